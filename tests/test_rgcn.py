"""rgcn_conv / graph_conv on every backend against the _ref twins, PyG, gradcheck and opcheck."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import imer_fast.ops as ops
from imer_fast.nn import GraphConv, RGCNConv

pyg = pytest.importorskip("torch_geometric.nn")


def random_graph(num_nodes, num_relations, num_edges, seed):
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, max(num_nodes, 1), (2, num_edges), generator=gen)
    edge_type = torch.randint(0, num_relations, (num_edges,), generator=gen)
    return edge_index, edge_type, ops.RelationalGraph.from_edges(edge_index, edge_type, num_nodes, num_relations)


def params(fin, fout, num_relations, dtype, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(num_relations, fin, fout), make(fin, fout), make(fout)


@pytest.mark.parametrize("aggr", ["mean", "add"])
@pytest.mark.parametrize("with_root, with_bias, with_weight", [(True, True, False), (False, False, True),
                                                                 (True, False, True), (False, True, False)])
def test_forward_matches_reference(backend, aggr, with_root, with_bias, with_weight):
    edge_index, edge_type, graph = random_graph(23, 4, 90, seed=1)
    weight, root, bias = params(37, 19, 4, torch.float32, seed=2)
    x = torch.randn(23, 37, generator=torch.Generator().manual_seed(3))
    edge_weight = torch.rand(90, generator=torch.Generator().manual_seed(4)) if with_weight else None
    root, bias = (root if with_root else None), (bias if with_bias else None)
    got = ops.rgcn_conv(x, graph, weight, root, bias, edge_weight, aggr)
    ref = ops.rgcn_conv_ref(x, edge_index, edge_type, weight, root, bias, edge_weight, aggr)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggr", ["mean", "add"])
def test_gradcheck_float64(backend, aggr):
    edge_index, edge_type, graph = random_graph(9, 3, 30, seed=5)
    weight, root, bias = params(5, 4, 3, torch.float64, seed=6, requires_grad=True)
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    edge_weight = torch.rand(30, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, r, b, ew: ops.rgcn_conv(x, graph, w, r, b, ew, aggr)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, root, bias, edge_weight))
    fn_plain = lambda x, w: ops.rgcn_conv(x, graph, w, aggr=aggr)  # noqa: E731
    assert torch.autograd.gradcheck(fn_plain, (x, weight))


def test_backward_matches_reference_in_float32(backend):
    edge_index, edge_type, graph = random_graph(40, 5, 200, seed=7)
    weight, root, bias = params(33, 17, 5, torch.float32, seed=8, requires_grad=True)
    x = torch.randn(40, 33, requires_grad=True)
    ew = torch.rand(200, requires_grad=True)
    grad = torch.randn(40, 17)
    leaves = (x, weight, root, bias, ew)
    got = torch.autograd.grad(ops.rgcn_conv(x, graph, weight, root, bias, ew), leaves, grad)
    ref = torch.autograd.grad(ops.rgcn_conv_ref(x, edge_index, edge_type, weight, root, bias, ew), leaves, grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_opcheck(backend):
    _, _, graph = random_graph(12, 3, 40, seed=9)
    weight, root, bias = params(6, 5, 3, torch.float32, seed=10, requires_grad=True)
    x = torch.randn(12, 6, requires_grad=True)
    scale = graph.edge_scale(torch.rand(40, requires_grad=True), "mean", torch.float32)
    for r, b, s in ((root, bias, scale), (None, None, None)):
        args = (x, weight, r, b, graph.seg_ptr, graph.col, s, graph.t_seg_ptr, graph.t_col, graph.t_eid,
                graph.max_degree)
        torch.library.opcheck(torch.ops.imer_fast.rgcn_conv.default, args)
        grad = torch.randn(12, 5)
        backward_args = (grad, x.detach(), weight.detach(), None if r is None else r.detach(), graph.seg_ptr, graph.col,
                         None if s is None else s.detach(), graph.t_seg_ptr, graph.t_col, graph.t_eid,
                         graph.max_degree, [True, True, r is not None, s is not None])
        torch.library.opcheck(torch.ops.imer_fast.rgcn_conv_backward.default, backward_args)


@pytest.mark.parametrize("bases, blocks", [(None, None), (2, None), (None, 2)])
def test_rgcnconv_module_loads_pyg_state_and_matches(bases, blocks):
    torch.manual_seed(0)
    theirs = pyg.RGCNConv(16, 8, 3, num_bases=bases, num_blocks=blocks)
    ours = RGCNConv(16, 8, 3, num_bases=bases, num_blocks=blocks)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    edge_index, edge_type, graph = random_graph(30, 3, 120, seed=11)
    x = torch.randn(30, 16, requires_grad=True)
    expected = theirs(x, edge_index, edge_type)
    torch.testing.assert_close(ours(x, graph), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x, edge_index, edge_type), expected, rtol=1e-5, atol=1e-5)
    g_theirs = torch.autograd.grad(expected.square().sum(), [x, theirs.weight])
    g_ours = torch.autograd.grad(ours(x, graph).square().sum(), [x, ours.weight])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("aggr", ["add", "mean"])
def test_graphconv_module_loads_pyg_state_and_matches(backend, aggr):
    torch.manual_seed(1)
    theirs = pyg.GraphConv(12, 7, aggr=aggr)
    ours = GraphConv(12, 7, aggr=aggr)
    ours.load_state_dict(theirs.state_dict())
    edge_index, edge_type, graph = random_graph(25, 3, 100, seed=12)
    x = torch.randn(25, 12)
    ew = torch.rand(100)
    torch.testing.assert_close(ours(x, graph), theirs(x, edge_index), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x, graph, ew), theirs(x, edge_index, ew), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(num_nodes=st.integers(0, 20), num_relations=st.integers(1, 5), num_edges=st.integers(0, 60),
       fin=st.integers(1, 24), fout=st.integers(1, 24), aggr=st.sampled_from(["mean", "add"]), seed=st.integers(0, 999))
def test_fuzz_shapes(num_nodes, num_relations, num_edges, fin, fout, aggr, seed):
    if num_nodes == 0:
        num_edges = 0
    edge_index, edge_type, graph = random_graph(num_nodes, num_relations, num_edges, seed)
    weight, root, bias = params(fin, fout, num_relations, torch.float64, seed)
    x = torch.randn(num_nodes, fin, dtype=torch.float64)
    got = ops.rgcn_conv(x, graph, weight, root, bias, aggr=aggr)
    torch.testing.assert_close(got, ops.rgcn_conv_ref(x, edge_index, edge_type, weight, root, bias, aggr=aggr))


def test_zero_size_and_empty_relations(backend):
    _, _, graph = random_graph(0, 2, 0, seed=0)
    weight, root, bias = params(4, 3, 2, torch.float32, seed=0, requires_grad=True)
    x = torch.zeros(0, 4, requires_grad=True)
    out = ops.rgcn_conv(x, graph, weight, root, bias)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    # relation 1 has no edges at all: only relation 0 and the root contribute
    edge_index = torch.tensor([[0, 1], [1, 2]])
    g = ops.RelationalGraph.from_edges(edge_index, torch.tensor([0, 0]), 3, 2)
    x = torch.randn(3, 4)
    torch.testing.assert_close(ops.rgcn_conv(x, g, weight, root, bias),
                               ops.rgcn_conv_ref(x, edge_index, torch.tensor([0, 0]), weight, root, bias))


def test_non_contiguous_inputs(backend):
    edge_index, edge_type, graph = random_graph(15, 2, 50, seed=13)
    x = torch.randn(8, 15).t()  # [15, 8], non-contiguous
    weight = torch.randn(2, 6, 8).transpose(1, 2)  # [2, 8, 6], non-contiguous
    root = torch.randn(6, 8).t()
    assert not (x.is_contiguous() or weight.is_contiguous() or root.is_contiguous())
    torch.testing.assert_close(ops.rgcn_conv(x, graph, weight, root),
                               ops.rgcn_conv_ref(x, edge_index, edge_type, weight, root), rtol=1e-5, atol=1e-5)


def test_bitwise_repeatable_forward_and_backward(backend):
    _, _, graph = random_graph(50, 4, 400, seed=14)
    weight, root, bias = params(20, 10, 4, torch.float32, seed=15, requires_grad=True)
    x = torch.randn(50, 20, requires_grad=True)
    results = []
    for _ in range(2):
        out = ops.rgcn_conv(x, graph, weight, root, bias)
        results.append((out,) + torch.autograd.grad(out.sum(), [x, weight]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_nan_propagates_without_crash():
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    graph = ops.RelationalGraph.from_edges(edge_index, None, 3, 1)
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    out = ops.rgcn_conv(x, graph, torch.randn(1, 4, 2), torch.randn(4, 2))
    assert torch.isnan(out[0]).all() and torch.isnan(out[1]).all() and not torch.isnan(out[2]).any()


def test_half_precision_on_cpu_upcasts():
    edge_index, edge_type, graph = random_graph(10, 2, 30, seed=16)
    weight, root, bias = params(8, 4, 2, torch.float32, seed=17)
    x = torch.randn(10, 8)
    ref = ops.rgcn_conv_ref(x, edge_index, edge_type, weight, root, bias)
    got = ops.rgcn_conv(x.bfloat16(), graph, weight.bfloat16(), root.bfloat16(), bias.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=5e-2, atol=5e-2)


def test_torch_compile_cpu():
    edge_index, edge_type, graph = random_graph(16, 2, 60, seed=18)
    weight, root, bias = params(8, 4, 2, torch.float32, seed=19)
    x = torch.randn(16, 8)
    fn = torch.compile(lambda x: torch.relu(ops.rgcn_conv(x, graph, weight, root, bias)), fullgraph=True)
    torch.testing.assert_close(fn(x), torch.relu(ops.rgcn_conv_ref(x, edge_index, edge_type, weight, root, bias)))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=torch.randn(5, 6)), ValueError, "x has 5 rows but the graph has num_nodes = 10"),
        (dict(x=torch.randn(10)), ValueError, "x must be a floating tensor of shape \\[num_nodes, in_channels\\]"),
        (dict(weight=torch.randn(3, 6, 4)), ValueError, "weight must have shape \\[num_relations = 2"),
        (dict(root=torch.randn(6, 4, dtype=torch.float64)), TypeError, "root has dtype torch.float64"),
        (dict(edge_weight=torch.rand(7)), ValueError, "edge_weight must have shape \\[E = 30\\]"),
        (dict(aggr="max"), ValueError, "aggr must be one of"),
        (dict(bias=torch.zeros(4, device="meta")), ValueError, "bias is on meta"),
        (dict(root=torch.randn(4, 6)), ValueError, "root must have shape \\[in_channels, out_channels\\] = \\[6, 4\\]"),
        (dict(bias=torch.zeros(1)), ValueError, "bias must have shape \\[out_channels = 4\\]; got \\(1,\\)"),
        (dict(weight=None), ValueError, "rgcn_conv: weight is required; got None"),
        (dict(root=[[0.0]]), TypeError, "rgcn_conv: root must be a tensor; got list"),
    ],
)
def test_bad_input_is_named(change, error, match):
    _, _, graph = random_graph(10, 2, 30, seed=20)
    args = dict(x=torch.randn(10, 6), graph=graph, weight=torch.randn(2, 6, 4), root=torch.randn(6, 4),
                bias=torch.zeros(4), edge_weight=None, aggr="mean")
    args.update(change)
    with pytest.raises(error, match=match):
        ops.rgcn_conv(**args)


@pytest.mark.parametrize("change, error, match", [
    (dict(lin_rel_bias=torch.zeros(1)), ValueError, "graph_conv: lin_rel_bias must have shape \\[out_channels = 4\\]"),
    (dict(lin_rel_weight=torch.randn(6)), ValueError, "graph_conv: lin_rel_weight and lin_root_weight must both"),
    (dict(lin_root_weight=None), ValueError, "graph_conv: lin_root_weight is required"),
])
def test_graph_conv_bad_input_is_named(change, error, match):
    _, _, graph = random_graph(10, 2, 30, seed=20)
    args = dict(x=torch.randn(10, 6), graph=graph, lin_rel_weight=torch.randn(4, 6), lin_rel_bias=torch.zeros(4),
                lin_root_weight=torch.randn(4, 6))
    args.update(change)
    with pytest.raises(error, match=match):
        ops.graph_conv(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(edge_index=[[0, 1], [1, 0]]), "edge_index must be a torch.long tensor; got list"),
    (dict(edge_type=[0, 1]), "edge_type must be a torch.long tensor; got list"),
    (dict(num_nodes=3.0), "num_nodes must be an int or None; got 3.0"),
])
def test_relational_graph_from_edges_names_bad_arguments(kwargs, match):
    args = dict(edge_index=torch.tensor([[0, 1], [1, 0]]), edge_type=torch.tensor([0, 1]), num_nodes=3,
                num_relations=2)
    args.update(kwargs)
    with pytest.raises(TypeError, match=f"RelationalGraph.from_edges: {match}"):
        ops.RelationalGraph.from_edges(**args)


def test_cpp_op_checks_shapes_directly():
    _, _, graph = random_graph(10, 2, 30, seed=21)
    with pytest.raises(RuntimeError, match="imer_fast::rgcn_conv: weight must have shape"):
        torch.ops.imer_fast.rgcn_conv(torch.randn(10, 6), torch.randn(2, 5, 4), None, None, graph.seg_ptr, graph.col,
                                      None, graph.t_seg_ptr, graph.t_col, graph.t_eid, graph.max_degree)


def test_backend_selection_is_explained():
    import imer_fast.backends as backends

    choice = backends.explain("rgcn_conv", torch.randn(2, 2))
    assert choice.backend == "cpp" and "triton" in choice.passed_over
    with backends.force("reference"):
        assert backends.explain("rgcn_conv", torch.randn(2, 2)).backend == "reference"
    with pytest.raises(RuntimeError, match="forced backend 'triton' cannot run"):
        with backends.force("triton"):
            backends.explain("rgcn_conv", torch.randn(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        with backends.force("cuda"):
            pass


@pytest.mark.parametrize("fin, fout", [(24, 7), (7, 24), (12, 12)])  # transform-first, aggregate-first, tie
@pytest.mark.parametrize("balanced", [True, False])  # one batched GEMM over padded relations vs one per relation
def test_cpu_layouts_match_reference_with_gradients(fin, fout, balanced):
    gen = torch.Generator().manual_seed(fin * 100 + fout)
    num_nodes, num_relations = 40, 4
    edge_index = torch.randint(0, num_nodes, (2, 300), generator=gen)
    if balanced:
        edge_type = torch.randint(0, num_relations, (300,), generator=gen)
    else:  # relation 0 everywhere, the others on two nodes only
        edge_type = torch.zeros(300, dtype=torch.long)
        edge_type[:6] = torch.tensor([1, 2, 3, 1, 2, 3])
        edge_index[1, :6] = torch.tensor([0, 0, 0, 1, 1, 1])
    graph = ops.RelationalGraph.from_edges(edge_index, edge_type, num_nodes, num_relations)
    weight, root, bias = params(fin, fout, num_relations, torch.float64, seed=fin, requires_grad=True)
    x = torch.randn(num_nodes, fin, dtype=torch.float64, requires_grad=True)
    ew = torch.rand(300, dtype=torch.float64, requires_grad=True)
    leaves = (x, weight, root, bias, ew)
    got = ops.rgcn_conv(x, graph, weight, root, bias, ew)
    ref = ops.rgcn_conv_ref(x, edge_index, edge_type, weight, root, bias, ew)
    torch.testing.assert_close(got, ref)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b)


# ---- regressions found in review ----------------------------------------------------------------


@pytest.mark.parametrize("num_nodes", [0, 1])
def test_bias_is_never_written_or_aliased(backend, num_nodes):
    conv = RGCNConv(4, 3, num_relations=2, root_weight=False)
    bias_before = conv.bias.detach().clone()
    edge_index = torch.zeros(2, num_nodes, dtype=torch.long)
    graph = ops.RelationalGraph.from_edges(edge_index, torch.ones(num_nodes, dtype=torch.long), num_nodes, 2)
    x = torch.randn(num_nodes, 4)
    outs = [conv(x, graph) for _ in range(3)]
    assert torch.equal(conv.bias.detach(), bias_before)
    for out in outs:
        torch.testing.assert_close(out, outs[0])
        assert out.data_ptr() != conv.bias.data_ptr() or out.numel() == 0


def test_forcing_the_triton_backend_covers_graph_building():
    """relational_csr (the graph builders' sort) had no "triton" backend, so forcing the GPU backend
    failed every RGCNConv(x, edge_index, edge_type) call even though the convolution could run it."""
    import imer_fast.backends as backends

    conv = RGCNConv(4, 5, num_relations=2)
    x = torch.randn(3, 4)
    edge_index, edge_type = torch.tensor([[0, 1, 2], [1, 2, 0]]), torch.tensor([0, 1, 0])
    expected = conv(x, edge_index, edge_type)
    with ops.triton_on_cpu(), backends.force("triton"):
        assert backends.explain("relational_csr", edge_index).backend == "triton"
        torch.testing.assert_close(conv(x, edge_index, edge_type), expected)


def test_inference_mode_then_normal_calls():
    conv = RGCNConv(8, 16, num_relations=2)
    _, _, graph = random_graph(10, 2, 30, seed=30)
    x = torch.randn(10, 8, requires_grad=True)
    with torch.inference_mode():
        expected = conv(x.detach(), graph)
    out = conv(x, graph)  # the C++ scratch buffers must not be inference tensors here
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None


def test_double_backward_is_a_clear_error(backend):
    _, _, graph = random_graph(6, 2, 15, seed=31)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(ops.rgcn_conv(x, graph, weight).square().sum(), x, create_graph=True)
    if backend == "reference":
        torch.autograd.grad(gx.square().sum(), weight)  # the pure-torch twin supports it
        return
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad(gx.square().sum(), weight)


def test_torch_compile_fullgraph_rgcn_then_graphconv_on_a_fresh_graph():
    torch.manual_seed(0)
    rgcn, gconv = RGCNConv(8, 16, 4), GraphConv(16, 16)
    d = ops.build_dialogue_graph([3, 5, 2], torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0]), 2, 1, "speaker", 2)
    fn = torch.compile(lambda x, g: gconv(torch.relu(rgcn(x, g)), g), fullgraph=True)
    x = torch.randn(10, 8)
    with torch.no_grad():
        expected = gconv(torch.relu(rgcn(x, d.graph)), d.graph)
    fresh = ops.build_dialogue_graph([3, 5, 2], torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0]), 2, 1, "speaker", 2)
    torch.testing.assert_close(fn(x, fresh.graph), expected)


@pytest.mark.parametrize("field, index, value, match", [
    ("col", 0, 10**9, "col must lie in \\[0, num_nodes"),
    ("t_col", 0, -1, "t_col must lie in \\[0, num_nodes"),
    ("t_eid", 0, 10**9, "t_eid must lie in \\[0, E"),
    ("seg_ptr", -1, 10**6, "seg_ptr must start at 0 and end at E"),
    ("t_seg_ptr", 1, 10**6, "t_seg_ptr must not decrease|t_seg_ptr must start at 0"),
])
def test_malformed_csr_is_rejected_not_read_out_of_bounds(field, index, value, match):
    _, _, graph = random_graph(6, 2, 20, seed=32)
    tensors = {name: getattr(graph, name).clone() for name in ("seg_ptr", "col", "t_seg_ptr", "t_col", "t_eid")}
    tensors[field][index] = value
    x, weight = torch.randn(6, 4), torch.randn(2, 4, 3)
    args = (x, weight, None, None, tensors["seg_ptr"], tensors["col"], None, tensors["t_seg_ptr"], tensors["t_col"],
            tensors["t_eid"], graph.max_degree)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.imer_fast.rgcn_conv(*args)


def test_inconsistent_forward_and_transposed_csr_is_rejected():
    _, _, graph = random_graph(6, 2, 20, seed=33)
    _, _, other = random_graph(6, 2, 20, seed=34)  # a valid CSR of another graph as the "transpose"
    x, weight = torch.randn(6, 4), torch.randn(2, 4, 3)  # Fout < Fin: the forward gathers through the transpose
    with pytest.raises(RuntimeError, match="CSRs disagree"):
        torch.ops.imer_fast.rgcn_conv(x, weight, None, None, graph.seg_ptr, graph.col, None, other.t_seg_ptr,
                                      other.t_col, other.t_eid, graph.max_degree)


def test_rgcnconv_requires_edge_type_with_an_edge_index_tensor():
    with pytest.raises(ValueError, match="edge_type \\[E\\] is required"):
        RGCNConv(4, 3, 2)(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]))


@pytest.mark.gpu
@pytest.mark.parametrize("aggr", ["mean", "add"])
def test_rgcn_on_gpu_matches_reference(aggr):
    """The Triton kernels on CUDA at GCNet's sizes (1,535 utterances, 8 relations, 200 -> 100): forward and
    every gradient against the reference, both on the GPU (this file's other tests run on the CPU)."""
    edge_index, edge_type, _ = random_graph(1535, 8, 28715, seed=40)
    edge_index, edge_type = edge_index.cuda(), edge_type.cuda()
    graph = ops.RelationalGraph.from_edges(edge_index, edge_type, 1535, 8)
    weight, root, bias = (t.cuda().requires_grad_() for t in params(200, 100, 8, torch.float32, seed=41))
    x = torch.randn(1535, 200, generator=torch.Generator().manual_seed(42)).cuda().requires_grad_()
    ew = torch.rand(28715, generator=torch.Generator().manual_seed(43)).cuda().requires_grad_()
    leaves = (x, weight, root, bias, ew)
    got = ops.rgcn_conv(x, graph, weight, root, bias, ew, aggr)
    ref = ops.rgcn_conv_ref(x, edge_index, edge_type, weight, root, bias, ew, aggr)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(got)
    for g, r in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)
