"""Federated FedDISC: server-side aggregation of client updates over parameter groups
(:mod:`.aggregation`) and the round schedules that say which groups each round trains (:mod:`.schedule`)."""
from .aggregation import (CLASSIFIER, COMBINES, EXTRACTOR, GENERATOR_GROUPS, ON_INVALID, AggregationError,
                          AggregationReport, AggregationResult, ClientUpdate, GroupReport, Partition, PartitionRule,
                          aggregate, feddisc_partition, generator_group)
from .schedule import PHASES, AlternatingFrozenSchedule, RoundPlan, SequentialSchedule

__all__ = [
    "AggregationError",
    "AggregationReport",
    "AggregationResult",
    "AlternatingFrozenSchedule",
    "CLASSIFIER",
    "COMBINES",
    "ClientUpdate",
    "EXTRACTOR",
    "GENERATOR_GROUPS",
    "GroupReport",
    "ON_INVALID",
    "PHASES",
    "Partition",
    "PartitionRule",
    "RoundPlan",
    "SequentialSchedule",
    "aggregate",
    "feddisc_partition",
    "generator_group",
]
