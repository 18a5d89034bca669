"""Triton kernels of the sampler updates and the counter normal generator.

Semantics: imer_fast/ops/sampler_steps.py and imer_fast/ops/counter_rng.py. Every kernel is a flat
elementwise pass over x's contiguous storage (strided inputs are made contiguous by the launcher),
so each element's noise is drawn from its flat index. The int64 seed is loaded from its device
tensor (no host sync, and a captured CUDA graph sees a new seed written into it). Half types are
computed in float32; float64 in float64, except the scalar coefficients: Triton passes Python floats
as float32, so float64 results on the GPU carry about 1e-7 relative error (the C++ kernels keep float64).
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 (wrapping multiplies, logical shifts)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _normal(seed_ptr, offset_mix, idx, COMPUTE: tl.constexpr):
    """The spec's z for flat indices ``idx`` (int64) of the draw whose offset·golden is offset_mix."""
    seed = tl.load(seed_ptr).to(tl.int64)
    s_lo, s_hi = seed.to(tl.uint32), (seed >> 32).to(tl.uint32)
    key = _fmix32(s_lo ^ _fmix32(offset_mix.to(tl.uint32) + s_hi))
    c = idx.to(tl.uint32) * 2
    h1 = _fmix32(key ^ _fmix32(c))
    h2 = _fmix32(key ^ _fmix32(c + 1))
    u1 = ((h1 >> 8) + 1).to(COMPUTE) * 5.9604644775390625e-08
    u2 = (h2 >> 8).to(COMPUTE) * 5.9604644775390625e-08
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _z(noise_ptr, seed_ptr, offset_mix, idx, mask, HAS_NOISE: tl.constexpr, COMPUTE: tl.constexpr):
    if HAS_NOISE:
        return tl.load(noise_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    return _normal(seed_ptr, offset_mix, idx, COMPUTE)


# offset_mix changes every sampler step: never specialised on its value (1 would become a constexpr int without
# .to(), and multiples of 16 a second compiled variant).
@triton.jit(do_not_specialize=["offset_mix"])
def _counter_normal_kernel(out_ptr, seed_ptr, offset_mix, n, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    z = _normal(seed_ptr, offset_mix, idx, COMPUTE)
    tl.store(out_ptr + idx, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["offset_mix"])
def _diffusion_step_kernel(x_ptr, eps_ptr, noise_ptr, seed_ptr, out_ptr, n, p, q, r, s, u, sigma, offset_mix,
                           CLIP: tl.constexpr, NOISY: tl.constexpr, HAS_NOISE: tl.constexpr,
                           COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    e = tl.load(eps_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    x0 = p * x - q * e
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    v = r * x0 + s * x + u * e
    if NOISY:
        v += sigma * _z(noise_ptr, seed_ptr, offset_mix, idx, mask, HAS_NOISE, COMPUTE)
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["offset_mix"])
def _ve_em_step_kernel(x_ptr, score_ptr, noise_ptr, seed_ptr, next_ptr, mean_ptr, n, drift, diffusion, offset_mix,
                       NOISY: tl.constexpr, HAS_NOISE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    sc = tl.load(score_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    m = x + drift * sc
    tl.store(mean_ptr + idx, m.to(mean_ptr.dtype.element_ty), mask=mask)
    if NOISY:
        m += diffusion * _z(noise_ptr, seed_ptr, offset_mix, idx, mask, HAS_NOISE, COMPUTE)
    tl.store(next_ptr + idx, m.to(next_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["offset_mix"])
def _add_scaled_noise_kernel(x_ptr, std_ptr, noise_ptr, seed_ptr, out_ptr, n, row, std_scalar, offset_mix,
                             PER_ROW: tl.constexpr, HAS_NOISE: tl.constexpr, COMPUTE: tl.constexpr,
                             BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    if PER_ROW:
        sd = tl.load(std_ptr + idx // row, mask=mask, other=0.0).to(COMPUTE)
    else:
        sd = std_scalar
    v = x + sd * _z(noise_ptr, seed_ptr, offset_mix, idx, mask, HAS_NOISE, COMPUTE)
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launchers (registered as the ops' CUDA kernels) ----------------------------------------------


def _compute(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(n):
    return (max(triton.cdiv(n, BLOCK), 1),)


def _offset_mix(offset):
    return (int(offset) * 0x9E3779B9) & 0xFFFFFFFF


def _noise_args(x, noise, seed):
    """(noise_ptr, seed_ptr, HAS_NOISE): unused pointers get x so every launch has valid arguments."""
    if noise is not None:
        return noise.contiguous(), x, True
    return x, (seed.reshape(1) if seed is not None else x), False


def counter_normal(seed, offset, size, dtype):
    out = torch.empty(size, dtype=dtype, device=seed.device)
    n = out.numel()
    if n:
        _counter_normal_kernel[_grid(n)](out, seed.reshape(1), _offset_mix(offset), n, COMPUTE=_compute(dtype),
                                         BLOCK=BLOCK)
    return out


def diffusion_step(x, eps, p, q, clip, r, s, u, sigma, noise, seed, offset):
    x, eps = x.contiguous(), eps.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        noise_arg, seed_arg, has_noise = _noise_args(x, noise, seed)
        _diffusion_step_kernel[_grid(n)](x, eps, noise_arg, seed_arg, out, n, float(p), float(q), float(r), float(s),
                                         float(u), float(sigma), _offset_mix(offset), CLIP=bool(clip),
                                         NOISY=sigma != 0.0, HAS_NOISE=has_noise, COMPUTE=_compute(x.dtype),
                                         BLOCK=BLOCK)
    return out


def ve_em_step(x, score, drift, diffusion, noise, seed, offset):
    x, score = x.contiguous(), score.contiguous()
    nxt, mean = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    if n:
        noise_arg, seed_arg, has_noise = _noise_args(x, noise, seed)
        _ve_em_step_kernel[_grid(n)](x, score, noise_arg, seed_arg, nxt, mean, n, float(drift), float(diffusion),
                                     _offset_mix(offset), NOISY=diffusion != 0.0, HAS_NOISE=has_noise,
                                     COMPUTE=_compute(x.dtype), BLOCK=BLOCK)
    return nxt, mean


def add_scaled_noise(x, std, std_scalar, noise, seed, offset):
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        noise_arg, seed_arg, has_noise = _noise_args(x, noise, seed)
        per_row = std is not None
        std_arg = std.to(torch.float64).contiguous() if per_row else x
        row = n // x.shape[0] if per_row and x.shape[0] else 1
        _add_scaled_noise_kernel[_grid(n)](x, std_arg, noise_arg, seed_arg, out, n, row, float(std_scalar),
                                           _offset_mix(offset), PER_ROW=per_row, HAS_NOISE=has_noise,
                                           COMPUTE=_compute(x.dtype), BLOCK=BLOCK)
    return out
