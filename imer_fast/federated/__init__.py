"""Federated FedDISC: server-side aggregation of client updates over parameter groups
(:mod:`.aggregation`), the round schedules that say which groups each round trains (:mod:`.schedule`),
the round code both engines share (:mod:`.rounds`), the in-process simulation of clients with fixed
modality availability (:mod:`.simulation`; the ``imer-fast federated`` command is in :mod:`.cli`) and
the Flower ServerApp / ClientApp (:mod:`.flower`, needs the ``fed`` extra).

:mod:`.flower` is imported only on first use of one of its names here (``Settings``,
``FedDISCStrategy``, ``make_server_app``, ``make_client_app``, ``run_server``), so that this package
works without ``flwr``."""
from .aggregation import (CLASSIFIER, COMBINES, EXTRACTOR, EXTRACTOR_GROUPS, GENERATOR_GROUPS, ON_INVALID,
                          AggregationError, AggregationReport, AggregationResult, ClientUpdate, GroupReport, Partition,
                          PartitionRule, aggregate, feddisc_partition, generator_group, projection_group)
from .rounds import RoundServer
from .schedule import PHASES, AlternatingFrozenSchedule, RoundPlan, SequentialSchedule
from .simulation import (DEFAULT_CLIENTS, FederatedConfig, SimulatedClient, SimulationHooks, make_clients,
                         make_schedule, run_simulation, shard_corpus)

_FLOWER_NAMES = ("FedDISCStrategy", "Settings", "make_client_app", "make_server_app", "run_server")


def __getattr__(name):
    if name in _FLOWER_NAMES:
        from . import flower   # needs flwr: pip install "imer_fast[fed]"

        return getattr(flower, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "EXTRACTOR_GROUPS",
    "FederatedConfig",
    "GENERATOR_GROUPS",
    "GroupReport",
    "ON_INVALID",
    "PHASES",
    "Partition",
    "PartitionRule",
    "RoundPlan",
    "RoundServer",
    "SequentialSchedule",
    "SimulatedClient",
    "SimulationHooks",
    "aggregate",
    "feddisc_partition",
    "generator_group",
    "projection_group",
    "make_clients",
    "make_schedule",
    "run_simulation",
    "shard_corpus",
]
