"""Fused GroupNorm + FiLM + SiLU (the U-Net block prologue) against the eager sequence and torch.compile
(default mode; also reduce-overhead on CUDA).

Shapes of the FedDISC U-Net (GroupNorm 8 with the time scale-shift at 128/256 channels, GroupNorm 32
at the attention level) and the IMDer ScoreNet (GroupNorm 4 at 32 channels, with its time bias),
forward and forward + backward, fp32, batch 32 and 256.

    python -m pytest bench/bench_group_norm.py --benchmark-only
"""
import pytest
import torch

from imer_fast.ops.group_norm import group_norm_film_silu, group_norm_film_silu_ref

from conftest import sync

CASES = {  # name: (C, L, groups, FiLM scale-shift, input bias)
    "unet-block C128 L48 G8 film": (128, 48, 8, True, False),
    "unet-block C256 L24 G8 film": (256, 24, 8, True, False),
    "unet-attn C256 L6 G32": (256, 6, 32, False, False),
    "scorenet C32 L48 G4 bias": (32, 48, 4, False, True),
}
BATCHES = (32, 256)
PROVIDERS = ("imer_fast", "eager", "compiled", "compiled reduce-overhead")


def _inputs(name, batch, device, grad):
    c, length, groups, film, in_bias = CASES[name]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, c, length, generator=g).to(device)
    kw = {"weight": torch.randn(c, generator=g).to(device), "bias": torch.randn(c, generator=g).to(device)}
    if film:
        kw["scale"] = torch.randn(batch, c, generator=g).to(device)
        kw["shift"] = torch.randn(batch, c, generator=g).to(device)
    if in_bias:
        kw["input_bias"] = torch.randn(batch, c, generator=g).to(device)
    if grad:
        x.requires_grad_()
        for t in kw.values():
            t.requires_grad_()
    return x, groups, kw


def _fn(provider, device):
    if provider == "imer_fast":
        return group_norm_film_silu
    if provider == "eager":
        return group_norm_film_silu_ref
    if provider == "compiled":
        return torch.compile(group_norm_film_silu_ref)
    if device.type != "cuda":
        pytest.skip("reduce-overhead adds CUDA graphs: on a CPU it is the default mode")
    return torch.compile(group_norm_film_silu_ref, mode="reduce-overhead")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward(benchmark, device, name, batch, provider):
    benchmark.group = f"group_norm_film_silu fwd {name} B={batch}"
    x, groups, kw = _inputs(name, batch, device, grad=False)
    fn = _fn(provider, device)

    def run():
        with torch.no_grad():
            out = fn(x, groups, **kw)
        sync(device)
        return out

    run()
    benchmark(run)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(benchmark, device, name, batch, provider):
    benchmark.group = f"group_norm_film_silu fwd+bwd {name} B={batch}"
    x, groups, kw = _inputs(name, batch, device, grad=True)
    fn = _fn(provider, device)
    leaves = [x, *kw.values()]

    def run():
        out = fn(x, groups, **kw)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        sync(device)
        return grads

    run()
    benchmark(run)
