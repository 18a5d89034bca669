"""DRKF end to end: one training epoch of each stage and one evaluation pass
(run: ``pytest bench/bench_drkf_epoch.py --benchmark-only``).

The same DRKF model (same weights) run on imer_fast's fused ops and as the eager reference
(``layers="reference"``: every fused op — the fusion encoder's attention, the U-Net's GroupNorm/FiLM,
the sampler steps — forced to its ``_ref``, which materialises the attention scores).

Data: synthetic IEMOCAP-4 (audio 512 / text 1,024 wide utterance vectors, GCNet's widths), 8 training
dialogues, batch 2 dialogues, GCNet missing rate 0.5, DISC-Diffusion recovery. Presets: ``release``
(BERT 1,024 × 6 layers over 32 × 48 latents per modality, 99 tokens; 5-block autoencoders; DDIM-50) and
``small`` (the tests'). Stages: ``drkf`` (ORL + classification + pair discrimination, fwd+bwd+AdamW),
``generator`` (ε-MSE of the two U-Nets), ``finetune`` (DDIM recovery + fusion fwd+bwd), ``eval``
(label-free prediction of the test split).
"""
import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.train.drkf import DRKFConfig, DRKFRun, build_model
from imer_fast.train.trainer import TrainerConfig, adamw

from conftest import sync

STAGES = ("drkf", "generator", "finetune", "eval")
LAYERS = ("fused", "reference")
GROUPS = {"drkf": "drkf", "generator": "recovery", "finetune": "fusion"}


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap4", seed=0, scale=0.067, feature_dims={"text": 1024, "audio": 512, "video": 16})


@pytest.fixture(scope="module")
def runs(corpus, device):
    out = {}
    for preset in ("release", "small"):
        config = DRKFConfig(preset=preset, batch_size=2, missing="gcnet:0.5",
                            trainer=TrainerConfig(device=str(device), progress=False))
        torch.manual_seed(0)
        fused = build_model(corpus, config).to(device)
        reference = build_model(corpus, DRKFConfig(**{**config.__dict__, "layers": "reference"})).to(device)
        reference.load_state_dict(fused.state_dict())
        for layers, model in (("fused", fused), ("reference", reference)):
            run = DRKFRun(model, corpus, config)
            run.fit_scaling()
            out[preset, layers] = run
    return out


def one_epoch(run: DRKFRun, stage: str, device):
    model = run.model
    if stage == "eval":  # the trainer's evaluation pass: eval mode, the training protocol, metrics included
        with torch.no_grad():
            run.evaluate("test")
        sync(device)
        return
    optimizer = adamw(model.parameter_groups()[GROUPS[stage]], lr=1e-5, weight_decay=0.01)  # the trainer's
    step = {"drkf": run.drkf_step, "generator": run.generator_step, "finetune": run.finetune_step}[stage]
    model.train()
    with model.layers.context():
        for batch in run.train_batches(0):
            loss, _ = step(batch, 0)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sync(device)


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", ("release", "small"))
def test_drkf_epoch(benchmark, runs, preset, stage, layers, device):
    benchmark.group = f"DRKF {preset} {stage} epoch"
    run = runs[preset, layers]
    one_epoch(run, stage, device)  # warm-up (first-call kernel selection, allocator)
    benchmark.pedantic(one_epoch, args=(run, stage, device), rounds=3, iterations=1)
