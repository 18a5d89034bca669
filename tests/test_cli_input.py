"""Bad command lines are refused before any work, with the flag named; --out never mixes two runs."""
import pytest
import torch

from imer_fast.cli import main

DATA = ["--data", "synthetic-iemocap6", "--scale", "0.1", "--feature-dim", "8"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1; got 0"),
    (["train", "--model", "rohydr", "--epochs", "-1"], "argument --epochs: expected an integer >= 0; got -1"),
    (["train", "--model", "drkf", "--finetune-epochs", "-1"], "argument --finetune-epochs: expected an integer >= 0"),
    (["train", "--feature-dim", "0"], "argument --feature-dim: expected an integer >= 1; got 0"),
    (["train", "--afa-cycles", "0"], "argument --afa-cycles: expected an integer >= 1; got 0"),
    (["train", "--seed", "x"], "argument --seed: expected an integer >= 0; got 'x'"),
    (["eval", "--checkpoint", "m.pt", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["recover", "--checkpoint", "m.pt", "--out", "r.npz", "--seed", "-1"],
     "argument --seed: expected an integer >= 0"),
    (["federated", "--local-epochs", "0"], "argument --local-epochs: expected an integer >= 1; got 0"),
    (["federated", "--rounds", "-2"], "argument --rounds: expected an integer >= 0; got -2"),
    (["train", "--window-past", "-2"], "argument --window-past: expected an integer >= -1; got -2"),  # -1: all
])
def test_counts_sizes_and_seeds_are_checked_when_the_command_line_is_read(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("model, flags, refused", [
    ("feddisc", ["--epochs", "1"], "--epochs: not used by --model feddisc (--epochs is for rohydr, drkf, dgn)"),
    ("rohydr", ["--recovery-samples", "8", "--condition-observed", "--window-past", "1"],
     "--window-past, --recovery-samples, --condition-observed: not used by --model rohydr"),
    ("drkf", ["--temperature", "5", "--schedule", "afa"], "--schedule, --temperature: not used by --model drkf"),
    ("dgn", ["--resume"], "--resume: not used by --model dgn (--resume is for feddisc, rohydr, drkf)"),
])
def test_a_flag_the_model_does_not_read_is_refused(tmp_path, model, flags, refused):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", model, *DATA, *flags, "--out", str(tmp_path / "run")])
    assert str(exit_info.value).startswith(refused)
    assert not (tmp_path / "run").exists()


def test_missing_and_missing_rate_together_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--missing fixed:ta and --missing-rate 0.5: give one"):
        main(["train", "--model", "dgn", *DATA, "--missing", "fixed:ta", "--missing-rate", "0.5", "--out",
              str(tmp_path)])


def _earlier_run(out):
    for path in ("checkpoint.pt", "metrics.json", "feddisc/model.pt", "zero_fill/checkpoint.pt", "results.png"):
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(b"earlier run")
    (out / "notes.txt").write_text("the user's own file")


def test_overwrite_clears_only_the_earlier_runs_files(tmp_path):
    from argparse import Namespace

    from imer_fast.cli import prepare_out

    _earlier_run(tmp_path)
    with pytest.raises(SystemExit, match="holds an earlier run"):
        prepare_out(Namespace(out=str(tmp_path), resume=False, overwrite=False))
    prepare_out(Namespace(out=str(tmp_path), resume=True, overwrite=False))  # resume keeps everything
    assert (tmp_path / "zero_fill" / "checkpoint.pt").exists()
    prepare_out(Namespace(out=str(tmp_path), resume=False, overwrite=True))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["notes.txt"]
    with pytest.raises(SystemExit, match="--resume and --overwrite: choose one"):
        prepare_out(Namespace(out=str(tmp_path), resume=True, overwrite=True))
    with pytest.raises(SystemExit, match="expected a folder; a file of that name exists"):
        prepare_out(Namespace(out=str(tmp_path / "notes.txt"), resume=False, overwrite=False))


def test_federated_refuses_an_out_holding_an_earlier_run(tmp_path):
    _earlier_run(tmp_path)
    with pytest.raises(SystemExit, match="holds an earlier run .*--resume to continue it, --overwrite"):
        main(["federated", *DATA, "--preset", "small", "--rounds", "1", "--quiet", "--out", str(tmp_path)])
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"earlier run"


def test_eval_and_recover_check_out_before_reading_the_checkpoint(tmp_path):
    for command in ("eval", "recover"):
        with pytest.raises(SystemExit, match="--out .*: expected a file path; that is a folder"):
            main([command, "--checkpoint", str(tmp_path / "absent.pt"), *DATA, "--out", str(tmp_path)])


@pytest.mark.parametrize("generator", ["dit", "score"])
def test_every_rohydr_preset_builds_each_generator(generator):
    from imer_fast.data import make_synthetic
    from imer_fast.train.rohydr import PRESETS, RoHyDRConfig, build_model

    corpus = make_synthetic("mosi", seed=0, scale=0.05, feature_dims=8)
    for preset in PRESETS:
        model = build_model(corpus, RoHyDRConfig(preset=preset, generator=generator))
        assert sum(p.numel() for p in model.parameters()) > 0
        del model
    torch.manual_seed(0)


def _data_args(**given):
    import argparse

    from imer_fast.cli import _add_data

    parser = argparse.ArgumentParser()
    _add_data(parser)
    args = parser.parse_args([])
    vars(args).update(given)
    return args


def test_data_flags_that_the_data_kind_ignores_are_refused(tmp_path):
    from imer_fast.cli import load_corpus

    with pytest.raises(SystemExit, match="--scale, --feature-dim: not used by --data gcnet"):
        load_corpus(_data_args(data="gcnet", scale=0.5, feature_dim=64))
    with pytest.raises(SystemExit, match="--num-classes: not used by --data synthetic-iemocap6"):
        load_corpus(_data_args(data="synthetic-iemocap6", num_classes=4))
    with pytest.raises(SystemExit, match="--label-path: not used by --data dialoguegcn"):
        load_corpus(_data_args(data="dialoguegcn", path="x.pkl", label_path="labels.pkl"))


def test_a_modality_given_twice_to_feature_dir_is_refused():
    from imer_fast.cli import load_corpus

    with pytest.raises(SystemExit, match="--feature-dir: text is given twice \\('a' and 'b'\\)"):
        load_corpus(_data_args(data="gcnet", label_path="l.pkl", feature_dir=["text=a", "l=b"]))
    with pytest.raises(SystemExit, match="--feature-dir smell=c: .*expected one of"):
        load_corpus(_data_args(data="gcnet", label_path="l.pkl", feature_dir=["smell=c"]))


def test_mmsa_files_load_from_the_command_line(tmp_path):
    from imer_fast.cli import load_corpus
    from imer_fast.data import assert_corpus_equal, read_mmsa, write_synthetic

    path = write_synthetic("mosi", tmp_path, formats=("mmsa",), scale=0.05, feature_dims=4)["mmsa"]["path"]
    assert_corpus_equal(load_corpus(_data_args(data="mmsa", path=str(path))), read_mmsa(path).to_corpus())
    with pytest.raises(SystemExit, match="--data mmsa needs --path"):
        load_corpus(_data_args(data="mmsa"))


def test_backends_command_explains_every_registered_op(capsys):
    from imer_fast import backends

    assert main(["backends"]) == 0
    shown = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert shown == backends.registered_ops() and len(shown) >= 11
