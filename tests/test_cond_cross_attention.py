"""CondCrossAttention / StableLayerNorm (FedDISC's cross-attention on the fused ops) against the eager
re-statement of the release (imer_fast.testing.reference_mult): state_dict compatibility, forward and
gradient parity, the release's quirks (shared null token, cosine-sim scale 16 without normalisation,
stable LayerNorm sign flip and epsilon rule), the context_mask extension, gradcheck, torch.compile
and input errors."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from imer_fast.nn.cond_cross_attention import CondCrossAttention, StableLayerNorm
from imer_fast.testing.reference_mult import ReferenceCrossAttention, ReferenceStableLayerNorm


@pytest.fixture
def attn_backend(backend):
    """The conftest ``backend`` fixture, skipping backends whose kernels are not built yet."""
    if backend == "cpp" and not torch._C._dispatch_has_kernel_for_dispatch_key("imer_fast::attention", "CPU"):
        pytest.skip("the C++ attention kernel is not built into imer_fast._C")
    if backend == "triton" and importlib.util.find_spec("imer_fast._kernels.attention") is None:
        pytest.skip("the Triton attention kernels are not installed")
    return backend


@pytest.fixture
def single_thread():
    """Tiny float64 problems evaluated thousands of times: one thread avoids OpenMP wake-ups."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_pair(dim=16, seed=0, **kw):
    torch.manual_seed(seed)
    ours = CondCrossAttention(dim, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ref = ReferenceCrossAttention(dim, **kw)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def make_inputs(b, n, m, dim, context_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=gen, dtype=dtype) + 0.3
    context = torch.randn(b, m, context_dim, generator=gen, dtype=dtype) + 0.3
    x[0, 1] = -x[0, 1].abs() - 0.05  # a row whose maximum is negative: the stable norm flips its sign
    return x.requires_grad_(), context.requires_grad_()


def run(module, x, context, **kw):
    out = module(x, context, **kw)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return out, torch.autograd.grad(out, [x, context] + list(module.parameters()), grad)


def assert_match(got, ref, rtol=1e-4, atol=3e-5):
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert len(got[1]) == len(ref[1])
    for g, r in zip(got[1], ref[1]):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("norm_context", [False, True])
def test_state_dict_and_initialisation_match_the_release_layout(norm_context):
    torch.manual_seed(4)
    ours = CondCrossAttention(32, context_dim=12, norm_context=norm_context)
    torch.manual_seed(4)
    ref = ReferenceCrossAttention(32, context_dim=12, norm_context=norm_context)
    expected = ["null_kv", "norm.g"] + (["norm_context.g"] if norm_context else []) + [
        "to_q.weight", "to_kv.weight", "to_out.0.weight", "to_out.1.g"]
    assert sorted(ours.state_dict()) == sorted(expected)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key  # same seed, same draws, same order
    assert ours.null_kv.shape == (2, 4) and ours.to_q.weight.shape == (32, 32)
    assert ours.to_kv.weight.shape == (64, 12) and ours.to_out[0].bias is None
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)


CONFIGS = [
    dict(dim_head=4, heads=8),
    dict(dim_head=8, heads=3, context_dim=12),
    dict(dim_head=32, heads=2, context_dim=24),
]


@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("norm_context", [False, True])
@pytest.mark.parametrize("cosine_sim_attn", [False, True])
def test_matches_reference(attn_backend, config, norm_context, cosine_sim_attn):
    kw = dict(CONFIGS[config], norm_context=norm_context, cosine_sim_attn=cosine_sim_attn)
    b, n, m, dim = 3, 10, 7, 16
    if attn_backend == "triton":
        if config != 1:
            pytest.skip("Triton interpreter: one configuration")
        b, n, m = 2, 4, 3
    ours, ref = build_pair(dim, seed=config, **kw)
    x, context = make_inputs(b, n, m, dim, kw.get("context_dim", dim), seed=config)
    got = run(ours, x, context)
    assert got[0].shape == (b, n, dim)
    # cosine_sim_attn: scale 16 on raw dot products gives peaked softmaxes; fp32 rounding grows with it.
    tol = dict(rtol=5e-4, atol=2e-4) if cosine_sim_attn else {}
    assert_match(got, run(ref, x, context), **tol)


def test_cosine_sim_attn_is_scale_16_without_normalisation():
    ours, _ = build_pair(16, seed=2, cosine_sim_attn=True)
    plain = CondCrossAttention(16)
    plain.load_state_dict(ours.state_dict())
    assert ours.scale == 1.0 and ours.cosine_sim_scale == 16
    # The same module with scale 16 instead of dim_head ** -0.5 = 0.5: multiply q's weight by 32.
    with torch.no_grad():
        plain.to_q.weight.mul_(32.0)
    x, context = make_inputs(2, 5, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, context), plain(x, context), rtol=1e-4, atol=1e-4)


def test_null_token_is_shared_by_heads_and_always_attended():
    """With every context token masked, each head attends only the null token: the pre-projection
    output is null_kv[1] repeated over heads for every query."""
    ours, _ = build_pair(16, seed=5, dim_head=4, heads=3)
    x, context = make_inputs(2, 5, 4, 16, 16)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    with torch.no_grad():
        got = ours(x, context, context_mask=mask)
        expected = ours.to_out(ours.null_kv[1].repeat(3).expand(2, 5, 12))
    torch.testing.assert_close(got, expected)
    out = ours(x, context, context_mask=mask)
    out.sum().backward()
    assert not context.grad.any() and ours.null_kv.grad[1].any()


@pytest.mark.parametrize("norm_context", [False, True])
def test_context_mask_extension_matches_an_additive_mask(attn_backend, norm_context):
    b, n, m, dim = 3, 6, 5, 16
    if attn_backend == "triton":
        if norm_context:
            pytest.skip("Triton interpreter: one configuration")
        b, n, m = 2, 3, 4
    ours, ref = build_pair(dim, seed=7, dim_head=4, heads=2, norm_context=norm_context, context_dim=8)
    x, context = make_inputs(b, n, m, dim, 8)
    mask = torch.arange(m)[None, :] < torch.tensor([m, 2, 0])[:b, None]  # batch 2: only the null token
    assert_match(run(ours, x, context, context_mask=mask), run(ref, x, context, context_mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_layer_norm_matches_the_release_including_sign_flip_and_eps(dtype):
    torch.manual_seed(0)
    ours, ref = StableLayerNorm(24), ReferenceStableLayerNorm(24)
    with torch.no_grad():
        ours.g.normal_()
    ref.load_state_dict(ours.state_dict())
    ours.to(dtype)
    ref.to(dtype)
    x = torch.randn(5, 7, 24, dtype=dtype) + 0.5
    x[1, 2] = -x[1, 2].abs() - 0.1  # negative row maximum
    x = x.requires_grad_()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    got, expected = ours(x), ref(x)
    torch.testing.assert_close(got, expected, **tol)
    grad = torch.randn_like(got)
    for a, r in zip(torch.autograd.grad(got, [x, ours.g], grad), torch.autograd.grad(expected, [x, ref.g], grad)):
        torch.testing.assert_close(a, r, **tol)
    # The negative-maximum row comes out with its sign flipped relative to a plain LayerNorm of the row.
    row = x.detach()[1, 2]
    scaled = row / row.max()
    eps = 1e-5 if dtype == torch.float32 else 1e-3  # the release's rule: 1e-3 for float64 too
    plain = F.layer_norm(scaled, (24,), eps=eps) * ours.g.detach()
    torch.testing.assert_close(got.detach()[1, 2], plain, **tol)
    assert (got.detach()[1, 2] * F.layer_norm(row, (24,)) * ours.g.detach() <= 1e-6).all()


def test_stable_layer_norm_other_dims_and_unstable():
    torch.manual_seed(1)
    for stable in (True, False):
        ours, ref = StableLayerNorm(6, stable=stable, dim=-2), ReferenceStableLayerNorm(6, stable=stable, dim=-2)
        assert ours.g.shape == (6, 1)
        with torch.no_grad():
            ours.g.normal_()
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(3, 6, 5) + 0.5
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        StableLayerNorm(6, dim=1)
    with pytest.raises(ValueError, match="x has 5 features along dim -1"):
        StableLayerNorm(6)(torch.randn(2, 5))


def test_float64_matches_reference():
    ours, ref = build_pair(16, seed=3, context_dim=8, norm_context=True)
    ours.double()
    ref.double()
    x, context = make_inputs(2, 5, 4, 16, 8, dtype=torch.float64)
    # The release (and so the reference) runs its softmax in float32 even for float64 inputs.
    assert_match(run(ours, x, context), run(ref, x, context), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_context", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(attn_backend, norm_context, masked, single_thread):
    """Stable LayerNorms are switched to plain ones here: the release detaches the row maximum, which
    the LayerNorm's output still depends on through epsilon, so finite differences would see a
    derivative that autograd (by design, like the release's) leaves out."""
    if attn_backend == "triton":
        pytest.skip("gradcheck under the Triton interpreter is too slow")
    ours, _ = build_pair(8, seed=1, context_dim=6, dim_head=3, heads=2, norm_context=norm_context)
    ours.double()
    for module in ours.modules():
        if isinstance(module, StableLayerNorm):
            module.stable = False
    names = [name for name, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    x, context = make_inputs(2, 3, 4, 8, 6, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]]) if masked else None

    def fn(x, context, *flat):
        return torch.func.functional_call(ours, dict(zip(names, flat)), (x, context), {"context_mask": mask})

    assert torch.autograd.gradcheck(fn, (x, context, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_torch_compile_matches_eager(attn_backend, compiler):
    if attn_backend != "cpp":
        pytest.skip("compiled on the default backend")
    ours, _ = build_pair(16, seed=6, context_dim=8, norm_context=True, dim_head=4, heads=4)
    x, context = make_inputs(2, 5, 3, 16, 8)
    compiled = torch.compile(ours, fullgraph=False, backend=compiler)
    if compiler == "inductor":
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, context), ours(x, context), rtol=1e-5, atol=1e-5)
        return
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert_match(run(compiled, x, context, context_mask=mask), run(ours, x, context, context_mask=mask),
                 rtol=1e-5, atol=1e-5)


def test_input_errors_name_the_argument():
    attn = CondCrossAttention(16, context_dim=8)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[batch, seq_len, dim=16\]"):
        attn(torch.randn(2, 5, 12), context)
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(5, 16), context)
    with pytest.raises(ValueError, match=r"context must be a floating tensor \[batch, context_len, context_dim=8\]"):
        attn(x, torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"context has batch size 4 \(dim 0\) but x has 2"):
        attn(x, torch.randn(4, 3, 8))
    with pytest.raises(TypeError, match="context is torch.float64"):
        attn(x, context.double())
    with pytest.raises(ValueError, match="context_mask must be a bool tensor"):
        attn(x, context, context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="context_mask must be a bool tensor"):
        attn(x, context, context_mask=torch.ones(2, 3))
