"""The round code of federated FedDISC, shared by its two engines: the in-process simulation
(:mod:`.simulation`) and the Flower apps (:mod:`.flower`).

Client side (what one client does with the broadcast state, on its own shard):

- :func:`shard_corpus` / :func:`make_clients`: the disjoint, seeded shards and each client's fixed
  availability pattern (a client is rebuilt from the corpus and the config alone, so a Flower
  ClientApp process that starts for every message finds the same shard);
- :func:`client_config`: the client's FedDISCRun settings in a round (``missing="fixed:<pattern>"``,
  trainer seed from (seed, round, client));
- :func:`scaling_reply`: the sufficient statistics of its held modalities' latents
  (:func:`scaling_statistics`) for the federated latent scaling;
- :func:`train_stage`: the local training of the round's phase's stage; returns the reply state.

Server side (:class:`RoundServer`): the initial model, the scaling refit (:func:`pool_scaling`) and the
classifier warm start before a round (:meth:`RoundServer.begin_round`), the aggregation over the
entitled clients, the round record, the atomic checkpoint and the hooks after it
(:meth:`RoundServer.end_round`), resume (:meth:`RoundServer.restore`) and the final evaluation and
``model.pt`` (:meth:`RoundServer.finish`). How the replies travel (function calls, Flower messages) is
the engine's business.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..data import Corpus, evaluate_patterns
from ..data.corpus import MODALITIES
from ..data.missing import pattern_mask
from ..diffusion.disc import pooled_scaling
from ..io import atomic_torch_save, atomic_write_json, load_torch_file
from ..train.feddisc import FedDISCConfig, FedDISCRun, build_model, num_task_classes
from ..train.run import corpus_identity
from ..train.trainer import Trainer, with_validation
from .aggregation import AggregationResult, ClientUpdate, aggregate, feddisc_partition
from .schedule import AlternatingFrozenSchedule, SequentialSchedule

if TYPE_CHECKING:   # pragma: no cover - annotations only (simulation imports this module)
    from .simulation import FederatedConfig, SimulationHooks

__all__ = ["CHECKPOINT", "FORMAT", "METRICS", "RESULTS", "SCALING_KEYS", "STAGE_OF_PHASE", "NoUsableRepliesError",
           "RoundServer",
           "SimulatedClient", "client_config", "client_info", "clone_state", "config_dict", "first_classifier_round",
           "local_config", "make_clients", "make_schedule", "new_model", "pool_scaling", "report_dict",
           "scaling_reply", "scaling_stale", "scaling_statistics", "shard_corpus", "site_client", "train_stage",
           "unscaled_modalities"]

STAGE_OF_PHASE = {"extractor": "extractor", "recovery": "generator", "classifier": "classifier"}
"""The FedDISCRun stage (``schedule="release"``) a round of each phase trains."""
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
RESULTS = "results.json"
FORMAT = "imer_fast.federated.simulation/1"
SCALING_KEYS = ("recovery.latent_min", "recovery.latent_max", "recovery.latent_mean", "recovery.latent_std",
                "recovery.scaling_fitted")
_SEED_RANGE = 2 ** 24   # per-(round, client) trainer seeds stay small: the runs multiply them into batch seeds


def make_schedule(config: "FederatedConfig"):
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


def make_clients(corpus: Corpus, config: "FederatedConfig") -> List[SimulatedClient]:
    """The config's clients on their shards of ``corpus`` (a validation share each)."""
    shards = shard_corpus(corpus, len(config.clients), config.seed)
    return [_client(config, i, shard, "use fewer clients or a larger corpus") for i, shard in enumerate(shards)]


def site_client(corpus: Corpus, config: "FederatedConfig", index: int) -> SimulatedClient:
    """Client ``index`` of ``config`` on its own site's ``corpus`` (a deployment where each site reads
    its local data instead of a shard of a shared corpus): its ``train`` dialogues (and ``valid``, or a
    held-out slice of ``train``) are the client's; its ``test`` split is not used (the server evaluates
    on its own)."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(config.clients):
        raise ValueError(f"site_client: index must be an int in [0, {len(config.clients)}); got {index!r}")
    if not corpus.splits.get("train"):
        raise ValueError(f"client {config.client_ids[index]}: the site's corpus {corpus.name!r} has no training "
                         f"dialogues")
    splits = {k: list(v) for k, v in corpus.splits.items() if k in ("train", "valid") and v}
    mine = replace(corpus, name=f"{corpus.name}/site{index}", splits=splits,
                   dialogues={d: corpus.dialogues[d] for ids in splits.values() for d in ids})
    return _client(config, index, mine, "the site needs at least 2 training dialogues")


def _client(config: "FederatedConfig", index: int, corpus: Corpus, hint: str) -> SimulatedClient:
    cid, pattern = config.client_ids[index], config.clients[index]
    try:
        corpus = with_validation(corpus, config.feddisc.valid_fraction, config.seed + index)
    except ValueError as err:
        raise ValueError(f"client {cid}: {err} ({hint})") from None
    modalities = frozenset(m for m, a in zip(MODALITIES, pattern_mask(pattern)) if a)
    return SimulatedClient(cid, index, pattern, modalities, corpus, corpus.num_utterances("train"))


def client_info(client: SimulatedClient) -> Dict:
    """What ``results.json`` records of a client."""
    return {"pattern": client.pattern, "modalities": sorted(client.modalities),
            "train_dialogues": len(client.corpus.splits["train"]),
            "valid_dialogues": len(client.corpus.splits.get("valid", [])), "train_utterances": client.num_samples}


class NoUsableRepliesError(RuntimeError):
    """A federated round in which no client's update could be aggregated."""


# ---- states and latent scaling ------------------------------------------------------------------


def clone_state(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def scaling_statistics(run: FedDISCRun, modalities) -> Dict[str, Dict]:
    """The sufficient statistics (``DISCDiffusion.scaling_statistics``) of the client's latents of its
    held ``modalities``: its training split under its own availability."""
    run.model.eval()
    packed = (b.packed() for b in run.loader("train"))
    batches = ((p.features, p.availability) for p in packed)
    return run.model.recovery.scaling_statistics(batches, [m for m in MODALITIES if m in modalities])


def pool_scaling(state: Mapping[str, Tensor], replies: Sequence[Dict[str, Dict]],
                 expected: Sequence[str] = MODALITIES) -> Dict[str, Tensor]:
    """The scaling buffers of ``state`` refitted to the pooled statistics of ``replies``
    (``pooled_scaling``: what ``fit_scaling`` gives on the pooled data); a modality without statistics
    keeps its values. ``scaling_fitted`` becomes true once every ``expected`` modality (those the clients
    hold) has been fitted, now or before: a modality whose holders all failed to reply at the first fit
    keeps its placeholder range and must not pass for fitted. Sums run in the order of ``replies``
    (client order, for a result independent of the engine)."""
    out = {k: state[k].clone() for k in SCALING_KEYS if k in state}
    pooled = pooled_scaling(replies)
    for m, fitted in pooled.items():
        i = MODALITIES.index(m)
        out["recovery.latent_min"][i], out["recovery.latent_max"][i] = fitted["min"], fitted["max"]
        if "recovery.latent_mean" in out:
            out["recovery.latent_mean"][i] = fitted["mean"].to(out["recovery.latent_mean"].dtype)
            out["recovery.latent_std"][i] = fitted["std"].to(out["recovery.latent_std"].dtype)
    out["recovery.scaling_fitted"].fill_(bool(state["recovery.scaling_fitted"]) or all(m in pooled for m in expected))
    return out


def unscaled_modalities(replies: Sequence[Dict[str, Dict]], expected: Sequence[str]) -> List[str]:
    """The ``expected`` modalities that no scaling reply covers (refit again before the next round)."""
    covered = {m for reply in replies for m in reply}
    return [m for m in expected if m not in covered]


def scaling_stale(schedule, round_number: int) -> bool:
    """Whether the projections changed since the scaling was last fitted, seen from the start of
    ``round_number`` (``total_rounds + 1``: before evaluation): round 1, or right after an extractor
    round (every recovery and classifier round starts with fresh scaling, so only these can be stale)."""
    return round_number == 1 or schedule.plan(round_number - 1).phase == "extractor"


def first_classifier_round(schedule, round_number: int) -> bool:
    return schedule.plan(round_number).phase == "classifier" and not any(
        schedule.plan(r).phase == "classifier" for r in range(1, round_number))


# ---- one client's round -------------------------------------------------------------------------


def local_config(config: "FederatedConfig") -> FedDISCConfig:
    """Every client's FedDISCRun settings (before the per-round ones of :func:`client_config`): the
    release's stage list, each stage lasting ``local_epochs``, no evaluation, no trainer checkpoints."""
    base = config.feddisc
    return replace(base, schedule="release", extractor_epochs=config.local_epochs,
                   generator_epochs=config.local_epochs, classifier_epochs=config.local_epochs,
                   eval_rates=(), eval_patterns=False,
                   trainer=replace(base.trainer, seed=config.seed, out_dir=None, resume=False, progress=False))


def new_model(corpus: Corpus, config: "FederatedConfig", base: Optional[FedDISCConfig] = None):
    """The federation's initial model (seeded by ``config.seed``) on ``config.feddisc.trainer.device``.
    A client may build its worker model this way too: its weights are replaced by the broadcast state."""
    base = base or local_config(config)
    torch.manual_seed(config.seed)
    return build_model(corpus, base).to(base.trainer.device)


def client_config(config: "FederatedConfig", base: FedDISCConfig, client: SimulatedClient,
                  round_number: int) -> FedDISCConfig:
    """``client``'s FedDISCRun settings in ``round_number``: its fixed availability and a trainer seed
    drawn from (seed, round, client index)."""
    seed = int(np.random.SeedSequence([config.seed, round_number, client.index]).generate_state(1)[0])
    return replace(base, missing=f"fixed:{client.pattern}", trainer=replace(base.trainer, seed=seed % _SEED_RANGE))


def scaling_reply(model, client: SimulatedClient, config: "FederatedConfig", base: FedDISCConfig,
                  round_number: int, state: Mapping[str, Tensor]) -> Dict:
    """``client``'s scaling statistics (:func:`scaling_statistics`) under the projections of ``state``
    (loaded into ``model``)."""
    model.load_state_dict(state)
    return scaling_statistics(FedDISCRun(model, client.corpus, client_config(config, base, client, round_number)),
                              client.modalities)


def train_stage(model, client: SimulatedClient, config: "FederatedConfig", base: FedDISCConfig, round_number: int,
                phase: str, state: Mapping[str, Tensor],
                client_start: Optional[Callable[[int, str, Dict[str, Tensor]], None]] = None
                ) -> Tuple[Dict[str, Tensor], Dict]:
    """``client`` loads ``state`` into ``model`` and trains the stage of ``phase`` for
    ``config.local_epochs`` epochs on its shard; returns its reply (the whole state, a copy) and the
    round's info (seconds, trainer seed, epochs, last train loss and validation, history).

    The stage's ``before`` hook is dropped: the scaling is fitted federatedly before the round and the
    classifier warm-started on the server. ``client_start(round, client id, state)`` sees the state
    training starts from.
    """
    model.load_state_dict(state)
    if client_start is not None:
        client_start(round_number, client.id, clone_state(model.state_dict()))
    cfg = client_config(config, base, client, round_number)
    run = FedDISCRun(model, client.corpus, cfg)
    if phase not in STAGE_OF_PHASE:
        raise ValueError(f"federated round: phase must be one of {tuple(STAGE_OF_PHASE)}; got {phase!r}")
    name = STAGE_OF_PHASE[phase]
    stage = next((s for s in run.stages() if s.name == name), None)
    if stage is None:
        raise RuntimeError(f"federated simulation: FedDISCRun has no {name!r} stage; its stages: "
                           f"{[s.name for s in run.stages()]}")
    stage = replace(stage, epochs=config.local_epochs, before=None)
    start = time.perf_counter()
    history = Trainer(model, [stage], cfg.trainer).run()
    seconds = time.perf_counter() - start
    reply = clone_state(model.state_dict())
    changed = [k for k in SCALING_KEYS if k in reply and not torch.equal(reply[k], state[k].to(reply[k].device))]
    if changed:
        raise RuntimeError(f"federated simulation: client {client.id}'s {name!r} stage changed the latent "
                           f"scaling {changed}; the simulation fits it federatedly before the round")
    last = history[-1] if history else {}
    info = {"seconds": seconds, "seed": cfg.trainer.seed, "epochs": len(history),
            "train_loss": last.get("train_loss"), "valid": last.get("valid"), "history": history}
    return reply, info


# ---- the server ---------------------------------------------------------------------------------


class RoundServer:
    """The server side of a federated FedDISC run: the global state(s) from round to round.

    ``states`` maps ``"global"`` (federated) or each client id (``federate=False``, the simulation's
    local-only reference) to a state. An engine calls, per round, :meth:`begin_round` (with its way of
    refitting the scaling), gathers the clients' replies into ``record["clients"]`` and
    ``ClientUpdate`` objects, then :meth:`end_round`; at the end :meth:`finish`.
    """

    def __init__(self, corpus: Corpus, config: "FederatedConfig", hooks: Optional["SimulationHooks"] = None):
        from .simulation import SimulationHooks

        self.corpus, self.config, self.hooks = corpus, config, hooks or SimulationHooks()
        self.schedule = make_schedule(config)
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.base = local_config(config)
        self.device = self.base.trainer.device
        self.model = new_model(corpus, config, self.base)   # one worker model, reloaded per use
        self.initial = clone_state(self.model.state_dict())
        self.partition = feddisc_partition(self.model.feature_dims)
        self.scaling_missing: List[str] = []   # modalities the last scaling refit got no statistics for

    # ---- states ---------------------------------------------------------------------------------

    def fresh_states(self) -> Dict[str, Dict[str, Tensor]]:
        if self.config.federate:
            return {"global": clone_state(self.initial)}
        return {cid: clone_state(self.initial) for cid in self.config.client_ids}

    def warm_start(self, state: Dict[str, Tensor]) -> None:
        """Start ``state``'s classifier from its pseudo-label head (in place)."""
        self.model.load_state_dict(state)
        FedDISCRun(self.model, self.corpus, self.base).warm_start_classifier()
        state.update({k: v.detach().clone() for k, v in self.model.state_dict().items() if k.startswith("classifier.")})

    # ---- rounds ---------------------------------------------------------------------------------

    def begin_round(self, round_number: int, states: Dict[str, Dict[str, Tensor]],
                    refit: Callable[[int, Dict[str, Dict[str, Tensor]]], List[str]]):
        """Round ``round_number``'s plan and its record so far, after the state transitions before it:
        the scaling refit (``refit(round, states)``, which returns the modalities it got no statistics
        for, when the projections changed since the last fit or the last fit missed a modality) and the
        classifier warm start (first classifier round). Returns ``(plan, record, scaling_seconds)``; fill
        ``record["clients"]`` (client id -> info) before :meth:`end_round`."""
        plan = self.schedule.plan(round_number)
        record = {"round": round_number, "phase": plan.phase, "trainable": sorted(plan.trainable)}
        start = time.perf_counter()
        scaling = plan.phase != "extractor" and (scaling_stale(self.schedule, round_number)
                                                 or bool(self.scaling_missing))
        if scaling:
            self.scaling_missing = list(refit(round_number, states))
            if self.scaling_missing:
                record["scaling_missing"] = list(self.scaling_missing)
        scaling_seconds = time.perf_counter() - start
        warm = self.config.feddisc.warm_start_classifier and first_classifier_round(self.schedule, round_number)
        if warm:
            for state in states.values():
                self.warm_start(state)
        record.update(scaling_refitted=scaling, classifier_warm_started=warm)
        record["clients"] = {}
        return plan, record, scaling_seconds

    def end_round(self, round_number: int, plan, record: Dict, states: Dict[str, Dict[str, Tensor]],
                  updates: Optional[Sequence[ClientUpdate]], history: List[Dict], scaling_seconds: float,
                  dropped: Optional[Mapping[str, str]] = None) -> Optional[AggregationResult]:
        """Aggregate ``updates`` into ``states["global"]`` (federated; local only: the engine has already
        stored each client's state), then record, checkpoint, print and call the ``round_end`` hook.
        ``dropped``: clients the engine already left out (no reply, an error reply), with the reason;
        recorded next to the aggregation's own."""
        cfg = self.config
        local_seconds = sum(info.get("seconds", 0.0) for info in record["clients"].values())
        start = time.perf_counter()
        result = None
        if cfg.federate:
            result = aggregate(states["global"], updates, self.partition, trainable=plan.trainable,
                               weighted=cfg.weighted, min_replies=cfg.min_replies, on_invalid=cfg.on_invalid)
            if len(result.report.dropped) == len(updates):
                # Every client failed or was left out: going on would finish the schedule and write results
                # for a model no round changed. The checkpoint holds the previous round, so --resume redoes it.
                reasons = {**dict(dropped or {}), **result.report.dropped}
                raise NoUsableRepliesError(
                    f"federated round {round_number} ({plan.phase}): no client's update could be used ({reasons}); "
                    f"the run stops, its checkpoint holds round {round_number - 1}: fix the cause and resume")
            states["global"] = result.state
            record["aggregation"] = report_dict(result, dropped)
        aggregation_seconds = time.perf_counter() - start
        record["seconds"] = {"scaling": scaling_seconds, "local_training": local_seconds,
                             "aggregation": aggregation_seconds}
        history.append(record)
        self.save(round_number, states, history)
        if cfg.progress:
            print(round_line(record, self.schedule.total_rounds), flush=True)
        if self.hooks.round_end is not None:
            self.hooks.round_end(round_number, states["global"] if cfg.federate else states, record)
        return result

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, round_number: int, states, history) -> None:
        if self.out_dir is None:
            return
        atomic_torch_save(self.out_dir / CHECKPOINT, {"format": FORMAT, "round": round_number,
                                                      "total_rounds": self.schedule.total_rounds,
                                                      "config": config_dict(self.config), "states": states,
                                                      "corpus": corpus_identity(self.corpus), "history": history})
        atomic_write_json(self.out_dir / METRICS, {"config": config_dict(self.config), "rounds_done": round_number,
                                                   "history": history})

    def restore(self):
        """``(rounds done, history, states)`` from ``out_dir``'s checkpoint, which must have been written
        with the same training settings."""
        path = self.out_dir / CHECKPOINT
        saved = load_torch_file(path, self.device, "federated simulation: cannot resume")
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"federated simulation: {path} is not a federated simulation checkpoint")
        mine = corpus_identity(self.corpus)
        if saved.get("corpus", mine) != mine:
            raise ValueError(f"federated simulation: the checkpoint at {path} was written on another corpus "
                             f"({saved['corpus']}); this run's is {mine}; resume needs the same data")
        mine, theirs = training_fields(config_dict(self.config)), training_fields(saved["config"])
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"federated simulation: the checkpoint at {path} was written with other settings "
                             f"({', '.join(diff)}); resume needs the same clients, schedule, seeds and model")
        states = saved["states"]
        expected = {"global"} if self.config.federate else set(self.config.client_ids)
        if set(states) != expected:
            raise ValueError(f"federated simulation: the checkpoint at {path} holds states {sorted(states)}; "
                             f"expected {sorted(expected)}")
        history = list(saved["history"])
        refits = [h for h in history if h.get("scaling_refitted")]
        self.scaling_missing = list(refits[-1].get("scaling_missing", [])) if refits else []
        return int(saved["round"]), history, states

    # ---- evaluation -----------------------------------------------------------------------------

    def finish(self, states, history, clients: Mapping[str, Dict],
               refit: Callable[[int, Dict[str, Dict[str, Tensor]]], List[str]]) -> Dict:
        """Refit a stale scaling (the run ended on extractor rounds, or the last fit missed a modality),
        evaluate every state on the test split, save the models and ``results.json``. ``clients``: client
        id -> :func:`client_info`."""
        cfg = self.config
        total = self.schedule.total_rounds
        if scaling_stale(self.schedule, total + 1) or self.scaling_missing:   # ended on extractor rounds, or
            self.scaling_missing = list(refit(total + 1, states))             # the last fit missed a modality
        results = {"config": config_dict(cfg), "corpus": self.corpus.name, "mode": "federated" if cfg.federate
                   else "local", "rounds": total, "clients": {cid: dict(info) for cid, info in clients.items()},
                   "train_seconds": sum(sum(h["seconds"].values()) for h in history), "models": {}}
        start = time.perf_counter()
        for name, state in states.items():
            patterns = [info["pattern"] for cid, info in clients.items() if cid == name] or \
                       [info["pattern"] for info in clients.values()]
            results["models"][name] = self.evaluate(state, patterns)
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


# ---- records ----------------------------------------------------------------------------------


def config_dict(config: "FederatedConfig") -> Dict:
    """``config`` as JSON-compatible data (tuples as lists)."""
    return json.loads(json.dumps(asdict(config)))


_EVALUATION_ONLY = {"eval_patterns", "eval_rates", "recovery_error", "out_dir", "resume", "progress"}
_FEDDISC_EVALUATION_ONLY = {"eval_rates", "eval_patterns"}
_TRAINER_IGNORED = {"out_dir", "resume", "progress"}


def training_fields(d: Dict) -> Dict:
    """The config fields that decide the training (what a resumed run must share)."""
    out = {k: v for k, v in d.items() if k not in _EVALUATION_ONLY and k != "feddisc"}
    feddisc = {k: v for k, v in d.get("feddisc", {}).items() if k not in _FEDDISC_EVALUATION_ONLY and k != "trainer"}
    trainer = {k: v for k, v in d.get("feddisc", {}).get("trainer", {}).items() if k not in _TRAINER_IGNORED}
    out.update({f"feddisc.{k}": v for k, v in feddisc.items()})
    out.update({f"feddisc.trainer.{k}": v for k, v in trainer.items()})
    return out


def report_dict(result: AggregationResult, dropped: Optional[Mapping[str, str]] = None) -> Dict:
    """The aggregation report as JSON data; ``dropped`` adds the clients the engine left out before the
    aggregation (their reasons first; a client is listed once)."""
    report = result.report
    every = dict(dropped or {})
    for cid, why in report.dropped.items():
        every.setdefault(cid, why)
    return {"groups": {g: {"contributors": list(r.contributors), "kept_previous": r.kept_previous,
                           "weighted": r.weighted} for g, r in report.groups.items()},
            "dropped": {cid: every[cid] for cid in sorted(every)}}


def round_line(record: Dict, total: int) -> str:
    losses = [info["train_loss"] for info in record["clients"].values() if info.get("train_loss") is not None]
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
