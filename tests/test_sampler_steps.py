"""Sampler step ops and the counter normal generator: refs, release formulas, backends, errors."""
import math

import pytest
import torch

import imer_fast
from hypothesis import given, settings
from hypothesis import strategies as st

from imer_fast.ops.counter_rng import counter_normal, counter_normal_ref
from imer_fast.ops.sampler_steps import (add_scaled_noise, add_scaled_noise_ref, ddim_step, ddpm_step,
                                         diffusion_step_ref, ve_em_step, ve_em_step_ref)

SEED = torch.tensor(20261124, dtype=torch.int64)


def test_counter_normal_matches_ref_and_is_standard_normal(backend):
    n = 200_000 if backend != "triton" else 4096
    z = counter_normal(SEED, 5, (n,))
    torch.testing.assert_close(z, counter_normal_ref(SEED, 5, (n,)), rtol=1e-5, atol=2e-6)
    assert torch.equal(z, counter_normal(SEED, 5, (n,)))  # bitwise-repeatable
    if backend != "triton":
        assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
        assert abs((z ** 4).mean().item() - 3) < 0.1  # kurtosis of a normal


def test_counter_normal_distribution_ks():
    z = torch.sort(counter_normal(SEED, 0, (100_000,)).double()).values
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    empirical = torch.arange(1, z.numel() + 1, dtype=torch.float64) / z.numel()
    assert (cdf - empirical).abs().max().item() < 0.01  # Kolmogorov-Smirnov at n = 1e5


def test_counter_normal_streams_are_independent():
    a = counter_normal(SEED, 1, (50_000,))
    b = counter_normal(SEED, 2, (50_000,))
    c = counter_normal(SEED + 1, 1, (50_000,))
    for other in (b, c):
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 0.02
    lag = torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()
    assert abs(lag) < 0.02


def test_counter_normal_shape_dtype_and_prefix_property():
    z = counter_normal(SEED, 3, (2, 3, 4), dtype=torch.float64)
    assert z.shape == (2, 3, 4) and z.dtype == torch.float64
    flat = counter_normal(SEED, 3, (24,), dtype=torch.float64)
    assert torch.equal(z.flatten(), flat)  # element i depends on (seed, offset, i) only
    assert counter_normal(SEED, 3, (0, 4)).shape == (0, 4)


def release_ddim(x, eps, a, ap, eta, z, clip=True):
    """FedDISC's ddim_sample body, restated with float32 tensors."""
    a, ap = torch.tensor(a, dtype=torch.float32), torch.tensor(ap, dtype=torch.float32)
    x0 = (x - torch.sqrt(1.0 - a) * eps) / torch.sqrt(a)
    if clip:
        x0 = torch.clamp(x0, -1.0, 1.0)
    sigma = eta * torch.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    return torch.sqrt(ap) * x0 + torch.sqrt(1 - ap - sigma ** 2) * eps + sigma * z


@pytest.mark.parametrize("eta,clip", [(0.0, True), (1.0, True), (0.5, False)])
def test_ddim_step_matches_release_formula(backend, eta, clip):
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(3, 4, 6, generator=g) * 2 for _ in range(3))
    with torch.no_grad():
        got = ddim_step(x, eps, alpha_bar=0.3, alpha_bar_prev=0.6, eta=eta, clip_denoised=clip, noise=z)
    torch.testing.assert_close(got, release_ddim(x, eps, 0.3, 0.6, eta, z, clip), rtol=1e-5, atol=1e-5)


def test_ddpm_step_matches_release_formula(backend):
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(2, 5, 7, generator=g) for _ in range(3))
    coefs = dict(sqrt_recip_alphas_cumprod=1.7, sqrt_recipm1_alphas_cumprod=1.4, posterior_mean_coef1=0.3,
                 posterior_mean_coef2=0.6, posterior_log_variance_clipped=-2.5)
    x0 = (1.7 * x - 1.4 * eps).clamp(-1, 1)
    expected = 0.3 * x0 + 0.6 * x + math.exp(-1.25) * z
    with torch.no_grad():
        torch.testing.assert_close(ddpm_step(x, eps, noise=z, **coefs), expected, rtol=1e-5, atol=1e-5)
        no_noise = ddpm_step(x, eps, add_noise=False, **coefs)  # t == 0: neither noise nor seed needed
    torch.testing.assert_close(no_noise, 0.3 * x0 + 0.6 * x, rtol=1e-5, atol=1e-5)


def test_ve_em_step_matches_release_formula(backend):
    g = torch.Generator().manual_seed(2)
    x, score, z = (torch.randn(2, 3, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        nxt, mean = ve_em_step(x, score, g=4.0, step_size=0.01, noise=z)
    torch.testing.assert_close(mean, x + 16.0 * score * 0.01, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, mean + math.sqrt(0.01) * 4.0 * z, rtol=1e-5, atol=1e-5)


def test_add_scaled_noise_per_row_and_scalar(backend):
    x, z = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    std = torch.tensor([0.5, 1.0, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(add_scaled_noise(x, std, noise=z), x + std[:, None, None] * z)
        torch.testing.assert_close(add_scaled_noise(x, 0.25, noise=z), x + 0.25 * z)


@pytest.mark.parametrize("op", ["ddim", "ddpm", "em", "perturb"])
def test_seeded_noise_matches_ref_on_every_backend(backend, op):
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    z = counter_normal_ref(SEED, 11, x.shape)
    with torch.no_grad():
        if op == "ddim":
            got, want = (ddim_step(x, e, alpha_bar=0.4, alpha_bar_prev=0.5, eta=1.0, **kw) for kw in
                         (dict(seed=SEED, offset=11), dict(noise=z)))
        elif op == "ddpm":
            kw0 = dict(sqrt_recip_alphas_cumprod=1.1, sqrt_recipm1_alphas_cumprod=0.2, posterior_mean_coef1=0.5,
                       posterior_mean_coef2=0.4, posterior_log_variance_clipped=-1.0)
            got, want = (ddpm_step(x, e, **kw0, **kw) for kw in (dict(seed=SEED, offset=11), dict(noise=z)))
        elif op == "em":
            got, want = (ve_em_step(x, e, g=2.0, step_size=0.1, **kw)[0] for kw in
                         (dict(seed=SEED, offset=11), dict(noise=z)))
        else:
            got, want = (add_scaled_noise(x, torch.tensor([1.0, 3.0]), **kw) for kw in
                         (dict(seed=SEED, offset=11), dict(noise=z)))
        again = {"ddim": lambda: ddim_step(x, e, alpha_bar=0.4, alpha_bar_prev=0.5, eta=1.0, seed=SEED, offset=11)}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if op in again:
        with torch.no_grad():
            assert torch.equal(got, again[op]())


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), p=st.floats(0.1, 3), q=st.floats(-2, 2),
       sigma=st.floats(0, 2), clip=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_diffusion_step_fuzz_against_ref(shape, p, q, sigma, clip, dtype):
    x = torch.randn(shape, dtype=dtype)
    eps = torch.randn(shape, dtype=dtype)
    args = (x, eps, p, q, clip, 0.7, 0.2, 0.1, sigma, None, SEED.reshape(1), 4)
    got = torch.ops.imer_fast.diffusion_step(*args)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, diffusion_step_ref(*args), rtol=tol, atol=tol)


def test_non_contiguous_inputs(backend):
    x = torch.randn(4, 6, 3).transpose(0, 2)
    score = torch.randn(3, 6, 4)
    with torch.no_grad():
        nxt, mean = ve_em_step(x, score, g=1.5, step_size=0.2, seed=SEED, offset=0)
    want_next, want_mean = ve_em_step_ref(x.contiguous(), score, 1.5 ** 2 * 0.2, math.sqrt(0.2) * 1.5, None, SEED, 0)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(nxt, want_next, rtol=1e-5, atol=1e-5)
    y = torch.randn(5, 8)[:, ::2]
    with torch.no_grad():
        torch.testing.assert_close(add_scaled_noise(y, 2.0, seed=SEED, offset=1),
                                   add_scaled_noise_ref(y.contiguous(), None, 2.0, None, SEED, 1), rtol=1e-5, atol=1e-5)


def test_opcheck():
    x, e = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    seed = SEED.reshape(1)
    for op, args in ((torch.ops.imer_fast.diffusion_step.default, (x, e, 1.0, 0.5, True, 0.9, 0.1, 0.2, 0.3, None, seed, 2)),
                     (torch.ops.imer_fast.ve_em_step.default, (x, e, 0.1, 0.2, None, seed, 1)),
                     (torch.ops.imer_fast.add_scaled_noise.default, (x, torch.ones(2), 0.0, None, seed, 1)),
                     (torch.ops.imer_fast.counter_normal.default, (seed, 3, [2, 5], torch.float32))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_errors_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="pass noise .* or seed"):
        ddim_step(x, x, alpha_bar=0.5, alpha_bar_prev=0.6, eta=1.0)
    with pytest.raises(ValueError, match="eps must be a tensor of x's shape"):
        ddim_step(x, x[:1], alpha_bar=0.5, alpha_bar_prev=0.6)
    with pytest.raises(ValueError, match="alpha_bar must be in"):
        ddim_step(x, x, alpha_bar=0.0, alpha_bar_prev=0.6)
    with pytest.raises(ValueError, match="eta > 0 needs alpha_bar_prev >= alpha_bar"):
        ddim_step(x, x, alpha_bar=0.6, alpha_bar_prev=0.5, eta=1.0, seed=SEED)
    with torch.no_grad():  # eta = 0 towards more noise: a DDIM inversion step, no sigma to compute
        inverted = ddim_step(x, x, alpha_bar=0.6, alpha_bar_prev=0.5, clip_denoised=False)
    x0 = (x - math.sqrt(0.4) * x) / math.sqrt(0.6)
    torch.testing.assert_close(inverted, math.sqrt(0.5) * x0 + math.sqrt(0.5) * x)
    with pytest.raises(ValueError, match="seed must be a one-element int64 tensor"):
        ve_em_step(x, x, g=1.0, step_size=0.1, seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="offset must be an int"):
        ve_em_step(x, x, g=1.0, step_size=0.1, seed=SEED, offset=-1)
    with pytest.raises(ValueError, match=r"std must be a float or a \[B\] tensor"):
        add_scaled_noise(x, torch.ones(3), seed=SEED)
    with pytest.raises(ValueError, match="std must be a floating tensor; got torch.int64"):
        add_scaled_noise(x, torch.ones(2, dtype=torch.int64), seed=SEED)
    for g, step_size, bad in ((float("nan"), 0.1, "g"), (1.0, float("inf"), "step_size")):
        with pytest.raises(ValueError, match=f"{bad} .*must be finite"):
            ve_em_step(x, x, g=g, step_size=step_size, seed=SEED)
    with pytest.raises(ValueError, match="noise is torch.float64"):
        add_scaled_noise(x, 1.0, noise=x.double())
    with pytest.raises(ValueError, match="shape must have non-negative sizes"):
        counter_normal(SEED, 0, (-1, 2))


def _grad_inputs(*shapes, scale=1.0):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).requires_grad_() for shape in shapes]


STEP_CASES = {
    # clip on, with x0 = p·x − q·ε spread over ±3 so that both sides of the clamp are exercised
    "ddim_clip_eta": lambda x, e, z: ddim_step(x, e, alpha_bar=0.3, alpha_bar_prev=0.6, eta=0.7, noise=z),
    "ddim_seeded": lambda x, e, z: ddim_step(x, e, alpha_bar=0.3, alpha_bar_prev=0.6, eta=0.7, clip_denoised=False,
                                             seed=SEED, offset=3),
    "ddpm": lambda x, e, z: ddpm_step(x, e, sqrt_recip_alphas_cumprod=1.7, sqrt_recipm1_alphas_cumprod=1.4,
                                      posterior_mean_coef1=0.3, posterior_mean_coef2=0.6,
                                      posterior_log_variance_clipped=-2.5, noise=z),
    "em_next": lambda x, e, z: ve_em_step(x, e, g=4.0, step_size=0.01, noise=z)[0],
    "em_both": lambda x, e, z: sum(ve_em_step(x, e, g=4.0, step_size=0.01, noise=z)),
    "em_mean_seeded": lambda x, e, z: ve_em_step(x, e, g=4.0, step_size=0.01, seed=SEED, offset=1)[1],
    "perturb_rows": lambda x, e, z: add_scaled_noise(x, e[:, 0, 0].abs() + 0.1, noise=z),
    "perturb_rows_seeded": lambda x, e, z: add_scaled_noise(x, e[:, 0, 0].abs() + 0.1, seed=SEED, offset=2),
    "perturb_scalar": lambda x, e, z: add_scaled_noise(x, 0.3, noise=z),
}


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_step_gradients_gradcheck_and_match_the_ref(backend, case):
    """Backpropagating through a sampler (RoHyDR's DiT release trains through its DDIM loop): float64
    gradcheck of the op, and the op's gradients equal autograd through the pure-torch twin."""
    step = STEP_CASES[case]
    x, e, z = _grad_inputs((3, 2, 5), (3, 2, 5), (3, 2, 5), scale=1.5)
    assert torch.autograd.gradcheck(step, (x, e, z), eps=1e-6, atol=1e-7)
    out = step(x, e, z)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * weights).sum(), (x, e, z), allow_unused=True)
    with imer_fast.backends.force("reference"):
        out_ref = step(x, e, z)
        want = torch.autograd.grad((out_ref * weights).sum(), (x, e, z), allow_unused=True)
    tol = 1e-6 if backend == "triton" else 1e-12  # Triton takes scalar coefficients as float32
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for a, b in zip(got, want):
        assert (a is None) == (b is None) or (a if b is None else b).abs().max() == 0
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_step_gradients_in_float32_reach_the_inputs_dtype(backend):
    x, e = (t.detach().float().requires_grad_() for t in _grad_inputs((2, 4), (2, 4)))
    out = ddim_step(x, e, alpha_bar=0.5, alpha_bar_prev=0.8, clip_denoised=True)
    out.sum().backward()
    assert x.grad.dtype == torch.float32 and e.grad.dtype == torch.float32
    x0 = (x - math.sqrt(0.5) * e) / math.sqrt(0.5)
    inside = ((x0 >= -1) & (x0 <= 1)).float()
    torch.testing.assert_close(x.grad, math.sqrt(0.8) * inside / math.sqrt(0.5))


def test_opcheck_with_gradients():
    x, e, z = _grad_inputs((2, 3, 4), (2, 3, 4), (2, 3, 4))
    std = torch.rand(2, dtype=torch.float64).requires_grad_()
    seed = SEED.reshape(1)
    step = torch.ops.imer_fast.diffusion_step.default
    for op, args in ((step, (x, e, 1.0, 0.5, True, 0.9, 0.1, 0.2, 0.3, z, None, 0)),
                     (step, (x, e, 1.0, 0.5, False, 0.9, 0.1, 0.2, 0.3, None, seed, 2)),
                     (torch.ops.imer_fast.ve_em_step.default, (x, e, 0.1, 0.2, z, None, 1)),
                     (torch.ops.imer_fast.add_scaled_noise.default, (x, std, 0.0, None, seed, 1)),
                     (torch.ops.imer_fast.add_scaled_noise.default, (x, None, 0.4, z, None, 0))):
        torch.library.opcheck(op, args)
