"""FedDISC end to end: one training epoch of each stage and one evaluation pass
(run: ``pytest bench/bench_feddisc_epoch.py --benchmark-only``).

The same FedDISC model (same weights) built from imer_fast's fused layers and from the eager twins of
the release semantics (``layers="reference"``: MulT ``TransformerEncoder``, FedDISC ``UNetModel``,
GCNet ``GraphModel``, every fused op forced to its ``_ref``), and ``torch.compile`` is left out here:
compiling the whole staged model recompiles on every new dialogue-length mix (dynamic shapes), which
the per-module suites (`bench_attention`, `bench_samplers`, `bench_score_net`) cover instead.

Data: the synthetic IEMOCAP-6 corpus at GCNet's feature widths (1,024 / 512 / 1,024), 8 training
dialogues of IEMOCAP lengths, batch 8 dialogues (the release's), GCNet missing rate 0.5. Presets:
``release`` (32 × 48 latents, 16.4 M-parameter U-Nets, DDIM-50 recovery) and ``small`` (the demo's).
Stages: ``extractor`` (DGN + MulT pseudo-labeller, fwd+bwd+AdamW), ``generator`` (the three U-Nets'
loss on utterance minibatches of ``generator_batch_size``, after computing the epoch's conditions),
``classifier`` (DDIM recovery of the missing latents + MulT classifier fwd+bwd), ``eval``
(label-free prediction of the test split).
"""
import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.train.feddisc import FedDISCConfig, FedDISCRun, build_model
from imer_fast.train.trainer import TrainerConfig, adamw

from conftest import sync

STAGES = ("extractor", "generator", "classifier", "eval")
LAYERS = ("fused", "reference")


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap6", seed=0, scale=0.067)  # 8 train / 2 test dialogues


@pytest.fixture(scope="module")
def runs(corpus, device):
    out = {}
    for preset in ("release", "small"):
        config = FedDISCConfig(preset=preset, batch_size=8, missing="gcnet:0.5",
                               trainer=TrainerConfig(device=str(device), progress=False))
        torch.manual_seed(0)
        fused = build_model(corpus, config).to(device)
        config_ref = FedDISCConfig(**{**config.__dict__, "layers": "reference"})
        reference = build_model(corpus, config_ref).to(device)
        reference.load_state_dict(fused.state_dict())
        for layers, model in (("fused", fused), ("reference", reference)):
            run = FedDISCRun(model, corpus, config)
            run.fit_scaling()
            out[preset, layers] = run
    return out


def one_epoch(run: FedDISCRun, stage: str, device):
    model = run.model
    if stage == "eval":  # the trainer's evaluation pass: eval mode, the training protocol, metrics included
        with torch.no_grad():
            run.evaluate("test")
        sync(device)
        return
    groups = model.parameter_groups()
    group = {"extractor": "extractor", "generator": "recovery", "classifier": "classifier"}[stage]
    params = groups[group]
    optimizer = adamw(params, lr=1e-5, weight_decay=0.01)  # the trainer's optimiser
    step = {"extractor": run.extractor_step, "generator": run.generator_step, "classifier": run.classifier_step}[stage]
    model.train()
    with model.layers.context():
        # the generator stage trains on utterance minibatches; its epoch includes computing their
        # conditions (the frozen pseudo-labeller over the dialogues), as the trainer's does
        batches = run.generator_batches("train", 0) if stage == "generator" else run.train_batches(0)
        for batch in batches:
            loss, _ = step(batch, 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sync(device)


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", ("release", "small"))
def test_feddisc_epoch(benchmark, runs, preset, stage, layers, device):
    benchmark.group = f"FedDISC {preset} {stage} epoch"
    run = runs[preset, layers]
    one_epoch(run, stage, device)  # warm-up (first-call kernel selection, allocator)
    benchmark.pedantic(one_epoch, args=(run, stage, device), rounds=3, iterations=1)
