"""CrossModalTransformer (MulT's TransformerEncoder on the fused attention op) against the eager
re-statement of the release (imer_fast.testing.reference_mult): state_dict compatibility, forward and
gradient parity in every mode, the release's quirks, the padding extension, dropout, gradcheck,
torch.compile and input errors."""
import importlib.util
import math

import pytest
import torch

from imer_fast.nn.cross_modal_transformer import (
    CrossModalTransformer,
    CrossModalTransformerLayer,
    PackedMultiheadAttention,
    SinusoidalPositionalEmbedding,
)
from imer_fast.testing.reference_mult import (
    ReferenceMultiheadAttention,
    ReferenceSinusoidalPositionalEmbedding,
    release_future_mask,
    ReferenceTransformerEncoder,
    ReferenceTransformerEncoderLayer,
)

# The Triton interpreter runs every program in Python (about 0.1 s per (batch, head) per layer):
# tiny problems only, one layer, two heads.
TRITON = {"embed_dim": 8, "heads": 2, "layers": 1, "lq": 5, "lk": 3, "batch": 2}


@pytest.fixture
def attn_backend(backend):
    """The conftest ``backend`` fixture, skipping backends whose attention kernel is not built yet."""
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


def build_pair(embed_dim, heads, layers=2, attn_mask=False, seed=0, **dropouts):
    """(ours, reference) with the same perturbed parameters (biases and LayerNorms non-trivial)."""
    torch.manual_seed(seed)
    ours = CrossModalTransformer(embed_dim, heads, layers, attn_mask=attn_mask, **dropouts)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ref = ReferenceTransformerEncoder(embed_dim, heads, layers, attn_mask=attn_mask, **dropouts)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def make_inputs(lq, lk, batch, embed_dim, dtype=torch.float32, seed=0):
    """x [lq, B, E], x_k [lk, B, E] with some exact zeros (and a -0.0) in feature 0 (padding positions)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(lq, batch, embed_dim, generator=gen, dtype=dtype)
    xk = torch.randn(lk, batch, embed_dim, generator=gen, dtype=dtype)
    x[lq - 1, 0, 0] = 0.0
    x[lq // 2, batch - 1, 0] = -0.0
    xk[lk - 1, batch - 1, 0] = 0.0
    return x.requires_grad_(), xk.requires_grad_()


def run(module, x, xk=None, xv=None, **kw):
    """Output and the gradients of (inputs, parameters) for a fixed non-uniform output gradient."""
    args = (x,) if xk is None else (x, xk, xv)
    out = module(*args, **kw)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    inputs = [t for t in dict.fromkeys([x, xk, xv]) if t is not None]
    grads = torch.autograd.grad(out, inputs + list(module.parameters()), grad, allow_unused=True)
    return out, grads


def assert_match(got, ref, rtol=1e-4, atol=2e-5):
    (out, grads), (ref_out, ref_grads) = got, ref
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


def test_state_dict_and_initialisation_match_the_release_layout():
    torch.manual_seed(7)
    ours = CrossModalTransformer(32, 8, 3, attn_mask=True)
    torch.manual_seed(7)
    ref = ReferenceTransformerEncoder(32, 8, 3, attn_mask=True)
    keys = list(ref.state_dict())
    assert list(ours.state_dict()) == keys
    assert {"version", "embed_positions._float_tensor", "layers.0.self_attn.in_proj_weight",
            "layers.0.self_attn.in_proj_bias", "layers.0.self_attn.out_proj.weight", "layers.2.fc1.bias",
            "layers.1.layer_norms.1.weight", "layer_norm.bias"} <= set(keys)
    # Same seed, same draws in the same order: identical initial values (xavier weights, zero biases).
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.layers[0].self_attn.in_proj_weight.shape == (96, 32)
    bound = math.sqrt(6.0 / (32 + 96))
    assert ours.layers[0].self_attn.in_proj_weight.abs().max() <= bound
    assert not ours.layers[1].fc1.bias.any() and not ours.layers[0].self_attn.in_proj_bias.any()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert "_table" not in "".join(ours.state_dict())  # the cached position table is not saved


def test_layer_state_dict_matches():
    torch.manual_seed(3)
    ours = CrossModalTransformerLayer(16, 4, attn_mask=True)
    torch.manual_seed(3)
    ref = ReferenceTransformerEncoderLayer(16, 4, attn_mask=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


MODES = ["self", "cross", "cross-separate-kv"]


# (embed_dim, heads, Lq, Lk): head dims 4, 8 and 32; more queries than keys and fewer.
SHAPES = [(32, 8, 50, 37), (32, 8, 24, 48), (32, 4, 50, 37), (64, 2, 24, 48)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attn_mask", [False, True])
@pytest.mark.parametrize("embed_dim, heads, lq, lk", SHAPES)
@pytest.mark.parametrize("train", [False, True])
def test_matches_reference(attn_backend, mode, attn_mask, lq, lk, embed_dim, heads, train):
    batch, layers = 3, 2
    if attn_backend == "triton":
        if (embed_dim, heads, lq, train) != (32, 8, 50, False) or (mode == "self") != attn_mask:
            pytest.skip("Triton interpreter: causal self-attention and unmasked cross-attention, tiny")
        embed_dim, heads, layers, lq, lk, batch = (TRITON[k] for k in ("embed_dim", "heads", "layers", "lq", "lk",
                                                                       "batch"))
    ours, ref = build_pair(embed_dim, heads, layers, attn_mask=attn_mask, seed=lq + embed_dim // heads)
    ours.train(train)
    ref.train(train)  # train mode with every dropout 0: deterministic
    x, xk = make_inputs(lq, lk, batch, embed_dim, seed=heads)
    if mode == "self":
        args = (x,)
    elif mode == "cross":
        args = (x, xk, xk)
    else:
        xv = (torch.randn(xk.shape, generator=torch.Generator().manual_seed(5)) * 2).requires_grad_()
        args = (x, xk, xv)
    got = run(ours, *args)
    expected = run(ref, *args)
    assert got[0].shape == (lq, batch, embed_dim)
    assert_match(got, expected)


@pytest.mark.parametrize("embed_dim, heads", [(15, 5), (9, 3)])
def test_odd_embed_dims(attn_backend, embed_dim, heads):
    if attn_backend == "triton":
        pytest.skip("covered by test_matches_reference")
    ours, ref = build_pair(embed_dim, heads, attn_mask=True, seed=embed_dim)
    x, xk = make_inputs(11, 7, 2, embed_dim)
    assert_match(run(ours, x, xk, xk), run(ref, x, xk, xk))
    assert_match(run(ours, x), run(ref, x))


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_without_positions_as_rohydrs_copy_of_the_encoder(mode):
    """RoHyDR's encoder defaults to position_embedding=False: inputs only scaled, no embed_positions entry."""
    torch.manual_seed(0)
    ours = CrossModalTransformer(16, 4, 2, attn_mask=True, position_embedding=False)
    assert not any("embed_positions" in k for k in ours.state_dict())
    ref = ReferenceTransformerEncoder(16, 4, 2, attn_mask=True, position_embedding=False)
    ref.load_state_dict(ours.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="embed_positions"):   # a release MulT state has the positions buffer
        CrossModalTransformer(16, 4, 2, position_embedding=False).load_state_dict(
            ReferenceTransformerEncoder(16, 4, 2).state_dict(), strict=True)
    x, xk = make_inputs(7, 5, 3, 16)
    args = (x,) if mode == "self" else (x, xk, xk)
    assert_match(run(ours, *args), run(ref, *args))
    with_positions = CrossModalTransformer(16, 4, 2, attn_mask=True)
    with_positions.load_state_dict(ours.state_dict(), strict=False)
    assert not torch.allclose(with_positions(*args), ours(*args), atol=1e-3)   # the positions do matter


def test_positions_follow_the_release():
    """Position t + 1, or the zero row where the (unscaled) first feature is exactly +-0; sin then cos."""
    ours, ref = SinusoidalPositionalEmbedding(7), ReferenceSinusoidalPositionalEmbedding(7)
    tokens = torch.randn(3, 200)
    tokens[0, 5] = 0.0
    tokens[1, 0] = -0.0
    tokens[2, 199] = 0.0
    got = ours(tokens)
    torch.testing.assert_close(got, ref(tokens), rtol=0, atol=0)
    assert not got[0, 5].any() and not got[1, 0].any() and not got[2, 199].any()
    assert not got[..., 6].any()  # odd dim: zero last column
    torch.testing.assert_close(got[0, 1, :3], torch.sin(2.0 * torch.tensor([1.0, 10000 ** (-1 / 2), 1e-4])))
    # The encoder reads x_in[:, :, 0] before scaling: a zero there zeroes the position of that step.
    enc = CrossModalTransformer(8, 2, 0)
    x = torch.randn(4, 2, 8)
    x[2, 1, 0] = 0.0
    emb = enc.embed_positions.embed(x, math.sqrt(8))
    expected_pos = emb - math.sqrt(8) * x
    assert not expected_pos[2, 1].abs().gt(1e-6).any()
    assert expected_pos[2, 0].abs().gt(1e-3).any()


def test_positions_follow_module_dtype_and_lengths_beyond_the_cache():
    ours, ref = build_pair(16, 4, layers=1, seed=2)
    ours.double()
    ref.double()
    x = torch.randn(300, 2, 16, dtype=torch.float64)  # longer than the initial 128-row table
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    assert ours.embed_positions._table.dtype == torch.float64


@pytest.mark.parametrize("mode", ["self", "cross"])
@pytest.mark.parametrize("attn_mask", [False, True])
@pytest.mark.parametrize("how", ["key_padding_mask", "lengths"])
def test_key_padding_extension_matches_an_additive_mask(attn_backend, mode, attn_mask, how):
    lq, lk, batch, e, heads, layers = 9, 7, 3, 16, 4, 2
    if attn_backend == "triton":
        if (mode, attn_mask, how) != ("cross", True, "lengths"):
            pytest.skip("Triton interpreter: one configuration")
        e, heads, layers = TRITON["embed_dim"], TRITON["heads"], TRITON["layers"]
    ours, ref = build_pair(e, heads, layers, attn_mask=attn_mask, seed=11)
    x, xk = make_inputs(lq, lk, batch, e, seed=3)
    key_len = lq if mode == "self" else lk
    lengths = torch.tensor([key_len, 4, 1])
    padding = torch.arange(key_len)[None, :] >= lengths[:, None]
    kw = {"key_padding_mask": padding} if how == "key_padding_mask" else {"lengths": lengths}
    args = (x,) if mode == "self" else (x, xk, xk)
    assert_match(run(ours, *args, **kw), run(ref, *args, key_padding_mask=padding))


def test_query_with_no_valid_key_gives_zero_attention_not_nan(attn_backend):
    if attn_backend == "triton":
        pytest.skip("cpp/reference only")
    layer = CrossModalTransformerLayer(8, 2, attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0).eval()
    x = torch.randn(4, 2, 8, requires_grad=True)
    xk = torch.randn(3, 2, 8, requires_grad=True)
    out = layer(x, xk, xk, lengths=torch.tensor([3, 0]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert not xk.grad[:, 1].any()  # keys of the all-padded sequence get no gradient
    # Batch element 1 saw no key: its attention output is 0, so its output is the layer without attention.
    alone = CrossModalTransformerLayer(8, 2, res_dropout=0.0, relu_dropout=0.0).eval()
    alone.load_state_dict(layer.state_dict())
    with torch.no_grad():
        alone.self_attn.out_proj.weight.zero_()
        torch.testing.assert_close(out[:, 1], alone(x, xk, xk)[:, 1])


def test_standalone_layer_matches_reference_layer(attn_backend):
    if attn_backend == "triton":
        pytest.skip("covered by test_matches_reference")
    torch.manual_seed(0)
    ours = CrossModalTransformerLayer(32, 8, attn_mask=True, attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0)
    ref = ReferenceTransformerEncoderLayer(32, 8, attn_mask=True, attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0)
    ref.load_state_dict(ours.state_dict())
    x, xk = make_inputs(24, 48, 2, 32)
    xv = torch.randn_like(xk).requires_grad_()
    for args in ((x,), (x, xk, xk), (x, xk, xv)):
        assert_match(run(ours, *args), run(ref, *args))
    # A transposed (non-contiguous) input is fine.
    xt = torch.randn(2, 24, 32).transpose(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(xt), ref(xt), rtol=1e-4, atol=2e-5)


def test_attention_module_alone_and_non_contiguous_inputs(attn_backend):
    if attn_backend == "triton":
        pytest.skip("cpp/reference only")
    torch.manual_seed(2)
    ours = PackedMultiheadAttention(16, 4)
    ref = ReferenceMultiheadAttention(16, 4)
    ref.load_state_dict(ours.state_dict())
    q, k = torch.randn(6, 2, 16), torch.randn(9, 2, 16)
    with torch.no_grad():
        expected = ref(q, k, k, attn_mask=release_future_mask(q, k))[0]
        torch.testing.assert_close(ours(q, k, k, future_mask=True), expected, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(ours(q), ref(q, q, q)[0], rtol=1e-4, atol=2e-5)
    # The op allocates its output like q: a [L, B, H, Dh] layout, so [L * B, E] is a free view.
    with torch.no_grad():
        flat = ours.attend(q.reshape(12, 16), None, None, 6, 6, 2, None, "none")
    assert flat.is_contiguous() and flat._base is not None
    # (B, L, E) data handed over as transposed views works like contiguous (L, B, E) input.
    enc, ref_enc = build_pair(16, 4, seed=8)
    x_bl, xk_bl = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc(x_bl.transpose(0, 1), xk_bl.transpose(0, 1), xk_bl.transpose(0, 1)),
                                   ref_enc(x_bl.transpose(0, 1).contiguous(), xk_bl.transpose(0, 1).contiguous(),
                                           xk_bl.transpose(0, 1).contiguous()), rtol=1e-4, atol=2e-5)


def test_only_one_of_key_and_value_runs_self_attention_like_the_release(attn_backend):
    if attn_backend == "triton":
        pytest.skip("cpp/reference only")
    ours, ref = build_pair(16, 4, seed=1)
    x, xk = make_inputs(6, 6, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, xk), ref(x, xk), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(ours(x, xk), ours(x))


def test_float64_matches_reference():
    ours, ref = build_pair(16, 4, attn_mask=True, seed=4)
    ours.double()
    ref.double()
    x, xk = make_inputs(8, 5, 2, 16, dtype=torch.float64)
    # The release (and so the reference) runs its softmax in float32 even for float64 inputs.
    assert_match(run(ours, x, xk, xk), run(ref, x, xk, xk), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["self", "cross", "cross-separate-kv"])
def test_gradcheck_float64(attn_backend, mode, single_thread):
    """Exact (column by column) gradcheck in the inputs, fast (random-projection) gradcheck in all of
    them and every parameter."""
    if attn_backend == "triton":
        pytest.skip("gradcheck under the Triton interpreter is too slow")
    torch.manual_seed(0)
    module = CrossModalTransformer(8, 2, 1, attn_mask=mode != "self").double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 2, 8, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    xk = (torch.randn(3, 2, 8, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    xv = (torch.randn(3, 2, 8, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(x, xk, xv, *flat):
        state = dict(zip(names, flat or params))
        if mode == "self":
            return torch.func.functional_call(module, state, (x,))
        return torch.func.functional_call(module, state, (x, xk, xk if mode == "cross" else xv))

    assert torch.autograd.gradcheck(fn, (x, xk, xv), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(fn, (x, xk, xv, *params), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_dropout_changes_training_outputs_not_eval(attn_backend):
    if attn_backend == "triton":
        pytest.skip("cpp/reference only")
    x, xk = make_inputs(10, 8, 2, 16)
    for which in ("attn_dropout", "relu_dropout", "res_dropout", "embed_dropout"):
        ours, ref = build_pair(16, 4, seed=2, **{which: 0.3})
        ours.train()
        torch.manual_seed(0)
        a = ours(x, xk, xk)
        b = ours(x, xk, xk)
        assert not torch.allclose(a, b), which
        a.sum().backward()  # the training graph backpropagates
        torch.manual_seed(5)
        c = ours(x, xk, xk)
        torch.manual_seed(5)
        torch.testing.assert_close(ours(x, xk, xk), c)  # repeatable under torch.manual_seed
        ours.eval()
        ref.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x, xk, xk), ours(x, xk, xk))
            torch.testing.assert_close(ours(x, xk, xk), ref(x, xk, xk), rtol=1e-4, atol=2e-5)
            assert not torch.allclose(ours(x, xk, xk), c)


def test_attention_dropout_keeps_the_expected_fraction():
    """Dropout on the probabilities with keep-probability 1 - p and scale 1 / (1 - p): with one key the
    attention output is v / (1 - p) where kept and 0 where dropped."""
    torch.manual_seed(0)
    layer = CrossModalTransformerLayer(8, 2, attn_dropout=0.25, relu_dropout=0.0, res_dropout=0.0).train()
    x = torch.randn(400, 64, 8)
    xk = torch.randn(1, 64, 8)
    with torch.no_grad():
        norm = layer.layer_norms[0]
        h = norm(xk.reshape(-1, 8))
        out = layer.self_attn.attend(norm(x.reshape(-1, 8)), h, h, 400, 1, 64, None, "none")
    heads = out.view(400, 64, 2, 4)
    dropped = (heads.abs().amax(-1) == 0).double().mean().item()
    assert abs(dropped - 0.25) < 0.02


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_torch_compile_matches_eager(attn_backend, compiler):
    """Inductor compiles the inference forward around the op; aot_eager traces forward and backward
    (train and eval, cross and self) through the op's fake and autograd registrations."""
    if attn_backend != "cpp":
        pytest.skip("compiled on the default backend")
    ours, _ = build_pair(16, 4, attn_mask=True, seed=9)
    x, xk = make_inputs(7, 5, 2, 16)
    compiled = torch.compile(ours, fullgraph=False, backend=compiler)
    if compiler == "inductor":
        ours.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, xk, xk), ours(x, xk, xk), rtol=1e-5, atol=1e-5)
        return
    for train in (False, True):
        ours.train(train)
        assert_match(run(compiled, x, xk, xk), run(ours, x, xk, xk), rtol=1e-5, atol=1e-5)
    assert_match(run(compiled, x), run(ours, x), rtol=1e-5, atol=1e-5)


def test_input_errors_name_the_argument():
    enc = CrossModalTransformer(16, 4, 1)
    x = torch.randn(10, 3, 16)
    with pytest.raises(ValueError, match="x_in has embed dim 8"):
        enc(torch.randn(10, 3, 8))
    with pytest.raises(ValueError, match="x_in must be a floating tensor"):
        enc(torch.randn(10, 16))
    with pytest.raises(ValueError, match=r"x_in_k has batch size 7 \(dim 1\) but x_in has 3.*transpose"):
        enc(x, torch.randn(3, 7, 16), torch.randn(3, 7, 16))  # a (B, L, D) key against (L, B, D) x
    with pytest.raises(ValueError, match="x_in_v has batch size 4"):
        enc(x, torch.randn(7, 3, 16), torch.randn(7, 4, 16))
    with pytest.raises(ValueError, match="x_in_k and x_in_v must have the same shape"):
        enc(x, torch.randn(7, 3, 16), torch.randn(6, 3, 16))
    with pytest.raises(TypeError, match="x_in_k is torch.float64"):
        enc(x, torch.randn(7, 3, 16, dtype=torch.float64), torch.randn(7, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        enc(x, key_padding_mask=torch.zeros(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        enc(x, lengths=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        enc(x, lengths=torch.ones(3, dtype=torch.long), key_padding_mask=torch.zeros(3, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        CrossModalTransformer(10, 4, 1)
    layer = CrossModalTransformerLayer(16, 4)
    with pytest.raises(ValueError, match="got only x_k"):
        layer(x, x_k=x)
    with pytest.raises(ValueError, match="x_k has embed dim 12"):
        layer(x, torch.randn(5, 3, 12), torch.randn(5, 3, 12))
