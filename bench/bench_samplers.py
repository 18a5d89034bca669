"""Whole-sampler benchmarks: DDIM-50 (FedDISC denoiser) and Euler–Maruyama-100 (IMDer ScoreNet).

Providers: ours (imer_fast modules + fused steps), the eager release-semantics reference, and
``torch.compile`` of the reference denoiser (default and ``reduce-overhead``), on the same device and
dtype (fp32), same step counts — step reduction (DPM-Solver++) is reported separately by
``bench/sampler_quality.py``. Batch: 32 on CPU (a 50-step loop of the full-size U-Net takes seconds
there), 256 on GPU.

    python -m pytest bench/bench_samplers.py --benchmark-only
"""
import pytest
import torch

from profile_sampler import build_em_sampler, build_unet_sampler

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 256 if DEVICE.type == "cuda" else 32
PROVIDERS = [("ours", None), ("reference", None), ("compiled", "default"), ("compiled", "reduce-overhead")]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, run):
    def timed():
        with torch.no_grad():
            out = run()
        _sync()
        return out

    rounds = 5 if DEVICE.type == "cuda" else 3
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl,mode", PROVIDERS, ids=[p if m is None else f"{p}-{m}" for p, m in PROVIDERS])
def test_ddim50(benchmark, impl, mode):
    benchmark.group = f"ddim50 B={BATCH}"
    run, _ = build_unet_sampler("ddim50", impl, BATCH, 50, DEVICE, mode or "default")
    _bench(benchmark, run)


@pytest.mark.parametrize("impl,mode", PROVIDERS, ids=[p if m is None else f"{p}-{m}" for p, m in PROVIDERS])
def test_em100(benchmark, impl, mode):
    benchmark.group = f"em100 B={BATCH}"
    run, _ = build_em_sampler(impl, BATCH, 100, DEVICE, mode or "default")
    _bench(benchmark, run)
