"""Round schedules of federated FedDISC: which parameter groups the clients train in round ``r``.

A schedule is a fixed sequence of phases, each lasting a number of rounds:

- ``"extractor"``: the projections (groups ``extractor:text`` / ``audio`` / ``video``) and the
  pseudo-labeller (group ``extractor``);
- ``"recovery"``: the three generators (``generator:text`` / ``audio`` / ``video``), classifier frozen;
- ``"classifier"``: the classifier, recovery frozen.

The groups of a round's :class:`RoundPlan` are both the groups the clients train locally and the
``trainable`` argument of :func:`~imer_fast.federated.aggregation.aggregate` for that round.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import accumulate
from typing import FrozenSet, Tuple

from .aggregation import CLASSIFIER, EXTRACTOR_GROUPS, GENERATOR_GROUPS

__all__ = ["PHASES", "AlternatingFrozenSchedule", "RoundPlan", "SequentialSchedule"]

PHASE_GROUPS = {"extractor": frozenset(EXTRACTOR_GROUPS), "recovery": frozenset(GENERATOR_GROUPS),
                "classifier": frozenset({CLASSIFIER})}
PHASES = tuple(PHASE_GROUPS)


@dataclass(frozen=True)
class RoundPlan:
    """What round ``r`` trains: its phase and the parameter groups trained and aggregated."""
    phase: str
    trainable: FrozenSet[str]


class _PhaseSchedule(ABC):
    """A schedule given as consecutive (phase, rounds) segments."""

    @abstractmethod
    def _segments(self) -> Tuple[Tuple[str, int], ...]:
        """The (phase, rounds) segments in order."""

    @property
    def total_rounds(self) -> int:
        return sum(rounds for _, rounds in self._segments())

    def plan(self, round_number: int) -> RoundPlan:
        """The plan of round ``round_number`` (1-based, at most :attr:`total_rounds`)."""
        name = type(self).__name__
        if isinstance(round_number, bool) or not isinstance(round_number, int):
            raise ValueError(f"{name}.plan: round_number must be an int; got {round_number!r}")
        if not 1 <= round_number <= self.total_rounds:
            raise ValueError(f"{name}.plan: round_number must be in [1, {self.total_rounds}] (rounds are 1-based); "
                             f"got {round_number}")
        segments = self._segments()
        ends = accumulate(rounds for _, rounds in segments)
        phase = next(phase for (phase, _), end in zip(segments, ends) if round_number <= end)
        return RoundPlan(phase, PHASE_GROUPS[phase])

    def _check(self, **counts: int) -> None:
        name = type(self).__name__
        for arg, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {arg} must be an int >= 0; got {value!r}")
        if self.total_rounds < 1:
            raise ValueError(f"{name}: the schedule must have at least one round; got "
                             f"{', '.join(f'{k}={v}' for k, v in counts.items())}")


@dataclass(frozen=True)
class AlternatingFrozenSchedule(_PhaseSchedule):
    """``extractor_rounds`` extractor rounds, then ``cycles`` cycles of ``recovery_rounds`` recovery rounds
    followed by ``classifier_rounds`` classifier rounds (the generators and the classifier alternate,
    each frozen while the other trains)."""
    extractor_rounds: int
    recovery_rounds: int
    classifier_rounds: int
    cycles: int

    def __post_init__(self):
        self._check(extractor_rounds=self.extractor_rounds, recovery_rounds=self.recovery_rounds,
                    classifier_rounds=self.classifier_rounds, cycles=self.cycles)

    def _segments(self) -> Tuple[Tuple[str, int], ...]:
        cycle = (("recovery", self.recovery_rounds), ("classifier", self.classifier_rounds))
        return (("extractor", self.extractor_rounds),) + cycle * self.cycles


@dataclass(frozen=True)
class SequentialSchedule(_PhaseSchedule):
    """The release's stage order, one pass: extractor, generator (phase ``"recovery"``), classifier rounds."""
    extractor_rounds: int
    generator_rounds: int
    classifier_rounds: int

    def __post_init__(self):
        self._check(extractor_rounds=self.extractor_rounds, generator_rounds=self.generator_rounds,
                    classifier_rounds=self.classifier_rounds)

    def _segments(self) -> Tuple[Tuple[str, int], ...]:
        return (("extractor", self.extractor_rounds), ("recovery", self.generator_rounds),
                ("classifier", self.classifier_rounds))
