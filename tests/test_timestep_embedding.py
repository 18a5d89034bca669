"""Timestep embedding op: release formulas, ref twin, backends, gradients, opcheck, errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imer_fast.ops.timestep_embedding import (gaussian_fourier_embedding, sinusoidal_timestep_embedding,
                                              timestep_embedding_ref)


def release_sinusoidal(timesteps, dim, max_period=10000):
    """guided-diffusion / FedDISC timestep_embedding, restated from its formula."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None].to(timesteps.device)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def release_fourier(t, W):
    """IMDer GaussianFourierProjection.forward, restated from its formula."""
    proj = t[:, None] * W[None, :] * 2 * np.pi
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


@pytest.mark.parametrize("dim", [2, 7, 128, 256])
def test_sinusoidal_matches_release(backend, dim):
    t = torch.tensor([0, 1, 17, 499, 998, 999])
    out = sinusoidal_timestep_embedding(t, dim)
    assert out.shape == (6, dim) and out.dtype == torch.float32
    # Angles reach ~1e3 rad: one ulp of the angle is ~6e-5, so libm / Sleef / Triton sin differ there.
    torch.testing.assert_close(out, release_sinusoidal(t, dim), rtol=0, atol=2e-4)
    if dim % 2:
        assert torch.all(out[:, -1] == 0)


def test_frequency_cache_filled_under_inference_mode_serves_differentiable_calls(monkeypatch):
    import imer_fast.ops.timestep_embedding as module

    monkeypatch.setattr(module, "_SINUSOID_FREQS", {})   # the first call fills the cache, here in inference mode
    with torch.inference_mode():
        sinusoidal_timestep_embedding(torch.arange(4), 16)
    t = torch.tensor([0.5, 3.0, 40.0], requires_grad=True)
    (grad,) = torch.autograd.grad(sinusoidal_timestep_embedding(t, 16).sum(), t)
    freqs = torch.exp(-math.log(10000) * torch.arange(8, dtype=torch.float32) / 8)
    expected = (-torch.sin(t.detach()[:, None] * freqs) * freqs + torch.cos(t.detach()[:, None] * freqs) * freqs).sum(1)
    torch.testing.assert_close(grad, expected)


def test_sinusoidal_dim_one_is_a_zero_column():
    # The release returns [N, 0] here (its zero column is cut from an empty tensor); ours is [N, dim].
    assert torch.equal(sinusoidal_timestep_embedding(torch.arange(3), 1), torch.zeros(3, 1))


def test_sinusoidal_cpp_equals_release_closely():
    t = torch.arange(1000)
    torch.testing.assert_close(sinusoidal_timestep_embedding(t, 128), release_sinusoidal(t, 128), rtol=0, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fourier_matches_release(backend, dtype):
    torch.manual_seed(0)
    W = torch.randn(128, dtype=dtype) * 30
    t = torch.rand(9, dtype=dtype) * (1 - 1e-5) + 1e-5
    out = gaussian_fourier_embedding(t, W)
    assert out.shape == (9, 256) and out.dtype == dtype
    tol = 5e-4 if dtype == torch.float32 else 1e-10  # angles up to ~600 rad in float32
    torch.testing.assert_close(out, release_fourier(t, W), rtol=0, atol=tol)


def test_float32_sincos_accuracy_over_its_range():
    # The C++ float32 path reduces angles itself (Cephes, |angle| < 8192) and falls back to libm beyond.
    angles = torch.cat([torch.linspace(-8191.0, 8191.0, 200_003), torch.tensor([9000.0, -2e4, 1e-30, 0.0])])
    out = torch.ops.imer_fast.timestep_embedding(torch.ones(1), angles, 1.0, True, 2 * angles.numel())
    truth = angles.double()
    torch.testing.assert_close(out[0, :angles.numel()].double(), torch.sin(truth), rtol=0, atol=2e-7)
    torch.testing.assert_close(out[0, angles.numel():].double(), torch.cos(truth), rtol=0, atol=2e-7)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 40), half=st.integers(0, 70), odd=st.booleans(), sin_first=st.booleans(),
       scale=st.sampled_from([1.0, math.pi, 0.5]), integer_t=st.booleans())
def test_op_matches_ref_fuzz(n, half, odd, sin_first, scale, integer_t):
    torch.manual_seed(n * 131 + half)
    t = torch.randint(0, 1000, (n,)) if integer_t else torch.rand(n) * 3
    freqs = torch.randn(half, dtype=torch.float64)
    dim = 2 * half + int(odd)
    out = torch.ops.imer_fast.timestep_embedding(t, freqs, scale, sin_first, dim)
    torch.testing.assert_close(out, timestep_embedding_ref(t, freqs, scale, sin_first, dim), rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs_and_repeatability(backend):
    t = torch.rand(20)[::2]
    W = (torch.randn(64) * 30)[::2]
    out = gaussian_fourier_embedding(t, W)
    torch.testing.assert_close(out, release_fourier(t.contiguous(), W.contiguous()), rtol=0, atol=5e-4)
    assert torch.equal(out, gaussian_fourier_embedding(t, W))


def test_half_types_computed_in_float32():
    t = torch.rand(8)
    W = torch.randn(16)
    out = gaussian_fourier_embedding(t.to(torch.bfloat16), W.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = timestep_embedding_ref(t.to(torch.bfloat16), W.to(torch.bfloat16) * 2, math.pi, True, 32)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=1e-2)


def test_gradcheck_float64_time_and_frequencies():
    t = torch.rand(5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gaussian_fourier_embedding, (t, W))
    assert torch.autograd.gradgradcheck(gaussian_fourier_embedding, (t, W))
    freqs = torch.randn(4, dtype=torch.float64, requires_grad=True)
    op = lambda t, f: torch.ops.imer_fast.timestep_embedding(t, f, 0.7, False, 9)  # noqa: E731
    assert torch.autograd.gradcheck(op, (t, freqs))


def test_integer_times_get_no_gradient():
    W = torch.randn(8, requires_grad=True)
    out = torch.ops.imer_fast.timestep_embedding(torch.arange(4), W, 1.0, False, 16)
    out.sum().backward()
    torch.testing.assert_close(W.grad, torch.autograd.grad(
        timestep_embedding_ref(torch.arange(4), W, 1.0, False, 16).sum(), W)[0])


def test_opcheck():
    for args in ((torch.rand(6), torch.randn(5), math.pi, True, 10),
                 (torch.arange(7), torch.randn(4, dtype=torch.float64), 1.0, False, 9),
                 (torch.rand(6, dtype=torch.float64, requires_grad=True),
                  torch.randn(3, dtype=torch.float64, requires_grad=True), 2.0, True, 6)):
        torch.library.opcheck(torch.ops.imer_fast.timestep_embedding, args)


def test_torch_compile_traces_the_op():
    t, W = torch.rand(4), torch.randn(8)
    compiled = torch.compile(gaussian_fourier_embedding, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(t, W), gaussian_fourier_embedding(t, W))


@pytest.mark.parametrize("call, message", [
    (lambda: sinusoidal_timestep_embedding(torch.zeros(2, 2), 8), "t must be a one-dimensional"),
    (lambda: sinusoidal_timestep_embedding(torch.zeros(2, dtype=torch.bool), 8), "t must be a one-dimensional"),
    (lambda: sinusoidal_timestep_embedding(torch.zeros(2), 0), "dim must be a positive int"),
    (lambda: sinusoidal_timestep_embedding(torch.zeros(2), 8, max_period=0), "max_period must be a positive"),
    (lambda: gaussian_fourier_embedding(torch.zeros(2), torch.zeros(2, 2)), "W must be a one-dimensional floating"),
    (lambda: gaussian_fourier_embedding(torch.zeros(2), torch.zeros(3, dtype=torch.long)), "W must be"),
    (lambda: torch.ops.imer_fast.timestep_embedding(torch.zeros(2), torch.zeros(3), 1.0, True, 9),
     "dim must be 2 \\* freqs.numel\\(\\) = 6 or one more"),
])
def test_bad_input_errors(call, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        call()
