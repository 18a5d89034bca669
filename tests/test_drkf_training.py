"""DRKF training end to end on small synthetic corpora: schedule, outputs, checkpoints, bad input, and
seeded evidence that recovery beats zero-fill."""
import dataclasses
import json
import os

import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.train.drkf import DRKFConfig, DRKFRun, build_model, load_drkf, train_drkf
from imer_fast.train.trainer import Trainer, TrainerConfig, with_validation


def tiny_config(tmp_path=None, **kwargs):
    base = dict(preset="small", drkf_epochs=1, generator_epochs=1, finetune_epochs=1, batch_size=4, eval_rates=(0.5,),
                sampling_steps=2, trainer=TrainerConfig(progress=False, out_dir=str(tmp_path) if tmp_path else None,
                                                        lr=1e-3))
    base.update(kwargs)
    return DRKFConfig(**base)


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap4", seed=0, scale=0.05, feature_dims=12)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("drkf")
    return out, train_drkf(corpus, tiny_config(out))


def test_schedule_trains_and_writes_everything(trained):
    out, results = trained
    assert set(results["systems"]) == {"drkf", "zero_fill"}
    assert [e["stage"] for e in results["systems"]["drkf"]["history"]] == ["drkf", "generator", "finetune"]
    assert [e["stage"] for e in results["systems"]["zero_fill"]["history"]] == ["drkf", "finetune"]
    for name in ("drkf", "zero_fill"):
        evaluation = results["systems"][name]["evaluation"]
        assert set(evaluation) == {"pattern:a", "pattern:t", "pattern:ta", "rate:0.5"}
        assert all(0.0 <= m["WA"] <= 1.0 and 0.0 <= m["UA"] <= 1.0 for m in evaluation.values())
        assert (out / name / "model.pt").exists() and (out / name / "checkpoint.pt").exists()
    error = results["systems"]["drkf"]["recovery_error"]
    assert error["entries"] > 0 and error["recovered_mse"] == error["recovered_mse"]  # not NaN
    saved = json.loads((out / "results.json").read_text())
    assert saved["systems"]["zero_fill"]["evaluation"]["pattern:ta"]["WA"] == \
        results["systems"]["zero_fill"]["evaluation"]["pattern:ta"]["WA"]


def test_checkpoint_round_trip(trained, corpus):
    out, _ = trained
    model, config = load_drkf(out / "drkf" / "model.pt")
    again, _ = load_drkf(out / "drkf" / "model.pt")
    assert config.recovery == "diffusion" and tuple(config.modalities) == ("audio", "text")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    assert DRKFRun(model, corpus, config).evaluate("test", "fixed:a") == \
        DRKFRun(again, corpus, config).evaluate("test", "fixed:a")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save({"model": "feddisc", "state_dict": {}}, tmp_path / "feddisc.pt")
    with pytest.raises(ValueError, match="not a DRKF checkpoint .*'feddisc'"):
        load_drkf(tmp_path / "feddisc.pt")


def test_labels_out_of_range_get_a_clear_error(corpus):
    config = tiny_config()
    run = DRKFRun(build_model(corpus, config), corpus, config)
    batch = next(iter(run.loader("train")))
    batch.labels[batch.utterance_mask] = 7
    with pytest.raises(ValueError, match=r"DRKF: labels must lie in \[0, 4\)"):
        run.drkf_step(batch, 0)


@pytest.mark.parametrize("pairs", [0, -1, 2.5, True])
def test_max_pairs_must_be_none_or_positive(corpus, pairs):
    config = tiny_config(max_pairs=pairs)
    with pytest.raises(ValueError, match=r"DRKF: max_pairs must be None .* or an int >= 1; got"):
        DRKFRun(build_model(corpus, config), corpus, config)


def test_corpus_without_a_modality_is_refused(corpus):
    dialogues = {k: dataclasses.replace(d, features={m: f for m, f in d.features.items() if m != "audio"})
                 for k, d in corpus.dialogues.items()}
    no_audio = dataclasses.replace(corpus, dialogues=dialogues,
                                   feature_dims={m: w for m, w in corpus.feature_dims.items() if m != "audio"})
    with pytest.raises(ValueError, match="has no 'audio' features"):
        train_drkf(no_audio, tiny_config())


def test_modality_absent_everywhere_is_refused_before_generators(corpus):
    config = tiny_config(missing="fixed:tv")  # audio never available
    run = DRKFRun(build_model(corpus, config), corpus, config)
    with pytest.raises(ValueError, match=r"no available entries for modalities \['audio'\]"):
        run.fit_scaling()


def test_diffusion_recovery_refuses_a_training_protocol_that_never_shows_a_modality(corpus):
    with pytest.raises(ValueError, match=r"DRKF: the training protocol missing='fixed:t' never makes \['audio'\]"):
        train_drkf(corpus, tiny_config(missing="fixed:t"))


def test_all_missing_utterances_are_skipped_and_counted(corpus):
    config = tiny_config(missing="fixed:v")  # neither audio nor text: nothing for DRKF to learn from
    run = DRKFRun(build_model(corpus, config), corpus, config)
    batch = next(iter(run.loader("train")))
    assert run.drkf_step(batch, 0) == (None, 0)
    assert run.finetune_step(batch, 0) == (None, 0)
    assert run.skipped_utterances == 2 * batch.num_utterances
    mixed = next(iter(run.loader("train", missing="gcnet:0.6")))
    loss, n = run.drkf_step(mixed, 0)
    assert torch.isfinite(loss) and 0 < n <= mixed.num_utterances


# ---- seeded evidence on synthetic IEMOCAP-4 -----------------------------------------------------------

# Corpus with redundant modalities (modality_noise=0.3; on the default corpus no recovery can beat mean
# imputation, see the README); generators conditioned on the other observed modality, pseudo-label temperature 0.2,
# 8-sample means. The diffusion and zero-fill models of one seed start from the same weights wherever they share
# them (one seed's WA moves by +-4 points with the initialisation alone), and three seeds are compared. Measured
# (2 CPU threads; seeds 0, 1, 2; code 291647a), WA averaged over pattern:a and pattern:t — diffusion 0.671 / 0.619 /
# 0.626 (mean 0.639), zero-fill 0.638 / 0.629 / 0.621 (mean 0.629); at 6a8c22f, before a last-bit change to a shared
# LayerNorm kernel, diffusion was 0.661 / 0.615 / 0.617. Recovery does not beat zero-fill at every seed (the
# generators' condition is the model's own per-utterance prediction, which carries nothing the zero-fill classifier
# lacks), so that assertion stays as stated and is expected to fail (strict: an unexpected pass is reported). The recovered
# latents do beat mean imputation (asserted). Opt in with IMER_FAST_EVIDENCE=1: about 5 minutes.
NOT_YET = pytest.mark.xfail(strict=True, reason="recovery does not beat zero-fill on accuracy yet (measured above)")
OPT_IN = pytest.mark.skipif(os.environ.get("IMER_FAST_EVIDENCE") != "1", reason="set IMER_FAST_EVIDENCE=1 (about 5 min)")
EVIDENCE = dict(preset="small", drkf_epochs=10, generator_epochs=30, finetune_epochs=5, batch_size=2,
                missing="gcnet:0.3", recovery_samples=8, condition_observed=True, pseudo_temperature=0.2,
                eval_rates=(), eval_patterns=False)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def evidence():
    corpus = with_validation(make_synthetic("iemocap4", seed=0, scale=0.3, feature_dims=16, modality_noise=0.3),
                             0.1, 0)
    runs = {}
    for seed in SEEDS:
        for recovery in ("zero", "diffusion"):
            trainer = TrainerConfig(progress=False, lr=2e-3, seed=seed)
            config = DRKFConfig(recovery=recovery, trainer=trainer, **EVIDENCE)
            torch.manual_seed(seed)
            model = build_model(corpus, config)
            run = DRKFRun(model, corpus, config)
            Trainer(model, run.stages(), config.trainer).run()
            runs[recovery, seed] = run
    return runs


@pytest.mark.slow
@OPT_IN
@NOT_YET
def test_recovery_beats_zero_fill_under_missing_modalities(evidence):
    accuracy = {key: sum(run.evaluate("test", f"fixed:{p}")["WA"] for p in ("a", "t")) / 2
                for key, run in evidence.items()}
    print(accuracy)
    for seed in SEEDS:
        assert accuracy["diffusion", seed] > accuracy["zero", seed], (seed, accuracy)
    mean = {r: sum(accuracy[r, seed] for seed in SEEDS) / len(SEEDS) for r in ("diffusion", "zero")}
    assert mean["diffusion"] > mean["zero"] + 0.01, mean


@pytest.mark.slow
@OPT_IN
def test_diffusion_recovery_beats_mean_imputation(evidence):
    for pattern in ("a", "t"):
        error = evidence["diffusion", 0].recovery_error("test", f"fixed:{pattern}")
        assert error["recovered_mse"] < 0.9 * error["mean_imputation_mse"], (pattern, error)
