"""Federated FedDISC: server-side aggregation of client updates over parameter groups
(:mod:`.aggregation`), the round schedules that say which groups each round trains (:mod:`.schedule`),
and the in-process simulation of clients with fixed modality availability (:mod:`.simulation`; the
``imer-fast federated`` command is in :mod:`.cli`)."""
from .aggregation import (CLASSIFIER, COMBINES, EXTRACTOR, GENERATOR_GROUPS, ON_INVALID, AggregationError,
                          AggregationReport, AggregationResult, ClientUpdate, GroupReport, Partition, PartitionRule,
                          aggregate, feddisc_partition, generator_group)
from .schedule import PHASES, AlternatingFrozenSchedule, RoundPlan, SequentialSchedule
from .simulation import (DEFAULT_CLIENTS, FederatedConfig, SimulatedClient, SimulationHooks, make_clients,
                         make_schedule, run_simulation, shard_corpus)

__all__ = [
    "AggregationError",
    "AggregationReport",
    "AggregationResult",
    "AlternatingFrozenSchedule",
    "CLASSIFIER",
    "COMBINES",
    "ClientUpdate",
    "DEFAULT_CLIENTS",
    "EXTRACTOR",
    "FederatedConfig",
    "GENERATOR_GROUPS",
    "GroupReport",
    "ON_INVALID",
    "PHASES",
    "Partition",
    "PartitionRule",
    "RoundPlan",
    "SequentialSchedule",
    "SimulatedClient",
    "SimulationHooks",
    "aggregate",
    "feddisc_partition",
    "generator_group",
    "make_clients",
    "make_schedule",
    "run_simulation",
    "shard_corpus",
]
