"""Triton device helpers shared by the kernels of this package."""
import triton
import triton.language as tl


@triton.jit
def zeros_acc(ROWS: tl.constexpr, COLS: tl.constexpr, IS_FP64: tl.constexpr):
    """An accumulator tile in the accumulation dtype (fp64 for fp64 inputs, else fp32)."""
    if IS_FP64:
        out = tl.zeros((ROWS, COLS), dtype=tl.float64)
    else:
        out = tl.zeros((ROWS, COLS), dtype=tl.float32)
    return out
