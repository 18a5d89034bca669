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
    assert main(["recover", "--checkpoint", ckpt, *data, "--missing", "fixed:a", "--out", str(tmp_path / "r.npz")]) == 0
    arrays = np.load(tmp_path / "r.npz")
    assert not arrays["availability"][:, 0].any() and arrays["availability"][:, 1].all()
    text = arrays["latent_text"]
    assert text.shape[0] == arrays["availability"].shape[0] and np.isfinite(text).all()

    with pytest.raises(SystemExit, match="do not match the checkpoint"):
        main(["eval", "--checkpoint", ckpt, *data[:-1], "12"])


def test_token_recovery_is_drkf_only(tmp_path):
    with pytest.raises(SystemExit, match="only DRKF"):
        main(["train", "--model", "rohydr", *ROHYDR_DATA, *COMMON, "--recovery", "token", "--out", str(tmp_path)])


def test_eval_refuses_a_file_that_is_not_a_system_checkpoint(tmp_path):
    import torch

    torch.save({"model": "dgn", "state_dict": {}}, tmp_path / "dgn.pt")
    with pytest.raises(SystemExit, match="not a checkpoint written by imer-fast train"):
        main(["eval", "--checkpoint", str(tmp_path / "dgn.pt"), *DRKF_DATA])
