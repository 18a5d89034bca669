"""Triton kernels of imer_fast (``kernels/``, installed as ``imer_fast._kernels``) against independent
pure-torch references written from the math.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set below before
torch / triton are imported) on CPU tensors. On a GPU machine run
``TRITON_INTERPRET=0 pytest tests/test_triton_kernels.py``: every test then runs compiled on CUDA,
and the ``gpu``-marked fp16/bf16 tests (the interpreter's half-precision arithmetic is not
trustworthy) run too.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("compiled Triton needs a CUDA device (or set TRITON_INTERPRET=1)", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

from imer_fast._kernels.dialogue_graph import build_dialogue_graph  # noqa: E402
from imer_fast._kernels.rgcn import rgcn_conv_backward, rgcn_conv_forward  # noqa: E402

try:
    import imer_fast._C  # noqa: E402,F401

    HAVE_CPP = hasattr(torch.ops.imer_fast, "relational_csr")
except ImportError:  # extension not built: the tests build their own CSR
    HAVE_CPP = False

gpu_only = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                              reason="needs a CUDA device and TRITON_INTERPRET=0")


# ---------------------------------------------------------------------------------------------
# Graph helpers and references
# ---------------------------------------------------------------------------------------------


def _csr_torch(edge_index, edge_type, num_nodes, num_relations):
    """Relational CSR from stable sorts (independent of the C++ op)."""
    src, tgt = edge_index[0], edge_index[1]
    num_keys = num_nodes * num_relations
    key = tgt * num_relations + edge_type
    perm = torch.sort(key, stable=True).indices
    t_key = (src * num_relations + edge_type)[perm]
    t_eid = torch.sort(t_key, stable=True).indices

    def ptr(keys):
        counts = torch.bincount(keys, minlength=num_keys) if keys.numel() else keys.new_zeros(num_keys)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    return ptr(key), src[perm], perm, ptr(t_key), tgt[perm][t_eid], t_eid


def make_csr(edge_index, edge_type, num_nodes, num_relations):
    """(seg_ptr, col, perm, t_seg_ptr, t_col, t_eid, max_degree)."""
    if HAVE_CPP and num_relations >= 1:
        csr = torch.ops.imer_fast.relational_csr(edge_index.cpu(), edge_type.cpu(), num_nodes, num_relations)
        csr = tuple(t.to(edge_index.device) for t in csr)
    else:
        csr = _csr_torch(edge_index, edge_type, num_nodes, num_relations)
    degree = torch.cat([csr[0].diff(), csr[3].diff()])
    max_degree = int(degree.max()) if degree.numel() else 0
    return (*csr, max_degree)


def random_graph(num_nodes, num_relations, num_edges, gen):
    if num_nodes == 0 or num_relations == 0:
        num_edges = 0
    edge_index = torch.randint(0, max(num_nodes, 1), (2, num_edges), generator=gen)
    edge_type = torch.randint(0, max(num_relations, 1), (num_edges,), generator=gen)
    return edge_index.to(DEVICE), edge_type.to(DEVICE)


def rgcn_reference(x, weight, root, bias, edge_index, edge_type, edge_scale):
    """out[i] = x[i] @ root + bias + sum over edges (j -> i, r) of scale * x[j] @ weight[r], per relation
    with index_add on the original (unsorted) edge list."""
    num_nodes, fout = x.shape[0], weight.shape[2]
    out = x @ root if root is not None else x.new_zeros(num_nodes, fout)
    for r in range(weight.shape[0]):
        sel = edge_type == r
        src, tgt = edge_index[0, sel], edge_index[1, sel]
        msg = x[src]
        if edge_scale is not None:
            msg = msg * edge_scale[sel, None]
        agg = x.new_zeros(num_nodes, x.shape[1]).index_add(0, tgt, msg)
        out = out + agg @ weight[r]
    if bias is not None:
        out = out + bias
    return out


def tolerances(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10),
            torch.float16: dict(rtol=2e-2, atol=5e-2), torch.bfloat16: dict(rtol=5e-2, atol=2e-1)}[dtype]


class Problem:
    def __init__(self, num_nodes, num_relations, fin, fout, num_edges, dtype, has_root=True, has_bias=True,
                 has_scale=True, seed=0, noncontig=False):
        gen = torch.Generator().manual_seed(seed)
        self.edge_index, self.edge_type = random_graph(num_nodes, num_relations, num_edges, gen)
        self.num_edges = self.edge_index.shape[1]
        (self.seg_ptr, self.col, self.perm, self.t_seg_ptr, self.t_col, self.t_eid,
         self.max_degree) = make_csr(self.edge_index, self.edge_type, num_nodes, num_relations)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)

        if noncontig:
            # x: every other column of a wider matrix; weight / root: transposed views of [.., Fout, Fin].
            self.x = rand(num_nodes, 2 * fin)[:, ::2]
            self.weight = rand(num_relations, fout, fin).transpose(1, 2)
            self.root = rand(fout, fin).t() if has_root else None
        else:
            self.x = rand(num_nodes, fin)
            self.weight = rand(num_relations, fin, fout)
            self.root = rand(fin, fout) if has_root else None
        self.bias = rand(fout) if has_bias else None
        self.edge_scale = (torch.rand(self.num_edges, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE, dtype) \
            if has_scale else None
        # the kernels take the scale in forward-sorted order
        self.scale = self.edge_scale[self.perm] if has_scale else None
        self.grad_out = rand(num_nodes, fout)

    def forward(self, **kw):
        return rgcn_conv_forward(self.x, self.weight, self.root, self.bias, self.seg_ptr, self.col, self.scale,
                                 kw.get("max_degree", self.max_degree))

    def backward(self, mask=(True, True, True, True), grad_out=None):
        return rgcn_conv_backward(self.grad_out if grad_out is None else grad_out, self.x, self.weight, self.root,
                                  self.seg_ptr, self.col, self.scale, self.t_seg_ptr, self.t_col, self.t_eid,
                                  self.max_degree, list(mask))

    def reference(self, grad_out=None):
        """float64 forward output and (grad_x, grad_weight, grad_root, grad_scale) by autograd."""
        leaf = lambda t: None if t is None else t.detach().double().requires_grad_(True)  # noqa: E731
        x, weight, root, bias, scale = (leaf(t) for t in (self.x, self.weight, self.root, self.bias, self.edge_scale))
        out = rgcn_reference(x, weight, root, bias, self.edge_index, self.edge_type, scale)
        g = (self.grad_out if grad_out is None else grad_out).double()
        inputs = [t for t in (x, weight, root, scale) if t is not None]
        grads = torch.autograd.grad(out, inputs, g, allow_unused=True) if out.numel() else [torch.zeros_like(t)
                                                                                              for t in inputs]
        grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, inputs)]
        it = iter(grads)
        gx, gw = next(it), next(it)
        groot = next(it) if root is not None else None
        gscale = next(it)[self.perm] if scale is not None else None  # sorted order, like the kernel
        return out.detach(), (gx, gw, groot, gscale)


def assert_close(actual, expected, dtype):
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected.double(), **tolerances(dtype))


def check_problem(p, dtype):
    out = p.forward()
    ref_out, ref_grads = p.reference()
    assert out.shape == ref_out.shape
    assert_close(out, ref_out, dtype)
    grads = p.backward()
    for got, want, name in zip(grads, ref_grads, ("grad_x", "grad_weight", "grad_root", "grad_scale")):
        if want is None:
            assert got.numel() == 0, name
        else:
            assert got.shape == want.shape, name
            assert_close(got, want, dtype)


# ---------------------------------------------------------------------------------------------
# rgcn_conv
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "num_nodes,num_relations,fin,fout,num_edges",
    [(24, 3, 5, 37, 80), (40, 1, 37, 5, 150), (17, 4, 20, 16, 60), (30, 2, 100, 33, 90)],
)
def test_rgcn_matches_reference(dtype, num_nodes, num_relations, fin, fout, num_edges):
    p = Problem(num_nodes, num_relations, fin, fout, num_edges, dtype, seed=num_nodes)
    check_problem(p, dtype)


@pytest.mark.parametrize("has_root,has_bias,has_scale", [(False, False, False), (True, False, False),
                                                          (False, True, True), (False, False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rgcn_optional_inputs(has_root, has_bias, has_scale, dtype):
    p = Problem(20, 3, 9, 18, 70, dtype, has_root=has_root, has_bias=has_bias, has_scale=has_scale, seed=3)
    check_problem(p, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rgcn_noncontiguous_and_transposed_views(dtype):
    p = Problem(26, 3, 13, 21, 90, dtype, noncontig=True, seed=5)
    assert not p.x.is_contiguous() and not p.weight.is_contiguous() and not p.root.is_contiguous()
    check_problem(p, dtype)
    # grad_out with stride 0 (e.g. coming from out.sum())
    g = torch.ones(1, 21, dtype=dtype, device=DEVICE).expand(26, 21)
    _, ref_grads = p.reference(grad_out=g)
    for got, want in zip(p.backward(grad_out=g), ref_grads):
        assert_close(got, want, dtype)


@pytest.mark.parametrize(
    "num_nodes,num_relations,num_edges,has_root",
    [(12, 0, 0, True), (12, 0, 0, False), (12, 3, 0, True), (0, 2, 0, True), (0, 0, 0, False), (9, 1, 1, False)],
)
def test_rgcn_degenerate_shapes(num_nodes, num_relations, num_edges, has_root):
    p = Problem(num_nodes, num_relations, 6, 10, num_edges, torch.float64, has_root=has_root, seed=7)
    check_problem(p, torch.float64)


def test_rgcn_output_mask():
    p = Problem(15, 2, 7, 9, 40, torch.float32, seed=11)
    _, ref_grads = p.reference()
    for mask in ([True, False, False, False], [False, True, False, True], [False, False, True, False],
                 [False, False, False, False]):
        grads = p.backward(mask)
        for m, got, want in zip(mask, grads, ref_grads):
            if m:
                assert_close(got, want, torch.float32)
            else:
                assert got.numel() == 0
    # no root / no scale: those gradients are empty even when requested
    q = Problem(15, 2, 7, 9, 40, torch.float32, has_root=False, has_scale=False, seed=11)
    gx, gw, groot, gscale = q.backward()
    assert gx.shape == (15, 7) and gw.shape == (2, 7, 9) and groot.numel() == 0 and gscale.numel() == 0


def test_rgcn_bitwise_repeatable_and_max_degree_independent():
    p = Problem(48, 3, 37, 40, 400, torch.float32, seed=13)
    out1, out2 = p.forward(), p.forward()
    assert torch.equal(out1, out2)
    assert torch.equal(out1, p.forward(max_degree=p.max_degree + 5))
    g1, g2 = p.backward(), p.backward()
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_rgcn_medium_split_weight_grad():
    # enough row blocks that grad_weight splits the node range into several deterministic partials
    p = Problem(320, 2, 24, 20, 900, torch.float32, seed=17)
    check_problem(p, torch.float32)
    gw = p.backward([False, True, False, False])[1]
    assert torch.equal(gw, p.backward([False, True, False, False])[1])


def test_rgcn_gradcheck_float64():
    p = Problem(7, 2, 3, 4, 14, torch.float64, seed=19)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, root, bias, scale):
            ctx.save_for_backward(x, weight, root, scale)
            return rgcn_conv_forward(x, weight, root, bias, p.seg_ptr, p.col, scale, p.max_degree)

        @staticmethod
        def backward(ctx, g):
            x, weight, root, scale = ctx.saved_tensors
            gx, gw, groot, gs = rgcn_conv_backward(g, x, weight, root, p.seg_ptr, p.col, scale, p.t_seg_ptr,
                                                   p.t_col, p.t_eid, p.max_degree, [True] * 4)
            return gx, gw, groot, g.sum(0), gs

    inputs = [t.detach().clone().requires_grad_(True) for t in (p.x, p.weight, p.root, p.bias, p.scale)]
    assert torch.autograd.gradcheck(Op.apply, inputs, eps=1e-6, atol=1e-7)


def test_rgcn_tf32_flag_runs():
    p = Problem(20, 2, 16, 16, 50, torch.float32, seed=23)
    ref, _ = p.reference()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out = p.forward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=5e-2)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rgcn_half_precision_gpu(dtype):
    p = Problem(300, 4, 100, 200, 2000, dtype, seed=29)
    check_problem(p, dtype)


@pytest.mark.gpu
@gpu_only
def test_rgcn_large_gpu():
    p = Problem(5000, 8, 200, 128, 60000, torch.float32, seed=31)
    check_problem(p, torch.float32)
    for a, b in zip(p.backward(), p.backward()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# build_dialogue_graph
# ---------------------------------------------------------------------------------------------


def dialogue_graph_reference(lengths, speakers, window_past, window_future, relations, num_speakers):
    """Brute force: every (target, source) pair of every dialogue, GCNet's rule i in [j - wp, j + wf]."""
    src, tgt, typ, degree = [], [], [], []
    offset = 0
    spk = speakers.tolist()
    for n in lengths.tolist():
        for i in range(n):
            d = 0
            for j in range(n):
                if window_past >= 0 and i < j - window_past:
                    continue
                if window_future >= 0 and i > j + window_future:
                    continue
                s_src, s_tgt = spk[offset + j], spk[offset + i]
                if relations == "temporal":
                    rel = 0 if j < i else (1 if j == i else 2)
                elif relations == "speaker":
                    rel = s_tgt * num_speakers + s_src
                elif relations == "dialoguegcn":
                    rel = (s_src * num_speakers + s_tgt) * 2 + (0 if j < i else 1)
                else:
                    rel = 0
                src.append(offset + j)
                tgt.append(offset + i)
                typ.append(rel)
                d += 1
            degree.append(d)
        offset += n
    rowptr = [0]
    for d in degree:
        rowptr.append(rowptr[-1] + d)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return torch.stack([as_long(src), as_long(tgt)]).view(2, -1), as_long(typ), as_long(rowptr)


@pytest.mark.parametrize("relations", ["temporal", "speaker", "dialoguegcn", "none"])
@pytest.mark.parametrize("windows", [(-1, -1), (0, 0), (2, 1), (1, 3), (-1, 2), (3, -1), (10, 10)])
def test_dialogue_graph_matches_bruteforce(relations, windows):
    gen = torch.Generator().manual_seed(hash((relations, windows)) % 1000)
    lengths = torch.tensor([5, 0, 1, 9, 3, 12])
    num_speakers = 3
    speakers = torch.randint(0, num_speakers, (int(lengths.sum()),), generator=gen)
    got = build_dialogue_graph(lengths.to(DEVICE), speakers.to(DEVICE), *windows, relations, num_speakers)
    want = dialogue_graph_reference(lengths, speakers, *windows, relations, num_speakers)
    for g, w in zip(got, want):
        assert g.dtype == torch.long and g.device.type == DEVICE.type
        assert torch.equal(g.cpu(), w)
    if HAVE_CPP:
        cpp = torch.ops.imer_fast.build_dialogue_graph(lengths, speakers, *windows, relations, num_speakers)
        for g, c in zip(got, cpp):
            assert torch.equal(g.cpu(), c)


@pytest.mark.parametrize("lengths", [[], [0, 0], [1], [70]])
def test_dialogue_graph_edge_cases(lengths):
    lengths = torch.tensor(lengths, dtype=torch.long)
    speakers = torch.arange(int(lengths.sum())) % 2
    got = build_dialogue_graph(lengths.to(DEVICE), speakers.to(DEVICE), 4, -1, "dialoguegcn", 2)
    want = dialogue_graph_reference(lengths, speakers, 4, -1, "dialoguegcn", 2)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


def test_dialogue_graph_rejects_bad_inputs():
    lengths = torch.tensor([2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="sum"):
        build_dialogue_graph(lengths, torch.zeros(4, dtype=torch.long, device=DEVICE), 1, 1, "temporal", 1)
    with pytest.raises(ValueError, match="speaker ids"):
        build_dialogue_graph(lengths, torch.full((5,), 2, dtype=torch.long, device=DEVICE), 1, 1, "speaker", 2)
    with pytest.raises(ValueError, match="relations"):
        build_dialogue_graph(lengths, torch.zeros(5, dtype=torch.long, device=DEVICE), 1, 1, "bogus", 1)
    with pytest.raises(ValueError, match=">= -1"):
        build_dialogue_graph(lengths, torch.zeros(5, dtype=torch.long, device=DEVICE), -2, 1, "temporal", 1)
    with pytest.raises(ValueError, match=">= 0"):
        build_dialogue_graph(torch.tensor([-1, 6], device=DEVICE), torch.zeros(5, dtype=torch.long, device=DEVICE),
                             1, 1, "temporal", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rgcn_on_dialogue_graph_with_window_max_degree(dtype):
    """The pipeline the models run: dialogue graph -> relational CSR -> rgcn with max_degree taken
    from the window (wp + wf + 1, never exceeded by any (node, relation) segment)."""
    gen = torch.Generator().manual_seed(37)
    lengths = torch.tensor([6, 11, 1, 8])
    num_speakers, wp, wf = 2, 3, 2
    speakers = torch.randint(0, num_speakers, (int(lengths.sum()),), generator=gen).to(DEVICE)
    edge_index, edge_type, _ = build_dialogue_graph(lengths.to(DEVICE), speakers, wp, wf, "dialoguegcn", num_speakers)
    num_nodes, num_relations = speakers.numel(), 2 * num_speakers ** 2
    seg_ptr, col, perm, t_seg_ptr, t_col, t_eid, max_degree = make_csr(edge_index, edge_type, num_nodes,
                                                                       num_relations)
    window = wp + wf + 1
    assert max_degree <= window
    x = torch.randn(num_nodes, 12, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    weight = torch.randn(num_relations, 12, 10, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    root = torch.randn(12, 10, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    # 'mean' aggregation: scale = 1 / segment size
    counts = seg_ptr.diff()
    scale = torch.repeat_interleave(counts, counts).to(dtype).reciprocal()
    out = rgcn_conv_forward(x, weight, root, None, seg_ptr, col, scale, window)
    edge_scale = torch.empty_like(scale)
    edge_scale[perm] = scale
    ref = rgcn_reference(x.double(), weight.double(), root.double(), None, edge_index, edge_type, edge_scale.double())
    assert_close(out, ref, dtype)
    g = torch.randn(num_nodes, 10, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    gx, gw, groot, gs = rgcn_conv_backward(g, x, weight, root, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid, window,
                                           [True] * 4)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, root, edge_scale)]
    ref = rgcn_reference(leaves[0], leaves[1], leaves[2], None, edge_index, edge_type, leaves[3])
    rx, rw, rroot, rs = torch.autograd.grad(ref, leaves, g.double())
    for got, want in zip((gx, gw, groot, gs), (rx, rw, rroot, rs[perm])):
        assert_close(got, want, dtype)
