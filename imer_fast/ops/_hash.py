"""The 32-bit counter hash shared by the in-kernel random streams (attention dropout, sampler noise),
written with int64 tensors so the pure-torch twins reproduce the kernels bit for bit.

Arithmetic is on uint32 (wrapping); ``fmix32`` is MurmurHash3's finaliser, a bijection on uint32.
"""
from __future__ import annotations

from torch import Tensor

M32 = 0xFFFFFFFF
FMIX_C1, FMIX_C2, GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


def mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without int64 overflow: split c into 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def fmix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = mul32(x, FMIX_C1)
    x = x ^ (x >> 13)
    x = mul32(x, FMIX_C2)
    return x ^ (x >> 16)
