"""`imer-fast train / eval / recover` for RoHyDR and DRKF: one command each, end to end on tiny synthetic corpora."""
import json

import numpy as np
import pytest

from imer_fast.cli import main

ROHYDR_DATA = ["--data", "synthetic-mosi", "--scale", "0.1", "--feature-dim", "8"]
DRKF_DATA = ["--data", "synthetic-iemocap4", "--scale", "0.1", "--feature-dim", "8"]
COMMON = ["--preset", "small", "--eval-rates", "0.0,0.5", "--batch-size", "4", "--quiet"]


@pytest.mark.parametrize("model, data, extra, metric", [
    ("rohydr", ROHYDR_DATA, ["--epochs", "1"], "MAE"),
    ("drkf", DRKF_DATA, ["--epochs", "1", "--generator-epochs", "1", "--finetune-epochs", "1", "--condition-context"],
     "WA"),
])
def test_train_eval_recover(tmp_path, capsys, model, data, extra, metric):
    out = tmp_path / "run"
    assert main(["train", "--model", model, *data, *COMMON, *extra, "--missing", "gcnet:0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{model} {metric}" in printed and f"zero_fill {metric}" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == {model, "zero_fill"}
    if model == "drkf":
        assert results["config"]["condition_context"]  # the flag reached the model's config and checkpoint
    evaluation = results["systems"][model]["evaluation"]
    assert "rate:0.5" in evaluation and metric in evaluation["rate:0.5"]
    ckpt = str(out / model / "model.pt")

    assert main(["eval", "--checkpoint", ckpt, *data, "--missing", "fixed:a", "--out", str(tmp_path / "e.json")]) == 0
    assert metric in json.loads((tmp_path / "e.json").read_text())["fixed:a"]
    # without --batch-size, eval batches as the training run did and gives its numbers
    assert main(["eval", "--checkpoint", ckpt, *data, "--eval-rates", "0.5", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rate:0.5"] == evaluation["rate:0.5"]
    assert main(["recover", "--checkpoint", ckpt, *data, "--missing", "fixed:a", "--out", str(tmp_path / "r.npz")]) == 0
    arrays = np.load(tmp_path / "r.npz")
    assert not arrays["availability"][:, 0].any() and arrays["availability"][:, 1].all()
    text = arrays["latent_text"]
    assert text.shape[0] == arrays["availability"].shape[0] and np.isfinite(text).all()

    with pytest.raises(SystemExit, match="do not match the checkpoint"):
        main(["eval", "--checkpoint", ckpt, *data[:-1], "12"])
    with pytest.raises(SystemExit, match="do not match the checkpoint"):  # recover checks its data like eval
        main(["recover", "--checkpoint", ckpt, *data[:-1], "12", "--out", str(tmp_path / "r2.npz")])
    # data the model cannot score: another task, or more classes than it has
    other = DRKF_DATA[:1] + ["synthetic-iemocap6"] + DRKF_DATA[2:] if model == "drkf" else \
        ["--data", "synthetic-iemocap4"] + ROHYDR_DATA[2:]
    refusal = "lie in \\[0, 6\\); the checkpoint has 4 classes" if model == "drkf" else \
        "classification corpus; the checkpoint's model does regression"
    with pytest.raises(SystemExit, match=refusal):
        main(["eval", "--checkpoint", ckpt, *other, "--missing", "fixed:a"])
    with pytest.raises(SystemExit, match="--split: .* no dialogues in split 'dev'"):
        main(["eval", "--checkpoint", ckpt, *data, "--split", "dev"])
    # the trainer's resume checkpoint next to model.pt, and a folder
    with pytest.raises(SystemExit, match="the trainer's resume checkpoint; pass the model.pt"):
        main(["eval", "--checkpoint", str(out / model / "checkpoint.pt"), *data])
    with pytest.raises(SystemExit, match="is a folder"):
        main(["eval", "--checkpoint", str(out / model), *data])
    # eval reports every pattern, even of a model trained with --no-pattern-eval, and keeps rates apart
    assert main(["eval", "--checkpoint", ckpt, *data, "--eval-rates", "0.05,0.1,0.15",
                 "--out", str(tmp_path / "all.json")]) == 0
    evaluation = json.loads((tmp_path / "all.json").read_text())
    assert {"pattern:ta", "rate:0.05", "rate:0.1", "rate:0.15"} <= set(evaluation)


def test_token_recovery_is_drkf_only(tmp_path):
    with pytest.raises(SystemExit, match="only DRKF"):
        main(["train", "--model", "rohydr", *ROHYDR_DATA, *COMMON, "--recovery", "token", "--out", str(tmp_path)])


def test_eval_refuses_a_file_that_is_not_a_system_checkpoint(tmp_path):
    import torch

    torch.save({"model": "mult", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a checkpoint written by imer-fast train .*'mult'"):
        main(["eval", "--checkpoint", str(tmp_path / "other.pt"), *DRKF_DATA])
    torch.save({"model": "dgn", "state_dict": {}}, tmp_path / "dgn.pt")
    with pytest.raises(SystemExit, match="Dialogue Graph Network written by imer-fast train --model dgn, which"):
        main(["eval", "--checkpoint", str(tmp_path / "dgn.pt"), *DRKF_DATA])


def test_dgn_refuses_the_recovery_systems_trainer_flags(tmp_path):
    for flags in (["--resume"], ["--patience", "3"], ["--amp"]):
        with pytest.raises(SystemExit, match=f"{flags[0]}: not used by --model dgn"):
            main(["train", "--model", "dgn", *DRKF_DATA, *flags, "--out", str(tmp_path), "--quiet"])


def test_bad_cli_input_gets_a_message_naming_the_option(tmp_path):
    with pytest.raises(SystemExit, match="--data dialoguegcn: .*file not found"):
        main(["train", "--model", "dgn", "--data", "dialoguegcn", "--path", str(tmp_path / "none.pkl")])
    with pytest.raises(SystemExit, match="imer-fast train: train_dgn: the corpus must be a classification corpus"):
        main(["train", "--model", "dgn", *ROHYDR_DATA, "--epochs", "1", "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit, match="imer-fast synthesize: name: unknown synthetic dataset 'nope'"):
        main(["synthesize", "--name", "nope", "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="--device"):
        main(["train", "--model", "dgn", *DRKF_DATA, "--device", "nonsense", "--out", str(tmp_path)])



def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import torch

    import imer_fast.train.trainer as trainer_module

    args = ["train", "--model", "drkf", *DRKF_DATA, "--preset", "small", "--eval-rates", "0.0", "--batch-size", "4",
            "--quiet", "--no-pattern-eval", "--no-baseline", "--epochs", "2", "--generator-epochs", "1",
            "--finetune-epochs", "2", "--missing", "gcnet:0.7", "--patience", "99"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    real = trainer_module.Trainer._run_epoch

    def crash_in_the_second_finetune_epoch(self, stage):
        if stage.name == "finetune" and self.position["epoch"] == 1:
            raise KeyboardInterrupt("simulated crash")
        return real(self, stage)

    monkeypatch.setattr(trainer_module.Trainer, "_run_epoch", crash_in_the_second_finetune_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "crash")])
    monkeypatch.setattr(trainer_module.Trainer, "_run_epoch", real)
    # the seed also draws another validation split: both are named
    with pytest.raises(SystemExit, match=r"other settings \(corpus.splits.train: .*trainer.seed: 0 -> 1\)"):
        main(args + ["--out", str(tmp_path / "crash"), "--resume", "--seed", "1"])
    assert main(args + ["--out", str(tmp_path / "crash"), "--resume"]) == 0
    full, resumed = (torch.load(tmp_path / run / "drkf" / "model.pt", weights_only=False)["state_dict"]
                     for run in ("full", "crash"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    counts = [json.loads((tmp_path / run / "results.json").read_text())["systems"]["drkf"]
              ["skipped_all_missing_utterances"] for run in ("full", "crash")]
    assert counts[0] == counts[1] > 0
