"""What this process can run: the compiled extension, Triton, and Triton-on-CPU for tests."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from typing import Callable, Dict, Iterator, Optional

import torch

_triton_cpu_routes: Dict[str, Callable] = {}
_triton_on_cpu = False


def _probe_cpp() -> Optional[str]:
    try:
        importlib.import_module("imer_fast._C")
    except ImportError as err:  # pragma: no cover - only without a built extension
        return f"imer_fast._C is not built ({err}); run `pip install --no-build-isolation -e .`"
    return None


# Probed once at import, and kept in plain globals so torch.compile can trace the selection functions.
_CPP_ERROR = _probe_cpp()
_TRITON_ERROR = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def cpp_error() -> Optional[str]:
    """None when ``imer_fast._C`` (the C++ kernels and the operator schemas) is loaded."""
    return _CPP_ERROR


def require_cpp() -> None:
    if _CPP_ERROR is not None:
        raise ImportError(_CPP_ERROR)


def triton_error() -> Optional[str]:
    """None when Triton is installed."""
    return _TRITON_ERROR


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"



def triton_cannot_run(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on tensors of ``device``, or None."""
    err = triton_error()
    if err is not None:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _triton_on_cpu:
        return None
    return f"tensors are on {device.type}; Triton runs on cuda (or on cpu inside imer_fast.ops.triton_on_cpu())"


def register_triton_cpu_route(op: str, kernel: Callable) -> None:
    """Record the Triton implementation that :func:`triton_on_cpu` installs for ``op``'s CPU key."""
    _triton_cpu_routes[op] = kernel


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Route every imer_fast op's CPU dispatch to its Triton kernels, run by the Triton interpreter.

    For tests on machines without a GPU: needs ``TRITON_INTERPRET=1`` in the environment before
    Triton is first imported. Leaving the block restores the C++ kernels.
    """
    global _triton_on_cpu
    if not triton_interpreter():
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is imported")
    if _triton_on_cpu:
        yield
        return
    with torch.library._scoped_library("imer_fast", "IMPL") as lib:
        with warnings.catch_warnings():  # overriding the C++ CPU kernels is the point here
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for op, kernel in _triton_cpu_routes.items():
                lib.impl(op, kernel, "CPU")
        _triton_on_cpu = True
        try:
            yield
        finally:
            _triton_on_cpu = False


def under_autocast(*tensors: Optional[torch.Tensor]) -> tuple:
    """Inside ``torch.autocast`` on the first tensor's device type, the float16 / bfloat16 / float32 tensors
    cast to float32, so that an op that takes one dtype for all its inputs (bf16 activations, fp32
    parameters under autocast) computes in float32, as torch's normalisations do and as the operators'
    autocast registrations (ops/__init__.py) run them. Returns the tensors unchanged outside autocast
    (float64 and non-floating tensors always)."""
    first = tensors[0] if tensors and isinstance(tensors[0], torch.Tensor) else None  # callers pass x first
    if first is None or first.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(first.device.type):
        return tensors
    castable = (torch.float16, torch.bfloat16, torch.float32)
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in castable else t for t in tensors)
