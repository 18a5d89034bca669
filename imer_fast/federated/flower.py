"""Federated FedDISC on Flower (flwr 1.42, Message API): a ServerApp, a ClientApp and their strategy.

Needs the ``fed`` extra (``pip install "imer_fast[fed]"``); :mod:`imer_fast.federated` does not import
this module. The apps run the same round code as the in-process simulation (:mod:`.rounds`), so that a
Flower run gives the simulation's global model for the same settings (bit for bit when both run
single-threaded on one machine):

- the **ClientApp** (:func:`make_client_app`) is one client: ``context.node_config["partition-id"]``
  picks its entry of the ``clients`` patterns and its shard of the corpus (rebuilt from the run config,
  deterministically, in every ClientApp process). It answers ``query.identify`` (its pattern and
  shard sizes), ``query.scaling`` (the statistics of its held modalities' latents under the broadcast
  projections, for the federated latent scaling) and ``train`` (it loads the broadcast state, trains
  the round's phase's stage and replies with its state and ``num-examples``);
- the **ServerApp** (:func:`make_server_app`) builds the initial model, then runs
  :class:`FedDISCStrategy` for the schedule's rounds, refits a stale scaling at the end, evaluates the
  global model on the test split and writes ``out-dir``'s ``checkpoint.pt`` / ``metrics.json`` (every
  round), ``results.json`` and ``global/model.pt``: the simulation's formats, so ``resume`` continues
  either engine's checkpoint and ``imer-fast eval`` reads the model;
- :class:`FedDISCStrategy` is a ``FedAvg`` whose ``configure_train`` registers the nodes (one
  ``query.identify`` per new node), refits the scaling and warm-starts the classifier when the
  schedule says so, and sends every connected client the global state and its round plan (phase from
  the AFA or sequential schedule), and whose ``aggregate_train`` averages **per parameter group over the
  clients entitled to it** with :func:`~.aggregation.aggregate` (each generator over the holders of its
  modality), leaving out (and recording) clients that sent an error, no reply, or an invalid state.

A client that disconnects mid-round costs that round its reply (Flower answers the pending message
with a ``NODE_UNAVAILABLE`` error once the node's heartbeat lapses, or the round times out after
``round-timeout`` s); the server keeps running and the next round goes on with the connected clients.
A client that reconnects is identified again under its new node id and takes part from the next round.

Settings come from the run config (``[tool.flwr.app.config]`` of ``apps/feddisc-flower/pyproject.toml``,
overridden with ``flwr run ... --run-config 'key=value ...'``): :data:`DEFAULT_RUN_CONFIG` lists every key;
unknown keys are an error. The Python API takes a :class:`Settings` instead (the deprecated
``flwr.simulation.run_simulation`` gives the ServerApp an empty run config).
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..data import Corpus
from ..data.corpus import MODALITIES
from ..data.missing import pattern_mask
from ..train.feddisc import FedDISCConfig
from ..train.trainer import TrainerConfig
from .aggregation import ClientUpdate, feddisc_partition
from .rounds import (CHECKPOINT, RoundServer, SimulatedClient, client_info, local_config, make_clients, new_model,
                     pool_scaling, scaling_reply, site_client, train_stage, unscaled_modalities)
from .simulation import FederatedConfig, SimulationHooks

__all__ = ["DEFAULT_RUN_CONFIG", "ERROR_CODES", "FedDISCStrategy", "IDENTIFY", "SCALING", "SITE_DATA_KEYS", "Settings",
           "TRAIN",
           "client_app", "make_client_app", "make_server_app", "record_to_state", "run_server", "server_app",
           "state_to_record"]

log = logging.getLogger(__name__)

IDENTIFY = f"{MessageType.QUERY}.identify"
SCALING = f"{MessageType.QUERY}.scaling"
TRAIN = MessageType.TRAIN
ERROR_CODES = {0: "UNKNOWN", 1: "LOAD_CLIENT_APP_EXCEPTION", 2: "CLIENT_APP_RAISED_EXCEPTION",
               3: "MESSAGE_UNAVAILABLE", 4: "REPLY_MESSAGE_UNAVAILABLE", 5: "NODE_UNAVAILABLE",
               6: "MOD_FAILED_PRECONDITION", 7: "INVALID_FAB", 8: "CLIENT_APP_CRASHED"}
"""``flwr.common.constant.ErrorCode`` by value (the names recorded for an error reply)."""

# ---- settings -----------------------------------------------------------------------------------

DEFAULT_RUN_CONFIG: Dict[str, Any] = {
    # corpus (as imer-fast's --data flags; every process regenerates or reads it)
    "data": "synthetic-iemocap6", "scale": 1.0, "feature-dim": 0, "data-seed": 0, "modality-noise": 1.0,
    "data-path": "", "label-path": "", "feature-dirs": "", "num-classes": 0,
    # federation (FederatedConfig)
    "clients": "tv,ta,av", "schedule": "afa", "extractor-rounds": 5, "recovery-rounds": 5, "classifier-rounds": 5,
    "cycles": 2, "local-epochs": 1, "weighted": False, "min-replies": 1, "on-invalid": "drop", "seed": 0,
    # model and local training (FedDISCConfig / TrainerConfig)
    "preset": "release", "batch-size": 8, "lr": 5e-4, "weight-decay": 0.01, "grad-clip": 1.0, "clip-mode": "norm",
    "patience": 10, "sampling-steps": 0, "window-past": 6, "window-future": 6, "layers": "fused",
    "temperature": 0.2, "condition-speaker": False, "condition-context": False, "condition-observed": False,
    "prediction": "", "scaling": "", "generator-batch-size": 64, "recovery-samples": 1, "cold-classifier": False,
    "valid-fraction": 0.1,
    # evaluation on the server
    "eval-patterns": "all", "eval-rates": "", "recovery-error": True,
    # runtime
    "out-dir": "", "resume": False, "device": "cpu", "round-timeout": 600.0, "join-timeout": 120.0,
    "torch-threads": 0, "quiet": False,
}
"""Every run-config key and its default. Kebab-case, flat, scalar (Flower's run config allows bool,
int, float and str only): lists are comma-separated strings (``clients="tv,ta,av"``), and 0 / ``""``
mean "unset" where the flag is optional (``feature-dim``, ``sampling-steps``, ``prediction``,
``scaling``, ``out-dir``, ``torch-threads``, ``num-classes``). ``round-timeout``: seconds the server waits
for a round's replies; ``join-timeout``: for the clients to connect before round 1 (and for an identify
reply).

A SuperNode whose node config has any of :data:`SITE_DATA_KEYS` reads its own site's data instead of a
shard of the run's corpus (see :func:`make_client_app`)."""

SITE_DATA_KEYS = ("data", "data-path", "label-path", "feature-dirs")
"""Node-config keys that point a SuperNode at its site's local data (same meaning as the run config's;
``data``, the format, defaults to the run's)."""


@dataclass(frozen=True)
class Settings:
    """A validated, complete run config (hashable). Build it with :meth:`from_run_config`."""
    items: Tuple[Tuple[str, Any], ...]

    @classmethod
    def from_run_config(cls, run_config: Optional[Mapping[str, Any]] = None, **overrides: Any) -> "Settings":
        """``run_config`` (kebab-case keys; missing ones take :data:`DEFAULT_RUN_CONFIG`'s value) updated
        by ``overrides`` (Python names: ``local_epochs=2``). Unknown keys and values of the wrong type
        are errors; the federation settings are checked by building the :class:`FederatedConfig`."""
        given = dict(run_config or {})
        given.update({k.replace("_", "-"): v for k, v in overrides.items()})
        unknown = sorted(set(given) - set(DEFAULT_RUN_CONFIG))
        if unknown:
            raise ValueError(f"feddisc-flower: unknown run-config keys {unknown}; known: {sorted(DEFAULT_RUN_CONFIG)}")
        values = dict(DEFAULT_RUN_CONFIG)
        for key, value in given.items():
            default = DEFAULT_RUN_CONFIG[key]
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ValueError(f"feddisc-flower: run-config {key!r} must be a {type(default).__name__} (like "
                                 f"{default!r}); got {value!r}")
            values[key] = value
        for key in ("round-timeout", "join-timeout"):
            if values[key] <= 0:
                raise ValueError(f"feddisc-flower: run-config {key!r} must be > 0 seconds; got {values[key]!r}")
        if values["num-classes"] < 0:
            raise ValueError(f"feddisc-flower: run-config 'num-classes' must be >= 0 (0: inferred from the labels); "
                             f"got {values['num-classes']}")
        if values["torch-threads"] < 0:
            raise ValueError(f"feddisc-flower: run-config 'torch-threads' must be >= 0; got {values['torch-threads']}")
        settings = cls(tuple(sorted(values.items())))
        settings.federated_config()   # validates the federation and model settings
        return settings

    def __getitem__(self, key: str) -> Any:
        return dict(self.items)[key]

    def run_config(self) -> Dict[str, Any]:
        """The complete run config (every key of :data:`DEFAULT_RUN_CONFIG`)."""
        return dict(self.items)

    @property
    def round_timeout(self) -> float:
        return float(self["round-timeout"])

    @property
    def join_timeout(self) -> float:
        return float(self["join-timeout"])

    def federated_config(self) -> FederatedConfig:
        """The :class:`FederatedConfig` these settings describe (``federate=True``)."""
        v = self.run_config()
        trainer = TrainerConfig(lr=v["lr"], weight_decay=v["weight-decay"], grad_clip=v["grad-clip"],
                                clip_mode=v["clip-mode"], patience=v["patience"], device=v["device"], seed=v["seed"],
                                progress=not v["quiet"])
        feddisc = FedDISCConfig(
            preset=v["preset"], batch_size=v["batch-size"], sampling_steps=v["sampling-steps"] or None,
            window_past=v["window-past"], window_future=v["window-future"], layers=v["layers"],
            temperature=v["temperature"], condition_speaker=v["condition-speaker"],
            condition_context=v["condition-context"], condition_observed=v["condition-observed"],
            prediction=v["prediction"] or None, scaling=v["scaling"] or None, recovery_samples=v["recovery-samples"],
            generator_batch_size=v["generator-batch-size"], warm_start_classifier=not v["cold-classifier"],
            valid_fraction=v["valid-fraction"], trainer=trainer)
        try:
            rates = tuple(float(r) for r in v["eval-rates"].split(",") if r.strip())
        except ValueError:
            raise ValueError(f"feddisc-flower: run-config 'eval-rates' must be comma-separated numbers such as "
                             f"\"0.0,0.3\"; got {v['eval-rates']!r}") from None
        return FederatedConfig(
            clients=_list(v["clients"]), schedule=v["schedule"], extractor_rounds=v["extractor-rounds"],
            recovery_rounds=v["recovery-rounds"], classifier_rounds=v["classifier-rounds"], cycles=v["cycles"],
            local_epochs=v["local-epochs"], federate=True, weighted=v["weighted"], min_replies=v["min-replies"],
            on_invalid=v["on-invalid"], seed=v["seed"], eval_patterns=_eval_patterns(v["eval-patterns"]),
            eval_rates=rates, recovery_error=v["recovery-error"], out_dir=v["out-dir"] or None, resume=v["resume"],
            progress=not v["quiet"], feddisc=feddisc)

    def load_corpus(self, site: Optional[Mapping[str, str]] = None) -> Corpus:
        """The corpus named by ``data`` (``synthetic-<name>``, ``gcnet`` with ``label-path`` and
        ``feature-dirs="text=DIR,audio=DIR,video=DIR"``, or ``dialoguegcn`` with ``data-path``);
        ``site``: :data:`SITE_DATA_KEYS` values that replace the run config's (a site's local files)."""
        from ..cli import load_corpus

        v = {**self.run_config(), **dict(site or {})}
        args = argparse.Namespace(data=v["data"], scale=v["scale"], feature_dim=v["feature-dim"] or None,
                                  data_seed=v["data-seed"], modality_noise=v["modality-noise"],
                                  label_path=v["label-path"] or None, feature_dir=list(_list(v["feature-dirs"])),
                                  path=v["data-path"] or None, num_classes=v["num-classes"] or None)
        try:
            return load_corpus(args)
        except SystemExit as err:
            raise ValueError(f"feddisc-flower: {err}") from None


def _list(text: str) -> Tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _eval_patterns(text: str) -> Optional[Tuple[str, ...]]:
    items = _list(text)
    if items == ("all",):
        return None
    return () if items in ((), ("none",)) else items


def _settings(settings: Optional[Settings], context: Context) -> Settings:
    if settings is not None:
        return settings
    return _settings_from_run_config(tuple(sorted(context.run_config.items())))


@lru_cache(maxsize=4)
def _settings_from_run_config(items) -> Settings:
    return Settings.from_run_config(dict(items))


def _threads(settings: Settings) -> None:
    if settings["torch-threads"] and torch.get_num_threads() != settings["torch-threads"]:
        torch.set_num_threads(settings["torch-threads"])


# ---- records ------------------------------------------------------------------------------------


def state_to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """``state`` as an ``ArrayRecord`` (each tensor as a NumPy array; key order, dtype and shape kept,
    bool and 0-d tensors included). A dtype NumPy cannot hold (bfloat16) is an error."""
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state_to_record: {key!r} is a {type(value).__name__}, not a tensor")
        if value.dtype == torch.bfloat16:
            raise ValueError(f"state_to_record: {key!r} is bfloat16, which NumPy (and so an ArrayRecord) cannot "
                             f"hold; keep the federated state in float32")
    return ArrayRecord.from_torch_state_dict(OrderedDict((k, v.detach().cpu()) for k, v in state.items()))


def record_to_state(record: ArrayRecord, like: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Tensor]:
    """The tensors of ``record`` (writable copies). With ``like``: the key set, every shape and dtype
    must equal ``like``'s (otherwise ``ValueError`` naming the first difference), and the result
    follows ``like``'s key order and devices."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"record_to_state: expected an ArrayRecord; got {type(record).__name__}")
    state = {}
    for key in record.keys():
        try:
            state[key] = torch.from_numpy(np.array(record[key].numpy(), copy=True))
        except (TypeError, ValueError) as err:
            raise ValueError(f"record_to_state: {key!r}: {err}") from None
    if like is None:
        return state
    missing, extra = sorted(set(like) - set(state)), sorted(set(state) - set(like))
    if missing or extra:
        raise ValueError(f"record_to_state: the record's keys differ from the model's: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''}")
    out = {}
    for key, ref in like.items():
        value = state[key]
        if value.dtype != ref.dtype or value.shape != ref.shape:
            raise ValueError(f"record_to_state: {key!r}: expected {ref.dtype} {tuple(ref.shape)}, got {value.dtype} "
                             f"{tuple(value.shape)}")
        out[key] = value.to(ref.device)
    return out


def _stats_to_records(stats: Mapping[str, Mapping]) -> RecordDict:
    held = [m for m in MODALITIES if m in stats]
    content = RecordDict({"stats": ConfigRecord({
        "modalities": held, "count": [int(stats[m]["count"]) for m in held],
        "min": [float(stats[m]["min"]) for m in held], "max": [float(stats[m]["max"]) for m in held]})})
    sums = {f"{m}.{part}": stats[m][part] for m in held for part in ("sum", "squares") if part in stats[m]}
    if sums:
        content["sums"] = state_to_record(sums)
    return content


def _records_to_stats(content: RecordDict, device) -> Dict[str, Dict]:
    meta = content["stats"]
    sums = record_to_state(content["sums"]) if "sums" in content else {}
    stats = {}
    for i, m in enumerate(meta["modalities"]):
        if m not in MODALITIES:
            raise ValueError(f"unknown modality {m!r}")
        stats[m] = {"count": int(meta["count"][i]), "min": float(meta["min"][i]), "max": float(meta["max"][i])}
        for part in ("sum", "squares"):
            if f"{m}.{part}" in sums:
                stats[m][part] = sums[f"{m}.{part}"].to(device)
    return stats


# ---- the client -------------------------------------------------------------------------------


@dataclass
class _ClientData:
    corpus: Corpus
    config: FederatedConfig
    base: FedDISCConfig
    clients: Dict[int, SimulatedClient]   # partition id -> client (a site node: its own only)
    site: str = ""                        # where a site node's data is ("": a shard of the run's corpus)


@lru_cache(maxsize=2)
def _client_data(settings: Settings) -> _ClientData:
    """The run's corpus and every client's shard (deterministic from the settings; cached per process)."""
    config = settings.federated_config()
    corpus = settings.load_corpus()
    return _ClientData(corpus, config, local_config(config), dict(enumerate(make_clients(corpus, config))))


@lru_cache(maxsize=2)
def _site_data(settings: Settings, pid: int, site: Tuple[Tuple[str, str], ...]) -> _ClientData:
    """Client ``pid`` on its site's own data (node-config :data:`SITE_DATA_KEYS`)."""
    config = settings.federated_config()
    where = " ".join(f"{k}={v}" for k, v in site)
    data_format = dict(site).get("data", settings["data"])
    if data_format.startswith("synthetic-"):
        raise ValueError(f"feddisc-flower ClientApp: the node config names site data ({where}) but the format is "
                         f"{data_format!r}; set data=gcnet or data=dialoguegcn in the node config or the run config")
    try:
        corpus = settings.load_corpus(dict(site))
        client = site_client(corpus, config, pid)
    except (OSError, ValueError) as err:
        raise ValueError(f"feddisc-flower ClientApp: cannot read this site's data ({where}): {err}") from None
    return _ClientData(corpus, config, local_config(config), {pid: client}, where)


def _partition_id(context: Context, config: FederatedConfig) -> int:
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError("feddisc-flower ClientApp: the node has no 'partition-id' in its node config; start it with "
                         "flower-supernode --node-config 'partition-id=<i> num-partitions=<n>'")
    pid, count = node_config["partition-id"], len(config.clients)
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < count:
        raise ValueError(f"feddisc-flower ClientApp: partition-id must be an int in [0, {count}) (one per entry of "
                         f"clients={','.join(config.clients)!r}); got {pid!r}")
    if "num-partitions" in node_config and node_config["num-partitions"] != count:
        raise ValueError(f"feddisc-flower ClientApp: num-partitions={node_config['num-partitions']!r} but the run "
                         f"has {count} clients ({','.join(config.clients)})")
    return pid


def _site(context: Context) -> Tuple[Tuple[str, str], ...]:
    """The node's site-data keys (empty: the node takes its shard of the run's corpus)."""
    items = []
    for key in SITE_DATA_KEYS:
        value = context.node_config.get(key, "")
        if not isinstance(value, str):
            raise ValueError(f"feddisc-flower ClientApp: node-config {key!r} must be a string; got {value!r}")
        if value:
            items.append((key, value))
    return tuple(items) if any(k != "data" for k, _ in items) else ()


def _worker(data: _ClientData, content: RecordDict):
    """A model with the broadcast state loaded (checked against the model's keys, shapes, dtypes)."""
    model = new_model(data.corpus, data.config, data.base)
    try:
        state = record_to_state(content["arrays"], like=model.state_dict())
    except ValueError as err:
        if not data.site:
            raise
        raise ValueError(f"feddisc-flower ClientApp: the broadcast model does not fit this site's data "
                         f"({data.site}: feature widths {data.corpus.feature_dims}, {data.corpus.num_classes} "
                         f"classes; set the run config's num-classes if a site lacks a class): {err}") from None
    return model, state


def make_client_app(settings: Optional[Settings] = None) -> ClientApp:
    """The FedDISC ClientApp. ``settings``: fixed settings (the Python simulation API); None: read from
    ``context.run_config`` (deployment, ``flwr run``).

    Each node's ``partition-id`` picks its client (pattern) in the run's ``clients``. Its data is that
    client's shard of the run's corpus, or, when the node config names site data
    (:data:`SITE_DATA_KEYS`, e.g. ``--node-config 'partition-id=0 data=dialoguegcn
    data-path="/data/site0.pkl"'``), the ``train`` (+ ``valid``) dialogues of the site's own files;
    the test split stays with the server, which evaluates on the run's corpus."""
    app = ClientApp()

    def setup(context: Context) -> Tuple[_ClientData, SimulatedClient]:
        s = _settings(settings, context)
        _threads(s)
        pid = _partition_id(context, s.federated_config())
        site = _site(context)
        data = _site_data(s, pid, site) if site else _client_data(s)
        return data, data.clients[pid]

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        data, client = setup(context)
        info = client_info(client)
        return Message(RecordDict({"client": ConfigRecord({
            "partition-id": client.index, "client-id": client.id, "pattern": client.pattern,
            "num-samples": client.num_samples, "train-dialogues": info["train_dialogues"],
            "valid-dialogues": info["valid_dialogues"]})}), reply_to=msg)

    @app.query("scaling")
    def scaling(msg: Message, context: Context) -> Message:
        data, client = setup(context)
        model, state = _worker(data, msg.content)
        round_number = int(msg.content["config"]["server-round"])
        stats = scaling_reply(model, client, data.config, data.base, round_number, state)
        return Message(_stats_to_records(stats), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        data, client = setup(context)
        model, state = _worker(data, msg.content)
        config = msg.content["config"]
        reply, info = train_stage(model, client, data.config, data.base, int(config["server-round"]),
                                  str(config["phase"]), state)
        # only what the aggregation reads: the round's trainable groups this client is entitled to
        partition = feddisc_partition(model.feature_dims)
        reply = {k: reply[k] for k in partition.reply_keys(reply, config["trainable"], client.modalities)}
        metrics = {"num-examples": client.num_samples, "seconds": float(info["seconds"]), "epochs": int(info["epochs"]),
                   "seed": int(info["seed"])}
        if info["train_loss"] is not None:
            metrics["train-loss"] = float(info["train_loss"])
        return Message(RecordDict({"arrays": state_to_record(reply), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# ---- the server -------------------------------------------------------------------------------


@dataclass
class _Pending:
    """The round in flight between configure_train and aggregate_train."""
    round: int
    plan: Any
    record: Dict
    scaling_seconds: float
    sent: Dict[int, int]          # node id -> partition
    messages: List[Tuple[Message, int]]   # what was sent, with its partition


@dataclass
class _Entry:
    """The server's record of a connected client."""
    node_id: int
    info: Dict = field(default_factory=dict)


def _sender(reply: Message, sent: Sequence[Tuple[Message, int]], by_node: Mapping[int, int]) -> Optional[int]:
    """The partition a reply answers: by the message it replies to (the grid sets the ids of the
    messages it pushes), else by its source node. An error reply the SuperLink writes for a node that
    went offline comes from the SuperLink's own node id, so only the first way finds it."""
    reply_to = reply.metadata.reply_to_message_id
    for msg, pid in sent:
        if reply_to and msg.metadata.message_id == reply_to:
            return pid
    return by_node.get(reply.metadata.src_node_id)


def _describe(reply: Message) -> str:
    error = reply.error
    return f"error reply {ERROR_CODES.get(error.code, error.code)}: {error.reason or 'no reason given'}"


class FedDISCStrategy(FedAvg):
    """FedAvg for FedDISC: per-group aggregation over the entitled clients, on the round schedule.

    Args:
        server: the :class:`~.rounds.RoundServer` (config, schedule, partition, checkpoints).
        states: ``{"global": state}``, the state after ``round_offset`` rounds (updated in place).
        history: the round records so far (appended to).
        round_offset: rounds already done (a resumed run); Flower's round ``k`` is the schedule's
            round ``k + round_offset``.
        round_timeout: seconds to wait for a round's replies (train and scaling queries).
        join_timeout: seconds to wait, before the first round, for every client to connect, and for
            an identify reply.
        poll_interval: seconds between checks for connecting clients.

    The clients are the run config's ``clients`` patterns; a node is client ``partition-id`` (its node
    config), accepted when its identify reply names the pattern the server expects for it. The newest
    node of a partition replaces an older one (a restarted SuperNode gets a new node id).
    """

    def __init__(self, server: RoundServer, states: Dict[str, Dict[str, Tensor]], history: List[Dict], *,
                 round_offset: int = 0, round_timeout: float = 600.0, join_timeout: float = 120.0,
                 poll_interval: float = 1.0):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                         min_available_nodes=1)
        if set(states) != {"global"}:
            raise ValueError(f"FedDISCStrategy: states must be {{'global': state}}; got keys {sorted(states)}")
        self.server, self.states, self.history = server, states, history
        self.config: FederatedConfig = server.config
        self.schedule = server.schedule
        self.round_offset, self.round_timeout, self.join_timeout = round_offset, round_timeout, join_timeout
        self.poll_interval = poll_interval
        self.registry: Dict[int, _Entry] = {}        # partition -> its node
        self.known: Dict[int, Optional[int]] = {}    # node id -> partition (None: rejected)
        self.rejected: Dict[int, str] = {}           # node id -> why
        self.scaling_dropped: Dict[str, str] = {}    # the last scaling refit's missing clients
        self._pending: Optional[_Pending] = None

    @property
    def global_state(self) -> Dict[str, Tensor]:
        return self.states["global"]

    def summary(self) -> None:
        log.info("FedDISCStrategy: %d clients (%s), %s schedule of %d rounds from round %d, round timeout %.0fs",
                 len(self.config.clients), ",".join(self.config.clients), self.config.schedule,
                 self.schedule.total_rounds, self.round_offset + 1, self.round_timeout)

    # ---- nodes ----------------------------------------------------------------------------------

    def connected(self, grid: Grid) -> Dict[int, int]:
        """partition -> node id, for the registered clients whose node is online."""
        online = set(grid.get_node_ids())
        return {pid: e.node_id for pid, e in sorted(self.registry.items()) if e.node_id in online}

    def register(self, grid: Grid, wait_for_all: bool = False) -> Dict[int, int]:
        """Identify the online nodes not seen yet; with ``wait_for_all``, until every client is connected
        or ``join_timeout`` has passed. Returns :meth:`connected`; no client at all is an error."""
        deadline = time.monotonic() + self.join_timeout
        while True:
            online = list(grid.get_node_ids())
            new = [n for n in online if n not in self.known]
            if new:
                self._identify(grid, new)
            connected = self.connected(grid)
            if not wait_for_all or len(connected) == len(self.config.clients) or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        if not connected:
            raise RuntimeError(f"FedDISCStrategy: no client connected within {self.join_timeout:.0f}s (expected "
                               f"{len(self.config.clients)}: partition-id 0..{len(self.config.clients) - 1}); "
                               f"rejected nodes: {self.rejected or 'none'}")
        missing = [self.config.client_ids[p] for p in range(len(self.config.clients)) if p not in connected]
        if missing:
            log.warning("FedDISCStrategy: clients not connected: %s", missing)
        return connected

    def _identify(self, grid: Grid, nodes: Sequence[int]) -> None:
        messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 0})}), node, IDENTIFY,
                            ttl=self.join_timeout) for node in nodes]
        sent = [(msg, msg.metadata.dst_node_id) for msg in messages]
        for reply in grid.send_and_receive(messages, timeout=self.join_timeout):
            node = _sender(reply, sent, {n: n for n in nodes})
            if node is None:
                continue
            if reply.has_error():
                log.warning("FedDISCStrategy: node %s did not identify (%s); asking again next round", node,
                            _describe(reply))
                continue
            try:
                info = reply.content["client"]
                pid, pattern = info["partition-id"], info["pattern"]
                if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < len(self.config.clients):
                    raise ValueError(f"partition-id {pid!r} is not in [0, {len(self.config.clients)})")
                if pattern != self.config.clients[pid]:
                    raise ValueError(f"it holds pattern {pattern!r}, but client {pid} of this run holds "
                                     f"{self.config.clients[pid]!r}")
                entry = {"train_dialogues": int(info["train-dialogues"]),
                         "valid_dialogues": int(info["valid-dialogues"]), "train_utterances": int(info["num-samples"])}
            except (KeyError, TypeError, ValueError) as err:
                self.known[node], self.rejected[node] = None, str(err)
                log.warning("FedDISCStrategy: node %s rejected: %s", node, err)
                continue
            previous = self.registry.get(pid)
            if previous is not None and previous.node_id != node:
                log.info("FedDISCStrategy: %s reconnected as node %s (was %s)", self.config.client_ids[pid], node,
                         previous.node_id)
            self.registry[pid] = _Entry(node, entry)
            self.known[node] = pid

    def clients_info(self) -> Dict[str, Dict]:
        """client id -> what results.json records (shard sizes from the identify replies)."""
        out = {}
        for pid, (cid, pattern) in enumerate(zip(self.config.client_ids, self.config.clients)):
            modalities = sorted(self._modalities(pid))
            entry = self.registry.get(pid)
            out[cid] = {"pattern": pattern, "modalities": modalities, **(entry.info if entry else {"joined": False})}
        return out

    def _modalities(self, pid: int) -> frozenset:
        return frozenset(m for m, a in zip(MODALITIES, pattern_mask(self.config.clients[pid])) if a)

    # ---- scaling ------------------------------------------------------------------------------

    def refit_scaling(self, grid: Grid, round_number: int, states: Dict[str, Dict[str, Tensor]]) -> List[str]:
        """Ask every connected client for its scaling statistics under the global projections and pool
        them (partition order) into ``states["global"]``. Returns the held modalities that no reply
        covered: the server refits again before the next round until every one is covered."""
        connected = self.connected(grid)
        arrays = state_to_record(states["global"])
        messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": round_number})}),
                            node, SCALING, ttl=self.round_timeout, group_id=f"scaling-{round_number}")
                    for node in connected.values()]
        node_pid = {node: pid for pid, node in connected.items()}
        sent = [(msg, node_pid[msg.metadata.dst_node_id]) for msg in messages]
        stats, dropped = {}, {}
        for reply in grid.send_and_receive(messages, timeout=self.round_timeout):
            pid = _sender(reply, sent, node_pid)
            if pid is None or pid in stats or self.config.client_ids[pid] in dropped:
                continue
            cid = self.config.client_ids[pid]
            if reply.has_error():
                dropped[cid] = _describe(reply)
                continue
            try:
                stats[pid] = _records_to_stats(reply.content, self.server.device)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                dropped[cid] = f"malformed scaling reply: {err}"
        for pid in range(len(self.config.clients)):
            if pid not in stats:
                dropped.setdefault(self.config.client_ids[pid], "no reply" if pid in connected else "not connected")
        self.scaling_dropped = dropped
        held = [m for m in MODALITIES if any(m in self._modalities(pid) for pid in range(len(self.config.clients)))]
        replies = [stats[pid] for pid in sorted(stats)]
        missing = unscaled_modalities(replies, held)
        if not stats:
            log.warning("FedDISCStrategy: round %d: no scaling statistics came back (%s); the scaling keeps its "
                        "previous values and is refitted before the next round", round_number, dropped)
            return missing
        if dropped:
            log.warning("FedDISCStrategy: round %d: scaling pooled without %s%s", round_number, sorted(dropped),
                        f"; no statistics for {missing}, refitted before the next round" if missing else "")
        states["global"].update(pool_scaling(states["global"], replies, held))
        return missing

    # ---- rounds ---------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> List[Message]:
        """Register new nodes, refit / warm-start as the schedule says, and send every connected client
        the global state with its round plan (``server-round``, ``phase``, ``trainable``)."""
        r = server_round + self.round_offset
        self.register(grid, wait_for_all=server_round == 1)
        self.scaling_dropped = {}
        plan, record, scaling_seconds = self.server.begin_round(
            r, self.states, lambda rnd, states: self.refit_scaling(grid, rnd, states))
        if self.scaling_dropped:
            record["scaling_dropped"] = dict(self.scaling_dropped)
        connected = self.connected(grid)
        payload = state_to_record(self.global_state)
        messages = []
        for pid, node in connected.items():
            content = RecordDict({"arrays": payload, "config": ConfigRecord({
                "server-round": r, "phase": plan.phase, "trainable": sorted(plan.trainable)})})
            messages.append(Message(content, node, TRAIN, ttl=self.round_timeout, group_id=str(r)))
        sent = {node: pid for pid, node in connected.items()}
        self._pending = _Pending(r, plan, record, scaling_seconds, sent,
                                 [(msg, sent[msg.metadata.dst_node_id]) for msg in messages])
        log.info("FedDISCStrategy: round %d (%s) sent to %s", r, plan.phase,
                 [self.config.client_ids[p] for p in connected])
        return messages

    def aggregate_train(self, server_round: int, replies) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Aggregate the replies per group over the entitled clients (:func:`~.aggregation.aggregate`);
        a client with an error reply, no reply, a malformed reply, or (``on-invalid="drop"``) an invalid
        state is left out, and the round record says why."""
        pending, self._pending = self._pending, None
        if pending is None or pending.round != server_round + self.round_offset:
            raise RuntimeError(f"FedDISCStrategy.aggregate_train: round {server_round} was not configured")
        cfg, record = self.config, pending.record
        updates, dropped, answered = [], {}, set()
        for reply in replies:
            pid = _sender(reply, pending.messages, pending.sent)
            if pid is None or pid in answered:
                log.warning("FedDISCStrategy: ignoring a reply from node %s (not sent this round, or a duplicate)",
                            reply.metadata.src_node_id)
                continue
            answered.add(pid)
            cid = cfg.client_ids[pid]
            if reply.has_error():
                dropped[cid] = _describe(reply)
                continue
            try:
                content = reply.content
                state = record_to_state(content["arrays"])
                metrics = content["metrics"]
                num_samples = metrics["num-examples"]
                info = {"seconds": float(metrics.get("seconds", 0.0)), "seed": metrics.get("seed"),
                        "epochs": metrics.get("epochs"), "train_loss": metrics.get("train-loss")}
            except (KeyError, TypeError, ValueError) as err:
                dropped[cid] = f"malformed reply: {err}"
                continue
            record["clients"][cid] = info
            updates.append(ClientUpdate(cid, state, num_samples, self._modalities(pid)))
        for node, pid in pending.sent.items():
            if pid not in answered:
                dropped[cfg.client_ids[pid]] = f"no reply within the round timeout ({self.round_timeout:.0f}s)"
        for pid, cid in enumerate(cfg.client_ids):
            if pid not in pending.sent.values():
                dropped[cid] = "not connected"
        self.server.end_round(pending.round, pending.plan, record, self.states, updates, self.history,
                                       pending.scaling_seconds, dropped)
        losses = [i["train_loss"] for i in record["clients"].values() if i.get("train_loss") is not None]
        metrics = {"round": pending.round, "replies": len(updates),
                   "dropped": len(record["aggregation"]["dropped"])}
        if losses:
            metrics["train-loss"] = float(sum(losses) / len(losses))
        return state_to_record(self.global_state), MetricRecord(metrics)

    def configure_evaluate(self, server_round, arrays, config, grid) -> List[Message]:
        return []   # evaluation runs on the server, once, after the last round

    def aggregate_evaluate(self, server_round, replies) -> Optional[MetricRecord]:
        return None


def run_server(grid: Grid, settings: Settings, hooks: Optional[SimulationHooks] = None,
               poll_interval: float = 1.0) -> Dict:
    """The ServerApp's work on ``grid``: train the schedule's rounds (resuming ``out-dir``'s checkpoint
    with ``resume``), refit a stale scaling, evaluate and save; returns the results (as
    :func:`~.simulation.run_simulation`'s). ``hooks.round_end`` sees every round's new global state."""
    _threads(settings)
    config = settings.federated_config()
    corpus = settings.load_corpus()
    for m in MODALITIES:
        if m not in corpus.feature_dims:
            raise ValueError(f"feddisc-flower: the corpus {corpus.name!r} has no {m!r} features; FedDISC needs a "
                             f"width for every modality")
    server = RoundServer(corpus, config, hooks)
    if config.resume:
        if not (Path(config.out_dir) / CHECKPOINT).exists():
            raise FileNotFoundError(f"feddisc-flower: resume=true but there is no checkpoint at "
                                    f"{Path(config.out_dir) / CHECKPOINT}")
        done, history, states = server.restore()
    else:
        done, history, states = 0, [], server.fresh_states()
    strategy = FedDISCStrategy(server, states, history, round_offset=done, round_timeout=settings.round_timeout,
                               join_timeout=settings.join_timeout, poll_interval=poll_interval)
    remaining = server.schedule.total_rounds - done
    if remaining > 0:
        strategy.start(grid, state_to_record(states["global"]), num_rounds=remaining, timeout=settings.round_timeout)
    else:
        strategy.register(grid, wait_for_all=True)
    return server.finish(strategy.states, strategy.history, strategy.clients_info(),
                         lambda rnd, st: strategy.refit_scaling(grid, rnd, st))


def make_server_app(settings: Optional[Settings] = None, hooks: Optional[SimulationHooks] = None,
                    poll_interval: float = 1.0) -> ServerApp:
    """The FedDISC ServerApp (:func:`run_server`). ``settings``: fixed settings (the Python simulation
    API, tests); None: read from ``context.run_config`` (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, _settings(settings, context), hooks, poll_interval)

    return app


server_app = make_server_app()
"""The ServerApp that ``flwr run`` loads (``imer_fast.federated.flower:server_app``)."""
client_app = make_client_app()
"""The ClientApp that ``flwr run`` loads (``imer_fast.federated.flower:client_app``)."""
