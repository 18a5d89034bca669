"""RoHyDR end to end: one training epoch (the three optimisation stages of every batch) and one evaluation
pass (run: ``pytest bench/bench_rohydr_epoch.py --benchmark-only``).

The same RoHyDR model (same weights) built from imer_fast's fused layers and from the eager twins
(``layers="reference"``: MulT ``TransformerEncoder`` twin, IMDer ``ScoreNet`` twin for the score generator,
every fused op — attention, LayerNorm, timestep features, sampler steps — forced to its ``_ref``).

Data: synthetic CMU-MOSI at the release's MOSI feature widths (text 768 — BERT's width —, audio 5, video 20),
utterance vectors projected to the 32 × 48 latent, 8 training / 4 test videos, batch 8 videos, GCNet missing
rate 0.5. Presets: ``release`` (DiT 64/6/16 generators, 1,000 DDPM steps sampled by DDIM-50, RCAN 20 blocks,
4-layer MulT) and ``small`` (the tests' and demo's). Generators: ``dit`` (release Dec 2025) and ``score``
(release May 2025, IMDer's ScoreNet with Euler–Maruyama sampling; release preset only).
"""
import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.train.rohydr import RoHyDRConfig, RoHyDRRun, build_model
from imer_fast.train.trainer import TrainerConfig, adamw

from conftest import sync

LAYERS = ("fused", "reference")
CASES = (("release", "dit"), ("release", "score"), ("small", "dit"))


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("mosi", seed=0, scale=0.15, feature_dims={"text": 768, "audio": 5, "video": 20})


@pytest.fixture(scope="module")
def runs(corpus, device):
    out = {}
    for preset, generator in CASES:
        config = RoHyDRConfig(preset=preset, generator=generator, batch_size=8, missing="gcnet:0.5",
                              trainer=TrainerConfig(device=str(device), progress=False))
        torch.manual_seed(0)
        fused = build_model(corpus, config).to(device)
        reference = build_model(corpus, RoHyDRConfig(**{**config.__dict__, "layers": "reference"})).to(device)
        reference.load_state_dict(fused.state_dict())
        for layers, model in (("fused", fused), ("reference", reference)):
            run = RoHyDRRun(model, corpus, config)
            run.fit_scaling()
            out[preset, generator, layers] = run
    return out


def one_epoch(run: RoHyDRRun, stage: str, device):
    model = run.model
    if stage == "eval":  # the trainer's evaluation pass: eval mode, the training protocol, metrics included
        with torch.no_grad():
            run.evaluate("test")
        sync(device)
        return
    optimisers = {g: adamw(ps, lr=1e-5, weight_decay=0.01) for g, ps in model.parameter_groups().items()}

    def update(group, loss):  # the Trainer's update(): one group, or several stepped from one backward
        groups = (group,) if isinstance(group, str) else group
        for g in groups:
            optimisers[g].zero_grad(set_to_none=True)
        loss.backward()
        for g in groups:
            optimisers[g].step()

    model.train()
    with model.layers.context():
        for batch in run.train_batches(0):
            run.train_step(batch, 0, update)
    sync(device)


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("stage", ("train", "eval"))
@pytest.mark.parametrize("preset,generator", CASES)
def test_rohydr_epoch(benchmark, runs, preset, generator, stage, layers, device):
    benchmark.group = f"RoHyDR {preset} {generator} {stage} epoch"
    run = runs[preset, generator, layers]
    one_epoch(run, stage, device)  # warm-up (first-call kernel selection, allocator)
    benchmark.pedantic(one_epoch, args=(run, stage, device), rounds=3, iterations=1)
