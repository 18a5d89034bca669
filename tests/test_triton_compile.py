"""Every Triton kernel configuration imer_fast launches compiles for an H100 / H200 (sm_90), here.

The CPU test-suite runs the Triton kernels under the interpreter, which never lowers them; this test
records the launches the launchers make under the interpreter and compiles each one with Triton's
compiler for sm_90 (no GPU needed: Triton bundles ptxas), so a kernel that would fail to compile on
the GPU fails here (see :mod:`imer_fast.testing.triton_aot`). By default a smoke subset (~35
configurations, about a minute cold); ``IMER_FAST_AOT=1`` runs the full workload plus the RGCN and
dialogue-graph launches of ``tests/test_triton_kernels.py`` (~630 configurations, ~15 minutes on two
cores) and also checks that every ``_*_kernel`` of ``kernels/`` was compiled.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from imer_fast.testing.triton_aot import H100_SHARED_BYTES  # noqa: E402

# Recording patches InterpretedFunction.run, which older interpreters (triton 3.2) do not have.
pytestmark = pytest.mark.skipif(not hasattr(pytest.importorskip("triton.runtime.interpreter").InterpretedFunction,
                                            "run"), reason="this triton's interpreter cannot record launches "
                                                           "(no InterpretedFunction.run; triton 3.2)")

FULL = os.environ.get("IMER_FAST_AOT") == "1"
ROOT = Path(__file__).resolve().parents[1]


def _env(interpret: bool) -> dict:
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(args, env, timeout):
    done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _launched_kernels() -> set:
    import imer_fast._kernels as kernels

    names = set()
    for source in Path(kernels.__file__).parent.glob("*.py"):
        names |= set(re.findall(r"^def (_\w+_kernel)\(", source.read_text(), flags=re.M))
    return names


def test_every_recorded_launch_compiles_for_sm90(tmp_path):
    recorded = [tmp_path / "workload.json"]
    record = ["-m", "imer_fast.testing.triton_aot", "record", str(recorded[0])] + ([] if FULL else ["--smoke"])
    _run(record, _env(interpret=True), timeout=1800)
    if FULL:
        recorded.append(tmp_path / "graph_tests.json")
        env = dict(_env(interpret=True), IMER_FAST_TRITON_LAUNCHES=str(recorded[1]))
        _run(["-m", "pytest", "-q", "-p", "imer_fast.testing.triton_aot", "-p", "no:cacheprovider",
              "tests/test_triton_kernels.py"], env, timeout=1800)
    report_path = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "imer_fast.testing.triton_aot", "compile", *map(str, recorded),
                           "--report", str(report_path), "--arch", "90"], env=_env(interpret=False), cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    report = json.loads(report_path.read_text())
    failures = [f"{e['module']}.{e['kernel']} {e['signature']} {e['constexprs']}: {e['error']}" for e in report
                if not e["ok"]]
    assert not failures and done.returncode == 0, "\n\n".join(failures)[:8000] or done.stderr[-3000:]
    assert len(report) >= (500 if FULL else 25)
    too_big = [(e["kernel"], e["shared_bytes"]) for e in report if e["shared_bytes"] > H100_SHARED_BYTES]
    assert not too_big, f"shared memory above sm_90's {H100_SHARED_BYTES} bytes per block: {too_big}"
    kinds = {t for e in report for t in e["signature"].values()}
    assert {"*fp32", "*bf16"} <= kinds  # the smoke subset compiles the tensor-core (bf16) attention too
    if FULL:
        missing = _launched_kernels() - {e["kernel"] for e in report}
        assert not missing, f"kernels never launched by the workload or the graph tests: {sorted(missing)}"
        # The attention's tile table: at most a few dozen spilled bytes outside fp64 (gradcheck); with exact
        # fp32 products and the earlier tiles they reached 9.4 KB per thread.
        spills = [(e["kernel"], e["signature"]["q_ptr"], e["constexprs"]["BLOCK_D"], e["constexprs"]["BLOCK_M"],
                   e["constexprs"]["BLOCK_N"], e.get("stack_bytes")) for e in report
                  if e["kernel"].startswith("_attn_") and e["signature"].get("q_ptr", "*fp64") != "*fp64"
                  and (e.get("stack_bytes") or 0) > 256]
        assert not spills, f"attention tiles that spill over 256 bytes per thread on sm_90: {spills}"
        out = os.environ.get("IMER_FAST_AOT_REPORT")
        if out:
            _write_summary(Path(out), report)


def _write_summary(path: Path, report: list) -> None:
    """The compile report, one line per configuration, with the toolchain that produced it."""
    import platform

    import torch
    import triton

    rows = [json.dumps({"kernel": e["kernel"],
                        "pointers": sorted({t for t in e["signature"].values() if t[0] == "*"}),
                        "constexprs": e["constexprs"], "options": e["options"], "shared_bytes": e["shared_bytes"],
                        "registers": e.get("registers"), "stack_bytes": e.get("stack_bytes")}, sort_keys=True)
            for e in sorted(report, key=lambda e: (e["kernel"], json.dumps(e, sort_keys=True)))]
    header = {"target": "sm_90 (compiled on a CPU-only machine with Triton's bundled ptxas; no GPU ran)",
              "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
              "command": ("IMER_FAST_AOT=1 IMER_FAST_AOT_REPORT=<this file> "
                          "python -m pytest tests/test_triton_compile.py"),
              "configurations": len(rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(header, indent=1)[:-2] + ',\n "report": [\n  ' + ",\n  ".join(rows) + "\n ]\n}\n")
