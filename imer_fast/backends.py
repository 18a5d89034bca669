"""Backend selection for imer_fast operators.

Every operator has exactly one selection function (``select_<op>_backend`` in its module) that walks
a priority list of backends and returns the first one whose conditions hold, together with the
reason each other backend was passed over. Backends:

- ``"triton"``: Triton kernels (``imer_fast._kernels``), CUDA tensors;
- ``"cpp"``: the C++ kernels of ``imer_fast._C``, CPU tensors;
- ``"reference"``: the pure-PyTorch ``<op>_ref`` twin, any device and dtype.

Force a backend for a block of code with ``with imer_fast.backends.force("reference"):`` or for a
whole process with the environment variable ``IMER_FAST_BACKEND=reference``. Ask why a backend was
not chosen with ``imer_fast.backends.explain(op_name, *example_args)``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

BACKENDS = ("triton", "cpp", "reference")

# A condition returns None when the backend can run, else the reason it cannot.
Condition = Callable[[], Optional[str]]

# A plain module global rather than a ContextVar: torch.compile can trace (and guard on) a global.
_forced: List[str] = []
_selectors: Dict[str, Callable[..., "Choice"]] = {}


@dataclass(frozen=True)
class Choice:
    """The backend an op will run on and why each other backend was not chosen."""

    op: str
    backend: str
    passed_over: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.op}: {self.backend}"]
        lines += [f"  not {name}: {why}" for name, why in self.passed_over.items()]
        return "\n".join(lines)


def _check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return backend


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`force` or by ``IMER_FAST_BACKEND``, if any."""
    name = (_forced[-1] if _forced else None) or os.environ.get("IMER_FAST_BACKEND") or None
    return _check_name(name) if name else None


@contextlib.contextmanager
def force(backend: str) -> Iterator[None]:
    """Run every imer_fast op inside the block on ``backend`` (an error if it cannot run there)."""
    _forced.append(_check_name(backend))
    try:
        yield
    finally:
        _forced.pop()


def choose(op: str, candidates: Sequence[Tuple[str, Condition]]) -> Choice:
    """First backend of ``candidates`` (priority order) whose condition holds, honouring ``force``."""
    forced = forced_backend()
    passed_over: Dict[str, str] = {}
    for name, condition in candidates:
        why_not = condition()
        if forced is not None and name != forced:
            why_not = f"backend {forced!r} is forced"
        if why_not is None:
            return Choice(op, name, passed_over)
        passed_over[name] = why_not
    if forced is not None:
        raise RuntimeError(f"{op}: the forced backend {forced!r} cannot run here: {passed_over.get(forced, 'not a backend of this op')}")
    raise RuntimeError(f"{op}: no backend can run these inputs: {passed_over}")


def register_selector(op: str):
    """Decorator recording an op's selection function so :func:`explain` can find it."""

    def wrap(fn):
        _selectors[op] = fn
        return fn

    return wrap


def explain(op: str, *args, **kwargs) -> Choice:
    """The :class:`Choice` the op would make for these arguments (its selection function's args)."""
    import imer_fast.ops  # noqa: F401  (registers the selectors)

    if op not in _selectors:
        raise ValueError(f"op must be one of {sorted(_selectors)}; got {op!r}")
    return _selectors[op](*args, **kwargs)


def registered_ops() -> List[str]:
    return sorted(_selectors)
