"""The in-process federated FedDISC simulation: shards, rounds, aggregation over the holders, resume, CLI."""
import argparse
import json
from dataclasses import replace

import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.federated import (FederatedConfig, SimulationHooks, make_clients, run_simulation, shard_corpus)
from imer_fast.federated.cli import add_federated_parser, run_federated
from imer_fast.federated.simulation import _pool_scaling, _scaling_statistics
from imer_fast.train.feddisc import FedDISCConfig, FedDISCRun, build_model, load_feddisc
from imer_fast.train.trainer import TrainerConfig, with_validation

TV, TA, AV = "client00:tv", "client01:ta", "client02:av"
TEXT_GEN, AUDIO_GEN = "recovery.score_l_va.", "recovery.score_a_lv."


def tiny_feddisc(**kwargs):
    return FedDISCConfig(preset="small", batch_size=4, sampling_steps=2,
                         trainer=TrainerConfig(lr=1e-3, progress=False), **kwargs)


def tiny_config(**kwargs):
    """The release's three clients, one recovery round then one classifier round, evaluated on one pattern."""
    base = dict(schedule="sequential", extractor_rounds=0, recovery_rounds=1, classifier_rounds=1, local_epochs=1,
                on_invalid="drop", eval_patterns=("tv",), progress=False, feddisc=tiny_feddisc())
    base.update(kwargs)
    return FederatedConfig(**base)


class Recorder:
    """Captures what every client starts from, every reply (before the server sees it) and every new
    global state; corrupts client ``av``'s classifier in round 2 (a NaN), as a faulty client would."""

    def __init__(self, stop_after=None):
        self.starts, self.replies, self.ends, self.stop_after = {}, {}, {}, stop_after

    def hooks(self):
        return SimulationHooks(client_start=self.client_start, reply=self.reply, round_end=self.round_end)

    def client_start(self, r, cid, state):
        self.starts[r, cid] = state

    def reply(self, r, cid, state):
        self.replies[r, cid] = {k: v.clone() for k, v in state.items()}
        if (r, cid) == (2, AV):
            state = dict(state)
            key = next(k for k in state if k.startswith("classifier.") and state[k].is_floating_point())
            state[key] = torch.full_like(state[key], float("nan"))
        return state

    def round_end(self, r, state, record):
        self.ends[r] = ({k: v.clone() for k, v in state.items()}, record)
        if r == self.stop_after:
            raise KeyboardInterrupt("interrupted after round %d" % r)


def keys(state, prefix):
    found = [k for k in state if k.startswith(prefix)]
    assert found, prefix
    return found


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread is as fast, and far faster when other work holds the cores (two
    threads then spin against each other, e.g. 0.9 s instead of 1 ms for the DGN's LSTM)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap6", seed=0, scale=0.05, feature_dims=12)


@pytest.fixture(scope="module")
def simulated(corpus):
    recorder = Recorder()
    results = run_simulation(corpus, tiny_config(), recorder.hooks())
    return recorder, results


# ---- shards -----------------------------------------------------------------------------------


def test_shards_are_disjoint_cover_the_training_dialogues_and_are_seeded():
    corpus = make_synthetic("iemocap6", seed=0, scale=0.1, feature_dims=4)
    train = corpus.splits["train"]
    shards = shard_corpus(corpus, 3, seed=0)
    ids = [s.splits["train"] for s in shards]
    assert sorted(i for shard in ids for i in shard) == sorted(train)          # cover, no duplicates
    assert max(map(len, ids)) - min(map(len, ids)) <= 1
    for shard in shards:
        assert set(shard.dialogues) == set(shard.splits["train"])              # nothing else, no test split
        assert shard.splits["train"] == [i for i in train if i in shard.splits["train"]]
    assert [s.splits["train"] for s in shard_corpus(corpus, 3, seed=0)] == ids
    assert [s.splits["train"] for s in shard_corpus(corpus, 3, seed=1)] != ids
    # a corpus with a valid split: every client gets its own share of it
    valid = with_validation(corpus, 0.5, seed=0)
    shards = shard_corpus(valid, 3, seed=0)
    held = [s.splits["valid"] for s in shards]
    assert sorted(i for h in held for i in h) == sorted(valid.splits["valid"]) and all(held)
    with pytest.raises(ValueError, match="fewer than the 13 clients"):
        shard_corpus(corpus, 13)
    # clients: a validation slice out of their own shard when there is no valid split; weights = utterances
    clients = make_clients(corpus, tiny_config())
    for client, shard in zip(clients, shard_corpus(corpus, 3, seed=0)):
        mine = client.corpus.splits["train"] + client.corpus.splits["valid"]
        assert sorted(mine) == sorted(shard.splits["train"])
        assert client.num_samples == client.corpus.num_utterances("train")
    assert [c.modalities for c in clients] == [{"text", "video"}, {"text", "audio"}, {"audio", "video"}]


def test_a_site_client_trains_on_its_own_train_and_valid_dialogues_only():
    from imer_fast.federated.rounds import site_client

    site = make_synthetic("iemocap6", seed=3, scale=0.1, feature_dims=4)     # its own train / test
    config = tiny_config()
    client = site_client(site, config, 2)
    assert (client.id, client.pattern, client.modalities) == (AV, "av", {"audio", "video"})
    mine = client.corpus.splits["train"] + client.corpus.splits["valid"]
    assert sorted(mine) == sorted(site.splits["train"]) and "test" not in client.corpus.splits
    assert set(client.corpus.dialogues) == set(mine)                          # the site's test never travels
    assert client.corpus.splits == with_validation(replace(site, splits={"train": site.splits["train"]}),
                                                   config.feddisc.valid_fraction, config.seed + 2).splits
    assert client.num_samples == client.corpus.num_utterances("train")
    with_valid = with_validation(site, 0.3, seed=0)                           # a site valid split is kept as is
    assert site_client(with_valid, config, 0).corpus.splits["valid"] == with_valid.splits["valid"]
    with pytest.raises(ValueError, match="index must be an int in"):
        site_client(site, config, 3)
    with pytest.raises(ValueError, match="has no training dialogues"):
        site_client(replace(site, splits={"test": site.splits["test"]}), config, 0)
    one = replace(site, splits={"train": site.splits["train"][:1]})
    with pytest.raises(ValueError, match="client client01:ta: .*at least 2 training dialogues"):
        site_client(one, config, 1)


def test_federated_scaling_equals_fitting_on_the_holders_pooled_data(corpus):
    """The clients send statistics of the modalities they hold; pooled per modality over its holders
    they give what fit_scaling gives on the holders' data together."""
    config = tiny_feddisc()
    model = build_model(corpus, config)
    tv, ta = shard_corpus(corpus, 2, seed=0)
    held = ((tv, "fixed:tv", {"text", "video"}), (ta, "fixed:ta", {"text", "audio"}))
    stats = [_scaling_statistics(FedDISCRun(model, shard, replace(config, missing=missing)), modalities)
             for shard, missing, modalities in held]
    pooled = _pool_scaling(model.state_dict(), stats)
    assert bool(pooled["recovery.scaling_fitted"])
    for row, data in ((0, corpus), (1, ta), (2, tv)):   # text: both shards; audio: ta only; video: tv only
        fitted = build_model(corpus, config)
        fitted.load_state_dict(model.state_dict())
        FedDISCRun(fitted, data, replace(config, missing="none")).fit_scaling()
        reference = fitted.state_dict()
        for key in ("recovery.latent_min", "recovery.latent_max"):
            assert pooled[key][row] == reference[key][row], (key, row)
        for key in ("recovery.latent_mean", "recovery.latent_std"):
            if key in reference:
                torch.testing.assert_close(pooled[key][row], reference[key][row], rtol=1e-5, atol=1e-6)


# ---- rounds -----------------------------------------------------------------------------------


def test_recovery_round_averages_each_generator_over_its_holders_only(simulated):
    recorder, _ = simulated
    before = recorder.starts[1, TV]
    after, record = recorder.ends[1]
    assert record["phase"] == "recovery"
    replies = {cid: recorder.replies[1, cid] for cid in (TV, TA, AV)}
    for key in keys(after, TEXT_GEN):
        expected = ((replies[TV][key].double() + replies[TA][key].double()) / 2).to(after[key].dtype)
        assert torch.equal(after[key], expected), key
        assert torch.equal(replies[AV][key], before[key]), key     # av never trains the text generator
    assert any(not torch.equal(replies[TV][k], before[k]) for k in keys(after, TEXT_GEN))
    for key in keys(after, AUDIO_GEN):
        expected = ((replies[TA][key].double() + replies[AV][key].double()) / 2).to(after[key].dtype)
        assert torch.equal(after[key], expected), key
    for prefix in ("classifier.", "pseudo.", "dgn.", "recovery.proj_"):  # frozen this round: untouched
        for key in keys(after, prefix):
            assert torch.equal(after[key], before[key]), key
    groups = record["aggregation"]["groups"]
    assert groups["generator:text"]["contributors"] == [TV, TA]
    assert groups["generator:audio"]["contributors"] == [TA, AV]
    assert record["seconds"]["local_training"] > 0 and record["scaling_refitted"]


def test_every_client_starts_each_round_from_the_broadcast_state(simulated):
    recorder, _ = simulated
    for r in (1, 2):
        first = recorder.starts[r, TV]
        for cid in (TA, AV):
            start = recorder.starts[r, cid]
            assert start.keys() == first.keys()
            for key in first:          # the generators of the modalities the client lacks included
                assert torch.equal(start[key], first[key]), (r, cid, key)
    assert bool(recorder.starts[1, TV]["recovery.scaling_fitted"])
    previous, _ = recorder.ends[1]
    start = recorder.starts[2, AV]
    for key in previous:
        if key.startswith("classifier."):     # round 2 is the first classifier round: warm start from pseudo
            assert torch.equal(start[key], previous["pseudo." + key[len("classifier."):]]), key
        else:
            assert torch.equal(start[key], previous[key]), key


def test_a_corrupt_reply_is_dropped_and_the_round_goes_on(simulated):
    recorder, results = simulated
    after, record = recorder.ends[2]
    assert record["phase"] == "classifier" and set(record["aggregation"]["dropped"]) == {AV}
    assert "NaN" in record["aggregation"]["dropped"][AV]
    assert record["aggregation"]["groups"]["classifier"]["contributors"] == [TV, TA]
    for key in keys(after, "classifier."):
        if after[key].is_floating_point():
            expected = ((recorder.replies[2, TV][key].double() + recorder.replies[2, TA][key].double()) / 2)
            assert torch.equal(after[key], expected.to(after[key].dtype)), key
    assert results["rounds"] == 2 and set(results["models"]) == {"global"}
    global_model = results["models"]["global"]
    assert set(global_model["evaluation"]) == {"pattern:tv"}
    assert set(global_model["recovery_error"]) == {"fixed:tv", "fixed:ta", "fixed:av"}


def test_resume_after_an_interruption_ends_in_the_same_state_bit_for_bit(simulated, corpus, tmp_path):
    recorder, _ = simulated
    config = tiny_config(out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_simulation(corpus, config, Recorder(stop_after=1).hooks())
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rounds_done"] == 1 and len(saved["history"]) == 1
    with pytest.raises(ValueError, match="other settings"):
        run_simulation(corpus, tiny_config(out_dir=str(tmp_path), resume=True, seed=1))
    other = make_synthetic("iemocap6", seed=5, scale=0.05, feature_dims=12)  # same widths, other dialogues
    with pytest.raises(ValueError, match="written on another corpus"):
        run_simulation(other, tiny_config(out_dir=str(tmp_path), resume=True))
    resumed = Recorder()
    results = run_simulation(corpus, tiny_config(out_dir=str(tmp_path), resume=True), resumed.hooks())
    assert set(resumed.ends) == {2}                 # round 1 was not trained again
    final, _ = resumed.ends[2]
    expected, _ = recorder.ends[2]
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    assert len(json.loads((tmp_path / "metrics.json").read_text())["history"]) == 2
    assert json.loads((tmp_path / "results.json").read_text())["rounds"] == results["rounds"] == 2


# ---- CLI --------------------------------------------------------------------------------------


def federated_parser():
    parser = argparse.ArgumentParser(prog="imer-fast")
    sub = parser.add_subparsers(dest="command", required=True)
    return parser, add_federated_parser(sub)


def test_cli_help_and_a_tiny_run(tmp_path, capsys):
    parser, federated = federated_parser()
    undocumented = [a.dest for a in federated._actions if not a.help]
    assert not undocumented
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["federated", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--clients", "--rounds", "--local-epochs", "--schedule", "--local-only", "--resume", "--out"):
        assert flag in shown
    out = tmp_path / "local"
    args = parser.parse_args(["federated", "--data", "synthetic-iemocap6", "--scale", "0.05", "--feature-dim", "12",
                              "--clients", "tv,ta,av", "--schedule", "afa", "--rounds", "0", "--extractor-rounds",
                              "1", "--cycles", "0", "--local-epochs", "1", "--local-only", "--preset", "small",
                              "--batch-size", "4", "--sampling-steps", "2", "--eval-patterns", "t,tv", "--device",
                              "cpu", "--quiet", "--out", str(out)])
    assert run_federated(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "local" and results["rounds"] == 1 and set(results["models"]) == {TV, TA, AV}
    for cid, pattern in ((TV, "tv"), (TA, "ta"), (AV, "av")):
        model = results["models"][cid]
        assert set(model["evaluation"]) == {"pattern:t", "pattern:tv"}
        assert all(0 <= m["WA"] <= 1 for m in model["evaluation"].values())
        assert set(model["recovery_error"]) == {f"fixed:{pattern}"}       # the modality it never sees
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["extractor"] and set(history[0]["clients"]) == {TV, TA, AV}
    assert "aggregation" not in history[0]
    tv, _ = load_feddisc(out / "client00" / "model.pt")
    ta, _ = load_feddisc(out / "client01" / "model.pt")
    assert bool(tv.recovery.scaling_fitted)
    assert not torch.equal(tv.dgn.state_dict()[next(iter(tv.dgn.state_dict()))],
                           ta.dgn.state_dict()[next(iter(ta.dgn.state_dict()))])   # each trained alone
    with pytest.raises(SystemExit, match="clients"):
        run_federated(parser.parse_args(["federated", "--clients", "tx", "--out", str(out)]))


def test_settings_that_would_fail_after_rounds_of_training_are_refused_up_front():
    with pytest.raises(ValueError, match=r"no client holds \['audio'\]"):
        tiny_config(clients=("t", "tv"))
    for field, value in (("generator_batch_size", 0), ("batch_size", 0), ("sampling_steps", 0),
                         ("sampling_steps", 201)):
        with pytest.raises(ValueError, match=f"FedDISC: {field} must be an int"):
            FedDISCConfig(preset="small", **{field: value})
    parser, _ = federated_parser()
    with pytest.raises(SystemExit, match="--device"):
        run_federated(parser.parse_args(["federated", "--device", "nonsense", "--out", "unused"]))



def test_a_client_whose_training_fails_is_dropped_or_named(corpus, tmp_path):
    """As on Flower, where a raising ClientApp becomes an error reply: with on_invalid='drop' the round
    goes on without the client; with 'raise' the error names the client and the round."""
    def av_fails_in_round_2(r, cid, state):
        if (r, cid) == (2, AV):
            raise FloatingPointError("Trainer: non-finite loss nan")

    results = run_simulation(corpus, tiny_config(out_dir=str(tmp_path / "drop")),
                             SimulationHooks(client_start=av_fails_in_round_2))
    record = json.loads((tmp_path / "drop" / "metrics.json").read_text())["history"][1]
    assert record["aggregation"]["dropped"] == {AV: "local training raised FloatingPointError: Trainer: non-finite "
                                                    "loss nan"}
    assert record["aggregation"]["groups"]["classifier"]["contributors"] == [TV, TA]
    assert results["rounds"] == 2
    from imer_fast.federated.simulation import ClientTrainingError

    with pytest.raises(ClientTrainingError, match="federated round 2 \\(classifier\\): client client02:av failed: "
                                                  "FloatingPointError: Trainer: non-finite loss nan"):
        run_simulation(corpus, tiny_config(on_invalid="raise"), SimulationHooks(client_start=av_fails_in_round_2))


def test_a_round_in_which_every_client_fails_stops_with_the_previous_round_checkpointed(corpus, tmp_path):
    from imer_fast.federated.rounds import NoUsableRepliesError

    def everyone_fails_in_round_2(r, cid, state):
        if r == 2:
            raise RuntimeError("out of memory")

    with pytest.raises(NoUsableRepliesError, match="federated round 2 \\(classifier\\): no client's update could be "
                                                   "used .*checkpoint holds round 1"):
        run_simulation(corpus, tiny_config(out_dir=str(tmp_path)),
                       SimulationHooks(client_start=everyone_fails_in_round_2))
    assert json.loads((tmp_path / "metrics.json").read_text())["rounds_done"] == 1


def test_values_that_would_train_nothing_are_refused_before_any_round():
    with pytest.raises(ValueError, match="min_replies = 3 exceeds the 2 clients holding text .*never be aggregated"):
        tiny_config(min_replies=3)
    assert tiny_config(min_replies=3, federate=False).min_replies == 3   # local-only runs aggregate nothing
    for field, value, message in (("lr", -1.0, "lr must be a finite number > 0"), ("lr", 0.0, "> 0"),
                                  ("weight_decay", -1.0, "weight_decay must be a finite number >= 0"),
                                  ("grad_clip", -1.0, "grad_clip must be a finite number >= 0"),
                                  ("lr", float("nan"), "finite"), ("lr_factor", 1.0, "lr_factor must be a number in")):
        with pytest.raises(ValueError, match=f"Trainer: .*{message}"):
            TrainerConfig(**{field: value})
    with pytest.raises(ValueError, match="FedDISC: window_past must be an int >= -1; got -5"):
        tiny_feddisc(window_past=-5)
    assert tiny_feddisc(window_past=-1).window_past == -1   # GCNet's "the whole dialogue"
