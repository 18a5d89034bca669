"""The U-Net's 3-tap convolutions as Winograd F(n, 3) (the n the U-Net picks) against the direct convolution.

Shapes of the FedDISC U-Net's residual-block convolutions (channels-last activations, as the U-Net
keeps them on the CPU), forward only (the sampler path), fp32, batch 32 and 256. Providers:
``imer_fast`` (``winograd_conv1d`` with the transformed kernel made once, as inside
``reuse_transformed_weights``), ``eager`` (``winograd_conv1d_ref``, the same transforms in torch ops),
``direct`` (``F.conv1d``: oneDNN's convolution on the CPU, cuDNN on a GPU — the best library here) on
the same channels-last input and, as ``direct channels-first``, on a contiguous copy (the release's layout),
``compiled`` (``torch.compile`` of the direct convolution).

    python -m pytest bench/bench_winograd_conv.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from imer_fast.ops.winograd_conv import fewest_rows_tile, winograd_conv1d, winograd_conv1d_ref, winograd_weight

from conftest import sync

CASES = {  # name: (C, Co, L)
    "level0 C128 L48": (128, 128, 48),
    "level1 C256 L24": (256, 256, 24),
    "level2 C256 L12": (256, 256, 12),
    "up-cat C512->256 L12": (512, 256, 12),
    "up-cat C384->256 L24": (384, 256, 24),
    "level3 C256 L6": (256, 256, 6),
}
BATCHES = (32, 256)
PROVIDERS = ("imer_fast", "eager", "direct", "direct channels-first", "compiled")


def _inputs(name, batch, device):
    c, co, length = CASES[name]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, length, c, generator=g).to(device).transpose(1, 2)  # channels-last [B, C, L]
    weight = (torch.randn(co, c, 3, generator=g) / (3 * c) ** 0.5).to(device)
    bias = torch.randn(co, generator=g).to(device)
    return x, weight, bias


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward(benchmark, device, name, batch, provider):
    benchmark.group = f"conv1d k3 fwd {name} B={batch}"
    x, weight, bias = _inputs(name, batch, device)
    weight_tf = winograd_weight(weight, fewest_rows_tile(x.shape[2]))
    if provider == "imer_fast":
        fn = lambda: winograd_conv1d(x, weight_tf, bias)  # noqa: E731
    elif provider == "eager":
        fn = lambda: winograd_conv1d_ref(x, weight_tf, bias)  # noqa: E731
    elif provider == "direct":
        fn = lambda: F.conv1d(x, weight, bias, padding=1)  # noqa: E731
    elif provider == "direct channels-first":  # the release U-Net's layout, oneDNN's / cuDNN's own choice
        x_first = x.contiguous()
        fn = lambda: F.conv1d(x_first, weight, bias, padding=1)  # noqa: E731
    else:
        compiled = torch.compile(F.conv1d)
        fn = lambda: compiled(x, weight, bias, padding=1)  # noqa: E731

    def run():
        with torch.no_grad():
            out = fn()
        sync(device)
        return out

    run()
    benchmark(run)
