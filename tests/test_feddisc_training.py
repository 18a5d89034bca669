"""FedDISC training end to end on a tiny synthetic corpus: the schedules, outputs, CLI eval / recover."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from imer_fast.cli import main
from imer_fast.data import make_synthetic
from imer_fast.train.feddisc import FedDISCConfig, FedDISCRun, build_model, load_feddisc, train_feddisc
from imer_fast.train.trainer import TrainerConfig

TINY_ARGS = ["--data", "synthetic-iemocap6", "--scale", "0.05", "--feature-dim", "12"]


def tiny_config(tmp_path, **kwargs):
    base = dict(preset="small", extractor_epochs=1, generator_epochs=1, classifier_epochs=1, batch_size=4,
                eval_rates=(0.5,), sampling_steps=2,
                trainer=TrainerConfig(progress=False, out_dir=str(tmp_path), lr=1e-3))
    base.update(kwargs)
    return FedDISCConfig(**base)


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap6", seed=0, scale=0.05, feature_dims=12)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("feddisc")
    return out, train_feddisc(corpus, tiny_config(out, batch_size=1))  # eval must batch as the run did


def test_release_schedule_trains_and_writes_everything(trained):
    out, results = trained
    assert set(results["systems"]) == {"feddisc", "zero_fill"}
    stages = [e["stage"] for e in results["systems"]["feddisc"]["history"]]
    assert stages == ["extractor", "generator", "classifier"]
    assert [e["stage"] for e in results["systems"]["zero_fill"]["history"]] == ["extractor", "classifier"]
    for name in ("feddisc", "zero_fill"):
        evaluation = results["systems"][name]["evaluation"]
        assert set(evaluation) == {f"pattern:{p}" for p in ("t", "a", "v", "ta", "tv", "av", "tav")} | {"rate:0.5"}
        assert all(0.0 <= m["WA"] <= 1.0 for m in evaluation.values())
        assert (out / name / "model.pt").exists() and (out / name / "checkpoint.pt").exists()
        assert json.loads((out / name / "metrics.json").read_text())["history"]
    error = results["systems"]["feddisc"]["recovery_error"]
    assert error["entries"] > 0 and np.isfinite(error["recovered_mse"])
    assert json.loads((out / "results.json").read_text())["systems"]["feddisc"]["evaluation"]


def test_afa_schedule_alternates_the_groups(corpus, tmp_path):
    config = tiny_config(tmp_path, schedule="afa", afa_cycles=2, eval_patterns=False, eval_rates=())
    model = build_model(corpus, config)
    names = [s.name for s in FedDISCRun(model, corpus, config).stages()]
    assert names == ["extractor", "generator[1]", "classifier[1]", "generator[2]", "classifier[2]"]
    groups = model.parameter_groups()
    stages = FedDISCRun(model, corpus, config).stages()
    assert {id(p) for p in stages[1].parameters} == {id(p) for p in groups["recovery"]}
    assert {id(p) for p in stages[2].parameters} == {id(p) for p in groups["classifier"]}


def test_saved_model_reloads_and_predicts_the_same(trained, corpus):
    out, _ = trained
    model, config = load_feddisc(out / "feddisc" / "model.pt")
    again, _ = load_feddisc(out / "feddisc" / "model.pt")
    run = FedDISCRun(model, corpus, config)
    assert run.evaluate("test", "fixed:t") == FedDISCRun(again, corpus, config).evaluate("test", "fixed:t")


def test_cli_eval_and_recover(trained, tmp_path, capsys):
    out, results = trained
    ckpt = str(out / "feddisc" / "model.pt")
    # recovery noise depends on the batching: without --batch-size, eval batches as the run did (1, not 8)
    assert main(["eval", "--checkpoint", ckpt, *TINY_ARGS, "--eval-rates", "0.5", "--out",
                 str(tmp_path / "r.json")]) == 0
    trained_numbers = results["systems"]["feddisc"]["evaluation"]["rate:0.5"]
    assert json.loads((tmp_path / "r.json").read_text())["rate:0.5"] == trained_numbers
    assert main(["eval", "--checkpoint", ckpt, *TINY_ARGS, "--missing", "fixed:ta", "--out",
                 str(tmp_path / "m.json")]) == 0
    assert "fixed:ta" in json.loads((tmp_path / "m.json").read_text())
    assert main(["recover", "--checkpoint", ckpt, *TINY_ARGS, "--missing", "fixed:t", "--out",
                 str(tmp_path / "r.npz")]) == 0
    data = np.load(tmp_path / "r.npz")
    assert data["latent_audio"].shape[1:] == (16, 16)
    assert not data["availability"][:, 1:].any() and data["availability"][:, 0].all()
    with pytest.raises(SystemExit, match="feature widths"):
        main(["eval", "--checkpoint", ckpt, "--data", "synthetic-iemocap6", "--scale", "0.05", "--feature-dim", "8"])


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save({"model": "dgn", "state_dict": {}}, tmp_path / "dgn.pt")
    with pytest.raises(ValueError, match="not a FedDISC checkpoint"):
        load_feddisc(tmp_path / "dgn.pt")
    with pytest.raises(SystemExit, match="--checkpoint"):
        main(["eval", "--checkpoint", str(tmp_path / "dgn.pt"), *TINY_ARGS])


def test_labels_out_of_range_get_a_clear_error(corpus, tmp_path):
    config = tiny_config(tmp_path)
    run = FedDISCRun(build_model(corpus, config), corpus, config)
    batch = next(iter(run.loader("train")))
    batch.labels[batch.utterance_mask] = 9
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        run.extractor_step(batch, 0)


def test_a_training_protocol_that_never_shows_a_modality_is_refused_before_any_stage(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"FedDISC: the training protocol missing='fixed:ta' never makes \['video'\]"):
        train_feddisc(corpus, tiny_config(tmp_path, missing="fixed:ta"))
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_corpus_without_a_modality_is_refused(corpus, tmp_path):
    dialogues = {k: dataclasses.replace(d, features={m: f for m, f in d.features.items() if m != "video"})
                 for k, d in corpus.dialogues.items()}
    text_audio = dataclasses.replace(corpus, dialogues=dialogues,
                                     feature_dims={m: w for m, w in corpus.feature_dims.items() if m != "video"})
    with pytest.raises(ValueError, match="no 'video' features"):
        train_feddisc(text_audio, tiny_config(tmp_path))
