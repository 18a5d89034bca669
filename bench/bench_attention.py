"""Masked cross-modal attention benchmarks (run: ``pytest bench/bench_attention.py --benchmark-only``).

Shapes come from the three systems:

- ``imder-L48-E32`` .. ``imder-L6-E256``: IMDer/RoHyDR score-network levels, B=32, 8 heads (head dims
  4, 8, 16, 32), queries = features, keys = the condition, MulT future mask;
- ``mult-L50-E32``: MulT cross-modal fusion, B=32, L=50, E=32 (head dim 4);
- ``dialogue-E64`` / ``dialogue-E200``: 32 conversations of IEMOCAP lengths (<= 110 utterances),
  key padding + missing-modality masks; imer_fast runs the packed varlen layout, the others padded;
- ``drkf``: DRKF's fusion encoder, B=4, L=2,800, E=1,024, 8 heads (head dim 128), no mask.

Providers for the attention core (``[B, H, L, D]`` in, same out, forward + backward): imer_fast's op,
the eager release computation (``bmm -> additive -inf mask -> float softmax -> bmm``, the release's
MultiheadAttention core), ``torch.compile`` of it, every SDPA backend that accepts the case, and
FlexAttention on CUDA. The MulT layer group times a whole ``CrossModalTransformer`` (one layer,
cross-modal) forward + backward against the eager release-semantics reference module and its
``torch.compile``. On CUDA each case also records peak memory beyond the inputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from imer_fast.ops.attention import attention
from imer_fast.nn.cross_modal_transformer import CrossModalTransformer
from imer_fast.testing.reference_mult import ReferenceTransformerEncoder

from conftest import iemocap_like_lengths, sync

HEADS = 8
CORE_CASES = {
    "imder-L48-E32": dict(batch=32, lq=48, lk=48, embed=32, mask="future"),
    "imder-L24-E64": dict(batch=32, lq=24, lk=24, embed=64, mask="future"),
    "imder-L12-E128": dict(batch=32, lq=12, lk=12, embed=128, mask="future"),
    "imder-L6-E256": dict(batch=32, lq=6, lk=6, embed=256, mask="future"),
    "mult-L50-E32": dict(batch=32, lq=50, lk=50, embed=32, mask="future"),
    "dialogue-E64": dict(batch=32, lq=None, lk=None, embed=64, mask="none"),
    "dialogue-E200": dict(batch=32, lq=None, lk=None, embed=200, mask="none"),
    "drkf": dict(batch=4, lq=2800, lk=2800, embed=1024, mask="none"),
}
# DRKF on a 2-core CPU takes seconds per call: a few rounds only.
SLOW_ON_CPU = {"drkf"}


class Case:
    """Inputs of one attention-core case, padded, plus the packed form for dialogues."""

    def __init__(self, name, device):
        spec = CORE_CASES[name]
        self.name, self.mask = name, spec["mask"]
        gen = torch.Generator().manual_seed(0)
        head_dim = spec["embed"] // HEADS
        batch = spec["batch"]
        if spec["lq"] is None:  # dialogues: IEMOCAP lengths, ~15% of utterances missing the key modality
            self.lengths = iemocap_like_lengths(batch)
            lq = lk = max(self.lengths)
            pad = torch.arange(lk)[None, :] < torch.tensor(self.lengths)[:, None]
            present = torch.rand(batch, lk, generator=gen) > 0.15
            self.key_mask = (pad & present).to(device)
        else:
            self.lengths = None
            lq, lk = spec["lq"], spec["lk"]
            self.key_mask = None
        make = lambda n: torch.randn(batch, HEADS, n, head_dim, generator=gen).to(device)  # noqa: E731
        self.q, self.k, self.v = make(lq), make(lk), make(lk)
        self.scale = head_dim ** -0.5
        self.device = device
        if self.lengths is not None:
            total = sum(self.lengths)
            cu = torch.tensor([0] + list(torch.tensor(self.lengths).cumsum(0)), dtype=torch.int32, device=device)
            self.cu, self.max_len, self.total = cu, lq, total
            self.packed = [torch.randn(total, HEADS, head_dim, generator=gen).to(device) for _ in range(3)]
            flat_valid = torch.cat([self.key_mask[b, :n] for b, n in enumerate(self.lengths)])
            self.packed_key_mask = flat_valid

    def bool_mask(self):
        """[B, 1, Lq, Lk] True = attend, for SDPA / the eager path."""
        lq, lk = self.q.shape[2], self.k.shape[2]
        i, j = torch.arange(lq, device=self.device)[:, None], torch.arange(lk, device=self.device)[None, :]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=self.device)
        if self.mask == "future":
            allowed = ~(j > i + abs(lk - lq))
        allowed = allowed[None, None]
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, None, :]
        return allowed.expand(self.q.shape[0], 1, lq, lk)


def eager_release_core(q, k, v, additive_mask, scale):
    """The release MultiheadAttention core: scaled bmm, additive mask, float softmax, bmm."""
    batch, heads, lq, dim = q.shape
    qf, kf, vf = (t.reshape(batch * heads, -1, dim) for t in (q * scale, k, v))
    weights = torch.bmm(qf, kf.transpose(1, 2))
    if additive_mask is not None:
        weights = weights + additive_mask
    weights = F.softmax(weights.float(), dim=-1).type_as(weights)
    return torch.bmm(weights, vf).view(batch, heads, lq, dim)


@pytest.fixture(scope="module", params=list(CORE_CASES))
def case(request, device):
    if device.type == "cpu" and request.param in SLOW_ON_CPU and request.config.getoption("--benchmark-disable"):
        pytest.skip("DRKF-size attention is a benchmark, not a check")
    return Case(request.param, device)


def _grad_inputs(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _run_fwd_bwd(fn, leaves, device):
    def run():
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        sync(device)
        return grads

    return run


def _bench(benchmark, case, run):
    run()  # warm-up (compiles, allocator)
    if case.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_extra_memory_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    if case.device.type == "cpu" and case.name in SLOW_ON_CPU:
        benchmark.pedantic(run, rounds=3, iterations=1)
    else:
        benchmark(run)


@pytest.mark.benchmark(group="attention core fwd+bwd")
def test_core_imer_fast(benchmark, case):
    if case.lengths is not None:
        leaves = _grad_inputs(*case.packed)
        fn = lambda q, k, v: attention(q, k, v, key_mask=case.packed_key_mask, cu_seqlens_q=case.cu,  # noqa: E731
                                       cu_seqlens_k=case.cu, max_seqlen_q=case.max_len, max_seqlen_k=case.max_len)
    else:
        leaves = _grad_inputs(case.q, case.k, case.v)
        fn = lambda q, k, v: attention(q, k, v, key_mask=case.key_mask, mask=case.mask)  # noqa: E731
    _bench(benchmark, case, _run_fwd_bwd(fn, leaves, case.device))


def _eager_fn(case):
    allowed = case.bool_mask()
    additive = torch.zeros(allowed.shape, device=case.device).masked_fill(~allowed, float("-inf"))
    additive = additive.expand(-1, HEADS, -1, -1).reshape(-1, *allowed.shape[2:])
    if case.mask == "none" and case.key_mask is None:
        additive = None
    return lambda q, k, v: eager_release_core(q, k, v, additive, case.scale)


@pytest.mark.benchmark(group="attention core fwd+bwd")
def test_core_eager_release(benchmark, case):
    leaves = _grad_inputs(case.q, case.k, case.v)
    _bench(benchmark, case, _run_fwd_bwd(_eager_fn(case), leaves, case.device))


@pytest.mark.benchmark(group="attention core fwd+bwd")
def test_core_compiled_eager_release(benchmark, case):
    leaves = _grad_inputs(case.q, case.k, case.v)
    _bench(benchmark, case, _run_fwd_bwd(torch.compile(_eager_fn(case)), leaves, case.device))


SDPA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


@pytest.mark.benchmark(group="attention core fwd+bwd")
@pytest.mark.parametrize("sdpa_backend", SDPA_BACKENDS)
def test_core_sdpa(benchmark, case, sdpa_backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, sdpa_backend)
    leaves = _grad_inputs(case.q, case.k, case.v)
    mask = None if case.mask == "none" and case.key_mask is None else case.bool_mask()

    def fn(q, k, v):
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=case.scale)

    run = _run_fwd_bwd(fn, leaves, case.device)
    try:
        run()
    except RuntimeError as err:
        pytest.skip(f"SDPA {sdpa_backend} does not accept this case: {str(err).splitlines()[0][:120]}")
    _bench(benchmark, case, run)


@pytest.mark.benchmark(group="attention core fwd+bwd")
def test_core_flex_attention(benchmark, case):
    if case.device.type != "cuda":
        pytest.skip("FlexAttention is benchmarked on CUDA only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    allowed = case.bool_mask()[:, 0]
    mask_mod = lambda b, h, i, j: allowed[b, i, j]  # noqa: E731
    block_mask = create_block_mask(mask_mod, allowed.shape[0], None, allowed.shape[1], allowed.shape[2],
                                   device=case.device)
    compiled = torch.compile(flex_attention)
    leaves = _grad_inputs(case.q, case.k, case.v)
    run = _run_fwd_bwd(lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=case.scale), leaves,
                       case.device)
    try:
        run()
    except Exception as err:  # noqa: BLE001 - head dims below 16 are rejected by Flex's lowering
        pytest.skip(f"FlexAttention does not accept this case: {str(err).splitlines()[0][:120]}")
    _bench(benchmark, case, run)


# ---- one MulT cross-modal layer, forward + backward ---------------------------------------------

LAYER_CASES = {  # (batch, query length, key length, embed dim)
    "mult-L50-E32": (32, 50, 50, 32),
    "imder-L48-E32": (32, 48, 48, 32),
    "imder-L24-E64": (32, 24, 24, 64),
    "imder-L12-E128": (32, 12, 12, 128),
    "imder-L6-E256": (32, 6, 6, 256),
}


@pytest.fixture(scope="module", params=list(LAYER_CASES))
def layer_case(request, device):
    batch, lq, lk, embed = LAYER_CASES[request.param]
    torch.manual_seed(0)
    ours = CrossModalTransformer(embed, HEADS, layers=1, attn_mask=True).to(device)
    reference = ReferenceTransformerEncoder(embed, HEADS, layers=1, attn_mask=True).to(device)
    reference.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(lq, batch, embed, generator=gen).to(device)
    context = torch.randn(lk, batch, embed, generator=gen).to(device)
    return ours, reference, x, context, device


def _layer_run(module, x, context, device):
    params = [p for p in module.parameters() if p.requires_grad]
    x, context = x.detach().clone().requires_grad_(), context.detach().clone().requires_grad_()

    def run():
        out = module(x, context, context)
        grads = torch.autograd.grad(out.sum(), [x, context, *params])
        sync(device)
        return grads

    return run


def _bench_layer(benchmark, run, device):
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_extra_memory_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    benchmark(run)


@pytest.mark.benchmark(group="MulT layer fwd+bwd")
def test_layer_imer_fast(benchmark, layer_case):
    ours, _, x, context, device = layer_case
    _bench_layer(benchmark, _layer_run(ours, x, context, device), device)


@pytest.mark.benchmark(group="MulT layer fwd+bwd")
def test_layer_eager_release(benchmark, layer_case):
    _, reference, x, context, device = layer_case
    _bench_layer(benchmark, _layer_run(reference, x, context, device), device)


@pytest.mark.benchmark(group="MulT layer fwd+bwd")
def test_layer_compiled_eager_release(benchmark, layer_case):
    _, reference, x, context, device = layer_case
    _bench_layer(benchmark, _layer_run(torch.compile(reference), x, context, device), device)


@pytest.mark.benchmark(group="MulT layer fwd+bwd")
def test_layer_compiled_imer_fast(benchmark, layer_case):
    ours, _, x, context, device = layer_case
    _bench_layer(benchmark, _layer_run(torch.compile(ours), x, context, device), device)


def test_eager_core_matches_attention():
    """The eager provider computes what imer_fast computes (so the timings compare equal work)."""
    case = Case("mult-L50-E32", torch.device("cpu"))
    expected = attention(case.q, case.k, case.v, mask=case.mask)
    torch.testing.assert_close(_eager_fn(case)(case.q, case.k, case.v), expected, rtol=1e-5, atol=1e-5)
    assert math.isclose(case.scale, 0.5)


# ---- FedDISC's condition cross-attention, forward (what every sampler step of the U-Net runs) -----

COND_CASES = {  # (batch, query length = latent positions at that U-Net level); 8 heads of dim 4
    "feddisc-cond-B32-L48": (32, 48),
    "feddisc-cond-B32-L6": (32, 6),
    "feddisc-cond-B256-L24": (256, 24),
}
COND_HEAD_DIM, COND_TOKENS = 4, 2  # release CrossAttention: dim_head 4, two condition tokens + one null


@pytest.fixture(scope="module", params=list(COND_CASES))
def cond_case(request, device):
    batch, length = COND_CASES[request.param]
    gen = torch.Generator().manual_seed(2)
    inner = HEADS * COND_HEAD_DIM
    # q and the packed k/v as CondCrossAttention lays them out: views of [b, n, h * d] projections
    q = torch.randn(batch, length, inner, generator=gen).view(batch, length, HEADS, COND_HEAD_DIM).permute(0, 2, 1, 3)
    kv = torch.randn(batch, COND_TOKENS, 2 * inner, generator=gen).view(batch, COND_TOKENS, 2, HEADS, COND_HEAD_DIM)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    null_kv = torch.randn(2, COND_HEAD_DIM, generator=gen)
    return tuple(t.to(device) for t in (q, k, v, null_kv))


def _cond_eager(q, k, v, null_kv):
    """The release's CrossAttention core: null key/value prepended, einsum scores, float softmax, einsum."""
    b, h = q.shape[:2]
    null_k, null_v = (t.view(1, 1, 1, -1).expand(b, h, 1, -1) for t in null_kv.unbind(0))
    keys, values = torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2)
    sim = torch.einsum("bhid,bhjd->bhij", q * COND_HEAD_DIM ** -0.5, keys)
    return torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1, dtype=torch.float32).to(q.dtype), values)


def _bench_forward(benchmark, run, device):
    with torch.no_grad():
        run()  # warm-up (compiles)
        sync(device)
        benchmark(lambda: (run(), sync(device)))


@pytest.mark.benchmark(group="condition cross-attention forward")
def test_cond_imer_fast(benchmark, cond_case, device):
    q, k, v, null_kv = cond_case
    h = q.shape[1]
    null_k, null_v = null_kv.view(2, 1, 1, -1).expand(2, h, 1, -1).unbind(0)
    _bench_forward(benchmark, lambda: attention(q, k, v, null_k=null_k, null_v=null_v, scale=COND_HEAD_DIM ** -0.5),
                   device)


@pytest.mark.benchmark(group="condition cross-attention forward")
def test_cond_eager_release(benchmark, cond_case, device):
    _bench_forward(benchmark, lambda: _cond_eager(*cond_case), device)


@pytest.mark.benchmark(group="condition cross-attention forward")
def test_cond_compiled_eager_release(benchmark, cond_case, device):
    compiled = torch.compile(_cond_eager)
    _bench_forward(benchmark, lambda: compiled(*cond_case), device)


@pytest.mark.benchmark(group="condition cross-attention forward")
@pytest.mark.parametrize("sdpa_backend", SDPA_BACKENDS)
def test_cond_sdpa(benchmark, cond_case, device, sdpa_backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, null_kv = cond_case
    b, h = q.shape[:2]
    null_k, null_v = (t.view(1, 1, 1, -1).expand(b, h, 1, -1) for t in null_kv.unbind(0))

    def run():
        with sdpa_kernel([getattr(SDPBackend, sdpa_backend)]):
            return F.scaled_dot_product_attention(q, torch.cat([null_k, k], 2), torch.cat([null_v, v], 2))

    try:
        with torch.no_grad():
            run()
    except RuntimeError as err:
        pytest.skip(f"SDPA {sdpa_backend} does not accept this case: {str(err).splitlines()[0][:120]}")
    _bench_forward(benchmark, run, device)
