"""IMDer score-network benchmarks (run: ``pytest bench/bench_score_net.py --benchmark-only``).

The release's shapes: latent and condition [B, 32, 48], default widths (32, 64, 128, 256), σ = 25.

- ``score net forward``: one forward with a condition under ``no_grad`` (what every sampling step
  runs), B = 32 and B = 256;
- ``score loss fwd+bwd``: the score-matching loss and its backward, B = 32 (a training step minus
  the optimiser);
- ``EM-100 sampling``: the Euler–Maruyama sampler, 100 steps, B = 32, with a condition (few rounds:
  seconds per run on a CPU).

Providers: imer_fast (``ScoreNet``, ``ve_sde_loss``, ``euler_maruyama_sampler`` — in counter-noise
``seed`` mode and in torch-``generator`` mode), the eager release-semantics reference
(``imer_fast.testing.reference_imder``) and ``torch.compile`` of the reference network (the
reference loss and sampler driving the compiled network; default mode, and reduce-overhead on CUDA).
With ``--benchmark-disable`` (a check run) the compiled providers and the sampling group are skipped:
they take minutes, not seconds.
"""
import functools

import pytest
import torch

from imer_fast.diffusion.ve_sde import VESDE, euler_maruyama_sampler, ve_sde_loss
from imer_fast.nn.score_net import ScoreNet
from imer_fast.testing.reference_imder import (
    ReferenceScoreNet,
    diffusion_coeff,
    marginal_prob_std,
    reference_euler_maruyama_sampler,
    reference_loss_fn,
)

from conftest import sync

SIGMA = 25.0
SDE = VESDE(SIGMA)
REF_STD = functools.partial(marginal_prob_std, sigma=SIGMA)
REF_G = functools.partial(diffusion_coeff, sigma=SIGMA)
PROVIDERS = ("imer_fast", "eager release", "compiled release", "compiled reduce-overhead release")
SAMPLE_STEPS = 100


def _checking(config) -> bool:
    return bool(config.getoption("--benchmark-disable"))


@pytest.fixture(scope="module")
def nets(device):
    """One set of weights in both networks; the compiled reference is built once per module."""
    torch.manual_seed(0)
    reference = ReferenceScoreNet(REF_STD).to(device)
    ours = ScoreNet(SDE.marginal_prob_std).to(device)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return {"imer_fast": ours, "eager release": reference, "compiled release": torch.compile(reference),
            "compiled reduce-overhead release": torch.compile(reference, mode="reduce-overhead")}


def _provider(request, nets, provider):
    if provider.startswith("compiled") and _checking(request.config):
        pytest.skip("torch.compile providers are benchmarks, not checks")
    if "reduce-overhead" in provider and next(nets["eager release"].parameters()).device.type != "cuda":
        pytest.skip("reduce-overhead adds CUDA graphs: on a CPU it is the default mode")
    return nets[provider]


def _data(batch, device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 32, 48, generator=gen).to(device)
    condition = torch.randn(batch, 32, 48, generator=gen).to(device)
    t = (torch.rand(batch, generator=gen) * (1 - 1e-3) + 1e-3).to(device)
    return x, t, condition


def _bench(benchmark, run, rounds=None):
    run()  # warm-up: compiles, allocator, Triton kernels
    if rounds is None:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=rounds, iterations=1)


@pytest.mark.benchmark(group="score net forward")
@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, request, nets, device, provider, batch):
    model = _provider(request, nets, provider)
    x, t, condition = _data(batch, device)

    def run():
        with torch.no_grad():
            out = model(x, t, condition)
        sync(device)
        return out

    _bench(benchmark, run, rounds=5 if batch > 32 and device.type == "cpu" else None)


@pytest.mark.benchmark(group="score loss fwd+bwd")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_loss_forward_backward(benchmark, request, nets, device, provider):
    model = _provider(request, nets, provider)
    x, _, condition = _data(32, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if provider == "imer_fast":
        loss_fn = functools.partial(ve_sde_loss, model, x, SDE.marginal_prob_std, condition)
    else:
        loss_fn = functools.partial(reference_loss_fn, model, x, REF_STD, condition)

    def run():
        grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
        sync(device)
        return grads

    _bench(benchmark, run)


SAMPLERS = ("imer_fast seed", "imer_fast generator", "eager release", "compiled release",
            "compiled reduce-overhead release")


@pytest.mark.benchmark(group="EM-100 sampling")
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_em_sampling(benchmark, request, nets, device, sampler):
    if _checking(request.config):
        pytest.skip("100-step sampling is a benchmark, not a check")
    _, _, condition = _data(32, device)
    if sampler.startswith("imer_fast"):
        noise = {"seed": 0} if sampler.endswith("seed") else {"generator": None}

        def sample():
            return euler_maruyama_sampler(nets["imer_fast"], SDE.marginal_prob_std, SDE.diffusion_coeff, 32,
                                          SAMPLE_STEPS, condition=condition, **noise)
    else:
        model = _provider(request, nets, sampler)

        def sample():
            return reference_euler_maruyama_sampler(model, REF_STD, REF_G, 32, SAMPLE_STEPS, device=device,
                                                    condition=condition)

    def run():
        out = sample()
        sync(device)
        return out

    _bench(benchmark, run, rounds=3 if device.type == "cpu" else 10)
