"""build_dialogue_graph and relational_csr against brute force, GCNet's per-edge builder and opcheck."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import imer_fast.ops as ops
from imer_fast.testing.reference_gcnet import python_graph_builder


def brute_force_graph(lengths, speakers, wp, wf, relations, num_speakers):
    """Edges (src, tgt, type) by checking every pair of utterances of each dialogue."""
    edges, offset = [], 0
    for b, n in enumerate(lengths):
        for i in range(n):  # targets in order
            for j in range(n):  # sources ascending
                if (wp == -1 or i >= j - wp) and (wf == -1 or i <= j + wf):
                    sj, si = speakers[offset + j], speakers[offset + i]
                    rel = {
                        "temporal": 0 if j < i else (1 if j == i else 2),
                        "speaker": si * num_speakers + sj,
                        "dialoguegcn": (sj * num_speakers + si) * 2 + (0 if j < i else 1),
                        "none": 0,
                    }[relations]
                    edges.append((offset + j, offset + i, rel))
        offset += n
    return edges


def as_triples(g):
    return list(zip(g.edge_index[0].tolist(), g.edge_index[1].tolist(), g.edge_type.tolist()))


@pytest.mark.parametrize("relations", ops.RELATION_KINDS)
@pytest.mark.parametrize("windows", [(0, 0), (2, 2), (6, 6), (-1, -1), (3, -1), (-1, 1), (1, 4)])
def test_matches_brute_force(backend, relations, windows):
    gen = torch.Generator().manual_seed(len(relations) * 31 + windows[0] * 7 + windows[1])
    lengths = [5, 1, 0, 8, 3]
    speakers = torch.randint(0, 2, (sum(lengths),), generator=gen)
    g = ops.build_dialogue_graph(lengths, speakers, *windows, relations=relations, num_speakers=2)
    assert as_triples(g) == brute_force_graph(lengths, speakers.tolist(), *windows, relations, 2)
    degree = torch.bincount(g.edge_index[1], minlength=sum(lengths))
    assert torch.equal(g.rowptr, torch.cat([torch.zeros(1, dtype=torch.long), degree.cumsum(0)]))
    assert g.num_relations == ops.num_relations_of(relations, 2)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=0, max_size=6),
    wp=st.integers(-1, 5), wf=st.integers(-1, 5),
    relations=st.sampled_from(ops.RELATION_KINDS), num_speakers=st.integers(1, 3), seed=st.integers(0, 2**16),
)
def test_fuzz_cpp_and_reference_agree_with_brute_force(lengths, wp, wf, relations, num_speakers, seed):
    gen = torch.Generator().manual_seed(seed)
    speakers = torch.randint(0, num_speakers, (sum(lengths),), generator=gen)
    expected = brute_force_graph(lengths, speakers.tolist(), wp, wf, relations, num_speakers)
    g = ops.build_dialogue_graph(lengths, speakers, wp, wf, relations, num_speakers)
    assert as_triples(g) == expected
    ref = ops.build_dialogue_graph_ref(torch.tensor(lengths, dtype=torch.long), speakers, wp, wf, relations,
                                       num_speakers)
    assert torch.equal(ref[0], g.edge_index) and torch.equal(ref[1], g.edge_type) and torch.equal(ref[2], g.rowptr)


@pytest.mark.parametrize("kind", ["temporal", "speaker", "dialoguegcn"])
def test_same_edges_as_gcnet_style_builder_with_its_relation_ids(kind):
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 4, 10]
    padded = torch.randint(0, 2, (3, 10), generator=gen)
    edge_index, edge_type, ids = python_graph_builder(padded.tolist(), lengths, 2, 3, kind)
    g = ops.build_dialogue_graph(lengths, padded, 2, 3, kind, 2,
                                 relation_map=ops.relation_map_from_names(ids, kind, 2))
    theirs = sorted(zip(edge_index[0].tolist(), edge_index[1].tolist(), edge_type.tolist()))
    assert sorted(as_triples(g)) == theirs


def test_padded_and_packed_speakers_agree():
    lengths = torch.tensor([3, 2])
    padded = torch.tensor([[0, 1, 1, 9], [1, 0, 9, 9]])  # 9 = padding, must be ignored
    a = ops.build_dialogue_graph(lengths, padded, 1, 1, "speaker", 2)
    b = ops.build_dialogue_graph(lengths, torch.tensor([0, 1, 1, 1, 0]), 1, 1, "speaker", 2)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_type, b.edge_type)


def test_empty_batch_and_empty_dialogues():
    g = ops.build_dialogue_graph([], torch.zeros(0, dtype=torch.long), 2, 2, "temporal", 1)
    assert g.edge_index.shape == (2, 0) and g.rowptr.tolist() == [0] and g.graph.num_nodes == 0
    g = ops.build_dialogue_graph([0, 0], None, 2, 2, "speaker", 1)
    assert g.edge_index.shape == (2, 0)


def test_bitwise_repeatable():
    speakers = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(0))
    runs = [ops.build_dialogue_graph([50, 70, 80], speakers, 10, 10, "dialoguegcn", 2) for _ in range(2)]
    assert torch.equal(runs[0].edge_index, runs[1].edge_index) and torch.equal(runs[0].edge_type, runs[1].edge_type)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lengths=[2.0, 3.0]), TypeError, "lengths must hold integers"),
        (dict(lengths=torch.tensor([2.5])), TypeError, "lengths must hold integers"),
        (dict(lengths=[[2, 3]]), TypeError, "lengths must hold integers"),
        (dict(lengths=torch.tensor([[2, 3]])), ValueError, "lengths must be 1-D"),
        (dict(lengths=[2, -1]), ValueError, "lengths must be >= 0"),
        (dict(speakers=torch.tensor([0, 1, 0])), ValueError, "sum\\(lengths\\) = 5"),
        (dict(speakers=torch.tensor([0.0, 1, 0, 1, 0])), TypeError, "speakers must hold integer"),
        (dict(speakers=torch.tensor([0, 1, 0, 2, 0]), num_speakers=2), ValueError, "num_speakers = 2"),
        (dict(window_past=-2), ValueError, "window_past must be an int >= -1"),
        (dict(window_future=1.5), ValueError, "window_future must be an int >= -1"),
        (dict(relations="spk"), ValueError, "build_dialogue_graph: relations must be one of"),
        (dict(speakers=torch.zeros(2, 2, dtype=torch.long)), ValueError, "padded speakers must have shape"),
        (dict(relation_map=[0, 0, 1]), ValueError, "permutation"),
        (dict(speakers=torch.zeros(5, dtype=torch.long, device="meta")), ValueError, "is on meta"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = dict(lengths=torch.tensor([2, 3]), speakers=torch.tensor([0, 1, 0, 1, 0]), window_past=1,
                window_future=1, relations="temporal", num_speakers=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.build_dialogue_graph(**args)


def test_cpp_op_checks_directly():
    with pytest.raises(RuntimeError, match="imer_fast::build_dialogue_graph: speaker ids"):
        torch.ops.imer_fast.build_dialogue_graph(torch.tensor([2]), torch.tensor([0, 3]), 1, 1, "speaker", 2)
    with pytest.raises(RuntimeError, match="imer_fast::relational_csr: edge_type must lie"):
        torch.ops.imer_fast.relational_csr(torch.tensor([[0], [1]]), torch.tensor([5]), 2, 3)


def test_opcheck_build_dialogue_graph():
    args = (torch.tensor([4, 2, 5]), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1]), 2, 1, "speaker", 2)
    torch.library.opcheck(torch.ops.imer_fast.build_dialogue_graph.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def random_typed_edges(num_nodes, num_relations, num_edges, seed):
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, max(num_nodes, 1), (2, num_edges), generator=gen)
    return edge_index, torch.randint(0, num_relations, (num_edges,), generator=gen)


@pytest.mark.parametrize("num_nodes, num_relations, num_edges", [(10, 3, 40), (1, 1, 3), (5, 4, 0), (0, 2, 0)])
def test_relational_csr_matches_reference_and_inverts(num_nodes, num_relations, num_edges):
    edge_index, edge_type = random_typed_edges(num_nodes, num_relations, num_edges, num_edges)
    got = torch.ops.imer_fast.relational_csr(edge_index, edge_type, num_nodes, num_relations)
    ref = ops.relational_csr_ref(edge_index, edge_type, num_nodes, num_relations)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    seg_ptr, col, perm, t_seg_ptr, t_col, t_eid = got
    assert torch.equal(col, edge_index[0, perm])
    key = edge_index[1, perm] * num_relations + edge_type[perm]
    assert torch.equal(key, torch.sort(key).values)  # sorted by (target, relation)
    assert torch.equal(t_col, edge_index[1, perm[t_eid]])
    assert torch.equal(torch.sort(t_eid).values, torch.arange(num_edges))
    torch.library.opcheck(torch.ops.imer_fast.relational_csr.default, (edge_index, edge_type, num_nodes, num_relations))


def test_relational_graph_validation():
    with pytest.raises(ValueError, match="edge_index entries must lie in \\[0, num_nodes = 3\\)"):
        ops.RelationalGraph.from_edges(torch.tensor([[0, 5], [1, 1]]), None, 3, 1)
    with pytest.raises(ValueError, match="edge_type must lie in \\[0, num_relations = 2\\)"):
        ops.RelationalGraph.from_edges(torch.tensor([[0, 1], [1, 1]]), torch.tensor([0, 2]), 3, 2)
    with pytest.raises(TypeError, match="edge_index must be int64"):
        ops.RelationalGraph.from_edges(torch.tensor([[0.0], [1.0]]), None, 3, 1)
    with pytest.raises(ValueError, match="shape \\[2, E\\]"):
        ops.RelationalGraph.from_edges(torch.tensor([0, 1, 2]), None, 3, 1)


@pytest.mark.parametrize("huge", [50, 2**62, 2**63 - 1])
def test_windows_beyond_the_longest_dialogue_are_unbounded(backend, huge):
    speakers = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    for windows, unbounded in (((huge, 1), (-1, 1)), ((1, huge), (1, -1)), ((huge, huge), (-1, -1))):
        got = ops.build_dialogue_graph([4, 3], speakers, *windows, relations="dialoguegcn", num_speakers=2)
        want = ops.build_dialogue_graph([4, 3], speakers, *unbounded, relations="dialoguegcn", num_speakers=2)
        assert as_triples(got) == as_triples(want)
    direct = torch.ops.imer_fast.build_dialogue_graph(torch.tensor([4, 3]), speakers, huge, huge, "temporal", 2)
    assert direct[0].shape[1] == 16 + 9
