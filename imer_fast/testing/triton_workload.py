"""Representative launches of every imer_fast Triton launcher, for :mod:`imer_fast.testing.triton_aot`.

Run under the Triton interpreter on CPU tensors only to be *recorded*: the values are never checked
(the interpreter's half-precision arithmetic is not trustworthy), so small inputs suffice. What matters
is that every code path's compile-time configuration is launched: each dtype the launcher accepts
(float32, float64, float16, bfloat16), every constexpr flag, and the block sizes that the launchers
derive from the shapes (the smallest and the largest each can pick, from the systems' shapes: U-Net
GroupNorms, FedDISC's condition attention, MulT heads of dim 4 to 128, DRKF's long sequences).
The RGCN and dialogue-graph launchers need CSR inputs from the C++ extension; their launches are
recorded from ``tests/test_triton_kernels.py`` instead (``tests/test_triton_compile.py``, full mode).
"""
from __future__ import annotations

from typing import Callable, List

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _attention(dtype: torch.dtype, full: bool) -> List[Callable[[], object]]:
    from imer_fast._kernels.attention import attention_backward, attention_forward

    calls = []
    head_dims = (4, 8, 16, 32, 64, 128) if full else ((64,) if dtype == torch.bfloat16 else (8,))
    cases = ((65, 65, 2, 2, True, True, 0.0),   # the largest blocks (lengths > 64): MulT mask, key mask, nulls
             (20, 2, 8, 0, False, True, 0.0),   # FedDISC's condition attention: 1 null + 2 keys
             (33, 17, 2, 1, True, False, 0.1))  # causal with dropout
    for head_dim in head_dims:
        for lq, lk, heads, mask_kind, masked, null, dropout in cases if full else cases[:1]:
            def run(head_dim=head_dim, lq=lq, lk=lk, heads=heads, mask_kind=mask_kind, masked=masked, null=null,
                    dropout=dropout):
                gen = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(2, heads, n, head_dim, generator=gen).to(dtype) for n in (lq, lk, lk))
                key_mask = torch.rand(2, lk, generator=gen) > 0.2 if masked else None
                null_k = torch.randn(heads, 1, head_dim, generator=gen).to(dtype) if null else None
                null_v = torch.randn(heads, 1, head_dim, generator=gen).to(dtype) if null else None
                seed = torch.tensor(3) if dropout else None
                args = (key_mask, null_k, null_v, None, None, lq, lk, head_dim ** -0.5, mask_kind, dropout, seed)
                out, lse = attention_forward(q, k, v, *args)
                attention_backward(torch.ones_like(out), q, k, v, out, lse, *args, [True] * 5)
            calls.append(run)
        if not full:
            continue

        def varlen(head_dim=head_dim):
            lengths = torch.tensor([0, 5, 40, 41], dtype=torch.int32)
            q, k, v = (torch.randn(41, 2, head_dim).to(dtype) for _ in range(3))
            args = (None, None, None, lengths, lengths, 35, 35, head_dim ** -0.5, 2, 0.0, None)
            out, lse = attention_forward(q, k, v, *args)
            attention_backward(torch.ones_like(out), q, k, v, out, lse, *args, [True, True, True, False, False])
        calls.append(varlen)
    return calls


def _group_norm(dtype: torch.dtype, full: bool) -> List[Callable[[], object]]:
    from imer_fast._kernels.group_norm import group_norm_film_silu_backward, group_norm_film_silu_forward

    calls = []
    shapes = ((512, 8, 48, True), (128, 32, 6, False), (96, 8, 7, True))
    for channels, groups, length, film in shapes if full else shapes[:1]:
        def run(channels=channels, groups=groups, length=length, film=film):
            x = torch.randn(2, channels, length).to(dtype)
            weight, bias = torch.randn(channels).to(dtype), torch.randn(channels).to(dtype)
            input_bias = torch.randn(2, channels).to(dtype) if film else None
            scale = torch.randn(2, channels).to(dtype) if film else None
            shift = torch.randn(2, channels).to(dtype) if film else None
            for silu in (True, False):
                y, mean, rstd = group_norm_film_silu_forward(x, weight, bias, input_bias, scale, shift, groups, 1e-5,
                                                             silu)
                group_norm_film_silu_backward(torch.ones_like(y), x, weight, bias, input_bias, scale, shift, mean,
                                              rstd, groups, silu, [True] * 6)
                group_norm_film_silu_backward(torch.ones_like(y), x, None, None, None, None, None, mean, rstd,
                                              groups, silu, [False, True, True, False, False, False])
        calls.append(run)
    return calls


def _layer_norm(dtype: torch.dtype, full: bool) -> List[Callable[[], object]]:
    from imer_fast._kernels.layer_norm import stable_layer_norm_backward, stable_layer_norm_forward

    calls = []
    shapes = ((300, 32), (70, 256), (9, 1024))
    for rows, features in shapes if full else shapes[:1]:
        def run(rows=rows, features=features):
            x = torch.randn(rows, features).to(dtype)
            weight, bias = torch.randn(features).to(dtype), torch.randn(features).to(dtype)
            for stable, w, b in ((True, weight, None), (False, weight, bias), (True, None, None)):
                y, mean, rstd, row_max = stable_layer_norm_forward(x, w, b, 1e-5, stable)
                stable_layer_norm_backward(torch.ones_like(y), x, w, mean, rstd, row_max, [True, True, True])
        calls.append(run)
    return calls


def _winograd(dtype: torch.dtype, full: bool) -> List[Callable[[], object]]:
    from imer_fast._kernels.winograd_conv import winograd_conv1d

    calls = []
    for transformed in (4, 6, 8) if full else (8,):  # F(2, 3), F(4, 3), F(6, 3)
        for extras in (False, True) if full else (True,):
            def run(transformed=transformed, extras=extras):
                weight_tf = torch.randn(transformed, 64, 80).to(dtype)
                bias = torch.randn(80).to(dtype) if extras else None
                for batch, length in ((2, 13), (1, 2)):   # (1, 2): a single tile, n_tiles == 1
                    x = torch.randn(batch, 64, length).to(dtype)
                    residual = torch.randn(batch, 80, length).to(dtype) if extras else None
                    winograd_conv1d(x, weight_tf, bias, residual)
            calls.append(run)
    return calls


def _sampler_steps(dtype: torch.dtype, full: bool) -> List[Callable[[], object]]:
    from imer_fast._kernels import sampler_steps as steps

    seed = torch.tensor(11)

    def run():
        x, eps = torch.randn(3, 32, 8).to(dtype), torch.randn(3, 32, 8).to(dtype)
        noise = torch.randn(3, 32, 8).to(dtype)
        steps.counter_normal(seed, 5, (3, 32, 8), dtype)
        for clip in (True, False):
            steps.diffusion_step(x, eps, 1.1, 0.2, clip, 0.3, 0.4, 0.5, 0.1, None, seed, 7)
        steps.diffusion_step(x, eps, 1.1, 0.2, False, 0.3, 0.4, 0.5, 0.0, None, None, 0)
        steps.diffusion_step(x, eps, 1.1, 0.2, True, 0.3, 0.4, 0.5, 0.1, noise, None, 0)
        steps.ve_em_step(x, eps, 0.5, 0.2, None, seed, 3)
        steps.ve_em_step(x, eps, 0.5, 0.0, None, None, 0)
        steps.ve_em_step(x, eps, 0.5, 0.2, noise, None, 0)
        steps.add_scaled_noise(x, torch.rand(3), 0.0, None, seed, 1)
        steps.add_scaled_noise(x, None, 0.7, noise, None, 0)
    return [run]


def _timestep_embedding(dtype: torch.dtype, full: bool) -> List[Callable[[], object]]:
    from imer_fast._kernels.timestep_embedding import timestep_embedding

    def run():
        t = torch.arange(5)
        for half, dim, sin_first in ((64, 128, True), (64, 129, False), (3, 6, True)):
            timestep_embedding(t, torch.rand(half).to(dtype), 1.0, sin_first, dim)
    return [run]


def workload(full: bool = True) -> List[Callable[[], object]]:
    """The workload's launches as no-argument callables. ``full=False`` keeps a smoke subset (float32
    everywhere; bfloat16 for the tensor-core attention at head dim 64; one shape per family) that
    compiles in about a minute."""
    calls = []
    for dtype in FLOAT_DTYPES if full else (torch.float32, torch.bfloat16):
        for family in (_attention, _group_norm, _layer_norm, _winograd, _sampler_steps, _timestep_embedding):
            if full or dtype == torch.float32 or family is _attention:
                calls += family(dtype, full)
    return calls
