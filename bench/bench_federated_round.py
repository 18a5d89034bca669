"""One federated FedDISC round split into local training, communication and aggregation
(run: ``pytest bench/bench_federated_round.py --benchmark-only``).

The release protocol's three clients ({text, video}, {text, audio}, {video, audio}) on disjoint shards
of the synthetic IEMOCAP-6 corpus at GCNet's feature widths (4 dialogues of IEMOCAP lengths each: 3
training + 1 validation, batch 4), presets ``release`` (three 16.4 M-parameter U-Nets) and ``small``. For each phase of
the schedule (``extractor``, ``recovery``: the generators, ``classifier``):

- ``local_training``: one client's local epoch of the phase's stage (:func:`~imer_fast.federated.rounds.
  train_stage`: load the broadcast state, train, copy the reply). Clients train in parallel in a
  deployment, one after another in the in-process simulation.
- ``communication``: one client's exchange as bytes: the server encodes the global state, the client
  decodes it, encodes its reply (only the keys the aggregation reads:
  :meth:`~imer_fast.federated.Partition.reply_keys`) and the server decodes it; through Flower's
  wire format (``ArrayRecord`` in a protobuf ``RecordDict``) when flwr is installed, otherwise through
  ``torch.save``. ``extra_info`` holds the payload sizes (broadcast, reply, and the whole state a
  reply would be untrimmed). The transfer itself is payload / bandwidth and depends on the network.
- ``aggregation``: the server's :func:`~imer_fast.federated.aggregate` of the three trimmed replies
  over FedDISC's partition (each generator over its holders, in float64, fixed order); with flwr
  installed, Flower's own FedAvg aggregation (``aggregate_arrayrecords``, every key over every
  client, no per-modality groups) of the same three whole states as the library reference.
"""
import io

import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.federated import FederatedConfig
from imer_fast.federated.aggregation import ClientUpdate, aggregate
from imer_fast.federated.rounds import (RoundServer, clone_state, make_clients, pool_scaling, scaling_reply,
                                        train_stage)
from imer_fast.federated.schedule import PHASE_GROUPS
from imer_fast.train.feddisc import FedDISCConfig
from imer_fast.train.trainer import TrainerConfig

from conftest import sync

try:
    from flwr.app import MetricRecord, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from imer_fast.federated.flower import record_to_state, state_to_record
    WIRE = "flower"
except ImportError:
    WIRE = "torch.save"

PHASES = ("extractor", "recovery", "classifier")
PRESETS = ("release", "small")
CLIENTS = ("tv", "ta", "av")


def encode(state) -> bytes:
    if WIRE == "flower":
        return recorddict_to_proto(RecordDict({"arrays": state_to_record(state)})).SerializeToString()
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def decode(data: bytes, like=None):
    if WIRE == "flower":
        proto = ProtoRecordDict()
        proto.ParseFromString(data)
        return record_to_state(recorddict_from_proto(proto)["arrays"], like)
    return torch.load(io.BytesIO(data), weights_only=True)


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap6", seed=0, scale=0.1)   # 12 training dialogues: 4 per client


@pytest.fixture(scope="module")
def rounds(corpus, device):
    """preset -> (server, clients, global state with fitted scaling)."""
    out = {}
    for preset in PRESETS:
        feddisc = FedDISCConfig(preset=preset, batch_size=4, trainer=TrainerConfig(device=str(device), progress=False))
        config = FederatedConfig(clients=CLIENTS, local_epochs=1, eval_patterns=(), recovery_error=False,
                                 progress=False, feddisc=feddisc)
        server = RoundServer(corpus, config)
        clients = make_clients(corpus, config)
        state = clone_state(server.initial)
        replies = [scaling_reply(server.model, c, config, server.base, 1, state) for c in clients]
        state.update(pool_scaling(state, replies))
        out[preset] = server, clients, state
    return out


@pytest.fixture(scope="module")
def replies(rounds):
    """(preset, phase) -> each client's whole reply to a round of that phase (trained once: the weights
    move as in a real round)."""
    cache = {}

    def get(preset, phase):
        if (preset, phase) not in cache:
            server, clients, state = rounds[preset]
            cache[preset, phase] = [train_stage(server.model, c, server.config, server.base, 1, phase, state)[0]
                                    for c in clients]
        return cache[preset, phase]

    return get


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("preset", PRESETS)
def test_local_training(benchmark, rounds, preset, phase, device):
    server, clients, state = rounds[preset]
    benchmark.group = f"federated round {preset} {phase}"
    benchmark.extra_info.update(part="local_training", clients=len(clients),
                                dialogues=len(clients[0].corpus.splits["train"]))

    def one_client():
        train_stage(server.model, clients[0], server.config, server.base, 1, phase, state)
        sync(device)

    benchmark.pedantic(one_client, rounds=3 if preset == "small" else 2, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("preset", PRESETS)
def test_communication(benchmark, rounds, replies, preset, phase):
    server, clients, state = rounds[preset]
    partition = server.partition
    client = clients[0]
    reply = replies(preset, phase)[0]
    keys = partition.reply_keys(reply, PHASE_GROUPS[phase], client.modalities)
    trimmed = {k: reply[k] for k in keys}
    benchmark.group = f"federated round {preset} {phase}"
    benchmark.extra_info.update(part="communication", wire=WIRE, broadcast_bytes=len(encode(state)),
                                reply_bytes=len(encode(trimmed)), whole_reply_bytes=len(encode(reply)))

    def exchange():
        received = decode(encode(state), state)   # server -> client: the global state
        returned = decode(encode(trimmed))        # client -> server: its reply
        return received, returned

    received, returned = exchange()   # the wire loses nothing
    assert all(torch.equal(received[k].cpu(), state[k].cpu()) for k in state)
    assert list(returned) == keys and all(torch.equal(returned[k].cpu(), trimmed[k].cpu()) for k in keys)
    benchmark.pedantic(exchange, rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("preset", PRESETS)
def test_aggregation(benchmark, rounds, replies, preset, phase, device):
    server, clients, state = rounds[preset]
    partition, trainable = server.partition, PHASE_GROUPS[phase]
    updates = [ClientUpdate(c.id, {k: r[k] for k in partition.reply_keys(r, trainable, c.modalities)},
                            c.num_samples, c.modalities) for c, r in zip(clients, replies(preset, phase))]
    benchmark.group = f"federated round {preset} {phase}"
    benchmark.extra_info.update(part="aggregation")

    def server_aggregate():
        out = aggregate(state, updates, partition, trainable=trainable)
        sync(device)
        return out

    benchmark.pedantic(server_aggregate, rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.skipif(WIRE != "flower", reason="flwr not installed (pip install -e '.[fed]')")
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("preset", PRESETS)
def test_aggregation_flower_fedavg(benchmark, rounds, replies, preset, phase):
    server, clients, state = rounds[preset]
    records = [RecordDict({"arrays": state_to_record(r), "metrics": MetricRecord({"num-examples": c.num_samples})})
               for c, r in zip(clients, replies(preset, phase))]
    benchmark.group = f"federated round {preset} {phase}"
    benchmark.extra_info.update(part="aggregation (library reference: Flower FedAvg, all keys over all clients)")
    benchmark.pedantic(lambda: aggregate_arrayrecords(records, "num-examples"), rounds=5, warmup_rounds=1,
                       iterations=1)

