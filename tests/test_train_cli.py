"""The first main job: `imer-fast train --model dgn` end to end on a small synthetic corpus."""
import json
import os

import pytest
import torch

from imer_fast.cli import main
from imer_fast.data import make_synthetic
from imer_fast.io import atomic_write_json
from imer_fast.train import DGNConfig, train_dgn


def test_cli_train_writes_metrics_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "dgn", "--data", "synthetic-iemocap6", "--scale", "0.15", "--feature-dim", "16",
                 "--missing-rate", "0.3", "--epochs", "2", "--batch-size", "4", "--hidden", "16", "--quiet",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "WA" in printed and "UA" in printed and "WF1" in printed and "tav" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and set(metrics["patterns"]) == {"t", "a", "v", "ta", "tv", "av", "tav"}
    for value in metrics["test"].values():
        assert 0.0 <= value <= 1.0
    checkpoint = torch.load(out / "model.pt", weights_only=False)
    assert checkpoint["model"] == "dgn" and "smax_fc.weight" in checkpoint["state_dict"]

    # a second run into the same folder would replace this one: refused unless asked for
    before = (out / "model.pt").read_bytes()
    again = ["train", "--model", "dgn", "--data", "synthetic-iemocap6", "--scale", "0.15", "--feature-dim", "16",
             "--epochs", "1", "--batch-size", "4", "--hidden", "16", "--quiet", "--no-pattern-eval", "--out", str(out)]
    with pytest.raises(SystemExit, match="holds an earlier run .*--resume to continue it, --overwrite to replace it"):
        main(again)
    assert (out / "model.pt").read_bytes() == before
    assert main(again + ["--overwrite"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 1


def test_training_learns_beyond_chance():
    corpus = make_synthetic("iemocap6", seed=0, scale=0.5, feature_dims=32)
    config = DGNConfig(epochs=10, batch_size=8, hidden=32, lr=3e-3, dropout=0.0, recon_weight=0.0,
                       missing="gcnet:0.3", progress=False, eval_patterns=False)
    result = train_dgn(corpus, config)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.85 * losses[0]
    labels = [int(y) for d in corpus.split("test") for y in d.labels]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    assert result["test"]["WA"] > majority + 0.1


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit, match="unknown synthetic corpus 'nope'"):
        main(["train", "--data", "synthetic-nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--missing"):
        main(["train", "--missing", "gcnet:0.9", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--data gcnet needs --label-path"):
        main(["train", "--data", "gcnet", "--out", str(tmp_path)])


def test_dgn_names_a_modality_the_corpus_lacks():
    corpus = make_synthetic("iemocap4", seed=0, scale=0.1, feature_dims=12).with_modalities(["audio", "text"])
    with pytest.raises(ValueError, match=r"train_dgn: the corpus .* has no \['video'\] features"):
        train_dgn(corpus, DGNConfig(epochs=1, hidden=16, progress=False))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not JSON-serialisable: fails mid-write
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary file left behind


def test_atomic_write_gives_the_mode_a_plain_open_would_and_keeps_an_existing_one(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "new.json", {})
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        path.chmod(0o640)
        atomic_write_json(path, {"again": 1})
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
