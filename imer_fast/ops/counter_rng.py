"""Counter-based Gaussian noise: ``imer_fast::counter_normal`` and the spec every kernel follows.

Sampler noise is drawn inside the fused step kernels instead of by a separate ``torch.randn`` launch,
and it must not depend on host state, so that a whole sampling loop can be captured into one CUDA
graph and replayed with a new seed. Element ``i`` (flat index in x's logical row-major order) of
draw ``offset`` under ``seed`` (int64, given as a one-element tensor so it is read on the device) is

    s_lo, s_hi = low and high 32 bits of seed (two's complement)
    key = fmix(s_lo ^ fmix(offset * 0x9E3779B9 + s_hi))
    h1  = fmix(key ^ fmix(2i)),   h2 = fmix(key ^ fmix(2i + 1))
    u1  = ((h1 >> 8) + 1) / 2**24  in (0, 1],   u2 = (h2 >> 8) / 2**24  in [0, 1)
    z   = sqrt(-2 ln u1) * cos(2 pi u2)                       (Box-Muller)

with wrapping uint32 arithmetic and MurmurHash3's finaliser ``fmix`` (``imer_fast/ops/_hash.py``).
Limits, by construction: offsets in [0, 2**32), at most 2**31 elements per draw, 24-bit uniforms (so
|z| <= 5.77), and a 32-bit ``key``: (seed, offset) pairs are folded into 2**32 streams, so distinct pairs
can share one (seed 12345 at offset 0 and seed 2462719799 at offset 1 give the same noise; a review
found 3 coinciding draws among 3,000 seeds × 51 offsets). Harmless for sampling noise; do not rely on
distinct seeds for statistically independent streams across very many draws. Kernels evaluate the
logarithm and cosine in the output's precision (float32 for half types), so backends agree to a few
ulps, not bit for bit; each backend is bitwise-repeatable.

Backends: C++ (``csrc/cpu/counter_rng.h``), Triton (``kernels/sampler_steps.py``), and
:func:`counter_normal_ref` (float64 math, rounded to the output dtype).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .. import backends
from . import _runtime
from ._hash import GOLDEN, M32, fmix32, mul32

_runtime.require_cpp()

_OP = "imer_fast.counter_normal: "


def counter_uniforms_ref(seed: Tensor, offset: int, numel: int):
    """(u1, u2) float64 uniforms of the spec for flat indices 0 .. numel - 1 (on seed's device)."""
    s = int(seed.reshape(()).item())
    s_lo, s_hi = s & M32, (s >> 32) & M32
    key = fmix32(torch.tensor(s_lo) ^ fmix32(torch.tensor((offset * GOLDEN + s_hi) & M32)))
    c = mul32(torch.arange(numel, dtype=torch.int64), 2)
    h1 = fmix32(key ^ fmix32(c))
    h2 = fmix32(key ^ fmix32((c + 1) & M32))
    u1 = ((h1 >> 8) + 1).double() / 16777216.0
    u2 = (h2 >> 8).double() / 16777216.0
    return u1.to(seed.device), u2.to(seed.device)


def counter_normal_ref(seed: Tensor, offset: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The spec's normals in float64, rounded to ``dtype``, shaped ``shape``, on seed's device."""
    numel = math.prod(shape)
    u1, u2 = counter_uniforms_ref(seed, offset, numel)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype).reshape(tuple(shape))


@torch.library.register_fake("imer_fast::counter_normal")
def _counter_normal_fake(seed, offset, size, dtype):
    return seed.new_empty(size, dtype=dtype)


def _counter_normal_triton(seed, offset, size, dtype):
    from imer_fast._kernels import sampler_steps as kernels

    return kernels.counter_normal(seed, offset, size, dtype)


torch.library.register_kernel("imer_fast::counter_normal", "cuda", _counter_normal_triton)
_runtime.register_triton_cpu_route("counter_normal", _counter_normal_triton)


@backends.register_selector("counter_normal")
def select_counter_normal_backend(seed: Tensor) -> backends.Choice:
    """Priority: Triton (CUDA), C++ (CPU), reference."""
    on = seed.device
    return backends.choose("counter_normal", [
        ("triton", lambda: _runtime.triton_cannot_run(on)),
        ("cpp", lambda: _runtime.cpp_error() or (None if on.type == "cpu" else f"seed is on {on.type}, not cpu")),
        ("reference", lambda: None),
    ])


def check_seed(op: str, seed, offset: int, device: torch.device) -> None:
    """Shared argument checks for every op that draws from the counter generator."""
    if not isinstance(seed, Tensor) or seed.numel() != 1 or seed.dtype != torch.int64:
        got = f"{tuple(seed.shape)} {seed.dtype}" if isinstance(seed, Tensor) else type(seed).__name__
        raise ValueError(f"{op}seed must be a one-element int64 tensor; got {got}")
    if seed.device != device:
        raise ValueError(f"{op}seed is on {seed.device} but the output is on {device}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= M32:
        raise ValueError(f"{op}offset must be an int in [0, 2**32); got {offset!r}")


def counter_normal(seed: Tensor, offset: int, shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                   device=None) -> Tensor:
    """Standard normal noise of ``shape`` from the counter generator (module doc). ``seed``: one-element
    int64 tensor on the output device (``device`` defaults to seed's)."""
    device = seed.device if device is None and isinstance(seed, Tensor) else torch.device(device or "cpu")
    check_seed(_OP, seed, offset, device)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape) or math.prod(shape) >= 2 ** 31:
        raise ValueError(f"{_OP}shape must have non-negative sizes and fewer than 2**31 elements; got {shape}")
    if not dtype.is_floating_point:
        raise ValueError(f"{_OP}dtype must be floating; got {dtype}")
    if select_counter_normal_backend(seed).backend == "reference":
        return counter_normal_ref(seed, offset, shape, dtype)
    return torch.ops.imer_fast.counter_normal(seed.reshape(1), offset, list(shape), dtype)
