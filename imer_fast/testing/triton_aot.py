"""Compile every Triton kernel configuration imer_fast launches for a real GPU, on a machine without one.

The Triton interpreter (``TRITON_INTERPRET=1``), which the CPU test-suite runs the kernels on, executes
their Python with numpy semantics: it does not lower them, so it cannot see what only the compiler
checks (``tl.dot`` operand shapes and dtypes, layout conversions, shared memory and register limits).
Triton's own compiler needs no GPU to emit a cubin (it bundles ``ptxas``), so this module closes that
gap in two steps, in two processes because the interpreter is chosen at import time:

1. record, under ``TRITON_INTERPRET=1``: every kernel launch is recorded as (kernel, argument types,
   constexpr values, launch options), deduplicated, and written as JSON. Either
   ``python -m imer_fast.testing.triton_aot record OUT.json [--smoke]`` (the launches of
   :mod:`imer_fast.testing.triton_workload`) or, while tests run, the pytest plugin
   ``-p imer_fast.testing.triton_aot`` with ``IMER_FAST_TRITON_LAUNCHES=OUT.json``;
2. ``python -m imer_fast.testing.triton_aot compile LAUNCHES.json [...] --report REPORT.json [--arch 90]``
   (no interpreter): compiles each recorded configuration with ``triton.compile`` for that
   architecture and writes its shared memory, registers and stack bytes (spills; from the
   ``cuobjdump`` Triton bundles) or its compile error.

Run by ``tests/test_triton_compile.py``. Integers are typed as the JIT types them (``i32`` unless they
need 64 bits; an int argument equal to 1 becomes the constexpr 1 unless the kernel lists it in
``do_not_specialize``), so the code compiled is the JIT's up to its divisibility hints.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
H100_SHARED_BYTES = 232448  # opt-in dynamic shared memory per block on sm_90 (227 KiB)

_TORCH_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int32": "i32",
                 "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# ---- step 1: recording (under the interpreter) -----------------------------------------------------


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    return "constexpr" in str(parameter.annotation)


def _encode_constexpr(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"triton_aot: cannot record constexpr value {value!r} of type {type(value).__name__}")


def _type_of(name: str, value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_DTYPES[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"triton_aot: cannot type argument {name} = {value!r} ({type(value).__name__})")


def describe_launch(fn, args: tuple, kwargs: dict, do_not_specialize=()) -> dict:
    """The compile-relevant description of one launch of the Python kernel function ``fn``
    (``do_not_specialize``: the kernel's ``@triton.jit`` option, names or positions)."""
    parameters = list(inspect.signature(fn).parameters.values())
    unspecialised = {parameters[i].name if isinstance(i, int) else i for i in do_not_specialize or ()}
    bound: Dict[str, object] = {}
    for parameter, value in zip(parameters, args):
        bound[parameter.name] = value
    options = {}
    for key, value in kwargs.items():
        if key in LAUNCH_OPTIONS:
            options[key] = value
        else:
            bound[key] = value
    signature, constexprs = {}, {}
    for parameter in parameters:
        if parameter.name in bound:
            value = bound[parameter.name]
        elif parameter.default is not inspect.Parameter.empty:
            value = parameter.default
        else:
            raise TypeError(f"triton_aot: {fn.__name__} launched without argument {parameter.name}")
        # The JIT turns an int argument equal to 1 into a constexpr (a Python int, without .to() in the kernel).
        as_one = type(value) is int and value == 1 and parameter.name not in unspecialised
        if _is_constexpr(parameter) or value is None or as_one:
            signature[parameter.name] = "constexpr"
            constexprs[parameter.name] = _encode_constexpr(value)
        else:
            signature[parameter.name] = _type_of(parameter.name, value)
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


class LaunchRecorder:
    """Records every interpreted kernel launch from :meth:`start` on (Triton's interpreter must be on)."""

    def __init__(self):
        self.launches: Dict[str, dict] = {}

    def start(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("triton_aot: recording needs TRITON_INTERPRET=1 before triton is imported")
        original = InterpretedFunction.run
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            launch = describe_launch(self.fn, args, kwargs, self.kwargs.get("do_not_specialize"))
            recorder.launches.setdefault(json.dumps(launch, sort_keys=True), launch)
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def write(self, path) -> None:
        Path(path).write_text(json.dumps(sorted(self.launches.values(), key=json.dumps), indent=1))


class _PytestRecorder(LaunchRecorder):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def pytest_configure(self, config):
        self.start()

    def pytest_sessionfinish(self, session, exitstatus):
        self.write(self.path)


def pytest_configure(config):  # loaded with ``-p imer_fast.testing.triton_aot``
    path = os.environ.get("IMER_FAST_TRITON_LAUNCHES")
    if path:
        config.pluginmanager.register(_PytestRecorder(path), "imer_fast_triton_launches")


def record_workload(path, full: bool = True) -> int:
    """Run :func:`imer_fast.testing.triton_workload.workload` and record its launches; returns the count.
    A launch that fails inside the interpreter after being recorded (its half-precision numpy) is kept:
    only its configuration matters here."""
    from .triton_workload import workload

    recorder = LaunchRecorder()
    recorder.start()
    for call in workload(full):
        try:
            call()
        except Exception:  # noqa: BLE001 - see the docstring; coverage is checked on the recorded kernels
            pass
    recorder.write(path)
    return len(recorder.launches)


# ---- step 2: compiling (no interpreter) ------------------------------------------------------------


def _decode_constexpr(value):
    import triton.language as tl

    if isinstance(value, dict) and "tl_dtype" in value:
        return getattr(tl, value["tl_dtype"]) if hasattr(tl, value["tl_dtype"]) else tl.dtype(value["tl_dtype"])
    return value


def _jit_function(module: str, name: str):
    import importlib

    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(module), name)
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn  # through @triton.autotune / @triton.heuristics wrappers
    return kernel


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes of the cubin's kernel, read by the cuobjdump Triton bundles."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        done = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True, text=True)
    usage = {}
    for key, pattern in (("registers", r"REG:(\d+)"), ("stack_bytes", r"STACK:(\d+)")):
        found = re.search(pattern, done.stdout)
        if found:
            usage[key] = int(found.group(1))
    return usage


def compile_launch(launch: dict, arch: int) -> dict:
    """Compile one recorded configuration for ``sm_<arch>``; the report entry (launch + outcome)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    entry = dict(launch)
    try:
        kernel = _jit_function(launch["module"], launch["kernel"])
        constexprs = {name: _decode_constexpr(value) for name, value in launch["constexprs"].items()}
        source = ASTSource(fn=kernel, signature=dict(launch["signature"]), constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(launch["options"]))
        entry["shared_bytes"] = int(compiled.metadata.shared)
        entry["num_warps"] = int(compiled.metadata.num_warps)
        entry.update(_resource_usage(compiled.asm["cubin"]))
        entry["ok"] = True
    except Exception as error:  # noqa: BLE001 - every failure is reported, with its message
        entry["ok"] = False
        entry["error"] = f"{type(error).__name__}: {error}"[:4000]
    return entry


def compile_all(launches: List[dict], arch: int) -> Tuple[List[dict], int]:
    """Compile every launch (one process per core: each takes ~1 s of LLVM and ptxas)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        report = list(pool.map(compile_launch, launches, [arch] * len(launches)))
    return report, sum(not entry["ok"] for entry in report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="record the workload's launches (TRITON_INTERPRET=1)")
    record.add_argument("out", type=Path)
    record.add_argument("--smoke", action="store_true", help="the smoke subset (workload(full=False))")
    build = commands.add_parser("compile", help="compile recorded launches (TRITON_INTERPRET unset)")
    build.add_argument("launches", type=Path, nargs="+", help="JSON files written by the recording step")
    build.add_argument("--report", type=Path, required=True, help="where to write the compile report (JSON)")
    build.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    args = parser.parse_args(argv)
    if args.command == "record":
        print(f"{record_workload(args.out, full=not args.smoke)} launch configurations recorded")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    launches: Dict[str, dict] = {}
    for path in args.launches:
        for launch in json.loads(path.read_text()):
            launches.setdefault(json.dumps(launch, sort_keys=True), launch)
    report, failures = compile_all(list(launches.values()), args.arch)
    args.report.write_text(json.dumps(report, indent=1))
    print(f"{len(report)} configurations compiled for sm_{args.arch}, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
