"""RoHyDR training on tiny synthetic MOSI: the three-stage update wiring, all-missing utterances, outputs and
checkpoints, and seeded evidence that recovery helps where the modalities are redundant."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.models.rohydr import RECOVERY_MODULE_PREFIXES
from imer_fast.train.rohydr import GROUPS, RoHyDRConfig, RoHyDRRun, build_model, load_rohydr, train_rohydr
from imer_fast.train.trainer import Trainer, TrainerConfig, with_validation

TINY_MODEL = dict(latent_channels=8, latent_length=8, dit=dict(hidden_size=16, depth=1, num_heads=2), timesteps=25,
                  sampling_steps=3, refiner_blocks=1, refiner_reduction=4,
                  mult=dict(num_heads=2, layers=1, mem_layers=1, embed_dropout=0.0, res_dropout=0.0),
                  reconstructor_hidden=(8, 8), discriminator_hidden=(8, 8))


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("mosi", seed=0, scale=0.1, feature_dims=6)


def tiny_config(tmp_path=None, **kwargs):
    base = dict(preset="small", epochs=1, batch_size=3, eval_rates=(0.5,), sampling_steps=2,
                trainer=TrainerConfig(progress=False, out_dir=str(tmp_path) if tmp_path else None, lr=1e-3))
    base.update(kwargs)
    return RoHyDRConfig(**base)


def tiny_run(corpus, **kwargs):
    from imer_fast.models.rohydr import RoHyDR

    config = tiny_config(**kwargs)
    torch.manual_seed(0)
    model = RoHyDR(corpus.feature_dims, recovery=config.recovery, **TINY_MODEL)
    run = RoHyDRRun(model, corpus, config)
    run.fit_scaling()
    return run


def test_each_stage_changes_only_its_group(corpus):
    run = tiny_run(corpus)
    model = run.model
    groups = model.parameter_groups()
    assert list(groups) == list(GROUPS)
    owner = {id(p): g for g, ps in groups.items() for p in ps}
    assert len(owner) == sum(len(ps) for ps in groups.values())  # the groups are disjoint
    projections = [p for n, p in model.named_parameters() if n.startswith("proj_")]
    assert projections and not any(id(p) in owner for p in projections)  # never trained, as the release
    optimisers = {g: torch.optim.SGD(ps, lr=0.1) for g, ps in groups.items()}
    calls = []

    def update(group, loss):
        asked = (group,) if isinstance(group, str) else tuple(group)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for g in asked:
            optimisers[g].zero_grad(set_to_none=True)
        loss.backward()
        for g in asked:
            optimisers[g].step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        changed_groups = {owner.get(id(dict(model.named_parameters())[n])) for n in changed}
        assert changed_groups == set(asked), (asked, changed_groups)  # every asked group moves, nothing else
        calls.append(group)

    model.train()
    batch = next(iter(run.loader("train", missing="gcnet:0.5")))
    loss, n = run.train_step(batch, 0, update)
    # stage 3's task loss trains the reconstructor R that the recovered prediction reads, as the release
    assert calls == ["recovery", "discriminator", "reconstructor", ("fusion", "reconstructor")]
    assert torch.isfinite(loss) and n == batch.num_utterances
    complete = next(iter(run.loader("train", missing="none")))
    calls.clear()
    run.train_step(complete, 0, update)
    assert calls == ["recovery", "fusion"]  # nothing missing: no adversarial stage


def test_sampler_gradient_trains_the_generators_through_the_sampler(corpus):
    """``sampler_gradient`` (the release's DiT version): stage 1's refiner loss and stage 3's task loss reach
    the generators through the DDIM steps; stage 3 steps the recovery group too."""
    plain, through = tiny_run(corpus), tiny_run(corpus, sampler_gradient=True)
    batch = next(iter(plain.loader("train", missing="gcnet:0.5")))
    truth, observed, avail, _ = plain._batch_latents(batch, training=False)
    losses, generator_grads = [], []

    def generator_grad(model):
        return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                          for p in model.score_l.parameters()])

    for run in (plain, through):
        run.model.train()
        torch.manual_seed(5)  # the same diffusion timesteps and noise in both generator losses
        loss, _ = run.recovery_loss(truth, observed, avail, 0)
        loss.backward()
        losses.append(loss.detach())
        generator_grads.append(generator_grad(run.model))
        run.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(losses[0], losses[1])  # the same loss either way ...
    assert not torch.allclose(*generator_grads)  # ... but the refiner loss now also trains the generator
    calls = []

    def update(group, loss):
        if "recovery" in ((group,) if isinstance(group, str) else group) and group != "recovery":
            loss.backward()  # stage 3: the generators receive the task loss's gradient
            assert generator_grad(through.model).abs().sum() > 0
            through.model.zero_grad(set_to_none=True)
        calls.append(group)

    through.train_step(batch, 0, update)
    assert calls == ["recovery", "discriminator", "reconstructor", ("fusion", "reconstructor", "recovery")]


def test_text_dropout_applies_in_training_to_text_only(corpus):
    from imer_fast.train.rohydr import text_dropout

    assert text_dropout(RoHyDRConfig(preset="release")) == 0.5  # the release's MOSI value
    assert text_dropout(RoHyDRConfig(preset="small")) == 0.0
    run = tiny_run(corpus, text_dropout=0.5)
    batch = next(iter(run.loader("train", missing="none")))
    clean = run.model.latents(batch.packed().ground_truth)
    torch.manual_seed(0)
    dropped, _, _, _ = run._batch_latents(batch)
    torch.manual_seed(0)
    features = dict(batch.packed().ground_truth)
    text = torch.nn.functional.dropout(features["text"], 0.5)
    torch.testing.assert_close(dropped["text"], run.model.latents({**features, "text": text})["text"])
    assert not torch.allclose(dropped["text"], clean["text"])
    for m in ("audio", "video"):
        assert torch.equal(dropped[m], clean[m])
    assert torch.equal(run._batch_latents(batch, training=False)[0]["text"], clean["text"])  # validation: none


def test_generator_warm_up_trains_recovery_alone_first(corpus):
    run = tiny_run(corpus, generator_epochs=2)
    model = run.model
    generator, joint = run.stages()
    assert (generator.name, generator.epochs, joint.name) == ("generator", 2, "rohydr")
    # Its own optimiser and LR schedule: the joint stage's "recovery" group starts afresh.
    assert set(generator.optimiser_groups()) == {"warm_up"} and "warm_up" not in joint.optimiser_groups()
    recovery = {id(p) for p in model.parameter_groups()["recovery"]}
    assert {id(p) for p in generator.parameters} == recovery
    trained = {n for n, m in model.named_children() if any(m is t for t in generator.train_modules)}
    assert trained == {n for n, _ in model.named_children() if n.startswith(RECOVERY_MODULE_PREFIXES)}
    batch = next(iter(run.loader("train", missing="gcnet:0.5")))
    model.train()
    loss, n = run.generator_step(batch, 0)
    assert n == batch.num_utterances and torch.isfinite(loss)
    loss.backward()
    graded = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert graded and graded <= recovery
    assert np.isfinite(run.validate_generator()["loss"])
    assert [s.name for s in tiny_run(corpus, generator_epochs=0).stages()] == ["rohydr"]  # the release's schedule
    assert [s.name for s in tiny_run(corpus, generator_epochs=2, recovery="zero").stages()] == ["rohydr"]


def test_variants_start_from_the_same_shared_weights(corpus):
    """Seeded alike, RoHyDR and its zero-fill baseline differ only in what recovery adds."""
    models = {}
    for recovery in ("diffusion", "zero"):
        torch.manual_seed(3)
        models[recovery] = build_model(corpus, tiny_config(recovery=recovery)).state_dict()
    shared = set(models["zero"]) - {"scaling_fitted"}
    assert shared and shared < set(models["diffusion"])
    for key in shared:
        assert torch.equal(models["zero"][key], models["diffusion"][key]), key


def test_stage_losses_follow_the_release_formulas(corpus):
    """Stage 3 = (1 − λ_c)·L1(ŷ_gt, y) + λ_c·L1(ŷ_rec, y), recomputed from the model's own pieces."""
    run = tiny_run(corpus, lambda_c=0.25)
    model = run.model.eval()  # no dropout / batch statistics: the recomputation is exact
    batch = next(iter(run.loader("train", missing="fixed:ta")))
    seen = {}
    run.train_step(batch, 0, lambda group, loss: seen.__setitem__(group, loss.detach()))
    packed = batch.packed()
    with torch.no_grad():
        truth = model.latents(packed.ground_truth)
        y = packed.labels
        pred_gt = model.head(model.fuse(truth))
        samples = model.draw(model.latents(packed.ground_truth, packed.availability), packed.availability,
                             seed=run.batch_seed(0))
        recovered = model.recover(model.latents(packed.ground_truth, packed.availability), packed.availability,
                                  samples=samples)
        pred_rec = model.head(model.reconstruction(model.fuse(recovered)))
    expected = 0.75 * (pred_gt - y).abs().mean() + 0.25 * (pred_rec - y).abs().mean()
    torch.testing.assert_close(seen["fusion", "reconstructor"], expected, atol=1e-5, rtol=1e-5)


def test_all_missing_utterances_are_skipped_and_counted(corpus):
    run = tiny_run(corpus)
    run.model.train()
    batch = next(iter(run.loader("train", missing="gcnet:0.5")))
    avail = batch.availability.clone()
    avail[0, :2] = False
    losses = []
    n_before = run.skipped_utterances
    _, n = run.train_step(dataclasses.replace(batch, availability=avail), 0, lambda g, loss: losses.append(loss))
    assert run.skipped_utterances - n_before == 2 and n == batch.num_utterances - 2
    assert all(torch.isfinite(loss) for loss in losses)
    gone = dataclasses.replace(batch, availability=torch.zeros_like(batch.availability))
    assert run.train_step(gone, 0, lambda g, loss: None) == (None, 0)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("rohydr")
    return out, train_rohydr(corpus, tiny_config(out))


def test_training_writes_results_and_checkpoints(trained):
    out, results = trained
    assert set(results["systems"]) == {"rohydr", "zero_fill"}
    for name in ("rohydr", "zero_fill"):
        evaluation = results["systems"][name]["evaluation"]
        assert set(evaluation) == {f"pattern:{p}" for p in ("t", "a", "v", "ta", "tv", "av", "tav")} | {"rate:0.5"}
        assert all(set(m) == {"Acc2_non0", "F1_non0", "Acc7", "MAE", "Corr"} for m in evaluation.values())
        assert (out / name / "model.pt").exists() and json.loads((out / name / "metrics.json").read_text())["history"]
    error = results["systems"]["rohydr"]["recovery_error"]
    assert error["entries"] > 0 and np.isfinite(error["recovered_mse"])
    assert json.loads((out / "results.json").read_text())["systems"]["zero_fill"]["evaluation"]


def test_checkpoint_round_trip_and_refusal(trained, corpus, tmp_path):
    out, _ = trained
    model, config = load_rohydr(out / "rohydr" / "model.pt")
    again, _ = load_rohydr(out / "rohydr" / "model.pt")
    corpus = with_validation(corpus, config.valid_fraction, config.trainer.seed)
    assert RoHyDRRun(model, corpus, config).evaluate("test", "fixed:t") == \
        RoHyDRRun(again, corpus, config).evaluate("test", "fixed:t")
    torch.save({"model": "feddisc", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="load_rohydr: .* is not a RoHyDR checkpoint .*'feddisc'"):
        load_rohydr(tmp_path / "other.pt")


def test_bad_settings_are_refused(corpus):
    with pytest.raises(ValueError, match="RoHyDR: lambda_c must lie in"):
        RoHyDRRun(build_model(corpus, tiny_config()), corpus, tiny_config(lambda_c=1.5))
    with pytest.raises(ValueError, match=r"RoHyDR: the training protocol missing='fixed:ta' never makes \['video'\]"):
        train_rohydr(corpus, tiny_config(missing="fixed:ta"))
    with pytest.raises(ValueError, match="RoHyDR: preset"):
        build_model(corpus, tiny_config(preset="huge"))
    with pytest.raises(ValueError, match=r"RoHyDR: text_dropout must lie in \[0, 1\); got 1.0"):
        RoHyDRRun(build_model(corpus, tiny_config()), corpus, tiny_config(text_dropout=1.0))
    from imer_fast.models.rohydr import RoHyDR

    score = RoHyDR(corpus.feature_dims, generator="score", latent_channels=32, latent_length=8, timesteps=25,
                   score=dict(channels=(32, 32, 32, 32), embed_dim=32), refiner_blocks=1, refiner_reduction=4,
                   mult=dict(num_heads=2, layers=1, mem_layers=1))
    with pytest.raises(ValueError, match="RoHyDR: sampler_gradient needs generator='dit'"):
        RoHyDRRun(score, corpus, tiny_config(sampler_gradient=True, generator="score"))


def redundant_mosi(noise: float = 0.1, seed: int = 0):
    """Synthetic MOSI whose audio and video are noisy rotations of the text features, so each modality is
    predictable from the others (stock synthetic MOSI gives a cross-modal linear R² of at most 0.17, where
    no recovery can beat mean imputation by much: see docs/releases/rohydr.md §7)."""
    corpus = make_synthetic("mosi", seed=0, scale=0.3, feature_dims=12)
    rng = np.random.default_rng(seed)
    rotations = {m: np.linalg.qr(rng.standard_normal((12, 12)))[0].astype(np.float32) for m in ("audio", "video")}
    dialogues = {}
    for key, dialogue in corpus.dialogues.items():
        text = dialogue.features["text"]
        features = {"text": text, **{m: (text @ r + noise * rng.standard_normal(text.shape)).astype(np.float32)
                                     for m, r in rotations.items()}}
        dialogues[key] = dataclasses.replace(dialogue, features=features)
    return dataclasses.replace(corpus, dialogues=dialogues)


def test_seeded_evidence_generator_learns_conditional_recovery():
    """The DiT generator, trained with the model's own loss on audio-conditioned text latents, samples text
    latents closer to the truth than mean imputation (held-out utterances), and its prediction depends on the condition."""
    from imer_fast.data import MODALITIES, make_loader

    corpus = redundant_mosi()
    config = RoHyDRConfig(preset="small", sampling_steps=10)
    torch.manual_seed(0)
    model = build_model(corpus, config)
    packed = next(iter(make_loader(corpus, "train", 100, missing="none"))).packed()
    model.fit_scaling([(packed.features, packed.availability)])
    truth = {m: model.standardise(m, model.project(m, packed.ground_truth[m])).detach() for m in MODALITIES}
    audio_only = torch.zeros_like(packed.availability)
    audio_only[:, 1] = True
    optimiser = torch.optim.AdamW(model.score_l.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        cond, _ = model.condition("text", truth, audio_only)
        loss = model.generator_loss("text", truth["text"], cond)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    test = next(iter(make_loader(corpus, "test", 100, missing="none"))).packed()
    held = {m: model.standardise(m, model.project(m, test.ground_truth[m])).detach() for m in MODALITIES}
    audio_only = torch.zeros_like(test.availability)
    audio_only[:, 1] = True
    with torch.no_grad():
        cond, _ = model.condition("text", held, audio_only)
        t = torch.full((len(cond),), 50)
        noise = torch.randn(held["text"].shape, generator=torch.Generator().manual_seed(0))
        true_cond = model.diffusion.train_losses(model.score_l, held["text"], t, cond, noise=noise,
                                                 prediction=model.prediction)
        wrong_cond = model.diffusion.train_losses(model.score_l, held["text"], t, cond.roll(1, 0), noise=noise,
                                                  prediction=model.prediction)
        sampled = model.sample("text", cond, seed=0)
    mean_imputation = float((truth["text"].mean(0) - held["text"]).pow(2).mean())
    recovered = float((sampled - held["text"]).pow(2).mean())
    assert recovered < 0.75 * mean_imputation, (recovered, mean_imputation)  # measured 0.51 vs 0.89
    assert float(wrong_cond) > 3 * float(true_cond), (float(true_cond), float(wrong_cond))


# ---- seeded pipeline evidence (opt-in: IMER_FAST_EVIDENCE=1, about 3.5 minutes) --------------------------------

# Synthetic MOSI with redundant modalities (modality_noise=0.3), DiT generators, 80 warm-up epochs of recovery
# alone (generator_epochs, ours) then the release's 20 joint epochs; RoHyDR and its zero-fill baseline start from the
# same shared weights. Measured (2 CPU threads; seeds 0, 1, 2): recovered-latent MSE at GCNet 0.5 0.290 / 0.305 /
# 0.286 against mean imputation 0.351 / 0.357 / 0.339 (ratios 0.83 / 0.85 / 0.84). With 20 warm-up epochs the ratios
# were 0.92 / 0.99 / 0.94 and then 0.92 / 0.99 / 1.03 after a float-rounding change in a shared LayerNorm kernel: too
# close to 1 to assert. Test MAE at GCNet 0.5 (lower is better): RoHyDR 0.682 / 0.669 / 0.725 (c435593: stage 3 trains
# the reconstructor too, as the release; 0.724 / 0.748 / 0.789 before), zero-fill 0.642 / 0.625 / 0.647 — the
# pipeline does not beat zero-fill on accuracy (docs/releases/rohydr.md §7): a strict expected failure.
OPT_IN = pytest.mark.skipif(os.environ.get("IMER_FAST_EVIDENCE") != "1",
                            reason="set IMER_FAST_EVIDENCE=1 (about 3.5 min)")
PIPELINE = dict(preset="small", generator="dit", generator_epochs=80, epochs=20, batch_size=2, missing="gcnet:0.3",
                eval_rates=(), eval_patterns=False)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def pipeline():
    corpus = with_validation(make_synthetic("mosi", seed=0, scale=0.3, feature_dims=12, modality_noise=0.3), 0.1, 0)
    runs = {}
    for seed in SEEDS:
        for recovery in ("zero", "diffusion"):
            config = RoHyDRConfig(recovery=recovery, trainer=TrainerConfig(progress=False, lr=3e-3, seed=seed),
                                  **PIPELINE)
            torch.manual_seed(seed)
            run = RoHyDRRun(build_model(corpus, config), corpus, config)
            Trainer(run.model, run.stages(), config.trainer).run()
            runs[recovery, seed] = run
    return runs


@pytest.mark.slow
@OPT_IN
def test_recovered_latents_beat_mean_imputation(pipeline):
    errors = {seed: pipeline["diffusion", seed].recovery_error("test", "gcnet:0.5") for seed in SEEDS}
    print(errors)
    ratios = [e["recovered_mse"] / e["mean_imputation_mse"] for e in errors.values()]
    assert all(r < 0.92 for r in ratios) and sum(ratios) / len(ratios) < 0.90, errors


@pytest.mark.slow
@OPT_IN
@pytest.mark.xfail(strict=True, reason="RoHyDR does not beat zero-fill on MAE yet (measured above)")
def test_recovery_beats_zero_fill_on_mae(pipeline):
    mae = {key: run.evaluate("test", "gcnet:0.5")["MAE"] for key, run in pipeline.items()}
    print(mae)
    assert sum(mae["diffusion", s] for s in SEEDS) < sum(mae["zero", s] for s in SEEDS), mae
