"""VE-SDE (IMDer): the schedule against its closed form and the release-semantics reference, the
score-matching loss and the Euler–Maruyama sampler against the reference under the same torch seed
(float32 and float64), the counter-noise mode (offsets, repeatability, no host RNG), sampling
accuracy on Gaussian data with the exact score, and argument errors."""
import functools
import math

import pytest
import torch

from imer_fast.diffusion.ve_sde import VESDE, euler_maruyama_sampler, ve_sde_loss
from imer_fast.nn.score_net import ScoreNet
from imer_fast.ops.counter_rng import counter_normal
from imer_fast.testing.reference_imder import (
    ReferenceScoreNet,
    diffusion_coeff,
    marginal_prob_std,
    reference_euler_maruyama_sampler,
    reference_loss_fn,
)

SIGMA = 25.0
SDE = VESDE(SIGMA)
REF_STD = functools.partial(marginal_prob_std, sigma=SIGMA)
REF_G = functools.partial(diffusion_coeff, sigma=SIGMA)
SMALL = dict(channels=[32, 32, 64, 64], embed_dim=64)


def models(dtype=torch.float32, seed=0):
    """(ours, reference) ScoreNets with the same weights (release default widths)."""
    torch.manual_seed(seed)
    ref = ReferenceScoreNet(REF_STD).to(dtype)
    ours = ScoreNet(SDE.marginal_prob_std).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def data(batch=2, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 32, 48, generator=gen, dtype=dtype),
            torch.randn(batch, 32, 48, generator=gen, dtype=dtype))


# ---- schedule ------------------------------------------------------------------------------------


def test_schedule_matches_closed_form_and_the_release_bit_for_bit():
    t64 = torch.linspace(0, 1, 101, dtype=torch.float64)
    want_std = torch.sqrt((SIGMA ** (2 * t64) - 1) / (2 * math.log(SIGMA)))
    torch.testing.assert_close(SDE.marginal_prob_std(t64), want_std, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(SDE.diffusion_coeff(t64), SIGMA ** t64, rtol=1e-14, atol=0)
    assert SDE.marginal_prob_std(0.0).item() == 0.0
    assert math.isclose(SDE.marginal_prob_std(1.0).item() ** 2, (SIGMA ** 2 - 1) / (2 * math.log(SIGMA)), rel_tol=1e-6)
    for dtype in (torch.float32, torch.float64):
        t = torch.rand(257, dtype=dtype)
        assert SDE.marginal_prob_std(t).dtype == dtype and SDE.diffusion_coeff(t).dtype == dtype
        assert torch.equal(SDE.marginal_prob_std(t), REF_STD(t))
        assert torch.equal(SDE.diffusion_coeff(t), REF_G(t))
    assert SDE.marginal_prob_std(0.5).dtype == torch.get_default_dtype()
    assert SDE.marginal_prob_std(torch.rand(3, device="meta")).device.type == "meta"


def test_variance_grows_at_the_rate_of_the_squared_diffusion():
    # VE-SDE consistency: d std(t)² / dt = g(t)².
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    slope = (SDE.marginal_prob_std(t + h) ** 2 - SDE.marginal_prob_std(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(slope, SDE.diffusion_coeff(t) ** 2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sigma", [1, 1.0, 0.0, -25.0, True, "25", float("inf"), float("nan")])
def test_vesde_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma must be"):
        VESDE(sigma)


# ---- loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_condition", [False, True])
def test_loss_and_its_gradients_equal_the_reference_under_the_same_seed(dtype, with_condition):
    ours, ref = models(dtype)
    x, cond = data(dtype=dtype)
    cond = cond if with_condition else None
    torch.manual_seed(3)
    want = reference_loss_fn(ref, x, REF_STD, condition=cond)
    after_ref = torch.rand(4)
    torch.manual_seed(3)
    got = ve_sde_loss(ours, x, SDE.marginal_prob_std, condition=cond)
    assert torch.equal(torch.rand(4), after_ref)  # same draws, RNG left in the same place
    tol = 1e-5 if dtype == torch.float32 else (1e-8 if with_condition else 1e-12)
    torch.testing.assert_close(got, want, rtol=tol, atol=0)
    want.backward()
    got.backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=100 * tol, atol=100 * tol * scale, msg=name)


def test_loss_perturbs_data_and_condition_with_the_same_noise():
    # A model that recovers the noise exactly from the perturbed input has zero loss; from the
    # perturbed condition too only if the condition got the same z.
    x, cond = data(batch=3, dtype=torch.float64)

    def from_x(xp, t):
        return -(xp - x) / SDE.marginal_prob_std(t)[:, None, None] ** 2

    def from_condition(xp, t, c):
        return -(c - cond) / SDE.marginal_prob_std(t)[:, None, None] ** 2

    assert ve_sde_loss(from_x, x, SDE.marginal_prob_std).item() < 1e-9
    assert ve_sde_loss(from_condition, x, SDE.marginal_prob_std, condition=cond).item() < 1e-9
    zero_score = ve_sde_loss(lambda xp, t: torch.zeros_like(xp), x, SDE.marginal_prob_std).item()
    assert 0.8 * 32 * 48 < zero_score < 1.2 * 32 * 48  # E|z|² per sample


def test_loss_with_a_generator_matches_the_global_stream_and_leaves_it_alone():
    x, _ = data(dtype=torch.float64)

    def model(xp, t):
        return xp * t[:, None, None]

    torch.manual_seed(9)
    want = ve_sde_loss(model, x, SDE.marginal_prob_std)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = ve_sde_loss(model, x, SDE.marginal_prob_std, generator=torch.Generator().manual_seed(9))
    assert torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), state)


def test_loss_errors_name_the_argument():
    x, cond = data()
    model = ScoreNet(SDE.marginal_prob_std, **SMALL)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        ve_sde_loss(model, x[0], SDE.marginal_prob_std)
    with pytest.raises(ValueError, match="condition must have x's shape"):
        ve_sde_loss(model, x, SDE.marginal_prob_std, condition=cond[:, :, :24])
    with pytest.raises(ValueError, match="condition is torch.float64"):
        ve_sde_loss(model, x, SDE.marginal_prob_std, condition=cond.double())
    with pytest.raises(ValueError, match="eps must be"):
        ve_sde_loss(model, x, SDE.marginal_prob_std, eps=0.0)
    with pytest.raises(ValueError, match=r"x has no samples \(B = 0\)"):
        ve_sde_loss(model, x[:0], SDE.marginal_prob_std)


# ---- sampler -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_condition", [False, True])
def test_sampler_equals_the_reference_under_the_same_torch_seed(dtype, with_condition):
    ours, ref = models(dtype, seed=2)
    _, cond = data(dtype=dtype, seed=4)
    cond = cond if with_condition else None
    torch.manual_seed(5)
    want = reference_euler_maruyama_sampler(ref, REF_STD, REF_G, 2, num_steps=3, condition=cond, dtype=dtype)
    after_ref = torch.rand(4)
    torch.manual_seed(5)
    got = euler_maruyama_sampler(ours, SDE.marginal_prob_std, SDE.diffusion_coeff, 2, num_steps=3, condition=cond)
    assert torch.equal(torch.rand(4), after_ref)
    assert got.shape == (2, 32, 48) and got.dtype == dtype and not got.requires_grad
    # float32: rounding of the step arithmetic (coefficients folded on the host); float64 with a
    # condition: the release's float32 softmax.
    tol = 1e-5 if dtype == torch.float32 else (1e-7 if with_condition else 1e-12)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_sampler_takes_the_release_positional_arguments():
    ours, _ = models(seed=2)
    _, cond = data(seed=4)
    torch.manual_seed(5)
    want = euler_maruyama_sampler(ours, SDE.marginal_prob_std, SDE.diffusion_coeff, batch_size=2, num_steps=3,
                                  condition=cond, device="cpu")
    torch.manual_seed(5)
    # the release's order: (score_model, marginal_prob_std, diffusion_coeff, batch_size, num_steps, device,
    # condition, eps)
    got = euler_maruyama_sampler(ours, SDE.marginal_prob_std, SDE.diffusion_coeff, 2, 3, "cpu", cond, 1e-3)
    assert torch.equal(got, want)
    torch.manual_seed(5)
    assert euler_maruyama_sampler(ours, SDE.marginal_prob_std, SDE.diffusion_coeff, num_steps=2).shape[0] == 64


def test_sampler_with_a_generator_matches_the_global_stream_and_leaves_it_alone():
    ours, _ = models(seed=3)
    torch.manual_seed(7)
    want = euler_maruyama_sampler(ours, SDE.marginal_prob_std, SDE.diffusion_coeff, 1, num_steps=2)
    state = torch.get_rng_state()
    got = euler_maruyama_sampler(ours, SDE.marginal_prob_std, SDE.diffusion_coeff, 1, num_steps=2,
                                 generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), state)


class Recorder:
    """Exact score of N(0, s0²) data under the VE-SDE; records the times and conditions it is called with."""

    def __init__(self, s0=0.5):
        self.s0, self.times, self.conditions = s0, [], []

    def __call__(self, x, t, condition=None):
        self.times.append(t.clone())
        self.conditions.append(None if condition is None else condition.clone())
        return -x / (self.s0 ** 2 + SDE.marginal_prob_std(t) ** 2)[:, None, None]


def test_seed_mode_uses_the_documented_counter_offsets():
    dtype, batch, steps, seed = torch.float64, 2, 4, 31
    cond = torch.randn(batch, 32, 48, dtype=dtype)
    recorder = Recorder()
    state = torch.get_rng_state()
    got = euler_maruyama_sampler(recorder, SDE.marginal_prob_std, SDE.diffusion_coeff, batch, steps,
                                 condition=cond, seed=seed)
    assert torch.equal(torch.get_rng_state(), state)  # no host RNG
    seed_t = torch.tensor(seed)
    grid = torch.linspace(1.0, 1e-3, steps, dtype=dtype)
    dt = (grid[0] - grid[1]).item()
    x = counter_normal(seed_t, 0, (batch, 32, 48), dtype=dtype) * SDE.marginal_prob_std(torch.ones(1, dtype=dtype))
    for i, time in enumerate(grid):
        assert torch.equal(recorder.times[i], time.expand(batch))
        std, g = SDE.marginal_prob_std(time).item(), SDE.diffusion_coeff(time).item()
        perturbation = std * counter_normal(seed_t, 2 * i + 1, cond.shape, dtype=dtype)
        torch.testing.assert_close(recorder.conditions[i], cond + perturbation, rtol=1e-12, atol=1e-12)
        score = -x / (recorder.s0 ** 2 + std ** 2)
        mean = x + g * g * dt * score
        x = mean + math.sqrt(dt) * g * counter_normal(seed_t, 2 * i + 2, x.shape, dtype=dtype)
    torch.testing.assert_close(got, mean, rtol=1e-10, atol=1e-10)


def test_seed_mode_is_repeatable_and_seed_dependent():
    run = functools.partial(euler_maruyama_sampler, Recorder(), SDE.marginal_prob_std, SDE.diffusion_coeff, 2, 3)
    a, b, c = run(seed=1), run(seed=torch.tensor(1)), run(seed=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sampler_recovers_the_data_spread_with_the_exact_score():
    out = euler_maruyama_sampler(Recorder(s0=0.5), SDE.marginal_prob_std, SDE.diffusion_coeff, 16, 200, seed=3)
    assert abs(out.std().item() - 0.5) < 0.025
    assert abs(out.mean().item()) < 0.02


def test_init_x_replaces_the_random_start():
    init = torch.full((2, 32, 8), 3.0, dtype=torch.float64)
    recorder = Recorder()
    out = euler_maruyama_sampler(recorder, SDE.marginal_prob_std, SDE.diffusion_coeff, 2, 2, init_x=init, seed=0)
    assert out.shape == (2, 32, 8) and len(recorder.times) == 2
    # Step 1 from init_x (noise at offset 2), step 2 returns its mean.
    grid = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    dt = (grid[0] - grid[1]).item()
    x = init
    for i, time in enumerate(grid):
        g2 = SDE.diffusion_coeff(time).item() ** 2
        mean = x - g2 * dt * x / (recorder.s0 ** 2 + SDE.marginal_prob_std(time).item() ** 2)
        x = mean + math.sqrt(dt * g2) * counter_normal(torch.tensor(0), 2 * i + 2, x.shape, dtype=torch.float64)
    torch.testing.assert_close(out, mean, rtol=1e-10, atol=1e-10)


def test_device_given_with_an_index_matches_a_condition_on_that_device():
    """torch.device("cpu", 0) (like torch.device("cuda") against a tensor on cuda:0) names the device a
    condition reports differently; the sampler compares canonical devices (found in review, for CUDA)."""
    condition = torch.randn(2, 32, 8, dtype=torch.float64)
    run = functools.partial(euler_maruyama_sampler, Recorder(), SDE.marginal_prob_std, SDE.diffusion_coeff, 2, 3,
                            condition=condition, seed=1)
    assert torch.equal(run(device=torch.device("cpu", 0)), run(device="cpu"))


def test_sampler_errors_name_the_argument():
    run = functools.partial(euler_maruyama_sampler, Recorder(), SDE.marginal_prob_std, SDE.diffusion_coeff)
    for steps in (0, 1, 2.5, True):
        with pytest.raises(ValueError, match="num_steps must be"):
            run(2, steps)
    for batch in (0, -1, 2.0):
        with pytest.raises(ValueError, match="batch_size must be"):
            run(batch, 3)
    for eps in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match="eps must be"):
            run(2, 3, eps=eps)
    with pytest.raises(ValueError, match="not both"):
        run(2, 3, generator=torch.Generator(), seed=1)
    with pytest.raises(ValueError, match="condition must be"):
        run(2, 3, condition=torch.randn(3, 32, 48))
    with pytest.raises(ValueError, match="condition is torch.float64"):
        run(2, 3, condition=torch.randn(2, 32, 48, dtype=torch.float64), dtype=torch.float32)
    with pytest.raises(ValueError, match="init_x must be"):
        run(2, 3, init_x=torch.randn(3, 32, 48))
    with pytest.raises(ValueError, match="diffusion_coeff must return"):
        euler_maruyama_sampler(Recorder(), SDE.marginal_prob_std, lambda t: torch.ones(1), 2, 3)
    with pytest.raises(ValueError, match="seed"):
        run(2, 3, seed="1")
