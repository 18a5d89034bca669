"""Server-side aggregation of FedDISC client updates, as pure functions.

FedDISC's clients permanently lack some modalities (release protocol: three clients holding
{text, video}, {text, audio} and {video, audio}). A client never sees data of a modality it lacks, so
it cannot train that modality's generator; averaging the untouched broadcast copy it sends back would
only drag the holders' progress towards the previous round. The state is therefore split into
*parameter groups* (a :class:`Partition`), and each group is aggregated over the clients entitled to
it:

- ``generator:text`` / ``generator:audio`` / ``generator:video``: the DISC-Diffusion generator of a
  modality (``recovery.score_l_va`` / ``score_a_lv`` / ``score_v_la``), averaged only over the
  clients that hold that modality;
- ``extractor:text`` / ``extractor:audio`` / ``extractor:video``: a modality's projection to the
  latent (``recovery.proj_l`` / ``proj_a`` / ``proj_v``), trained in the extractor rounds and averaged
  over the holders of the modality only (the release averages them over every client, so the
  untouched copies of the clients that lack a modality cut each update of its projection to 2/3 with
  the release's three clients);
- ``extractor`` (``dgn``, ``pseudo``) and ``classifier`` (``classifier``), averaged over every client,
  except the input weights of the DGN's first recurrent layer when the partition knows the feature
  widths (``feddisc_partition(feature_dims)``, as every engine here builds it): that layer reads the
  concatenated modalities, zero-filled where a client lacks one, so a client that lacks a modality
  never trains its input columns (zero gradient, while weight decay still shrinks them); its column
  block belongs to ``extractor:<modality>`` and is averaged over the modality's holders, like the
  projections.

Broadcast: :func:`aggregate` returns the *complete* global state, and every client loads all of it,
generators of the modalities it lacks included (they condition the recovery of its missing
modalities). No per-client filtering is needed, so there is no separate broadcast function.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data.corpus import MODALITIES
from ..diffusion.disc import GENERATOR_NAMES, PROJECTION_NAMES
from ..nn.dialogue_graph_network import GCNET_ORDER

__all__ = [
    "AggregationError",
    "AggregationReport",
    "AggregationResult",
    "ClientUpdate",
    "CLASSIFIER",
    "COMBINES",
    "EXTRACTOR",
    "EXTRACTOR_GROUPS",
    "GENERATOR_GROUPS",
    "GroupReport",
    "ON_INVALID",
    "Partition",
    "PartitionRule",
    "aggregate",
    "feddisc_partition",
    "generator_group",
    "projection_group",
]

EXTRACTOR = "extractor"
CLASSIFIER = "classifier"
COMBINES = ("mean", "min", "max", "all")
"""How the contributors' values of a key combine: (weighted) arithmetic mean, element-wise min / max,
logical AND (bool tensors)."""
ON_INVALID = ("raise", "drop")


def generator_group(modality: str) -> str:
    """Name of the parameter group of ``modality``'s generator (``"generator:text"`` …)."""
    if modality not in MODALITIES:
        raise ValueError(f"generator_group: modality must be one of {MODALITIES}; got {modality!r}")
    return f"generator:{modality}"


GENERATOR_GROUPS = tuple(generator_group(m) for m in MODALITIES)
"""The generator groups in :data:`~imer_fast.data.corpus.MODALITIES` order."""


def projection_group(modality: str) -> str:
    """Name of the parameter group of ``modality``'s projection (``"extractor:text"`` …)."""
    if modality not in MODALITIES:
        raise ValueError(f"projection_group: modality must be one of {MODALITIES}; got {modality!r}")
    return f"{EXTRACTOR}:{modality}"


EXTRACTOR_GROUPS = (EXTRACTOR,) + tuple(projection_group(m) for m in MODALITIES)
"""What the extractor rounds train: the shared group and the three projection groups."""


class AggregationError(ValueError):
    """An update or an argument that :func:`aggregate` refuses."""


# ---- partition --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionRule:
    """The group(s) of the state_dict keys under one module path.

    Args:
        path: a module path (``"dgn"`` matches ``dgn.*``) or a full key (``"recovery.latent_min"``); a
            key matches when it equals ``path`` or starts with ``path + "."``.
        groups: for a whole tensor (neither ``rowwise`` nor ``columns``), the groups it belongs to: it is
            aggregated when any of them is trainable, over the union of their contributors (a tensor
            shared by several groups, such as ``scaling_fitted``). With ``rowwise=True``, row ``i``
            (along dim 0) belongs to ``groups[i]`` alone and is aggregated over that group's
            contributors; with ``columns``, so is the ``i``-th block of columns (along the last dim).
        rowwise: split the tensor into rows, one per group.
        combine: one of :data:`COMBINES`.
        columns: split the tensor along its last dim into blocks of these widths, one per group (a layer
            whose input concatenates the modalities).
    """
    path: str
    groups: Tuple[str, ...]
    rowwise: bool = False
    combine: str = "mean"
    columns: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path or self.path.startswith(".") or self.path.endswith("."):
            raise ValueError(f"PartitionRule: path must be a non-empty module path or key without a leading or "
                             f"trailing '.'; got {self.path!r}")
        groups = (self.groups,) if isinstance(self.groups, str) else tuple(self.groups)
        if not groups or not all(isinstance(g, str) and g for g in groups):
            raise ValueError(f"PartitionRule {self.path!r}: groups must be one or more non-empty group names; "
                             f"got {self.groups!r}")
        if self.columns is not None:
            columns = tuple(self.columns)
            if self.rowwise:
                raise ValueError(f"PartitionRule {self.path!r}: rowwise and columns are exclusive; give one")
            if len(columns) != len(groups) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0
                                                      for w in columns):
                raise ValueError(f"PartitionRule {self.path!r}: columns must be one int width >= 0 per group "
                                 f"({len(groups)} groups); got {self.columns!r}")
            object.__setattr__(self, "columns", columns)
        if not self.split and len(set(groups)) != len(groups):
            raise ValueError(f"PartitionRule {self.path!r}: groups of a whole tensor must be distinct; got {groups}")
        if self.combine not in COMBINES:
            raise ValueError(f"PartitionRule {self.path!r}: combine must be one of {COMBINES}; got {self.combine!r}")
        object.__setattr__(self, "groups", groups)

    @property
    def split(self) -> bool:
        """Whether parts of the tensor belong to different groups (``rowwise`` or ``columns``)."""
        return self.rowwise or self.columns is not None

    def parts(self) -> List[Tuple[tuple, str]]:
        """``(index, group)`` for each part of a split tensor: ``tensor[index]`` belongs to ``group``."""
        if self.rowwise:
            return [((row,), group) for row, group in enumerate(self.groups)]
        starts = [sum(self.columns[:i]) for i in range(len(self.columns))]
        return [((Ellipsis, slice(start, start + width)), group)
                for start, width, group in zip(starts, self.columns, self.groups)]

    def matches(self, key: str) -> bool:
        return key == self.path or key.startswith(self.path + ".")


@dataclass(frozen=True)
class Partition:
    """Maps every state_dict key to its parameter group(s) (see :class:`PartitionRule`).

    Args:
        rules: the rules, with distinct paths; a key belongs to the most specific rule that matches it
            (the longest path), so ``"dgn.lstm.weight_ih_l0"`` can carve one tensor out of ``"dgn"``.
        group_modality: group -> the modality a client must hold to be entitled to the group (groups
            not listed: every client is entitled).
    """
    rules: Tuple[PartitionRule, ...]
    group_modality: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        rules = tuple(self.rules)
        for rule in rules:
            if not isinstance(rule, PartitionRule):
                raise ValueError(f"Partition: rules must be PartitionRule objects; got {type(rule).__name__}")
        paths = [rule.path for rule in rules]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ValueError(f"Partition: more than one rule for path(s) {repeated}")
        groups = {g for rule in rules for g in rule.groups}
        for group, modality in self.group_modality.items():
            if group not in groups:
                raise ValueError(f"Partition: group_modality names group {group!r} that no rule uses; rule groups: "
                                 f"{sorted(groups)}")
            if modality not in MODALITIES:
                raise ValueError(f"Partition: group_modality[{group!r}] must be one of {MODALITIES}; got {modality!r}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "group_modality", dict(self.group_modality))

    @property
    def groups(self) -> FrozenSet[str]:
        return frozenset(g for rule in self.rules for g in rule.groups)

    def rule_for(self, key: str) -> PartitionRule:
        """The most specific rule matching ``key``; a key matching no rule is an error."""
        matching = [rule for rule in self.rules if rule.matches(key)]
        if matching:
            return max(matching, key=lambda rule: len(rule.path))
        raise ValueError(f"Partition: state_dict key {key!r} matches no rule; rule paths: "
                         f"{[rule.path for rule in self.rules]}")

    def entitled(self, group: str, modalities: FrozenSet[str]) -> bool:
        """Whether a client holding ``modalities`` trains (and contributes to) ``group``."""
        required = self.group_modality.get(group)
        return required is None or required in modalities

    def reply_keys(self, keys: Iterable[str], trainable: Iterable[str], modalities: FrozenSet[str]) -> List[str]:
        """The keys (of ``keys``, in order) a client holding ``modalities`` sends back from a round that
        trains the groups ``trainable``: those with a group that is trainable and that the client is
        entitled to. :func:`aggregate` reads nothing else from its reply, so leaving the rest out
        changes no aggregate and shrinks the upload (an extractor round sends no generator)."""
        trainable = _trainable_groups(trainable, self)
        modalities = frozenset(modalities)
        return [key for key in keys
                if any(g in trainable and self.entitled(g, modalities) for g in self.rule_for(key).groups)]


def feddisc_partition(feature_dims: Optional[Mapping[str, int]] = None) -> Partition:
    """FedDISC's partition (module doc).

    ``feature_dims`` (modality -> feature width, the model's ``feature_dims``) lays out the input
    columns of the DGN's first recurrent layer (``dgn.lstm`` / ``dgn.gru`` ``weight_ih_l0`` and its
    ``_reverse``; GCNet's audio, text, video order): each modality's block belongs to
    ``extractor:<modality>``. Without it those tensors are averaged over every client with the rest
    of the DGN.

    ``recovery.latent_min`` / ``latent_max`` hold one scaling bound per modality (MODALITIES order), so
    row ``i`` belongs to ``generator:MODALITIES[i]`` and combines over that modality's holders by min
    (latent_min) and max (latent_max). Each holder fits its bounds to the latents it saw, and the
    sampler clips the denoised latent to [-1, 1] of the scaled range: the union of the holders' ranges
    is the smallest range that maps every holder's latents inside [-1, 1] (an average of the bounds
    would clip the holder with the widest range), and it is exactly what ``fit_scaling`` would give on
    the holders' pooled data.

    ``recovery.scaling_fitted`` (bool) belongs to the three generator groups and combines by logical
    AND: the aggregated bounds count as fitted only if every contributor's were; one unfitted
    contributor brings its placeholder bounds (-1, 1) into the min / max, so the aggregate must not
    claim to be fitted.

    ``recovery.latent_mean`` / ``latent_std`` ([3, C, L], only with ``scaling="standard"``) are row-wise
    means over the holders. A federated run fits them once from the holders' pooled statistics before
    the generators train (:mod:`.simulation`), so every reply carries the same values and the mean
    passes them through.
    """
    rules = [PartitionRule(f"recovery.{GENERATOR_NAMES[m]}", generator_group(m)) for m in MODALITIES]
    rules += [PartitionRule(f"recovery.{PROJECTION_NAMES[m]}", projection_group(m)) for m in MODALITIES]
    rules += [PartitionRule("dgn", EXTRACTOR), PartitionRule("pseudo", EXTRACTOR),
              PartitionRule("classifier", CLASSIFIER),
              PartitionRule("recovery.latent_min", GENERATOR_GROUPS, rowwise=True, combine="min"),
              PartitionRule("recovery.latent_max", GENERATOR_GROUPS, rowwise=True, combine="max"),
              PartitionRule("recovery.scaling_fitted", GENERATOR_GROUPS, combine="all"),
              PartitionRule("recovery.latent_mean", GENERATOR_GROUPS, rowwise=True, combine="mean"),
              PartitionRule("recovery.latent_std", GENERATOR_GROUPS, rowwise=True, combine="mean")]
    if feature_dims is not None:
        widths = _dgn_input_widths(feature_dims)
        groups = tuple(projection_group(m) for m in GCNET_ORDER)
        rules += [PartitionRule(f"dgn.{rnn}.weight_ih_l0{direction}", groups, columns=widths)
                  for rnn in ("lstm", "gru") for direction in ("", "_reverse")]
    entitlement = {generator_group(m): m for m in MODALITIES}
    entitlement.update({projection_group(m): m for m in MODALITIES})
    return Partition(tuple(rules), entitlement)


def _dgn_input_widths(feature_dims: Mapping[str, int]) -> Tuple[int, ...]:
    if not isinstance(feature_dims, Mapping) or set(feature_dims) != set(MODALITIES) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in feature_dims.values()):
        raise ValueError(f"feddisc_partition: feature_dims must map each of {MODALITIES} to an int width >= 1; "
                         f"got {feature_dims!r}")
    return tuple(feature_dims[m] for m in GCNET_ORDER)


# ---- updates and results ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply to a round.

    ``client_id`` and ``modalities`` are the server's own records of the client and are checked here;
    ``state`` and ``num_samples`` come from the client's reply and are checked by :func:`aggregate`, so
    that ``on_invalid="drop"`` can exclude a client that reports a bad state or sample count.
    """
    client_id: str
    state: Mapping[str, Tensor]
    num_samples: int
    modalities: FrozenSet[str]

    def __post_init__(self):
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ValueError(f"ClientUpdate: client_id must be a non-empty str; got {self.client_id!r}")
        if isinstance(self.modalities, str) or not isinstance(self.modalities, (set, frozenset)):
            raise ValueError(f"ClientUpdate: client {self.client_id!r} modalities must be a frozenset of modality "
                             f"names; got {self.modalities!r}")
        unknown = sorted(m for m in self.modalities if m not in MODALITIES)
        if unknown:
            raise ValueError(f"ClientUpdate: client {self.client_id!r} modalities must be among {MODALITIES}; got "
                             f"unknown {unknown}")
        object.__setattr__(self, "modalities", frozenset(self.modalities))


@dataclass(frozen=True)
class GroupReport:
    """How one trainable group was aggregated this round.

    ``contributors``: the valid, entitled clients (sorted ids). ``kept_previous``: fewer than
    ``min_replies`` contributors, so the group kept its previous global values. ``weighted``: its means
    were weighted by ``num_samples`` (False when unweighted was asked for, when the group kept its
    previous values, or when the contributors' total is zero).
    """
    contributors: Tuple[str, ...]
    kept_previous: bool
    weighted: bool


@dataclass(frozen=True)
class AggregationReport:
    """``groups``: a :class:`GroupReport` per trainable group; ``dropped``: client id -> why it was
    excluded (``on_invalid="drop"``)."""
    groups: Dict[str, GroupReport]
    dropped: Dict[str, str]


@dataclass(frozen=True)
class AggregationResult:
    """``state``: the complete new global state (broadcast whole to every client); ``report``: how it was
    obtained."""
    state: Dict[str, Tensor]
    report: AggregationReport


# ---- aggregation ------------------------------------------------------------------------------


def aggregate(global_state: Mapping[str, Tensor], updates: Iterable[ClientUpdate], partition: Partition, *,
              trainable: Optional[Iterable[str]] = None, weighted: bool = False, min_replies: int = 1,
              on_invalid: str = "raise") -> AggregationResult:
    """One round's new global state from the clients' updates (pure: inputs are never modified).

    Args:
        global_state: the state broadcast at the start of the round; every key must match a rule.
        updates: the clients' replies (distinct client ids).
        partition: the parameter groups (:func:`feddisc_partition` for FedDISC).
        trainable: the groups trained this round (None: all). Keys of other groups keep their global
            values and need not be sent.
        weighted: weight means by ``num_samples`` (the FedDISC release averages unweighted); a zero
            total weight falls back to unweighted.
        min_replies: a trainable group with fewer contributors keeps its previous global values.
        on_invalid: an invalid update (a key not in ``global_state``, another shape or dtype, NaN / inf,
            a missing key of a trainable group it is entitled to, a bad ``num_samples``) raises
            :class:`AggregationError` (``"raise"``) or is excluded from the round (``"drop"``, the reason
            recorded in the report). Every sent key is checked, frozen or not.

    Returns:
        The complete new global state (new tensors, each with the dtype and device of its
        ``global_state`` entry: this is what every client loads) and the report.

    Contributors to a group are the valid updates entitled to it (holding its modality). Means
    accumulate in float64, in client-id order, and are cast back once, so the result is bitwise
    independent of the order of ``updates``.
    """
    if on_invalid not in ON_INVALID:
        raise AggregationError(f"aggregate: on_invalid must be one of {ON_INVALID}; got {on_invalid!r}")
    if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
        raise AggregationError(f"aggregate: min_replies must be an int >= 1; got {min_replies!r}")
    trainable_groups = _trainable_groups(trainable, partition)
    rules = {key: partition.rule_for(key) for key in global_state}
    for key, rule in rules.items():
        _check_global_entry(key, global_state[key], rule)
    updates = _distinct_updates(updates)

    group_keys: Dict[str, List[str]] = {g: [] for g in partition.groups}
    for key, rule in rules.items():
        for group in set(rule.groups):
            group_keys[group].append(key)

    valid, dropped = [], {}
    for update in updates:
        problem = _first_problem(update, global_state, partition, trainable_groups, group_keys)
        if problem is None:
            valid.append(update)
        elif on_invalid == "raise":
            raise AggregationError(f"aggregate: client {update.client_id!r} {problem}")
        else:
            dropped[update.client_id] = problem

    reports, contributors = {}, {}
    for group in sorted(trainable_groups):
        entitled = [u for u in valid if partition.entitled(group, u.modalities)]
        kept = len(entitled) < min_replies
        contributors[group] = [] if kept else entitled
        reports[group] = GroupReport(tuple(u.client_id for u in entitled), kept,
                                     weighted and not kept and sum(u.num_samples for u in entitled) > 0)

    state = {}
    with torch.no_grad():
        for key, previous in global_state.items():
            rule = rules[key]
            if rule.split:
                new = previous.clone()
                for index, group in rule.parts():
                    if contributors.get(group):
                        new[index] = _combine(rule.combine, [(u.state[key][index], u.num_samples)
                                                             for u in contributors[group]], previous[index], weighted)
                state[key] = new
            else:
                by_id = {u.client_id: u for g in rule.groups for u in contributors.get(g, ())}
                replies = [(by_id[cid].state[key], by_id[cid].num_samples) for cid in sorted(by_id)]
                state[key] = _combine(rule.combine, replies, previous, weighted) if replies else previous.clone()
    return AggregationResult(state, AggregationReport(reports, dropped))


def _trainable_groups(trainable: Optional[Iterable[str]], partition: Partition) -> FrozenSet[str]:
    if trainable is None:
        return partition.groups
    if isinstance(trainable, str):
        raise AggregationError(f"aggregate: trainable must be a set of group names, not the str {trainable!r}")
    groups = frozenset(trainable)
    unknown = sorted(groups - partition.groups)
    if unknown:
        raise AggregationError(f"aggregate: trainable names unknown groups {unknown}; the partition's groups: "
                               f"{sorted(partition.groups)}")
    return groups


def _check_global_entry(key: str, value: Tensor, rule: PartitionRule) -> None:
    if not isinstance(value, Tensor):
        raise AggregationError(f"aggregate: global_state[{key!r}] must be a tensor; got {type(value).__name__}")
    if rule.combine == "mean" and not value.is_floating_point():
        raise AggregationError(f"aggregate: global_state[{key!r}] is {value.dtype}, but rule {rule.path!r} combines "
                               f"by mean, which needs a floating dtype")
    if rule.combine == "all" and value.dtype != torch.bool:
        raise AggregationError(f"aggregate: global_state[{key!r}] is {value.dtype}, but rule {rule.path!r} combines "
                               f"by logical AND, which needs torch.bool")
    if rule.rowwise and (value.dim() == 0 or value.shape[0] != len(rule.groups)):
        raise AggregationError(f"aggregate: global_state[{key!r}] must have {len(rule.groups)} rows (one per group "
                               f"of rule {rule.path!r}: {rule.groups}); got shape {tuple(value.shape)}")
    if rule.columns is not None and (value.dim() == 0 or value.shape[-1] != sum(rule.columns)):
        raise AggregationError(f"aggregate: global_state[{key!r}] must have {sum(rule.columns)} columns (blocks "
                               f"{rule.columns} of rule {rule.path!r}: {rule.groups}); got shape "
                               f"{tuple(value.shape)}")


def _distinct_updates(updates: Iterable[ClientUpdate]) -> List[ClientUpdate]:
    """The updates sorted by client id (the fixed summation order); duplicate ids are an error."""
    updates = list(updates)
    for update in updates:
        if not isinstance(update, ClientUpdate):
            raise AggregationError(f"aggregate: updates must be ClientUpdate objects; got {type(update).__name__}")
    updates.sort(key=lambda u: u.client_id)
    for a, b in zip(updates, updates[1:]):
        if a.client_id == b.client_id:
            raise AggregationError(f"aggregate: client id {a.client_id!r} appears in more than one update")
    return updates


def _first_problem(update: ClientUpdate, global_state: Mapping[str, Tensor], partition: Partition,
                   trainable_groups: FrozenSet[str], group_keys: Mapping[str, Sequence[str]]) -> Optional[str]:
    """Why ``update`` is invalid (the first reason, in key order), or None."""
    count = update.num_samples
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"num_samples must be an int >= 0; got {count!r}"
    if not isinstance(update.state, Mapping):
        return f"state must be a mapping of key -> tensor; got {type(update.state).__name__}"
    for key in sorted(update.state):
        value = update.state[key]
        if key not in global_state:
            return f"key {key!r}: not in global_state"
        expected = global_state[key]
        if not isinstance(value, Tensor):
            return f"key {key!r}: expected a tensor, got {type(value).__name__}"
        if value.dtype != expected.dtype:
            return f"key {key!r}: expected dtype {expected.dtype}, got {value.dtype}"
        if value.shape != expected.shape:
            return f"key {key!r}: expected shape {tuple(expected.shape)}, got {tuple(value.shape)}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"key {key!r}: contains NaN or inf"
    for group in sorted(trainable_groups):
        if partition.entitled(group, update.modalities):
            for key in sorted(group_keys[group]):
                if key not in update.state:
                    return (f"key {key!r}: missing; it belongs to trainable group {group!r}, which the client is "
                            f"entitled to (holds {sorted(update.modalities)})")
    return None


def _combine(combine: str, replies: Sequence[Tuple[Tensor, int]], like: Tensor, weighted: bool) -> Tensor:
    """Combine the (value, num_samples) replies, already in client-id order, into a tensor like ``like``."""
    values = [value.to(like.device) for value, _ in replies]
    if combine == "min":
        return torch.stack(values).amin(0)
    if combine == "max":
        return torch.stack(values).amax(0)
    if combine == "all":
        return torch.stack(values).all(0)
    weights = [count for _, count in replies]
    total = sum(weights)
    if not weighted or total == 0:
        weights, total = [1] * len(values), len(values)
    # Accumulate in float64 and cast once: the sum's own rounding stays far below the storage dtype's
    # resolution, so the result is the correctly rounded mean in practice, however many clients reply.
    acc = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
    for value, weight in zip(values, weights):
        acc += value.to(torch.float64) * weight
    return (acc / total).to(like.dtype)
