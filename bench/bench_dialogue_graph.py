"""Dialogue-graph benchmarks (run: ``pytest bench --benchmark-only``).

Shapes from real data: 32 dialogues of IEMOCAP lengths (1,535 utterances, 28,715 edges), window 10/10,
DialogueGCN's 8 relations (2 speakers x 2 directions x 2), 200 -> 100 features, fp32.

- graph building: imer_fast's op vs a vectorised torch builder (the op's _ref twin) vs a GCNet-style
  per-edge Python builder;
- RGCNConv + GraphConv forward + backward from edge_index / edge_type: imer_fast (its sorted graph
  built inside the timing; also with it prebuilt) vs the eager _ref twins vs torch.compile of them vs
  PyG (eager, and under torch.compile).
"""
import pytest
import torch

import imer_fast.ops as ops
from imer_fast.nn import GraphConv, RGCNConv
from imer_fast.testing.reference_gcnet import python_graph_builder

from conftest import iemocap_like_lengths, sync, synced

WINDOW = 10
NUM_DIALOGUES = 32
IN_FEATURES, OUT_FEATURES = 200, 100


@pytest.fixture(scope="module")
def dialogues(device):
    lengths = iemocap_like_lengths(NUM_DIALOGUES)
    gen = torch.Generator().manual_seed(0)
    speakers = torch.randint(0, 2, (sum(lengths),), generator=gen)
    return torch.tensor(lengths, device=device), speakers.to(device)


@pytest.mark.benchmark(group="build_dialogue_graph")
def test_build_graph_imer_fast(benchmark, dialogues, device):
    lengths, speakers = dialogues
    benchmark(synced(torch.ops.imer_fast.build_dialogue_graph, device, lengths, speakers, WINDOW, WINDOW,
                     "dialoguegcn", 2))


@pytest.mark.benchmark(group="build_dialogue_graph")
def test_build_graph_vectorised_torch(benchmark, dialogues, device):
    lengths, speakers = dialogues
    benchmark(synced(ops.build_dialogue_graph_ref, device, lengths, speakers, WINDOW, WINDOW, "dialoguegcn", 2))


@pytest.mark.benchmark(group="build_dialogue_graph")
def test_build_graph_python_per_edge(benchmark, dialogues, device):
    lengths, speakers = dialogues
    length_list = lengths.tolist()
    starts = [sum(length_list[:b]) for b in range(len(length_list))]
    padded = [speakers[s:s + n].tolist() for s, n in zip(starts, length_list)]

    def run():  # GCNet's batch_graphify pattern (DialogueGCN's 8 relations, as the other rows): a lookup per edge
        edge_index, edge_type, _ = python_graph_builder(padded, length_list, WINDOW, WINDOW, "dialoguegcn")
        return edge_index.to(device), edge_type.to(device)

    benchmark.pedantic(run, rounds=5, iterations=1)


@pytest.mark.benchmark(group="build_dialogue_graph")
def test_build_graph_compiled_vectorised_torch(benchmark, dialogues, device):
    lengths, speakers = dialogues
    run = synced(torch.compile(ops.build_dialogue_graph_ref, dynamic=True), device, lengths, speakers, WINDOW,
                 WINDOW, "dialoguegcn", 2)
    run()  # compile outside the timing
    benchmark(run)


@pytest.mark.benchmark(group="build_dialogue_graph")
def test_build_graph_imer_fast_with_csr(benchmark, dialogues, device):
    lengths, speakers = dialogues
    benchmark(synced(ops.build_dialogue_graph, device, lengths, speakers, WINDOW, WINDOW, "dialoguegcn", 2))


# ---- relational CSR (sorting the typed edges for the convolutions) ---------------------------


@pytest.fixture(scope="module")
def typed_edges(dialogues):
    lengths, speakers = dialogues
    edge_index, edge_type, _ = ops.build_dialogue_graph_ref(lengths, speakers, WINDOW, WINDOW, "dialoguegcn", 2)
    perm = torch.randperm(edge_type.numel(), generator=torch.Generator().manual_seed(0)).to(edge_type.device)
    return edge_index[:, perm], edge_type[perm], speakers.numel()


@pytest.mark.benchmark(group="relational_csr")
def test_csr_imer_fast(benchmark, typed_edges, device):
    edge_index, edge_type, num_nodes = typed_edges
    benchmark(synced(torch.ops.imer_fast.relational_csr, device, edge_index, edge_type, num_nodes, 8))


@pytest.mark.benchmark(group="relational_csr")
def test_csr_reference(benchmark, typed_edges, device):
    edge_index, edge_type, num_nodes = typed_edges
    benchmark(synced(ops.relational_csr_ref, device, edge_index, edge_type, num_nodes, 8))


@pytest.mark.benchmark(group="relational_csr")
def test_csr_compiled_reference(benchmark, typed_edges, device):
    edge_index, edge_type, num_nodes = typed_edges
    run = synced(torch.compile(ops.relational_csr_ref, dynamic=True), device, edge_index, edge_type, num_nodes, 8)
    run()  # compile outside the timing
    benchmark(run)


@pytest.mark.benchmark(group="relational_csr")
def test_csr_pyg_sort_edge_index(benchmark, typed_edges, device):
    """PyG's own sort (by target, then source; no relation key, no transpose): a lower bound on
    what a library sort costs here."""
    utils = pytest.importorskip("torch_geometric.utils")
    edge_index, edge_type, num_nodes = typed_edges
    benchmark(lambda: (utils.sort_edge_index(edge_index, edge_type, num_nodes=num_nodes, sort_by_row=False),
                       sync(device)))


# ---- RGCNConv + GraphConv forward + backward --------------------------------------------------


@pytest.fixture(scope="module")
def layer_inputs(dialogues, device):
    lengths, speakers = dialogues
    graph = ops.build_dialogue_graph(lengths, speakers, WINDOW, WINDOW, "dialoguegcn", 2).graph
    torch.manual_seed(0)
    rgcn, gconv = RGCNConv(IN_FEATURES, OUT_FEATURES, 8).to(device), GraphConv(OUT_FEATURES, OUT_FEATURES).to(device)
    x = torch.randn(graph.num_nodes, IN_FEATURES, device=device, requires_grad=True)
    return graph, rgcn, gconv, x


def _fwd_bwd(fn, x, params, device):
    def run():
        out = fn(x)
        grads = torch.autograd.grad(out.sum(), [x, *params])
        sync(device)
        return grads

    return run


def _record_peak_memory(benchmark, fn, x, device):
    """GPU only: peak memory of one forward beyond its inputs, in multiples of the output size
    (target: <= 1.2 for imer_fast's RGCN layer)."""
    if device.type != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = fn(x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    benchmark.extra_info["peak_extra_memory_over_output"] = extra / (out.numel() * out.element_size())


def _ref_layers(graph, rgcn, gconv):
    def fn(x):
        h = ops.rgcn_conv_ref(x, graph.edge_index, graph.edge_type, rgcn.weight, rgcn.root, rgcn.bias)
        return ops.graph_conv_ref(h, graph.edge_index, gconv.lin_rel.weight, gconv.lin_rel.bias, gconv.lin_root.weight)

    return fn


def _params(rgcn, gconv):
    return list(rgcn.parameters()) + list(gconv.parameters())


@pytest.mark.benchmark(group="rgcn+graphconv fwd+bwd")
def test_layers_imer_fast(benchmark, layer_inputs, device):
    """From the same edge_index / edge_type as PyG and the twins: the sorted graph (built once for both
    layers, as a training step does per batch) is inside the timing."""
    graph, rgcn, gconv, x = layer_inputs
    edge_index, edge_type, num_nodes = graph.edge_index, graph.edge_type, graph.num_nodes

    def layers(x):
        sorted_graph = ops.RelationalGraph.from_edges(edge_index, edge_type, num_nodes, 8)
        return gconv(rgcn(x, sorted_graph), sorted_graph)

    _record_peak_memory(benchmark, lambda x: rgcn(x, graph), x, device)
    benchmark(_fwd_bwd(layers, x, _params(rgcn, gconv), device))


@pytest.mark.benchmark(group="rgcn+graphconv fwd+bwd")
def test_layers_imer_fast_prebuilt_graph(benchmark, layer_inputs, device):
    """The sorted graph built outside the timing (reused across calls, e.g. fixed evaluation batches)."""
    graph, rgcn, gconv, x = layer_inputs
    benchmark(_fwd_bwd(lambda x: gconv(rgcn(x, graph), graph), x, _params(rgcn, gconv), device))


@pytest.mark.benchmark(group="rgcn+graphconv fwd+bwd")
def test_layers_eager_reference(benchmark, layer_inputs, device):
    graph, rgcn, gconv, x = layer_inputs
    benchmark(_fwd_bwd(_ref_layers(graph, rgcn, gconv), x, _params(rgcn, gconv), device))


@pytest.mark.benchmark(group="rgcn+graphconv fwd+bwd")
def test_layers_compiled_reference(benchmark, layer_inputs, device):
    graph, rgcn, gconv, x = layer_inputs
    run = _fwd_bwd(torch.compile(_ref_layers(graph, rgcn, gconv)), x, _params(rgcn, gconv), device)
    run()  # compile outside the timing
    benchmark(run)


def _pyg_layers(rgcn, gconv, device):
    pyg = pytest.importorskip("torch_geometric.nn")
    theirs_rgcn = pyg.RGCNConv(IN_FEATURES, OUT_FEATURES, 8).to(device)
    theirs_gconv = pyg.GraphConv(OUT_FEATURES, OUT_FEATURES).to(device)
    theirs_rgcn.load_state_dict(rgcn.state_dict())
    theirs_gconv.load_state_dict(gconv.state_dict())
    return theirs_rgcn, theirs_gconv


@pytest.mark.benchmark(group="rgcn+graphconv fwd+bwd")
def test_layers_pyg(benchmark, layer_inputs, device):
    graph, rgcn, gconv, x = layer_inputs
    theirs_rgcn, theirs_gconv = _pyg_layers(rgcn, gconv, device)
    _record_peak_memory(benchmark, lambda x: theirs_rgcn(x, graph.edge_index, graph.edge_type), x, device)
    fn = lambda x: theirs_gconv(theirs_rgcn(x, graph.edge_index, graph.edge_type), graph.edge_index)  # noqa: E731
    benchmark(_fwd_bwd(fn, x, _params(theirs_rgcn, theirs_gconv), device))


@pytest.mark.benchmark(group="rgcn+graphconv fwd+bwd")
def test_layers_pyg_compiled(benchmark, layer_inputs, device):
    graph, rgcn, gconv, x = layer_inputs
    theirs_rgcn, theirs_gconv = _pyg_layers(rgcn, gconv, device)
    fn = torch.compile(lambda x: theirs_gconv(theirs_rgcn(x, graph.edge_index, graph.edge_type), graph.edge_index))
    run = _fwd_bwd(fn, x, _params(theirs_rgcn, theirs_gconv), device)
    run()
    benchmark(run)
