"""Federated FedDISC on Flower (imer_fast.federated.flower, flwr 1.42 Message API).

Fast tests drive the ServerApp and the ClientApp in this process through :class:`InlineGrid`, a Grid that
calls the ClientApp for every message (no Ray, no sockets), and compare with the in-process simulation.
The slow ones run Flower's Ray simulation engine and a loopback deployment (flower-superlink, three
flower-supernode processes, ``flwr run``), killing one SuperNode mid-run. Every test that needs flwr
skips without it (``pip install "imer_fast[fed]"``).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from imer_fast.federated import SimulationHooks, run_simulation

try:   # the Grid base class, when flwr is installed (every test that uses it needs flwr anyway)
    from flwr.serverapp import Grid as _GridBase
except ImportError:
    _GridBase = object

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "feddisc-flower"
BIN = Path(sys.executable).parent
TV, TA, AV = "client00:tv", "client01:ta", "client02:av"

TINY = {"data": "synthetic-iemocap6", "scale": 0.05, "feature-dim": 12, "clients": "tv,ta,av", "schedule": "afa",
        "extractor-rounds": 1, "recovery-rounds": 1, "classifier-rounds": 1, "cycles": 1, "local-epochs": 1,
        "preset": "small", "batch-size": 4, "sampling-steps": 2, "lr": 1e-3, "eval-patterns": "tv",
        "on-invalid": "drop", "quiet": True, "torch-threads": 1}
"""Three rounds (extractor, recovery, classifier): a scaling refit before round 2 and the classifier's
warm start before round 3 are both exercised."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (two processes with two threads each on two cores slow each other 10-50x, and
    the cross-engine comparisons assume the same reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fl():
    pytest.importorskip("flwr")
    from imer_fast.federated import flower

    return flower


@pytest.fixture
def task_identity(fl):
    """``Message(content, dst, type)`` reads the running task's identity, which a real run sets
    (internal API; the legacy simulation API does the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InlineGrid(_GridBase):
    """A Flower Grid that answers every message by calling the ClientApp in this process.

    ``contexts``: node id -> the node's Context (its ``node_config`` holds its partition-id, and
    ``node_configs[partition id]``'s keys).
    ``intercept(msg, node) -> Optional[Message]``: a reply to use instead of the ClientApp's (fault
    injection); ``rewrite(msg, reply) -> Message``: replaces the ClientApp's reply. An exception in the
    ClientApp becomes an error reply (``CLIENT_APP_RAISED_EXCEPTION``), as on a SuperNode.
    """

    def __init__(self, client_app, num_nodes=3, intercept=None, rewrite=None, run_config=None, node_configs=None):
        from flwr.app import Context, RecordDict

        self.client_app, self.intercept, self.rewrite = client_app, intercept, rewrite
        extra = node_configs or {}
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i,
                                                                                  "num-partitions": num_nodes,
                                                                                  **extra.get(i, {})},
                                          state=RecordDict(), run_config=dict(run_config or {}))
                         for i in range(num_nodes)}
        self.offline, self.sent = set(), []

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages):
        raise NotImplementedError("InlineGrid answers in send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("InlineGrid answers in send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            self.sent.append((msg.metadata.message_type, node, msg))
            reply = self.intercept(msg, node) if self.intercept else None
            if reply is None and node in self.offline:
                reply = Message(Error(5, "node offline"), reply_to=msg)
            if reply is None:
                try:
                    reply = self.client_app(msg, self.contexts[node])
                except Exception as err:   # noqa: BLE001 - a SuperNode turns it into an error reply
                    reply = Message(Error(2, f"{type(err).__name__}: {err}"), reply_to=msg)
                if self.rewrite:
                    reply = self.rewrite(msg, reply)
            if reply is not False:        # False: no reply at all (lost)
                replies.append(reply)
        return replies


class Recorder:
    """The global state after every round, and the round records."""

    def __init__(self):
        self.ends = {}

    def hooks(self, **kwargs):
        return SimulationHooks(round_end=self.round_end, **kwargs)

    def round_end(self, r, state, record):
        self.ends[r] = ({k: v.detach().clone() for k, v in state.items()}, json.loads(json.dumps(record)))


def corrupt_av_in_round_2(r, cid, state):
    """The simulation's stand-in for a client that fails in round 2: a NaN reply, dropped."""
    if (r, cid) == (2, AV):
        state = dict(state)
        key = next(k for k in state if k.startswith("recovery.score_a_lv.") and state[k].is_floating_point())
        state[key] = torch.full_like(state[key], float("nan"))
    return state


def run_inline(fl, settings, grid_kwargs=None):
    recorder = Recorder()
    grid = InlineGrid(fl.make_client_app(settings), **(grid_kwargs or {}))
    from flwr.app import Context, RecordDict

    app = fl.make_server_app(settings, recorder.hooks(), poll_interval=0.01)
    app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return recorder, grid


def assert_same_state(a, b, what):
    assert list(a) == list(b), what
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (what, key)


# ---- the reference and the inline Flower runs ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_settings(fl, tmp_path_factory):
    out = tmp_path_factory.mktemp("flower")
    return {name: fl.Settings.from_run_config(TINY, out_dir=str(out / name)) for name in
            ("simulation", "flower", "simulation-drop", "flower-drop", "ray")}


@pytest.fixture(scope="module")
def reference(tiny_settings):
    settings = tiny_settings["simulation"]
    recorder = Recorder()
    results = run_simulation(settings.load_corpus(), settings.federated_config(), recorder.hooks())
    return recorder, results


@pytest.fixture(scope="module")
def inline(fl, tiny_settings):
    with identity():
        return run_inline(fl, tiny_settings["flower"])


class identity:
    """The task identity as a context manager (for module-scoped fixtures)."""

    def __enter__(self):
        from flwr.supercore.task_identity import TaskIdentity

        self.saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1

    def __exit__(self, *exc):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = self.saved


def test_flower_rounds_give_the_simulations_global_model_bit_for_bit(reference, inline, tiny_settings):
    """The same settings, seeds and shards: every round's global state, the final model and the test
    evaluation equal the in-process simulation's exactly."""
    (sim, sim_results), (flower, grid) = reference, inline
    assert set(sim.ends) == set(flower.ends) == {1, 2, 3}
    for r in (1, 2, 3):
        (sim_state, sim_record), (fl_state, fl_record) = sim.ends[r], flower.ends[r]
        assert_same_state(sim_state, fl_state, f"round {r}")
        for key in ("phase", "trainable", "scaling_refitted", "classifier_warm_started", "aggregation"):
            assert sim_record[key] == fl_record[key], (r, key)
        for cid in (TV, TA, AV):
            assert sim_record["clients"][cid]["seed"] == fl_record["clients"][cid]["seed"]
            assert sim_record["clients"][cid]["train_loss"] == fl_record["clients"][cid]["train_loss"]
    assert [sim.ends[r][1]["phase"] for r in (1, 2, 3)] == ["extractor", "recovery", "classifier"]
    assert sim.ends[2][1]["scaling_refitted"] and sim.ends[3][1]["classifier_warm_started"]
    # one identify per node, one scaling query per node (round 2), one train message per node and round
    kinds = [kind for kind, _, _ in grid.sent]
    assert kinds.count("query.identify") == 3 and kinds.count("query.scaling") == 3 and kinds.count("train") == 9
    # the saved artefacts: same model, same evaluation, same clients
    sim_dir, fl_dir = (Path(tiny_settings[n]["out-dir"]) for n in ("simulation", "flower"))
    sim_model = torch.load(sim_dir / "global" / "model.pt", weights_only=False)
    fl_model = torch.load(fl_dir / "global" / "model.pt", weights_only=False)
    assert_same_state(sim_model["state_dict"], fl_model["state_dict"], "model.pt")
    fl_results = json.loads((fl_dir / "results.json").read_text())
    assert fl_results["models"] == json.loads(json.dumps(sim_results["models"]))
    assert fl_results["clients"] == json.loads(json.dumps(sim_results["clients"]))
    fl_metrics = json.loads((fl_dir / "metrics.json").read_text())
    assert fl_metrics["rounds_done"] == 3 and len(fl_metrics["history"]) == 3


def test_a_client_failing_mid_run_is_dropped_and_the_next_round_goes_on(fl, reference, tiny_settings):
    """av's ClientApp raises in round 2: the server records the error reply, aggregates without it
    (each generator over its remaining holder), and round 3 goes on with all three clients; the states
    equal a simulation in which av's round-2 reply is dropped."""
    settings = tiny_settings["simulation-drop"]
    sim = Recorder()
    run_simulation(settings.load_corpus(), settings.federated_config(), sim.hooks(reply=corrupt_av_in_round_2))

    def fail_av_round_2(msg, node):
        if msg.metadata.message_type == "train" and node == 102 and msg.content["config"]["server-round"] == 2:
            from flwr.app import Message

            return Message(fl_error(2, "RuntimeError: out of memory"), reply_to=msg)
        return None

    with identity():
        flower, _ = run_inline(fl, tiny_settings["flower-drop"], {"intercept": fail_av_round_2})
    record = flower.ends[2][1]
    assert record["aggregation"]["dropped"] == {AV: "error reply CLIENT_APP_RAISED_EXCEPTION: RuntimeError: out of "
                                                    "memory"}
    groups = record["aggregation"]["groups"]
    assert groups["generator:audio"]["contributors"] == [TA] and groups["generator:video"]["contributors"] == [TV]
    assert groups["generator:text"]["contributors"] == [TV, TA]
    assert flower.ends[3][1]["aggregation"]["dropped"] == {}
    assert flower.ends[3][1]["aggregation"]["groups"]["classifier"]["contributors"] == [TV, TA, AV]
    for r in (1, 2, 3):
        assert_same_state(sim.ends[r][0], flower.ends[r][0], f"round {r}")


def write_sites(settings, root, feature_dim=None):
    """Each client's shard of the run's corpus written as its site's DialogueGCN pickle; the node
    configs pointing at them."""
    from imer_fast.data import make_synthetic
    from imer_fast.data.formats import write_dialoguegcn
    from imer_fast.federated import shard_corpus

    corpus = settings.load_corpus() if feature_dim is None else \
        make_synthetic("iemocap6", scale=settings["scale"], feature_dims=feature_dim)
    shards = shard_corpus(corpus, 3, settings["seed"])
    return {i: {"data": "dialoguegcn", "data-path": str(write_dialoguegcn(shard, root / f"site{i}.pkl")["path"])}
            for i, shard in enumerate(shards)}


def test_site_nodes_reading_their_own_files_give_the_shared_corpus_model(fl, reference, tiny_settings, tmp_path):
    """Each SuperNode reads its site's data (node config data + data-path) instead of sharding the
    run's corpus: with the sites' files holding exactly the shards, every round's global state equals
    the in-process simulation's, bit for bit."""
    settings = fl.Settings.from_run_config(TINY, num_classes=6, out_dir=str(tmp_path / "site-run"))
    nodes = write_sites(settings, tmp_path)
    with identity():
        flower, _ = run_inline(fl, settings, {"node_configs": nodes})
    sim, _ = reference
    for r in (1, 2, 3):
        assert flower.ends[r][1]["aggregation"]["dropped"] == {}
        assert_same_state(sim.ends[r][0], flower.ends[r][0], f"round {r}")
    results = json.loads((tmp_path / "site-run" / "results.json").read_text())
    assert {cid: c["train_dialogues"] for cid, c in results["clients"].items()} == \
        {cid: c["train_dialogues"] for cid, c in reference[1]["clients"].items()}


def test_a_site_whose_data_does_not_fit_the_model_is_dropped_with_the_reason(fl, tiny_settings, tmp_path):
    settings = fl.Settings.from_run_config(TINY, num_classes=6, out_dir=str(tmp_path / "bad-site"))
    nodes = write_sites(settings, tmp_path)
    nodes[2] = write_sites(settings, tmp_path / "narrow", feature_dim=8)[2]   # 8-wide features, not 12
    with identity():
        flower, _ = run_inline(fl, settings, {"node_configs": nodes})
    dropped = flower.ends[1][1]["aggregation"]["dropped"]
    assert list(dropped) == [AV]
    assert "does not fit this site's data" in dropped[AV] and "site2.pkl" in dropped[AV], dropped


@pytest.mark.parametrize("node, message", [
    ({"data-path": "x.pkl"}, "the format is 'synthetic-iemocap6'"),
    ({"data": "dialoguegcn", "data-path": "/nonexistent/site.pkl"}, "cannot read this site's data"),
    ({"data-path": 3}, "node-config 'data-path' must be a string"),
])
def test_bad_site_data_in_a_node_config_is_a_clear_error(fl, task_identity, node, message):
    from flwr.app import Context, Message, RecordDict

    app = fl.make_client_app(fl.Settings.from_run_config(TINY))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, **node}, state=RecordDict(), run_config={})
    query = Message(RecordDict(), 7, fl.IDENTIFY)
    query.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    with pytest.raises(ValueError, match=message):
        app(query, context)


def fl_error(code, reason):
    from flwr.app import Error

    return Error(code, reason)


# ---- the strategy, without training -------------------------------------------------------------


def strategy_for(fl, settings, grid_kwargs=None, round_offset=0):
    """A FedDISCStrategy on a fresh RoundServer, with an InlineGrid around the real ClientApp."""
    from imer_fast.federated import RoundServer

    server = RoundServer(settings.load_corpus(), settings.federated_config())
    strategy = fl.FedDISCStrategy(server, server.fresh_states(), [], round_offset=round_offset, round_timeout=5,
                                  join_timeout=5, poll_interval=0.01)
    return strategy, InlineGrid(fl.make_client_app(settings), **(grid_kwargs or {}))


def reply_with(fl, msg, state, num_samples=10):
    from flwr.app import Message, MetricRecord, RecordDict

    return Message(RecordDict({"arrays": fl.state_to_record(state), "metrics": MetricRecord(
        {"num-examples": num_samples, "seconds": 0.0})}), reply_to=msg)


def test_a_reply_with_an_unknown_key_is_dropped_with_the_client_named(fl, task_identity):
    settings = fl.Settings.from_run_config(TINY, extractor_rounds=1, recovery_rounds=0, classifier_rounds=0, cycles=0)
    strategy, grid = strategy_for(fl, settings)
    start = {k: v.clone() for k, v in strategy.global_state.items()}
    messages = strategy.configure_train(1, None, None, grid)
    assert [m.metadata.dst_node_id for m in messages] == [100, 101, 102]
    assert {m.content["config"]["phase"] for m in messages} == {"extractor"}
    key = "dgn.lstm.weight_hh_l0"   # a DGN tensor of every client's (not a per-modality input column block)
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    bogus = {**start, "bogus.weight": torch.zeros(2)}
    moved = {**start, key: start[key] + 1.0}
    from flwr.app import Message

    lost = Message(fl_error(5, "node went offline"), reply_to=messages[2])
    lost.metadata.__dict__["_src_node_id"] = 1   # the SuperLink writes it, under its own node id
    replies = [reply_with(fl, messages[0], bogus), reply_with(fl, messages[1], moved), lost]
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = strategy.history[-1]
    assert record["aggregation"]["dropped"] == {
        TV: "key 'bogus.weight': not in global_state",
        AV: "error reply NODE_UNAVAILABLE: node went offline"}
    assert record["aggregation"]["groups"]["extractor"]["contributors"] == [TA]
    assert torch.equal(strategy.global_state[key], start[key] + 1.0)          # ta alone
    assert torch.equal(fl.record_to_state(arrays)[key], start[key] + 1.0)
    assert metrics["replies"] == 2 and metrics["dropped"] == 2      # two came back, one of them invalid


def test_a_missing_reply_and_an_offline_node_are_recorded(fl, task_identity):
    settings = fl.Settings.from_run_config(TINY, extractor_rounds=2, recovery_rounds=0, classifier_rounds=0, cycles=0)
    strategy, grid = strategy_for(fl, settings)
    messages = strategy.configure_train(1, None, None, grid)
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    strategy.aggregate_train(1, [reply_with(fl, m, strategy.global_state) for m in messages[:2]])
    assert strategy.history[-1]["aggregation"]["dropped"] == {AV: "no reply within the round timeout (5s)"}
    grid.offline.add(102)                                         # av's node is gone: round 2 skips it
    messages = strategy.configure_train(2, None, None, grid)
    assert [m.metadata.dst_node_id for m in messages] == [100, 101]
    strategy.aggregate_train(2, [reply_with(fl, m, strategy.global_state) for m in messages])
    assert strategy.history[-1]["aggregation"]["dropped"] == {AV: "not connected"}
    assert strategy.history[-1]["aggregation"]["groups"]["extractor"]["contributors"] == [TV, TA]


def test_each_round_sends_the_schedules_phase_and_groups(fl, task_identity):
    """AFA with 2 extractor rounds and 2 cycles of 1 recovery + 1 classifier round: every node gets the
    round's phase and trainable groups; the scaling is refitted (one query per node) only after the
    extractor rounds, the classifier warm-started only before the first classifier round; a resumed
    strategy (round_offset) continues the schedule."""
    from imer_fast.federated.schedule import PHASE_GROUPS

    settings = fl.Settings.from_run_config(TINY, extractor_rounds=2, recovery_rounds=1, classifier_rounds=1, cycles=2)
    strategy, grid = strategy_for(fl, settings)
    schedule = strategy.schedule
    assert schedule.total_rounds == 6
    phases = []
    for rnd in range(1, 7):
        before = len(grid.sent)
        messages = strategy.configure_train(rnd, None, None, grid)
        sent_now = [kind for kind, _, _ in grid.sent[before:]]
        configs = [m.content["config"] for m in messages]
        assert len(messages) == 3 and {c["server-round"] for c in configs} == {rnd}
        assert all(c["phase"] == schedule.plan(rnd).phase for c in configs)
        assert all(set(c["trainable"]) == PHASE_GROUPS[c["phase"]] for c in configs)
        assert sent_now.count("query.scaling") == (3 if rnd == 3 else 0)
        assert sent_now.count("query.identify") == (3 if rnd == 1 else 0)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        strategy.aggregate_train(rnd, [reply_with(fl, m, strategy.global_state) for m in messages])
        record = strategy.history[-1]
        assert record["scaling_refitted"] == (rnd == 3)
        assert record["classifier_warm_started"] == (rnd == 4)
        phases.append(record["phase"])
    assert phases == ["extractor", "extractor", "recovery", "classifier", "recovery", "classifier"]
    assert bool(strategy.global_state["recovery.scaling_fitted"])
    resumed, grid = strategy_for(fl, settings, round_offset=4)
    messages = resumed.configure_train(1, None, None, grid)
    assert {m.content["config"]["server-round"] for m in messages} == {5}
    assert {m.content["config"]["phase"] for m in messages} == {"recovery"}


def test_a_scaling_refit_that_misses_a_modality_is_redone_before_the_next_round(fl, task_identity):
    """Both text holders (tv, ta) fail round 2's scaling query: text keeps its placeholder range, so the
    state must not pass for fitted, and round 3 queries every node again until text is covered."""
    settings = fl.Settings.from_run_config(TINY, extractor_rounds=1, recovery_rounds=1, classifier_rounds=1, cycles=1)

    def fail_text_holders_round_2(msg, node):
        if msg.metadata.message_type == fl.SCALING and node in (100, 101) and \
                msg.content["config"]["server-round"] == 2:
            from flwr.app import Message

            return Message(fl_error(2, "RuntimeError: out of memory"), reply_to=msg)
        return None

    strategy, grid = strategy_for(fl, settings, {"intercept": fail_text_holders_round_2})
    placeholder = strategy.global_state["recovery.latent_min"].clone()
    queries = {}
    for rnd in (1, 2, 3):
        before = len(grid.sent)
        messages = strategy.configure_train(rnd, None, None, grid)
        queries[rnd] = [kind for kind, _, _ in grid.sent[before:]].count("query.scaling")
        text_min, fitted = strategy.global_state["recovery.latent_min"][0], strategy.global_state[
            "recovery.scaling_fitted"]
        if rnd == 2:   # audio and video fitted, text left at its placeholder: not fitted
            assert not bool(fitted) and torch.equal(text_min, placeholder[0])
            assert not torch.equal(strategy.global_state["recovery.latent_min"][1:], placeholder[1:])
        if rnd == 3:
            assert bool(fitted) and not torch.equal(text_min, placeholder[0])
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        strategy.aggregate_train(rnd, [reply_with(fl, m, strategy.global_state) for m in messages])
    assert queries == {1: 0, 2: 3, 3: 3}
    assert strategy.history[1]["scaling_missing"] == ["text"]
    assert strategy.history[2]["scaling_refitted"] and "scaling_missing" not in strategy.history[2]


def test_a_round_without_any_usable_reply_stops_the_run(fl, task_identity):
    """Finishing the schedule would write results for a model no round changed; the checkpoint keeps the
    previous round, so a resumed run redoes this one."""
    from imer_fast.federated.rounds import NoUsableRepliesError

    settings = fl.Settings.from_run_config(TINY, extractor_rounds=2, recovery_rounds=0, classifier_rounds=0, cycles=0)
    strategy, grid = strategy_for(fl, settings)
    strategy.configure_train(1, None, None, grid)
    with pytest.raises(NoUsableRepliesError, match="round 1 \\(extractor\\): no client's update could be used "
                                                   ".*no reply within the round timeout"):
        strategy.aggregate_train(1, [])
    assert strategy.history == []


def test_nodes_claiming_the_wrong_pattern_are_rejected_and_a_reconnected_node_replaces_its_old_id(fl, task_identity):
    from flwr.app import ConfigRecord, Message, RecordDict

    def claim_tv_everywhere(msg, reply):
        if msg.metadata.message_type == "query.identify" and msg.metadata.dst_node_id == 101:
            info = dict(reply.content["client"])
            info["pattern"] = "tv"
            return Message(RecordDict({"client": ConfigRecord(info)}), reply_to=msg)
        return reply

    settings = fl.Settings.from_run_config(TINY, extractor_rounds=2, recovery_rounds=0, classifier_rounds=0, cycles=0)
    strategy, grid = strategy_for(fl, settings, {"rewrite": claim_tv_everywhere})
    messages = strategy.configure_train(1, None, None, grid)
    assert [m.metadata.dst_node_id for m in messages] == [100, 102]
    assert "client 1 of this run holds 'ta'" in strategy.rejected[101]
    # av's SuperNode restarts: a new node id with the same partition takes over from the next round
    grid.contexts[200] = grid.contexts.pop(102)
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    strategy.aggregate_train(1, [reply_with(fl, m, strategy.global_state) for m in messages])
    messages = strategy.configure_train(2, None, None, grid)
    assert [m.metadata.dst_node_id for m in messages] == [100, 200]
    assert strategy.registry[2].node_id == 200


# ---- pure pieces --------------------------------------------------------------------------------


def test_records_round_trip_the_feddisc_state_bit_for_bit_and_check_it(fl, reference, tiny_settings):
    state, _ = reference[0].ends[3]
    assert any(v.dtype == torch.bool for v in state.values()) and any(v.dim() == 0 for v in state.values())
    back = fl.record_to_state(fl.state_to_record(state), like=state)
    assert_same_state(state, back, "round trip")
    back["recovery.latent_min"].add_(1.0)                     # writable copies, not views of the record
    assert not torch.equal(back["recovery.latent_min"], state["recovery.latent_min"])
    record = fl.state_to_record(state)
    with pytest.raises(ValueError, match="missing"):
        fl.record_to_state(record, like={**state, "extra.key": torch.zeros(1)})
    key = next(k for k in state if state[k].dim() == 2)
    with pytest.raises(ValueError, match="expected"):
        fl.record_to_state(fl.state_to_record({**state, key: state[key].double()}), like=state)
    with pytest.raises(ValueError, match="expected"):
        fl.record_to_state(fl.state_to_record({**state, key: state[key].t().contiguous()}), like=state)
    with pytest.raises(ValueError, match="bfloat16"):
        fl.state_to_record({"w": torch.zeros(2, dtype=torch.bfloat16)})


def test_settings_validate_the_run_config_and_match_the_app_pyproject(fl):
    import tomllib   # Python >= 3.11, as flwr 1.42

    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert app["tool"]["flwr"]["app"]["config"] == fl.DEFAULT_RUN_CONFIG
    assert app["tool"]["flwr"]["app"]["components"] == {"serverapp": "imer_fast.federated.flower:server_app",
                                                         "clientapp": "imer_fast.federated.flower:client_app"}
    assert not list(APP_DIR.rglob("*.py"))                     # no copy of imer_fast in the FAB
    settings = fl.Settings.from_run_config(TINY)
    config = settings.federated_config()
    assert config.clients == ("tv", "ta", "av") and config.eval_patterns == ("tv",) and config.feddisc.preset == "small"
    assert config.feddisc.sampling_steps == 2 and config.feddisc.prediction is None and config.out_dir is None
    assert fl.Settings.from_run_config({"scale": 1}).run_config()["scale"] == 1.0     # an int for a float
    with pytest.raises(ValueError, match="unknown run-config keys"):
        fl.Settings.from_run_config({"rounds": 3})
    with pytest.raises(ValueError, match="'local-epochs' must be a int"):
        fl.Settings.from_run_config({"local-epochs": "2"})
    with pytest.raises(ValueError, match="clients"):
        fl.Settings.from_run_config({"clients": "tx"})
    with pytest.raises(ValueError, match="schedule"):
        fl.Settings.from_run_config({"schedule": "fedprox"})
    # values every client would fail on, round after round, are refused before the run
    for key, value, message in (("lr", -1.0, "Trainer: lr must be a finite number > 0"),
                                ("weight-decay", -1.0, "Trainer: weight_decay"), ("grad-clip", -1.0, "grad_clip"),
                                ("window-past", -5, "window_past must be an int >= -1"),
                                ("min-replies", 3, "min_replies = 3 exceeds the 2 clients holding")):
        with pytest.raises(ValueError, match=message):
            fl.Settings.from_run_config({key: value})


def test_the_federated_package_imports_without_flwr():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "import imer_fast.federated as f\n"
            "assert 'imer_fast.federated.flower' not in sys.modules\n"
            "try:\n    f.Settings\nexcept ImportError:\n    print('lazy')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "lazy", out.stderr


# ---- Flower's simulation engine (Ray) -----------------------------------------------------------


@pytest.mark.slow
def test_flowers_ray_simulation_engine_gives_the_simulations_model(fl, reference, tiny_settings):
    pytest.importorskip("ray")
    from flwr.simulation import run_simulation as flower_simulation

    settings = tiny_settings["ray"]
    flower_simulation(server_app=fl.make_server_app(settings), client_app=fl.make_client_app(settings),
                      num_supernodes=3, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                        "init_args": {"num_cpus": 2, "include_dashboard": False}})
    sim_dir, ray_dir = Path(tiny_settings["simulation"]["out-dir"]), Path(settings["out-dir"])
    sim_model = torch.load(sim_dir / "global" / "model.pt", weights_only=False)["state_dict"]
    ray_model = torch.load(ray_dir / "global" / "model.pt", weights_only=False)["state_dict"]
    assert list(sim_model) == list(ray_model)
    worst = max(float((sim_model[k].double() - ray_model[k].double()).abs().max()) if sim_model[k].numel() else 0.0
                for k in sim_model if sim_model[k].is_floating_point())
    print(f"Ray engine vs in-process simulation: max |difference| {worst:.3g}")
    assert worst <= 1e-5
    for key in sim_model:
        if not sim_model[key].is_floating_point():
            assert torch.equal(sim_model[key], ray_model[key]), key
    history = json.loads((ray_dir / "metrics.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["extractor", "recovery", "classifier"]
    assert all(h["aggregation"]["dropped"] == {} for h in history)


# ---- loopback deployment ------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc, grace=10.0):
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; reap the leader."""
    pgid = proc.pid                      # start_new_session: the leader's pid is the group id
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(pgid):
            proc.poll()
            time.sleep(0.2)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def wait_for(condition, timeout, what, interval=1.0, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for proc, name in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode} while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.slow
def test_loopback_deployment_survives_a_supernode_killed_mid_run(fl, tmp_path):
    """flower-superlink + three flower-supernode processes on 127.0.0.1 and ``flwr run``, with runtime
    dependency installation disabled (imer_fast is installed here). Node 2 (av) is SIGKILLed as round 2
    starts; rounds 2 and 3 finish with tv and ta, and the run completes. Every process group started
    here is stopped in ``finally``."""
    for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not installed next to {sys.executable}")
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    link_port = free_port()
    node_ports = [free_port() for _ in range(3)]
    procs, started = [], []   # running (watched) / every process group started here

    def start(args, name):
        log = open(tmp_path / f"{name}.log", "w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=tmp_path)
        procs.append((proc, name))
        started.append((proc, name))
        return proc

    def logs():
        return "\n".join(f"---- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))

    def healthy():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{link_port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
               "--disable-runtime-dependency-installation"], "superlink")   # in-memory state
        wait_for(healthy, 120, "the SuperLink's /health", procs=procs)
        nodes = [start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                        "--port", str(port), "--node-config", f"partition-id={i} num-partitions=3"], f"supernode{i}")
                 for i, port in enumerate(node_ports)]
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\n'
                                           f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
        overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                             for k, v in {**TINY, "out-dir": str(out), "round-timeout": 240.0,
                                          "join-timeout": 180.0}.items())
        submitted = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "loop", "--format", "json",
                                    "--run-config", overrides], env=env, capture_output=True, text=True,
                                   timeout=300, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr + logs()
        run_id = json.loads(submitted.stdout[submitted.stdout.index("{"):])["run-id"]

        def flwr(*args, timeout=120):
            return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True,
                                  timeout=timeout, cwd=tmp_path).stdout

        def status():
            text = flwr("list", "loop", "--run-id", str(run_id), "--format", "json")
            try:
                runs = json.loads(text[text.index("{"):])["runs"]
            except (ValueError, KeyError):
                return ""
            return runs[0]["status"] if runs else ""

        def run_log():
            return "\n---- flwr log\n" + flwr("log", str(run_id), "loop", "--show")[-6000:]

        def rounds_done(n):
            def check():
                if (read_json(out / "metrics.json") or {}).get("rounds_done", 0) >= n:
                    return True
                current = status()
                if current.startswith("finished"):
                    raise AssertionError(f"the run ended ({current}) before round {n}" + run_log() + logs())
                return False
            return check

        wait_for(rounds_done(1), 600, "round 1", interval=3.0, procs=procs)
        time.sleep(3)                                   # round 2's messages are out
        os.killpg(nodes[2].pid, signal.SIGKILL)         # av's SuperNode and its ClientApp, mid-round
        nodes[2].wait(timeout=30)
        procs.remove((nodes[2], "supernode2"))

        def finished():
            current = status()
            return current if current.startswith("finished") else None

        final = wait_for(finished, 900, "the run to finish", interval=5.0)
        assert final == "finished:completed", final + run_log() + logs()
        history = json.loads((out / "metrics.json").read_text())["history"]
        assert [h["phase"] for h in history] == ["extractor", "recovery", "classifier"]
        assert history[0]["aggregation"]["dropped"] == {}
        for record in history[1:]:                      # av is gone for good; tv and ta carry on
            assert set(record["aggregation"]["dropped"]) == {AV}, record["aggregation"]
            assert set(record["clients"]) == {TV, TA}
        # av was killed as round 2's scaling query went out: Flower answers it with an error reply
        # (NODE_UNAVAILABLE) once av's heartbeat lapses, and the pooled scaling leaves av out
        assert set(history[1].get("scaling_dropped", {AV: None})) == {AV}
        assert history[1]["aggregation"]["groups"]["generator:audio"]["contributors"] == [TA]
        assert history[1]["aggregation"]["groups"]["generator:video"]["contributors"] == [TV]
        assert history[2]["aggregation"]["groups"]["classifier"]["contributors"] == [TV, TA]
        assert (out / "global" / "model.pt").exists() and read_json(out / "results.json")["rounds"] == 3
        for proc, name in procs:
            assert proc.poll() is None, f"{name} died" + logs()
    finally:
        for proc, _ in reversed(started):
            stop_group(proc)
    leftover = [name for proc, name in started if group_alive(proc.pid)]
    assert not leftover, f"process groups still alive: {leftover}"
