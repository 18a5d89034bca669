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
that ``imer-fast eval`` / ``recover`` read it. The round code itself (shards, a client's local training,
the scaling statistics, the server's round transitions, checkpoints and evaluation) is in
:mod:`.rounds`, which the Flower apps (:mod:`.flower`) share: this module calls it in one process.

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from ..data import Corpus
from ..data.corpus import MODALITIES
from ..data.missing import GCNET_MAX_RATE, pattern_mask, pattern_name
from ..train.feddisc import FedDISCConfig
from .aggregation import ON_INVALID, ClientUpdate
# the round code lives in .rounds (shared with the Flower apps); its names stay importable from here
from .rounds import (CHECKPOINT, FORMAT, METRICS, RESULTS, SCALING_KEYS, STAGE_OF_PHASE, RoundServer, SimulatedClient,
                     client_config, client_info, clone_state, config_dict, first_classifier_round, make_clients,
                     make_schedule, pool_scaling, report_dict, round_line, scaling_reply, scaling_stale,
                     scaling_statistics, shard_corpus, train_stage, training_fields)
from .schedule import RoundPlan

__all__ = ["CHECKPOINT", "DEFAULT_CLIENTS", "FederatedConfig", "SCHEDULES", "SHARD_MODES", "SimulatedClient",
           "SimulationHooks", "make_clients", "make_schedule", "run_simulation", "shard_corpus"]

DEFAULT_CLIENTS = ("tv", "ta", "av")
"""The release protocol: {text, video}, {text, audio}, {audio, video} (each lacks one modality)."""
SCHEDULES = ("afa", "sequential")
SHARD_MODES = ("even",)


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
        held = {m for p in self.clients for m, available in zip(MODALITIES, pattern_mask(p)) if available}
        unheld = [m for m in MODALITIES if m not in held]
        if unheld:
            raise ValueError(f"FederatedConfig: no client holds {unheld} (clients {list(self.clients)}): their "
                             f"generators would never train, and their recovery would sample from untrained "
                             f"weights; give every modality to at least one client")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FederatedConfig: schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        for name in ("local_epochs", "min_replies"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FederatedConfig: {name} must be an int >= 1; got {value!r}")
        holders = {m: sum(bool(pattern_mask(p)[i]) for p in self.clients) for i, m in enumerate(MODALITIES)}
        fewest = min(holders, key=holders.get)
        if self.federate and self.min_replies > holders[fewest]:
            raise ValueError(f"FederatedConfig: min_replies = {self.min_replies} exceeds the {holders[fewest]} clients "
                             f"holding {fewest} (clients {list(self.clients)}): its generator, projection and DGN "
                             f"input columns, averaged over their holders only, would never be aggregated")
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


# ---- the simulation ---------------------------------------------------------------------------


class ClientTrainingError(ValueError):
    """A client's local training failed (with ``on_invalid="raise"``, or in a local-only run)."""

# the names these helpers had before they moved to :mod:`.rounds` (shared with the Flower apps)
_clone, _scaling_statistics, _pool_scaling = clone_state, scaling_statistics, pool_scaling
_scaling_stale, _first_classifier_round = scaling_stale, first_classifier_round
_report_dict, _round_line, _training_fields = report_dict, round_line, training_fields


class _Simulation(RoundServer):
    """The server (:class:`~.rounds.RoundServer`) and its clients in one process: every client's round
    is a call on one worker model (:func:`~.rounds.train_stage`), one after another."""

    def __init__(self, corpus: Corpus, config: FederatedConfig, hooks: Optional[SimulationHooks]):
        clients = make_clients(corpus, config)
        super().__init__(corpus, config, hooks)
        self.clients = clients

    # ---- one client ----------------------------------------------------------------------------

    def client_config(self, client: SimulatedClient, round_number: int) -> FedDISCConfig:
        return client_config(self.config, self.base, client, round_number)

    def scaling_reply(self, client: SimulatedClient, round_number: int, state: Mapping[str, Tensor]) -> Dict:
        return scaling_reply(self.model, client, self.config, self.base, round_number, state)

    def train_client(self, client: SimulatedClient, round_number: int, plan: RoundPlan,
                     state: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict]:
        return train_stage(self.model, client, self.config, self.base, round_number, plan.phase, state,
                           self.hooks.client_start)

    # ---- state transitions before a round --------------------------------------------------------

    def refit_scaling(self, round_number: int, states: Dict[str, Dict[str, Tensor]]) -> List[str]:
        """Refit the scaling of every state in ``states`` (key "global": pooled over all clients;
        otherwise a client id: over that client alone). Every client answers in process, so no modality
        is left without statistics (the returned list is empty)."""
        if "global" in states:
            replies = [self.scaling_reply(c, round_number, states["global"]) for c in self.clients]
            states["global"].update(pool_scaling(states["global"], replies))
            return []
        for client in self.clients:
            reply = self.scaling_reply(client, round_number, states[client.id])
            states[client.id].update(pool_scaling(states[client.id], [reply], sorted(client.modalities)))
        return []

    # ---- rounds ---------------------------------------------------------------------------------

    def run(self) -> Dict:
        cfg = self.config
        total = self.schedule.total_rounds
        done, history, states = self.restore() if cfg.resume else (0, [], self.fresh_states())
        for r in range(done + 1, total + 1):
            plan, record, scaling_seconds = self.begin_round(r, states, self.refit_scaling)
            replies, dropped = [], {}
            for client in self.clients:
                start_state = states["global"] if cfg.federate else states[client.id]
                try:
                    reply, info = self.train_client(client, r, plan, start_state)
                except Exception as err:  # as on Flower, where a raising ClientApp becomes an error reply
                    if not (cfg.federate and cfg.on_invalid == "drop"):
                        raise ClientTrainingError(f"federated round {r} ({plan.phase}): client {client.id} failed: "
                                                  f"{type(err).__name__}: {err}") from err
                    dropped[client.id] = f"local training raised {type(err).__name__}: {err}"
                    continue
                if self.hooks.reply is not None:
                    reply = self.hooks.reply(r, client.id, reply)
                record["clients"][client.id] = info
                if cfg.federate:
                    replies.append(ClientUpdate(client.id, reply, client.num_samples, client.modalities))
                else:
                    states[client.id] = reply
            self.end_round(r, plan, record, states, replies if cfg.federate else None, history, scaling_seconds,
                           dropped)
        return self.finish(states, history, {c.id: client_info(c) for c in self.clients}, self.refit_scaling)


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
