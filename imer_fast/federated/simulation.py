"""In-process simulation of federated FedDISC (no extra dependencies).

N clients, each with a permanent availability pattern (release protocol: three clients holding
{text, video}, {text, audio} and {video, audio}), train on disjoint shards of a corpus's training
dialogues. A round follows the schedule (:mod:`.schedule`): every client loads the broadcast global
state, trains the round's FedDISC stage (``extractor`` / ``generator`` / ``classifier`` of
:meth:`~imer_fast.train.feddisc.FedDISCRun.stages`) for ``local_epochs`` epochs under
``missing="fixed:<its pattern>"``, and replies with its state; the server aggregates the replies with
:func:`~.aggregation.aggregate` over FedDISC's partition (each generator over the holders of its
modality), and the result is the next global state. Clients run one after another, each seeded by
(seed, round, client), so a run is deterministic. After each round the global state, the round number,
the config and the per-round metrics are written atomically to ``out_dir/checkpoint.pt`` (and the
metrics to ``metrics.json``); ``resume=True`` continues after the last finished round and ends in the
same state, bit for bit, as an uninterrupted run. At the end the global model (or each client's) is
evaluated on the test split and saved as ``out_dir/<model>/model.pt`` in ``train_feddisc``'s format, so
that ``imer-fast eval`` / ``recover`` read it.

``federate=False`` is the "local only" reference: every client follows the same schedule on its own
shard, with no aggregation, so the global model can be compared with each client alone on the
modalities it never sees.

Choices the release leaves open (``docs/releases/feddisc.md`` §3-4), made here:

- **Latent scaling** is fitted federatedly, once per extractor phase: at the start of the first
  recovery or classifier round after the projections changed (and before evaluation, if the run ends
  on extractor rounds), every client sends the sufficient statistics of its *held* modalities' latents
  under the global projections (count, min, max, and with ``scaling="standard"`` per-element sums and
  sums of squares); the server pools them per modality over its holders and broadcasts the result,
  which is what ``fit_scaling`` would give on the holders' pooled data (for min-max: the row-wise
  min / max of :func:`~.aggregation.feddisc_partition`). A client cannot run ``fit_scaling`` itself: it
  refuses a modality with no entries, and a client fitting its own range would train its generators
  on a scaling the others do not use. The generator stage's ``before`` hook is therefore dropped.
- **Warm start of the classifier** (``FedDISCConfig.warm_start_classifier``) happens once, on the
  server, before the first classifier round (the pseudo-labeller it copies is global), not in every
  classifier round, which would overwrite the aggregated classifier.
- Clients are stateless between rounds: a fresh optimiser per round (FedAvg's usual simulation).
- Each client's local validation (early stopping / learning-rate schedule within a round) is its own
  share of the corpus's ``valid`` split, or a held-out slice of its training shard.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..data import Corpus, evaluate_patterns
from ..data.corpus import MODALITIES
from ..data.missing import GCNET_MAX_RATE, pattern_mask, pattern_name
from ..io import atomic_torch_save, atomic_write_json
from ..train.feddisc import FedDISCConfig, FedDISCRun, build_model, num_task_classes
from ..train.trainer import Trainer, with_validation
from .aggregation import (ON_INVALID, AggregationResult, ClientUpdate,
                          aggregate, feddisc_partition)
from .schedule import AlternatingFrozenSchedule, RoundPlan, SequentialSchedule

__all__ = ["CHECKPOINT", "DEFAULT_CLIENTS", "FederatedConfig", "SCHEDULES", "SHARD_MODES", "SimulatedClient",
           "SimulationHooks", "make_clients", "make_schedule", "run_simulation", "shard_corpus"]

DEFAULT_CLIENTS = ("tv", "ta", "av")
"""The release protocol: {text, video}, {text, audio}, {audio, video} (each lacks one modality)."""
SCHEDULES = ("afa", "sequential")
SHARD_MODES = ("even",)
STAGE_OF_PHASE = {"extractor": "extractor", "recovery": "generator", "classifier": "classifier"}
"""The FedDISCRun stage (``schedule="release"``) a round of each phase trains."""
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
RESULTS = "results.json"
FORMAT = "imer_fast.federated.simulation/1"
SCALING_KEYS = ("recovery.latent_min", "recovery.latent_max", "recovery.latent_mean", "recovery.latent_std",
                "recovery.scaling_fitted")
_SEED_RANGE = 2 ** 24   # per-(round, client) trainer seeds stay small: the runs multiply them into batch seeds


@dataclass
class FederatedConfig:
    """A federated FedDISC simulation.

    Args:
        clients: one availability pattern per client (``"tv"``: text + video; any spelling
            :func:`~imer_fast.data.missing.pattern_mask` accepts, stored canonically).
        schedule: ``"afa"`` (``extractor_rounds``, then ``cycles`` × (``recovery_rounds`` recovery rounds,
            ``classifier_rounds`` classifier rounds)) or ``"sequential"`` (one pass: extractor, recovery,
            classifier rounds; ``cycles`` unused).
        local_epochs: epochs each client trains the round's stage.
        federate: False: "local only", every client trains the schedule alone (no aggregation).
        weighted, min_replies, on_invalid: :func:`~.aggregation.aggregate`'s (weights = training
            utterances; the release averages unweighted).
        shard: how the training dialogues are split: ``"even"`` (seeded, disjoint, equal counts ±1).
        seed: shards, model initialisation and every client's training seeds.
        eval_patterns: fixed availability patterns evaluated on the test split at the end (None: all 7;
            empty: none); eval_rates: GCNet missing rates also evaluated.
        recovery_error: also report the latent MSE of the recovered test entries under every client's
            pattern (the modalities that client never sees).
        out_dir: checkpoint, metrics, results and model folder (None: nothing written); resume:
            continue from ``out_dir``'s checkpoint.
        feddisc: the model and local-training settings (preset, batch sizes, learning rate, device,
            ...). Its ``missing`` (per client: ``fixed:<pattern>``), ``schedule``, stage epochs
            (``local_epochs``), ``eval_rates`` / ``eval_patterns`` and the trainer's ``seed``,
            ``out_dir``, ``resume`` and ``progress`` are set by the simulation.
    """
    clients: Sequence[str] = DEFAULT_CLIENTS
    schedule: str = "afa"
    extractor_rounds: int = 5
    recovery_rounds: int = 5
    classifier_rounds: int = 5
    cycles: int = 2
    local_epochs: int = 1
    federate: bool = True
    weighted: bool = False
    min_replies: int = 1
    on_invalid: str = "raise"
    shard: str = "even"
    seed: int = 0
    eval_patterns: Optional[Sequence[str]] = None
    eval_rates: Sequence[float] = ()
    recovery_error: bool = True
    out_dir: Optional[str] = None
    resume: bool = False
    progress: bool = True
    feddisc: FedDISCConfig = field(default_factory=FedDISCConfig)

    def __post_init__(self):
        if isinstance(self.clients, str) or not self.clients:
            raise ValueError(f"FederatedConfig: clients must be a non-empty list of availability patterns such as "
                             f"['tv', 'ta', 'av']; got {self.clients!r}")
        self.clients = tuple(_canonical_pattern(p, "clients") for p in self.clients)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FederatedConfig: schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        for name in ("local_epochs", "min_replies"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FederatedConfig: {name} must be an int >= 1; got {value!r}")
        if self.on_invalid not in ON_INVALID:
            raise ValueError(f"FederatedConfig: on_invalid must be one of {ON_INVALID}; got {self.on_invalid!r}")
        if self.shard not in SHARD_MODES:
            raise ValueError(f"FederatedConfig: shard must be one of {SHARD_MODES}; got {self.shard!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"FederatedConfig: seed must be an int >= 0; got {self.seed!r}")
        if self.eval_patterns is not None:
            if isinstance(self.eval_patterns, str):
                raise ValueError(f"FederatedConfig: eval_patterns must be a list of patterns, not the str "
                                 f"{self.eval_patterns!r}")
            self.eval_patterns = tuple(_canonical_pattern(p, "eval_patterns") for p in self.eval_patterns)
        self.eval_rates = tuple(float(r) for r in self.eval_rates)
        bad = [r for r in self.eval_rates if not 0.0 <= r <= GCNET_MAX_RATE]
        if bad:
            raise ValueError(f"FederatedConfig: eval_rates are GCNet missing rates in [0, {GCNET_MAX_RATE}]; got {bad}")
        if not isinstance(self.feddisc, FedDISCConfig):
            raise ValueError(f"FederatedConfig: feddisc must be a FedDISCConfig; got {type(self.feddisc).__name__}")
        if self.feddisc.recovery != "diffusion":
            raise ValueError(f"FederatedConfig: the simulation federates FedDISC's diffusion recovery; "
                             f"feddisc.recovery must be 'diffusion', got {self.feddisc.recovery!r}")
        if self.resume and not self.out_dir:
            raise ValueError("FederatedConfig: resume=True needs out_dir (where the checkpoint is)")
        make_schedule(self)   # the round counts

    @property
    def client_ids(self) -> Tuple[str, ...]:
        """``client00:tv``, ... (sorted in client order, which is the aggregation's summation order)."""
        width = max(2, len(str(len(self.clients) - 1)))
        return tuple(f"client{i:0{width}d}:{p}" for i, p in enumerate(self.clients))


def _canonical_pattern(pattern, what: str) -> str:
    try:
        return pattern_name(pattern_mask(pattern))
    except ValueError as err:
        raise ValueError(f"FederatedConfig: {what}: {err}") from None


def make_schedule(config: FederatedConfig):
    """The round schedule of ``config`` (:class:`AlternatingFrozenSchedule` or :class:`SequentialSchedule`)."""
    if config.schedule == "afa":
        return AlternatingFrozenSchedule(config.extractor_rounds, config.recovery_rounds, config.classifier_rounds,
                                         config.cycles)
    return SequentialSchedule(config.extractor_rounds, config.recovery_rounds, config.classifier_rounds)


# ---- shards and clients -----------------------------------------------------------------------


def shard_corpus(corpus: Corpus, num_clients: int, seed: int = 0) -> List[Corpus]:
    """Split ``corpus``'s training dialogues disjointly and evenly (counts differ by at most one) over
    ``num_clients`` clients, by a seeded permutation; each shard keeps the split order.

    A client's corpus holds only its own dialogues: ``train`` (its shard) and, when the corpus has at
    least ``num_clients`` validation dialogues, ``valid`` (its share of them, split the same way);
    otherwise no ``valid`` (hold a slice of the shard out with
    :func:`~imer_fast.train.trainer.with_validation`). The test split stays with the server.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"shard_corpus: num_clients must be an int >= 1; got {num_clients!r}")
    train = list(corpus.splits.get("train", []))
    if len(train) < num_clients:
        raise ValueError(f"shard_corpus: corpus {corpus.name!r} has {len(train)} training dialogues, fewer than the "
                         f"{num_clients} clients")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    train_shards = _split(train, num_clients, rng)
    valid = list(corpus.splits.get("valid", []))
    valid_shards = _split(valid, num_clients, rng) if len(valid) >= num_clients else [[] for _ in range(num_clients)]
    shards = []
    for i, (mine, held) in enumerate(zip(train_shards, valid_shards)):
        splits = {"train": mine, **({"valid": held} if held else {})}
        shards.append(replace(corpus, name=f"{corpus.name}/client{i}", splits=splits,
                              dialogues={d: corpus.dialogues[d] for d in mine + held},
                              metadata={**corpus.metadata, "shard": {"client": i, "of": num_clients, "seed": seed}}))
    return shards


def _split(ids: List[str], parts: int, rng: np.random.Generator) -> List[List[str]]:
    order = rng.permutation(len(ids))
    return [[ids[i] for i in sorted(chunk.tolist())] for chunk in np.array_split(order, parts)]


@dataclass(frozen=True)
class SimulatedClient:
    """One client: its id, availability ``pattern`` (and modalities), its corpus (train + valid) and
    ``num_samples``, its training utterances (the aggregation weight)."""
    id: str
    index: int
    pattern: str
    modalities: frozenset
    corpus: Corpus
    num_samples: int


def make_clients(corpus: Corpus, config: FederatedConfig) -> List[SimulatedClient]:
    """The config's clients on their shards of ``corpus`` (a validation share each)."""
    shards = shard_corpus(corpus, len(config.clients), config.seed)
    clients = []
    for i, (cid, pattern, shard) in enumerate(zip(config.client_ids, config.clients, shards)):
        try:
            shard = with_validation(shard, config.feddisc.valid_fraction, config.seed + i)
        except ValueError as err:
            raise ValueError(f"client {cid}: {err} (use fewer clients or a larger corpus)") from None
        mask = pattern_mask(pattern)
        clients.append(SimulatedClient(cid, i, pattern, frozenset(m for m, a in zip(MODALITIES, mask) if a), shard,
                                       shard.num_utterances("train")))
    return clients


# ---- hooks ------------------------------------------------------------------------------------


@dataclass
class SimulationHooks:
    """Optional observers of a simulation (tests, fault injection).

    client_start(round, client_id, state): the state the client's model holds when its local training
        starts (a copy).
    reply(round, client_id, state) -> state: called with the client's reply before the server sees it;
        what it returns is sent instead (inject a corrupt reply here).
    round_end(round, state, record): after the round's checkpoint; ``state`` is the new global state
        (federated) or client id -> state (local only), ``record`` the round's metrics.
    """
    client_start: Optional[Callable[[int, str, Dict[str, Tensor]], None]] = None
    reply: Optional[Callable[[int, str, Dict[str, Tensor]], Mapping[str, Tensor]]] = None
    round_end: Optional[Callable[[int, object, Dict], None]] = None


# ---- partition and scaling --------------------------------------------------------------------


def _clone(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def _scaling_statistics(run: FedDISCRun, modalities) -> Dict[str, Dict]:
    """The sufficient statistics of the client's latents of its held ``modalities`` (its training split
    under its own availability), as ``DISCDiffusion.fit_scaling`` accumulates them."""
    recovery = run.model.recovery
    standard = getattr(recovery, "scaling", "minmax") == "standard"
    stats = {m: {"count": 0, "min": float("inf"), "max": float("-inf")} for m in MODALITIES if m in modalities}
    if standard:
        for s in stats.values():
            s["sum"] = torch.zeros(recovery.latent_shape, dtype=torch.float64, device=recovery.latent_min.device)
            s["squares"] = torch.zeros_like(s["sum"])
    run.model.eval()
    for batch in run.loader("train"):
        packed = batch.packed()
        for m, s in stats.items():
            rows = packed.availability[:, MODALITIES.index(m)].to(torch.bool)
            if bool(rows.any()):
                z = recovery.project(m, packed.features[m][rows])
                s["count"] += int(z.shape[0])
                s["min"], s["max"] = min(s["min"], float(z.min())), max(s["max"], float(z.max()))
                if standard:
                    z64 = z.double()
                    s["sum"] += z64.sum(0)
                    s["squares"] += z64.pow(2).sum(0)
    return stats


def _pool_scaling(state: Mapping[str, Tensor], replies: Sequence[Dict[str, Dict]]) -> Dict[str, Tensor]:
    """The scaling buffers of ``state`` refitted to the pooled statistics of ``replies``: per modality,
    over the replies that hold it (a modality nobody holds keeps its values). Same formulas as
    ``DISCDiffusion.fit_scaling`` on the pooled data."""
    out = {k: state[k].clone() for k in SCALING_KEYS if k in state}
    for i, m in enumerate(MODALITIES):
        mine = [r[m] for r in replies if m in r and r[m]["count"] > 0]
        if not mine:
            continue
        lo, hi = min(s["min"] for s in mine), max(s["max"] for s in mine)
        out["recovery.latent_min"][i] = lo
        out["recovery.latent_max"][i] = hi if hi > lo else lo + 1.0
        if "recovery.latent_mean" in out:
            count = sum(s["count"] for s in mine)
            mean = sum(s["sum"] for s in mine) / count
            var = (sum(s["squares"] for s in mine) / count - mean.pow(2)).clamp_min(0.0)
            std = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))
            out["recovery.latent_mean"][i] = mean.to(out["recovery.latent_mean"].dtype)
            out["recovery.latent_std"][i] = std.to(out["recovery.latent_std"].dtype)
    out["recovery.scaling_fitted"].fill_(True)
    return out


def _scaling_stale(schedule, round_number: int) -> bool:
    """Whether the projections changed since the scaling was last fitted, seen from the start of
    ``round_number`` (``total_rounds + 1``: before evaluation): round 1, or right after an extractor
    round (every recovery and classifier round starts with fresh scaling, so only these can be stale)."""
    return round_number == 1 or schedule.plan(round_number - 1).phase == "extractor"


def _first_classifier_round(schedule, round_number: int) -> bool:
    return schedule.plan(round_number).phase == "classifier" and not any(
        schedule.plan(r).phase == "classifier" for r in range(1, round_number))


# ---- the simulation ---------------------------------------------------------------------------


class _Simulation:
    def __init__(self, corpus: Corpus, config: FederatedConfig, hooks: Optional[SimulationHooks]):
        self.corpus, self.config, self.hooks = corpus, config, hooks or SimulationHooks()
        self.schedule = make_schedule(config)
        self.clients = make_clients(corpus, config)
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        base = config.feddisc
        self.device = base.trainer.device
        # every client's FedDISCRun: the release's stage list, each stage lasting local_epochs
        self.base = replace(base, schedule="release", extractor_epochs=config.local_epochs,
                            generator_epochs=config.local_epochs, classifier_epochs=config.local_epochs,
                            eval_rates=(), eval_patterns=False,
                            trainer=replace(base.trainer, seed=config.seed, out_dir=None, resume=False, progress=False))
        torch.manual_seed(config.seed)
        self.model = build_model(corpus, self.base).to(self.device)   # one worker model, reloaded per client
        self.initial = _clone(self.model.state_dict())
        self.partition = feddisc_partition()

    # ---- one client ----------------------------------------------------------------------------

    def client_config(self, client: SimulatedClient, round_number: int) -> FedDISCConfig:
        seed = int(np.random.SeedSequence([self.config.seed, round_number, client.index]).generate_state(1)[0])
        return replace(self.base, missing=f"fixed:{client.pattern}",
                       trainer=replace(self.base.trainer, seed=seed % _SEED_RANGE))

    def scaling_reply(self, client: SimulatedClient, round_number: int, state: Mapping[str, Tensor]) -> Dict:
        self.model.load_state_dict(state)
        return _scaling_statistics(FedDISCRun(self.model, client.corpus, self.client_config(client, round_number)),
                                   client.modalities)

    def train_client(self, client: SimulatedClient, round_number: int, plan: RoundPlan,
                     state: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict]:
        self.model.load_state_dict(state)
        if self.hooks.client_start is not None:
            self.hooks.client_start(round_number, client.id, _clone(self.model.state_dict()))
        config = self.client_config(client, round_number)
        run = FedDISCRun(self.model, client.corpus, config)
        name = STAGE_OF_PHASE[plan.phase]
        stage = next((s for s in run.stages() if s.name == name), None)
        if stage is None:
            raise RuntimeError(f"federated simulation: FedDISCRun has no {name!r} stage; its stages: "
                               f"{[s.name for s in run.stages()]}")
        # the scaling is fitted federatedly before the round, the classifier warm-started on the server
        stage = replace(stage, epochs=self.config.local_epochs, before=None)
        start = time.perf_counter()
        history = Trainer(self.model, [stage], config.trainer).run()
        seconds = time.perf_counter() - start
        reply = _clone(self.model.state_dict())
        changed = [k for k in SCALING_KEYS if k in reply and not torch.equal(reply[k], state[k])]
        if changed:
            raise RuntimeError(f"federated simulation: client {client.id}'s {name!r} stage changed the latent "
                               f"scaling {changed}; the simulation fits it federatedly before the round")
        last = history[-1] if history else {}
        info = {"seconds": seconds, "seed": config.trainer.seed, "epochs": len(history),
                "train_loss": last.get("train_loss"), "valid": last.get("valid"), "history": history}
        return reply, info

    # ---- state transitions before a round --------------------------------------------------------

    def refit_scaling(self, round_number: int, states: Dict[str, Dict[str, Tensor]]) -> None:
        """Refit the scaling of every state in ``states`` (key "global": pooled over all clients;
        otherwise a client id: over that client alone)."""
        if "global" in states:
            replies = [self.scaling_reply(c, round_number, states["global"]) for c in self.clients]
            states["global"].update(_pool_scaling(states["global"], replies))
            return
        for client in self.clients:
            reply = self.scaling_reply(client, round_number, states[client.id])
            states[client.id].update(_pool_scaling(states[client.id], [reply]))

    def warm_start(self, state: Dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)
        FedDISCRun(self.model, self.corpus, self.base).warm_start_classifier()
        state.update({k: v.detach().clone() for k, v in self.model.state_dict().items() if k.startswith("classifier.")})

    # ---- rounds ---------------------------------------------------------------------------------

    def run(self) -> Dict:
        cfg = self.config
        total = self.schedule.total_rounds
        done, history, states = self.restore() if cfg.resume else (0, [], self.fresh_states())
        for r in range(done + 1, total + 1):
            plan = self.schedule.plan(r)
            record = {"round": r, "phase": plan.phase, "trainable": sorted(plan.trainable)}
            start = time.perf_counter()
            scaling = plan.phase != "extractor" and _scaling_stale(self.schedule, r)
            if scaling:
                self.refit_scaling(r, states)
            scaling_seconds = time.perf_counter() - start
            warm = cfg.feddisc.warm_start_classifier and _first_classifier_round(self.schedule, r)
            if warm:
                for state in states.values():
                    self.warm_start(state)
            record.update(scaling_refitted=scaling, classifier_warm_started=warm)
            record["clients"], replies = {}, []
            for client in self.clients:
                start_state = states["global"] if cfg.federate else states[client.id]
                reply, info = self.train_client(client, r, plan, start_state)
                if self.hooks.reply is not None:
                    reply = self.hooks.reply(r, client.id, reply)
                record["clients"][client.id] = info
                if cfg.federate:
                    replies.append(ClientUpdate(client.id, reply, client.num_samples, client.modalities))
                else:
                    states[client.id] = reply
            local_seconds = sum(info["seconds"] for info in record["clients"].values())
            start = time.perf_counter()
            if cfg.federate:
                result = aggregate(states["global"], replies, self.partition, trainable=plan.trainable,
                                   weighted=cfg.weighted, min_replies=cfg.min_replies, on_invalid=cfg.on_invalid)
                states["global"] = result.state
                record["aggregation"] = _report_dict(result)
            aggregation_seconds = time.perf_counter() - start
            record["seconds"] = {"scaling": scaling_seconds, "local_training": local_seconds,
                                 "aggregation": aggregation_seconds}
            history.append(record)
            self.save(r, states, history)
            if cfg.progress:
                print(_round_line(record, total), flush=True)
            if self.hooks.round_end is not None:
                self.hooks.round_end(r, states["global"] if cfg.federate else states, record)
        return self.finish(states, history)

    def fresh_states(self) -> Dict[str, Dict[str, Tensor]]:
        if self.config.federate:
            return {"global": _clone(self.initial)}
        return {c.id: _clone(self.initial) for c in self.clients}

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, round_number: int, states, history) -> None:
        if self.out_dir is None:
            return
        atomic_torch_save(self.out_dir / CHECKPOINT, {"format": FORMAT, "round": round_number,
                                                      "total_rounds": self.schedule.total_rounds,
                                                      "config": config_dict(self.config), "states": states,
                                                      "history": history})
        atomic_write_json(self.out_dir / METRICS, {"config": config_dict(self.config), "rounds_done": round_number,
                                                   "history": history})

    def restore(self):
        path = self.out_dir / CHECKPOINT
        saved = torch.load(path, map_location=self.device, weights_only=False)
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"federated simulation: {path} is not a federated simulation checkpoint")
        mine, theirs = _training_fields(config_dict(self.config)), _training_fields(saved["config"])
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"federated simulation: the checkpoint at {path} was written with other settings "
                             f"({', '.join(diff)}); resume needs the same clients, schedule, seeds and model")
        states = saved["states"]
        expected = {"global"} if self.config.federate else {c.id for c in self.clients}
        if set(states) != expected:
            raise ValueError(f"federated simulation: the checkpoint at {path} holds states {sorted(states)}; "
                             f"expected {sorted(expected)}")
        return int(saved["round"]), list(saved["history"]), states

    # ---- evaluation -----------------------------------------------------------------------------

    def finish(self, states, history) -> Dict:
        cfg = self.config
        total = self.schedule.total_rounds
        if _scaling_stale(self.schedule, total + 1):   # the run ended on extractor rounds
            self.refit_scaling(total + 1, states)
        results = {"config": config_dict(cfg), "corpus": self.corpus.name, "mode": "federated" if cfg.federate
                   else "local", "rounds": total,
                   "clients": {c.id: {"pattern": c.pattern, "modalities": sorted(c.modalities),
                                      "train_dialogues": len(c.corpus.splits["train"]),
                                      "valid_dialogues": len(c.corpus.splits.get("valid", [])),
                                      "train_utterances": c.num_samples} for c in self.clients},
                   "train_seconds": sum(sum(h["seconds"].values()) for h in history), "models": {}}
        start = time.perf_counter()
        for name, state in states.items():
            mine = [c for c in self.clients if c.id == name]
            results["models"][name] = self.evaluate(state, [c.pattern for c in (mine or self.clients)])
            self.save_model(name, state)
        results["eval_seconds"] = time.perf_counter() - start
        if self.out_dir is not None:
            atomic_write_json(self.out_dir / RESULTS, results)
        return results

    def evaluate(self, state: Mapping[str, Tensor], recovery_patterns: Sequence[str]) -> Dict:
        cfg = self.config
        out: Dict = {"evaluation": {}}
        if not self.corpus.splits.get("test"):
            out["note"] = "the corpus has no test split"
            return out
        self.model.load_state_dict(state)
        run = FedDISCRun(self.model, self.corpus, self.base)
        for name, protocol in evaluate_patterns(cfg.eval_patterns):
            out["evaluation"][f"pattern:{name}"] = run.evaluate("test", protocol)
        for rate in cfg.eval_rates:
            out["evaluation"][f"rate:{rate:.1f}"] = run.evaluate("test", f"gcnet:{rate}")
        if cfg.recovery_error:
            out["recovery_error"] = {f"fixed:{p}": run.recovery_error("test", f"fixed:{p}")
                                     for p in dict.fromkeys(recovery_patterns) if len(p) < len(MODALITIES)}
        return out

    def save_model(self, name: str, state: Mapping[str, Tensor]) -> None:
        """``out_dir/<name>/model.pt`` in :func:`~imer_fast.train.feddisc.train_feddisc`'s format, so that
        ``imer-fast eval`` / ``recover`` read it."""
        if self.out_dir is None:
            return
        config = replace(self.config.feddisc, trainer=replace(self.config.feddisc.trainer, out_dir=None, resume=False))
        folder = "global" if name == "global" else name.split(":")[0]
        fields = asdict(config)
        fields["eval_rates"] = list(config.eval_rates)
        atomic_torch_save(self.out_dir / folder / "model.pt",
                          {"model": "feddisc", "recovery": config.recovery, "state_dict": dict(state),
                           "config": fields, "feature_dims": self.corpus.feature_dims,
                           "num_classes": num_task_classes(self.corpus), "num_speakers": self.corpus.num_speakers,
                           "federated": {"client": name, "rounds": self.schedule.total_rounds}})


def run_simulation(corpus: Corpus, config: FederatedConfig, hooks: Optional[SimulationHooks] = None) -> Dict:
    """Run (or, with ``config.resume``, finish) the simulation and evaluate on the test split.

    Returns the results (also written to ``out_dir/results.json``): ``models`` maps ``"global"``
    (federated) or each client id (local only) to its ``evaluation`` (``pattern:<p>`` / ``rate:<r>`` ->
    WA, UA, weighted F1) and ``recovery_error`` (per client pattern ``fixed:<p>``: latent MSE of the
    recovered entries of the modalities it lacks, next to mean imputation); plus the clients' shards,
    the config and the timings. Per-round metrics are in ``out_dir/metrics.json``.
    """
    for m in MODALITIES:
        if m not in corpus.feature_dims:
            raise ValueError(f"federated simulation: the corpus {corpus.name!r} has no {m!r} features; FedDISC needs "
                             f"a width for every modality")
    if config.resume and not (Path(config.out_dir) / CHECKPOINT).exists():
        raise FileNotFoundError(f"federated simulation: resume=True but there is no checkpoint at "
                                f"{Path(config.out_dir) / CHECKPOINT}")
    return _Simulation(corpus, config, hooks).run()


# ---- records ----------------------------------------------------------------------------------


def config_dict(config: FederatedConfig) -> Dict:
    """``config`` as JSON-compatible data (tuples as lists)."""
    return json.loads(json.dumps(asdict(config)))


_EVALUATION_ONLY = {"eval_patterns", "eval_rates", "recovery_error", "out_dir", "resume", "progress"}
_FEDDISC_EVALUATION_ONLY = {"eval_rates", "eval_patterns"}
_TRAINER_IGNORED = {"out_dir", "resume", "progress"}


def _training_fields(d: Dict) -> Dict:
    """The config fields that decide the training (what a resumed run must share)."""
    out = {k: v for k, v in d.items() if k not in _EVALUATION_ONLY and k != "feddisc"}
    feddisc = {k: v for k, v in d.get("feddisc", {}).items() if k not in _FEDDISC_EVALUATION_ONLY and k != "trainer"}
    trainer = {k: v for k, v in d.get("feddisc", {}).get("trainer", {}).items() if k not in _TRAINER_IGNORED}
    out.update({f"feddisc.{k}": v for k, v in feddisc.items()})
    out.update({f"feddisc.trainer.{k}": v for k, v in trainer.items()})
    return out


def _report_dict(result: AggregationResult) -> Dict:
    report = result.report
    return {"groups": {g: {"contributors": list(r.contributors), "kept_previous": r.kept_previous,
                           "weighted": r.weighted} for g, r in report.groups.items()},
            "dropped": dict(report.dropped)}


def _round_line(record: Dict, total: int) -> str:
    losses = [info["train_loss"] for info in record["clients"].values() if info["train_loss"] is not None]
    seconds = record["seconds"]
    line = (f"round {record['round']:3d}/{total} {record['phase']:<10} mean client loss "
            f"{(sum(losses) / len(losses)) if losses else float('nan'):.4f}  local {seconds['local_training']:.1f}s  "
            f"aggregation {seconds['aggregation']:.2f}s")
    if record.get("scaling_refitted"):
        line += f"  scaling {seconds['scaling']:.1f}s"
    dropped = record.get("aggregation", {}).get("dropped")
    if dropped:
        line += f"  dropped {sorted(dropped)}"
    return line
