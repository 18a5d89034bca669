"""GaussianDiffusion: schedules, loss and samplers against the release-semantics reference and closed forms."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from imer_fast.diffusion.gaussian import (GaussianDiffusion, ddim_timestep_sequence, dpm_solver_timesteps,
                                          linear_beta_schedule)
from imer_fast.testing.reference_feddisc import ReferenceGaussianDiffusion


class TinyDenoiser(nn.Module):
    """A small conditional ε-model: enough structure (x, t and y all matter) to expose ordering bugs."""

    def __init__(self, channels=4, classes=3):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.cond = nn.Linear(classes, channels)
        self.time = nn.Linear(1, channels)

    def forward(self, x, t, y):
        tt = self.time(t.to(self.time.weight.dtype)[:, None] / 1000.0)
        return torch.tanh(self.conv(x) + (self.cond(y) + tt)[:, :, None])


class GaussianEps(nn.Module):
    """The exact ε-prediction for data x0 ~ N(mu, s²) per element: E[ε | x_t] = σ (x_t − α μ) / (α² s² + σ²)."""

    def __init__(self, diffusion, mu, s):
        super().__init__()
        self.ab = diffusion.alphas_cumprod.float()
        self.mu, self.s = mu, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        ab = self.ab[t].view(-1, 1, 1)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        return sigma * (x - alpha * self.mu) / (ab * self.s ** 2 + sigma ** 2)


def _pair(T=1000, schedule="linear"):
    return GaussianDiffusion(T, schedule), ReferenceGaussianDiffusion(T, schedule)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_buffers_match_reference(schedule):
    ours, ref = _pair(200, schedule)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_linear_schedule_closed_form():
    betas = linear_beta_schedule(500)
    assert betas[0].item() == pytest.approx(2 * 1e-4) and betas[-1].item() == pytest.approx(2 * 0.02)


@pytest.mark.parametrize("method,n", [("quad", 50), ("uniform", 50), ("quad", 7), ("uniform", 20)])
def test_ddim_sequence_release_formula(method, n):
    T = 1000
    seq, prev = ddim_timestep_sequence(T, n, method)
    if method == "uniform":
        expected = np.arange(0, T, T // n) + 1
    else:
        expected = np.floor(np.linspace(0, math.sqrt(0.8 * T), n) ** 2).astype(int) + 1
    np.testing.assert_array_equal(seq, expected)
    np.testing.assert_array_equal(prev, np.concatenate([[0], expected[:-1]]))


def test_q_sample_and_loss_match_reference():
    ours, ref = _pair()
    torch.manual_seed(0)
    model = TinyDenoiser()
    x0 = torch.rand(5, 4, 8) * 2 - 1
    y = torch.softmax(torch.randn(5, 3), 1)
    t = torch.randint(0, 1000, (5,))
    noise = torch.randn_like(x0)
    torch.testing.assert_close(ours.q_sample(x0, t, noise), ref.q_sample(x0, t, noise), rtol=0, atol=0)
    torch.manual_seed(3)
    expected = ref.train_losses(model, x0, t, y)
    torch.manual_seed(3)
    torch.testing.assert_close(ours.train_losses(model, x0, t, y), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method,eta", [("quad", 0.0), ("uniform", 0.0), ("quad", 1.0), ("uniform", 0.5)])
def test_ddim_sample_equals_reference_under_same_torch_seed(method, eta):
    ours, ref = _pair()
    torch.manual_seed(1)
    model = TinyDenoiser()
    y = torch.softmax(torch.randn(3, 3), 1)
    torch.manual_seed(7)
    expected = ref.ddim_sample(model, y, 8, batch_size=3, channels=4, ddim_timesteps=20,
                               ddim_discr_method=method, ddim_eta=eta)
    after_ref = torch.rand(())
    torch.manual_seed(7)
    got = ours.ddim_sample(model, y, 8, batch_size=3, channels=4, ddim_timesteps=20, ddim_discr_method=method,
                           ddim_eta=eta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.rand(()) == after_ref  # the global RNG stream is left where the release leaves it


def test_ddim_explicit_start_noise_is_deterministic_and_matches_reference():
    ours, ref = _pair()
    torch.manual_seed(2)
    model = TinyDenoiser()
    y = torch.softmax(torch.randn(4, 3), 1)
    x_T = torch.randn(4, 4, 8)
    got = ours.ddim_sample(model, y, 8, batch_size=4, channels=4, noise=x_T)
    again = ours.ddim_sample(model, y, 8, batch_size=4, channels=4, noise=x_T)
    assert torch.equal(got, again)
    expected = _reference_ddim_from(ref, model, y, x_T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _reference_ddim_from(ref, model, y, x_T):
    """The reference DDIM loop started from an explicit x_T (eta 0: no other randomness)."""
    original = torch.randn

    def first_draw_is_x_T(*args, **kwargs):
        torch.randn = original
        return x_T.clone()

    torch.randn = first_draw_is_x_T
    try:
        return ref.ddim_sample(model, y, x_T.shape[2], batch_size=x_T.shape[0], channels=x_T.shape[1])
    finally:
        torch.randn = original


def test_ddpm_sample_equals_reference_under_same_torch_seed():
    ours, ref = _pair(60)
    torch.manual_seed(4)
    model = TinyDenoiser()
    y = torch.softmax(torch.randn(2, 3), 1)
    torch.manual_seed(11)
    expected = ref.sample(model, y, 8, batch_size=2, channels=4)
    torch.manual_seed(11)
    got = ours.sample(model, y, 8, batch_size=2, channels=4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_p_sample_per_element_timesteps_match_reference():
    ours, ref = _pair()
    torch.manual_seed(6)
    model = TinyDenoiser()
    x = torch.randn(4, 4, 8)
    y = torch.softmax(torch.randn(4, 3), 1)
    t = torch.tensor([0, 10, 500, 999])
    torch.manual_seed(9)
    expected = ref.p_sample(model, x, t, y)
    torch.manual_seed(9)
    torch.testing.assert_close(ours.p_sample(model, x, t, y), expected, rtol=0, atol=0)


def test_seed_mode_is_repeatable_and_seed_dependent():
    ours = GaussianDiffusion(100)
    torch.manual_seed(0)
    model = TinyDenoiser()
    y = torch.softmax(torch.randn(3, 3), 1)
    a = ours.ddim_sample(model, y, 8, 3, 4, ddim_timesteps=10, ddim_eta=1.0, seed=5)
    b = ours.ddim_sample(model, y, 8, 3, 4, ddim_timesteps=10, ddim_eta=1.0, seed=5)
    c = ours.ddim_sample(model, y, 8, 3, 4, ddim_timesteps=10, ddim_eta=1.0, seed=6)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    d = ours.sample(model, y, 8, 3, 4, seed=5)
    assert torch.equal(d, ours.sample(model, y, 8, 3, 4, seed=5))


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_10", "dpm_solver_20"])
def test_samplers_recover_gaussian_data_distribution(sampler):
    """With the exact ε of N(μ, s²) data, the deterministic samplers must map N(0, I) onto N(μ, s²)."""
    diffusion = GaussianDiffusion(1000)
    mu, s = 0.3, 0.2
    model = GaussianEps(diffusion, mu, s)
    y = torch.zeros(4096, 1)
    gen = torch.Generator().manual_seed(0)
    if sampler == "ddim":
        x = diffusion.ddim_sample(model, y, 4, 4096, 1, clip_denoised=False, generator=gen)
    else:
        steps = int(sampler.rsplit("_", 1)[1])
        x = diffusion.dpm_solver_sample(model, y, 4, 4096, 1, steps=steps, clip_denoised=False, generator=gen)
    assert abs(x.mean().item() - mu) < 0.01
    assert abs(x.std().item() - s) < 0.01


def test_dpm_solver_clips_as_ddim_does():
    """With x0 clipping active (data of std 2 against the [-1, 1] clip), DPM-Solver++ must converge to
    what many-step clipped DDIM gives from the same x_T (clip x0, keep the model's ε), and its first
    step must be exactly a clipped DDIM step, not a saturated flow of its own."""
    diffusion = GaussianDiffusion(1000)
    model = GaussianEps(diffusion, 0.0, 2.0)
    y = torch.zeros(512, 1)
    x_t = torch.randn(512, 1, 4, generator=torch.Generator().manual_seed(0))
    ddim = diffusion.ddim_sample(model, y, 4, 512, 1, ddim_timesteps=999, ddim_discr_method="uniform", noise=x_t)
    dpm = diffusion.dpm_solver_sample(model, y, 4, 512, 1, steps=200, noise=x_t)
    assert (dpm - ddim).abs().max().item() < 0.05
    one = diffusion.dpm_solver_sample(model, y, 4, 512, 1, steps=1, spacing="time_uniform", noise=x_t)
    ab = diffusion.alphas_cumprod.float()
    eps = model(x_t, torch.full((512,), 999), y)
    x0 = ((x_t - (1 - ab[999]).sqrt() * eps) / ab[999].sqrt()).clamp(-1, 1)
    expected = ab[0].sqrt() * x0 + (1 - ab[0]).sqrt() * eps
    torch.testing.assert_close(one, expected, rtol=1e-4, atol=2e-4)  # 1/α(999) ≈ 160 amplifies rounding


def test_dpm_solver_timesteps():
    diffusion = GaussianDiffusion(1000)
    for spacing in ("time_uniform", "logSNR"):
        ts = dpm_solver_timesteps(diffusion.alphas_cumprod, 10, spacing)
        assert ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError, match="spacing"):
        dpm_solver_timesteps(diffusion.alphas_cumprod, 10, "karras")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="beta_schedule"):
        GaussianDiffusion(10, "sigmoid")
    with pytest.raises(ValueError, match="ddim_discr_method"):
        ddim_timestep_sequence(1000, 50, "cubic")
    with pytest.raises(ValueError, match="ddim_timesteps"):
        ddim_timestep_sequence(100, 500, "quad")
    # the release's +1 shift runs past the last trained step (it would index out of range)
    with pytest.raises(ValueError, match=r"ddim_timesteps=1000 with 'uniform' spacing .* reaches t=1000"):
        ddim_timestep_sequence(1000, 1000, "uniform")
    with pytest.raises(ValueError, match=r"reaches t=5, past the last trained step 4"):
        ddim_timestep_sequence(5, 3, "quad")
    assert ddim_timestep_sequence(1000, 999, "uniform")[0][998] == 999  # the longest that fits
    with pytest.raises(ValueError, match=r"timesteps must be an int > 20 for the linear schedule"):
        GaussianDiffusion(20)
    GaussianDiffusion(20, "cosine")  # bounded by construction
    diffusion = GaussianDiffusion(100)
    model = TinyDenoiser()
    x0 = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 99\]"):
        diffusion.q_sample(x0, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="t must be an integer tensor"):
        diffusion.q_sample(x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="y must be a tensor with batch_size=3"):
        diffusion.ddim_sample(model, torch.zeros(2, 3), 8, 3, 4)
    with pytest.raises(ValueError, match="noise must have shape"):
        diffusion.ddim_sample(model, torch.zeros(2, 3), 8, 2, 4, noise=torch.zeros(2, 4, 9))
    with pytest.raises(ValueError, match="either generator"):
        diffusion.ddim_sample(model, torch.zeros(2, 3), 8, 2, 4, generator=torch.Generator(), seed=1)
    y = torch.zeros(2, 3)
    for bad in (3.0, True):  # a float or bool step count is a mistake, not something to round
        with pytest.raises(ValueError, match="ddim_timesteps must be an int"):
            diffusion.ddim_sample(model, y, 8, 2, 4, ddim_timesteps=bad)
    with pytest.raises(ValueError, match="num_steps must be an int"):
        diffusion.sample(model, y, 8, 2, 4, num_steps=2.5)
    with pytest.raises(ValueError, match="steps must be an int"):
        diffusion.dpm_solver_sample(model, y, 8, 2, 4, steps=2.5)
    with pytest.raises(ValueError, match="timesteps must be an int"):
        GaussianDiffusion(True, "cosine")
    with pytest.raises(ValueError, match=r"ddim_eta must be in \[0, 1\]"):
        diffusion.ddim_sample(model, y, 8, 2, 4, ddim_eta=1.5)
    with pytest.raises(ValueError, match="generator must be a torch.Generator; got int"):
        diffusion.ddim_sample(model, y, 8, 2, 4, generator=3)
    with pytest.raises(ValueError, match=r"seed must fit in int64"):
        diffusion.ddim_sample(model, y, 8, 2, 4, seed=2 ** 63)
    with pytest.raises(ValueError, match=r"p_sample: noise must have x_t's shape \(2, 4, 8\)"):
        diffusion.p_sample(model, x0, torch.tensor([3, 3]), y, noise=torch.zeros(1, 4, 8))
    numpy_steps = diffusion.ddim_sample(model, y, 8, 2, 4, ddim_timesteps=np.int64(5), seed=0)
    torch.testing.assert_close(numpy_steps, diffusion.ddim_sample(model, y, 8, 2, 4, ddim_timesteps=5, seed=0),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"noise must have x_start's shape \(2, 4, 8\)"):
        diffusion.q_sample(x0, torch.tensor([0, 1]), noise=torch.zeros(1, 4, 8))
    for method in (diffusion.q_mean_variance, lambda x, t: diffusion.predict_start_from_noise(x, t, x),
                   lambda x, t: diffusion.q_posterior_mean_variance(x, x, t)):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 99\]"):
            method(x0, torch.tensor([0, 100]))


def test_v_prediction_samples_in_the_models_dtype():
    """The v → ε wrapper exposes the model's parameters, so the samplers start from noise of its dtype."""
    diffusion = GaussianDiffusion(timesteps=50)
    model = TinyDenoiser().double()
    y = torch.softmax(torch.randn(2, 3, dtype=torch.float64), 1)
    out = diffusion.ddim_sample(diffusion.noise_predictor(model, "v"), y, 8, 2, 4, ddim_timesteps=5, seed=3)
    assert out.dtype == torch.float64


def test_v_prediction_loss_and_noise_predictor_from_the_definition():
    """v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 (Salimans & Ho); a perfect v-predictor turned into an ε-predictor
    returns the exact noise, in float64."""
    diffusion = GaussianDiffusion(timesteps=50)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    noise = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 5, 17, 30, 44, 49])
    abar = diffusion.alphas_cumprod[t].view(-1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def oracle_v(x, tt, y):          # knows x0 and noise; checks it is called on x_t
        torch.testing.assert_close(x, x_t.float(), rtol=0, atol=1e-6)
        return v.float()

    eps = diffusion.noise_predictor(oracle_v, "v")(x_t.float(), t, None)
    torch.testing.assert_close(eps.double(), noise, rtol=0, atol=1e-5)
    zero = diffusion.train_losses(oracle_v, x0.float(), t, None, noise=noise.float(), prediction="v")
    assert zero.item() < 1e-10
    shifted = diffusion.train_losses(lambda x, tt, y: v.float() + 0.5, x0.float(), t, None, noise=noise.float(),
                                     prediction="v")
    assert shifted.item() == pytest.approx(0.25, rel=1e-5)
    model = lambda x, tt, y: x  # noqa: E731
    assert diffusion.noise_predictor(model, "eps") is model
    with pytest.raises(ValueError, match="prediction must be one of"):
        diffusion.train_losses(model, x0.float(), t, None, prediction="x0")


@pytest.mark.parametrize("clip", [True, False])
def test_differentiable_ddim_matches_a_pure_torch_loop_in_value_and_gradient(clip):
    """``differentiable=True`` (RoHyDR's DiT release trains through its sampler): same value as the no-grad
    sampler, and gradients for the denoiser and the condition equal autograd through the DDIM math."""
    ours, _ = _pair()
    torch.manual_seed(3)
    model = TinyDenoiser().double()
    y = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1).requires_grad_()
    x_T = torch.randn(4, 4, 8, dtype=torch.float64) * 2
    kwargs = dict(batch_size=4, channels=4, ddim_timesteps=6, ddim_discr_method="uniform", clip_denoised=clip,
                  noise=x_T)
    plain = ours.ddim_sample(model, y, 8, **kwargs)
    assert not plain.requires_grad
    got = ours.ddim_sample(model, y, 8, differentiable=True, **kwargs)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    seq, prev = ddim_timestep_sequence(ours.timesteps, 6, "uniform")
    x = x_T
    for i in reversed(range(6)):
        # the sampler reads the schedule in float32, as the release keeps it
        a, ap = (float(ours.alphas_cumprod[j].float()) for j in (seq[i], prev[i]))
        eps = model(x, torch.full((4,), int(seq[i])), y)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(ap) * (x0.clamp(-1, 1) if clip else x0) + math.sqrt(1 - ap) * eps
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)
    weights = torch.randn(x.shape, dtype=torch.float64)
    inputs = (y, *model.parameters())
    want = torch.autograd.grad((x * weights).sum(), inputs)
    have = torch.autograd.grad((got * weights).sum(), inputs)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
