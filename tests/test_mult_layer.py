"""imer_fast.mult_layer (one MulT encoder layer as one op): parity with the pure-torch twin written from
the math (attention_ref, F.layer_norm, F.linear) in every key/value mode, mask kind, key mask and dropout
draw, float64 gradcheck, opcheck, hypothesis shape fuzzing, zero-size and non-contiguous inputs,
bitwise-repeatable runs and clear errors."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imer_fast.backends
from imer_fast.ops.mult_layer import MultLayerWeights, mult_layer, mult_layer_ref

MODES = ("self", "shared", "separate")


def make_weights(e, hidden, dtype=torch.float64, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(e,), (e,), (3 * e, e), (3 * e,), (e, e), (e,), (e,), (e,), (hidden, e), (hidden,), (e, hidden), (e,)]
    return MultLayerWeights(*(torch.randn(*s, generator=g, dtype=dtype).mul_(0.5).requires_grad_(requires_grad)
                              for s in shapes))


def make_inputs(mode, batch, lq, lk, e, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lq * batch, e, generator=g, dtype=dtype).requires_grad_()
    xk = torch.randn(lk * batch, e, generator=g, dtype=dtype).requires_grad_() if mode != "self" else None
    xv = torch.randn(lk * batch, e, generator=g, dtype=dtype).requires_grad_() if mode == "separate" else None
    return x, xk, xv


def keep_factors(rows, cols, p, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, cols, generator=g) >= p).to(dtype) / (1 - p)


def grads_of(out, inputs, seed=5):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", [0, 1, 2])
@pytest.mark.parametrize("with_key_mask", [False, True])
def test_matches_reference_forward_and_backward(backend, mode, mask_kind, with_key_mask):
    batch, lq, lk, e, heads = 3, 5, 5 if mode == "self" else 4, 8, 2
    w = make_weights(e, 4 * e)
    x, xk, xv = make_inputs(mode, batch, lq, lk, e)
    key_mask = (torch.arange(lk)[None, :] < torch.tensor([lk, 2, 0])[:, None]) if with_key_mask else None
    kw = dict(batch=batch, num_heads=heads, mask_kind=mask_kind, key_mask=key_mask)
    inputs = [t for t in (x, xk, xv, *w) if t is not None]
    out = mult_layer(x, xk, xv, w, **kw)
    with imer_fast.backends.force("reference"):
        expected = mult_layer_ref(x, xk, xv, w, **kw)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads_of(out, inputs), grads_of(expected, inputs)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_draws_match_reference(mode):
    """Residual and ReLU dropout factors are inputs and the attention dropout is the op's seeded hash: every
    backend computes the same function of the same draws."""
    batch, lq, lk, e, heads = 2, 6, 6 if mode == "self" else 3, 8, 4
    w = make_weights(e, 4 * e, seed=2)
    x, xk, xv = make_inputs(mode, batch, lq, lk, e, seed=3)
    kw = dict(batch=batch, num_heads=heads, mask_kind=2, dropout_p=0.3, dropout_seed=torch.tensor(1234),
              attn_res_keep=keep_factors(lq * batch, e, 0.2, torch.float64, 1),
              relu_keep=keep_factors(lq * batch, 4 * e, 0.2, torch.float64, 2),
              ffn_res_keep=keep_factors(lq * batch, e, 0.2, torch.float64, 3))
    inputs = [t for t in (x, xk, xv, *w) if t is not None]
    out, expected = mult_layer(x, xk, xv, w, **kw), mult_layer_ref(x, xk, xv, w, **kw)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads_of(out, inputs), grads_of(expected, inputs)):
        torch.testing.assert_close(got, want)
    no_drop = mult_layer(x, xk, xv, w, batch=batch, num_heads=heads, mask_kind=2)
    assert not torch.allclose(out, no_drop)  # the draws took effect


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    batch, lq, lk, e, heads = 2, 3, 3 if mode == "self" else 2, 4, 2
    w = make_weights(e, 8, seed=4)
    x, xk, xv = make_inputs(mode, batch, lq, lk, e, seed=5)
    key_mask = torch.tensor([[True] * lk, [True] + [False] * (lk - 1)])
    relu_keep = keep_factors(lq * batch, 8, 0.25, torch.float64, 6)

    def layer(x, xk, xv, *weights):
        return mult_layer(x, xk, xv, MultLayerWeights(*weights), batch=batch, num_heads=heads, mask_kind=2,
                          key_mask=key_mask, relu_keep=relu_keep)

    assert torch.autograd.gradcheck(layer, (x, xk, xv, *w))


def test_float32_matches_float64_reference():
    batch, lq, lk, e, heads = 32, 50, 50, 32, 4  # MulT's fusion layer
    w = make_weights(e, 4 * e, dtype=torch.float32, seed=7)
    x, xk, _ = make_inputs("shared", batch, lq, lk, e, dtype=torch.float32, seed=8)
    out = mult_layer(x, xk, None, w, batch=batch, num_heads=heads, mask_kind=2)
    w64 = MultLayerWeights(*(t.detach().double() for t in w))
    expected = mult_layer_ref(x.detach().double(), xk.detach().double(), None, w64, batch=batch, num_heads=heads,
                              mask_kind=2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    batch, lq, lk, e, heads = 2, 4, 4 if mode == "self" else 3, 8, 2
    w = make_weights(e, 16, seed=9)
    x, xk, xv = make_inputs(mode, batch, lq, lk, e, seed=10)
    key_mask = torch.ones(batch, lk, dtype=torch.bool)
    relu_keep = keep_factors(lq * batch, 16, 0.5, torch.float64, 11)
    args = (x, xk, xv, *w, key_mask, None, relu_keep, None, batch, heads, 1e-5, 1e-5, 0.5, 2, 0.0, None)
    torch.library.opcheck(torch.ops.imer_fast.mult_layer.default, args)
    out, saved = torch.ops.imer_fast.mult_layer(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    detached = [t.detach() if t is not None else None for t in (x, xk, xv)]
    wd = [t.detach() for t in w]
    torch.library.opcheck(
        torch.ops.imer_fast.mult_layer_backward.default,
        (torch.randn_like(out), saved, *detached, wd[0], wd[1], wd[2], wd[4], wd[6], wd[7], wd[8], wd[10], key_mask,
         None, relu_keep, None, batch, heads, 0.5, 2, 0.0, None))


def test_double_backward_is_refused():
    w = make_weights(8, 16, seed=12)
    x, _, _ = make_inputs("self", 2, 3, 3, 8, seed=13)
    out = mult_layer(x, None, None, w, batch=2, num_heads=2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_non_contiguous_and_zero_size_inputs():
    batch, lq, e, heads = 2, 3, 8, 2
    w = make_weights(e, 32, seed=14)
    wide = torch.randn(lq * batch, 2 * e, dtype=torch.float64)
    x = wide[:, ::2]  # non-contiguous rows
    assert not x.is_contiguous()
    torch.testing.assert_close(mult_layer(x, None, None, w, batch=batch, num_heads=heads),
                               mult_layer_ref(x, None, None, w, batch=batch, num_heads=heads))
    empty = torch.zeros(0, e, dtype=torch.float64, requires_grad=True)
    out = mult_layer(empty, None, None, w, batch=batch, num_heads=heads)
    assert out.shape == (0, e)
    grads = torch.autograd.grad(out.sum(), [empty, *w], allow_unused=True)
    assert grads[0].shape == (0, e)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[1:])


def test_bitwise_repeatable():
    batch, lq, lk, e, heads = 4, 9, 7, 16, 4
    w = make_weights(e, 64, dtype=torch.float32, seed=15)
    x, xk, _ = make_inputs("shared", batch, lq, lk, e, dtype=torch.float32, seed=16)
    runs = []
    for _ in range(2):
        out = mult_layer(x, xk, None, w, batch=batch, num_heads=heads, mask_kind=2)
        runs.append((out, *grads_of(out, [x, xk, *w])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), lq=st.integers(1, 9), lk=st.integers(1, 9), heads=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([1, 4, 8]), mode=st.sampled_from(MODES), mask_kind=st.sampled_from([0, 1, 2]),
       hidden=st.integers(1, 24), padded=st.booleans())
def test_fuzz_against_reference(batch, lq, lk, heads, head_dim, mode, mask_kind, hidden, padded):
    e = heads * head_dim
    lk = lq if mode == "self" else lk
    w = make_weights(e, hidden, seed=batch * 100 + lq)
    x, xk, xv = make_inputs(mode, batch, lq, lk, e, seed=lk)
    key_mask = torch.rand(batch, lk, generator=torch.Generator().manual_seed(lq)) > 0.3 if padded else None
    kw = dict(batch=batch, num_heads=heads, mask_kind=mask_kind, key_mask=key_mask)
    inputs = [t for t in (x, xk, xv, *w) if t is not None]
    out, expected = mult_layer(x, xk, xv, w, **kw), mult_layer_ref(x, xk, xv, w, **kw)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads_of(out, inputs), grads_of(expected, inputs)):
        torch.testing.assert_close(got, want)


def test_selection_and_bad_input():
    x = torch.randn(6, 8)
    assert imer_fast.backends.explain("mult_layer", x, 2).backend == "cpp"
    assert imer_fast.backends.explain("mult_layer", x.half(), 2).backend == "reference"
    w = make_weights(8, 32, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=r"imer_fast.mult_layer: batch \(4\) must be >= 1 and divide x's 6 rows"):
        mult_layer(x, None, None, w, batch=4, num_heads=2)
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide the embed dim 8"):
        mult_layer(x, None, None, w, batch=2, num_heads=3)
    with pytest.raises(ValueError, match=r"xv needs xk"):
        mult_layer(x, None, x, w, batch=2, num_heads=2)
    with pytest.raises(ValueError, match=r"xk must be a torch.float32 tensor \[L \* B, 8\] with B = 2"):
        mult_layer(x, torch.randn(4, 6), None, w, batch=2, num_heads=2)
    with pytest.raises(ValueError, match=r"xk must be a torch.float32 tensor .* got torch.float64"):
        mult_layer(x, torch.randn(4, 8, dtype=torch.float64), None, w, batch=2, num_heads=2)
    with pytest.raises(ValueError, match=r"in_proj_weight must be a torch.float32 tensor of shape \(24, 8\)"):
        mult_layer(x, None, None, w._replace(in_proj_weight=torch.randn(8, 8)), batch=2, num_heads=2)
    with pytest.raises(ValueError, match=r"fc2_weight must be a torch.float32 tensor of shape \(8, 32\)"):
        mult_layer(x, None, None, w._replace(fc2_weight=torch.randn(8, 16)), batch=2, num_heads=2)
    with pytest.raises(ValueError, match=r"relu_keep must be a torch.float32 tensor \[6, 32\]"):
        mult_layer(x, None, None, w, batch=2, num_heads=2, relu_keep=torch.ones(6, 8))
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor \[B = 2, Lk = 3\]"):
        mult_layer(x, None, None, w, batch=2, num_heads=2, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask_kind must be one of \[0, 1, 2\]"):
        mult_layer(x, None, None, w, batch=2, num_heads=2, mask_kind=5)
    with pytest.raises(ValueError, match=r"dropout_p must lie in \[0, 1\); got 1.0"):
        mult_layer(x, None, None, w, batch=2, num_heads=2, dropout_p=1.0)
    with pytest.raises(RuntimeError, match=r"imer_fast::mult_layer: in_proj_weight must have shape \[24, 8\]"):
        torch.ops.imer_fast.mult_layer(x, None, None, *w._replace(in_proj_weight=torch.randn(8, 8)), None, None,
                                       None, None, 2, 2, 1e-5, 1e-5, 0.5, 0, 0.0, None)
