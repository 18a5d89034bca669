"""stable_layer_norm on every backend against the _ref twin, the FedDISC release's formula, gradcheck
and opcheck."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imer_fast.backends as backends
from imer_fast.ops.layer_norm import stable_layer_norm, stable_layer_norm_ref

SHAPES = [(32, 48, 128), (7, 3), (6, 21), (5, 0, 4), (0, 8), (3, 1), (17,)]  # (6, 21): vector lanes + a tail


def release_layer_norm(x, g, stable=True, dim=-1):
    """wdqdp/FedDISC conditional_ddim.py LayerNorm.forward, restated literally."""
    eps = 1e-5 if x.dtype == torch.float32 else 1e-3
    if stable:
        x = x / x.amax(dim=dim, keepdim=True).detach()
    var = torch.var(x, dim=dim, unbiased=False, keepdim=True)
    mean = x.mean(dim=dim, keepdim=True)
    return (x - mean) * (var + eps).rsqrt() * g


def make(shape, dtype=torch.float32, seed=0, requires_grad=False, affine=True):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(*shape, generator=gen, dtype=dtype) * 3 + 0.5
    w = torch.randn(n, generator=gen, dtype=dtype) if affine else None
    b = torch.randn(n, generator=gen, dtype=dtype) if affine else None
    leaves = [t.requires_grad_(requires_grad) for t in (x, w, b) if t is not None]
    return (x, w, b), leaves


AFFINE = [(True, True), (False, False), (True, False), (False, True)]


@pytest.mark.parametrize("shape, with_weight, with_bias", [(s, w, b) for s in SHAPES for w, b in AFFINE
                                                           if s != SHAPES[0] or w == b])
@pytest.mark.parametrize("stable", [True, False])
def test_forward_and_backward_match_reference(backend, shape, stable, with_weight, with_bias):
    (x, w, b), _ = make(shape, seed=len(shape) + shape[-1])
    w = w.requires_grad_() if with_weight else None
    b = b.requires_grad_() if with_bias else None
    x.requires_grad_()
    got = stable_layer_norm(x, w, b, 1e-5, stable)
    ref = stable_layer_norm_ref(x, w, b, 1e-5, stable)
    assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    leaves = [t for t in (x, w, b) if t is not None]
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for g, r in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stable", [True, False])
def test_matches_the_feddisc_release(backend, dtype, stable):
    (x, g, _), _ = make((6, 10, 24), dtype=dtype, seed=3)
    x.requires_grad_()
    g.requires_grad_()
    eps = 1e-5 if dtype == torch.float32 else 1e-3
    got = stable_layer_norm(x, g, None, eps, stable)
    expected = release_layer_norm(x, g, stable)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, expected, **tol)
    grad = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(got, (x, g), grad), torch.autograd.grad(expected, (x, g), grad)):
        torch.testing.assert_close(a, e, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}))
    # the release's default parameter: g = ones
    ones = torch.ones(24, dtype=dtype)
    torch.testing.assert_close(stable_layer_norm(x, ones, None, eps, stable), release_layer_norm(x, ones, stable),
                               **tol)


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the Triton interpreter's 0 / 0
def test_negative_row_max_flips_the_sign_and_zero_max_gives_nan(backend):
    x = -torch.rand(4, 9, dtype=torch.float64) - 0.1  # every row maximum is negative
    a = x.amax(-1, keepdim=True)
    y = stable_layer_norm(x, stable=True)
    torch.testing.assert_close(y, -stable_layer_norm(x / a.abs(), stable=False))
    # the release (float64: eps = 1e-3) flips it the same way
    torch.testing.assert_close(stable_layer_norm(x, None, None, 1e-3, True),
                               release_layer_norm(x, torch.ones(9, dtype=torch.float64), True))
    torch.testing.assert_close(y, stable_layer_norm_ref(x, stable=True))
    # row max 0: the release divides by zero; so do we (documented quirk)
    z = torch.tensor([[0.0, -1.0, -2.0], [1.0, 2.0, 3.0]])
    out = stable_layer_norm(z, stable=True)
    release = release_layer_norm(z, torch.ones(3))
    assert torch.isnan(out[0]).all() and torch.isnan(release[0]).all()
    torch.testing.assert_close(out[1], release[1], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the Triton interpreter's NaN arithmetic
def test_nan_stays_in_its_row(backend):
    x = torch.randn(3, 6, dtype=torch.float64)
    x[1, 4] = float("nan")
    for stable in (True, False):
        y = stable_layer_norm(x, stable=stable)
        assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
    if backend != "reference":
        _, mean, rstd, row_max = torch.ops.imer_fast.stable_layer_norm(x, None, None, 1e-5, True)
        assert torch.isnan(row_max[1]) and torch.isnan(mean[1]) and not torch.isnan(row_max[[0, 2]]).any()
        torch.testing.assert_close(row_max, x.amax(-1), equal_nan=True)


@pytest.mark.parametrize("stable", [True, False])
def test_gradcheck_float64(backend, stable):
    (x, w, b), _ = make((2, 3, 5), dtype=torch.float64, seed=5, requires_grad=True)
    if not stable:
        assert torch.autograd.gradcheck(lambda x, w, b: stable_layer_norm(x, w, b, 1e-5, False), (x, w, b))
        assert torch.autograd.gradcheck(lambda x: stable_layer_norm(x, None, None, 1e-5, False), (x,))
        return
    # The row maximum is detached: the analytic gradient treats it as a constant while finite
    # differences move it. With eps = 0 and a positive maximum the output does not depend on the
    # maximum's value at all (LayerNorm is scale-invariant), so the two agree exactly.
    assert (x.amax(-1) > 0).all()
    assert torch.autograd.gradcheck(lambda x, w, b: stable_layer_norm(x, w, b, 0.0, True), (x, w, b))
    assert torch.autograd.gradcheck(lambda w, b: stable_layer_norm(x.detach(), w, b, 1e-3, True), (w, b))
    # With eps > 0 the max does matter, and the gradient is the detached one (as in the release).
    grad = torch.randn_like(x)
    got = torch.autograd.grad(stable_layer_norm(x, w, b, 1e-3, True), (x, w, b), grad)
    expected = torch.autograd.grad(release_layer_norm(x, w, True) + b, (x, w, b), grad)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("stable", [True, False])
def test_opcheck(backend, stable):
    (x, w, b), _ = make((3, 5, 12), seed=6, requires_grad=True)
    for weight, bias in ((w, b), (None, None)):
        torch.library.opcheck(torch.ops.imer_fast.stable_layer_norm.default, (x, weight, bias, 1e-5, stable))
        _, mean, rstd, row_max = torch.ops.imer_fast.stable_layer_norm(x.detach(), None if weight is None else
                                                                       weight.detach(), None, 1e-5, stable)
        grad = torch.randn(3, 5, 12)
        mask = [True, weight is not None, bias is not None]
        torch.library.opcheck(torch.ops.imer_fast.stable_layer_norm_backward.default,
                              (grad, x.detach(), None if weight is None else weight.detach(), mean, rstd, row_max,
                               mask))


def test_op_statistics_and_unrequested_outputs(backend):
    if backend == "reference":
        pytest.skip("the statistics come from the kernels")
    (x, w, _), _ = make((4, 7, 10), dtype=torch.float64, seed=7)
    for stable in (True, False):
        y, mean, rstd, row_max = torch.ops.imer_fast.stable_layer_norm(x, w, None, 1e-5, stable)
        a = x.amax(-1) if stable else torch.ones(4, 7, dtype=torch.float64)
        xh = x / a.unsqueeze(-1)
        assert mean.shape == rstd.shape == row_max.shape == (4, 7) and mean.dtype == torch.float64
        torch.testing.assert_close(row_max, a, rtol=0, atol=0)
        torch.testing.assert_close(mean, xh.mean(-1))
        torch.testing.assert_close(rstd, (xh.var(-1, unbiased=False) + 1e-5).rsqrt())
    _, mean, rstd, row_max = torch.ops.imer_fast.stable_layer_norm(x.float(), None, None, 1e-5, True)
    assert mean.dtype == rstd.dtype == row_max.dtype == torch.float32
    _, mean, rstd, row_max = torch.ops.imer_fast.stable_layer_norm(x.half(), None, None, 1e-5, True)
    assert mean.dtype == torch.float32
    grad = torch.randn_like(x)
    _, mean, rstd, row_max = torch.ops.imer_fast.stable_layer_norm(x, w, None, 1e-5, True)
    dx, dw, db = torch.ops.imer_fast.stable_layer_norm_backward(grad, x, w, mean, rstd, row_max, [True, False, False])
    assert dx.shape == x.shape and dw.numel() == 0 and db.numel() == 0 and dw is not db
    dx, dw, db = torch.ops.imer_fast.stable_layer_norm_backward(grad, x, None, mean, rstd, row_max, [False, True, True])
    assert dx.numel() == 0 and dw.numel() == 0 and db.shape == (10,)
    torch.testing.assert_close(db, grad.sum((0, 1)))


def test_non_contiguous_input(backend):
    cases = [torch.randn(24, 10).t(), torch.randn(4, 20, 6).transpose(1, 2), torch.randn(5, 3, 16)[:, :, ::2],
             torch.randn(6, 8).expand(3, 6, 8)]
    for x in cases:
        assert not x.is_contiguous()
        x.requires_grad_()
        w = torch.randn(x.shape[-1], requires_grad=True)
        got = stable_layer_norm(x, w, None)
        ref = stable_layer_norm_ref(x, w, None)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        grad = torch.randn(x.shape).transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous grad too
        for a, e in zip(torch.autograd.grad(got, (x, w), grad), torch.autograd.grad(ref, (x, w), grad)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_bitwise_repeatable_forward_and_backward(backend):
    (x, w, b), leaves = make((20, 33, 40), seed=8, requires_grad=True)
    grad = torch.randn(20, 33, 40)
    threads = torch.get_num_threads()
    results = []
    try:  # the C++ kernels' results do not depend on the number of threads either
        for n_threads in (threads, threads, 1) if backend == "cpp" else (threads, threads):
            torch.set_num_threads(n_threads)
            y = stable_layer_norm(x, w, b)
            results.append((y,) + torch.autograd.grad(y, leaves, grad))
    finally:
        torch.set_num_threads(threads)
    for run in results[1:]:
        for a, e in zip(results[0], run):
            assert torch.equal(a, e)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lead=st.lists(st.integers(0, 5), min_size=0, max_size=3), n=st.integers(1, 70), stable=st.booleans(),
       affine=st.booleans(), seed=st.integers(0, 999))
def test_fuzz_shapes(backend, lead, n, stable, affine, seed):
    shape = tuple(lead) + (n,)
    (x, w, b), leaves = make(shape, dtype=torch.float64, seed=seed, requires_grad=True, affine=affine)
    got = stable_layer_norm(x, w, b, 1e-5, stable)
    ref = stable_layer_norm_ref(x, w, b, 1e-5, stable)
    torch.testing.assert_close(got, ref)
    grad = torch.randn(shape, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(backend, dtype):
    (x, w, b), _ = make((9, 40), seed=9)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    got = stable_layer_norm(x, w, b)
    assert got.dtype == dtype
    expected = stable_layer_norm_ref(x.float(), w.float(), b.float())
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=5e-2)
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(stable_layer_norm(xg, w, b).float().square().sum(), xg)
    xf = x.float().requires_grad_()
    (ef,) = torch.autograd.grad(stable_layer_norm_ref(xf, w.float(), b.float()).to(dtype).float().square().sum(), xf)
    assert gx.dtype == dtype
    torch.testing.assert_close(gx.float(), ef, rtol=5e-2, atol=1e-1)


def test_double_backward_is_a_clear_error(backend):
    (x, w, b), _ = make((3, 5), dtype=torch.float64, seed=10, requires_grad=True)
    (gx,) = torch.autograd.grad(stable_layer_norm(x, w, b).square().sum(), x, create_graph=True)
    if backend == "reference":
        torch.autograd.grad(gx.square().sum(), w)  # the pure-torch twin supports it
        return
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        torch.autograd.grad(gx.square().sum(), w)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(weight=torch.randn(7)), ValueError, r"weight must have shape \[N = 8\]"),
        (dict(bias=torch.randn(2, 8)), ValueError, r"bias must have shape \[N = 8\]"),
        (dict(weight=torch.randn(8, dtype=torch.float64)), TypeError, "weight has dtype torch.float64 but x has "
         "torch.float32"),
        (dict(x=torch.ones(4, 8, dtype=torch.long)), TypeError, "x must be a floating tensor .* got torch.int64"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
        (dict(x=torch.randn(3, 0)), ValueError,
         r"x must have .* a last \(normalised\) dimension N >= 1; got shape \(3, 0\)"),
        (dict(bias=torch.zeros(8, device="meta")), ValueError, "bias is on meta"),
        (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
        (dict(stable=1), TypeError, "stable must be a bool"),
    ],
)
def test_bad_input_is_named(change, error, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(8), bias=torch.randn(8), eps=1e-5, stable=True)
    args.update(change)
    with pytest.raises(error, match="imer_fast.stable_layer_norm: " + match):
        stable_layer_norm(**args)


def test_cpp_op_checks_arguments_directly():
    with pytest.raises(RuntimeError, match=r"imer_fast::stable_layer_norm: weight must have shape \[N = 6\]"):
        torch.ops.imer_fast.stable_layer_norm(torch.randn(3, 6), torch.randn(5), None, 1e-5, True)
    with pytest.raises(RuntimeError, match="imer_fast::stable_layer_norm: bias dtype must match x"):
        torch.ops.imer_fast.stable_layer_norm(torch.randn(3, 6), None, torch.randn(6).double(), 1e-5, True)
    with pytest.raises(RuntimeError, match="imer_fast::stable_layer_norm: x must be a floating tensor"):
        torch.ops.imer_fast.stable_layer_norm(torch.ones(3, 6, dtype=torch.long), None, None, 1e-5, True)
    x = torch.randn(3, 6)
    _, mean, rstd, row_max = torch.ops.imer_fast.stable_layer_norm(x, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="imer_fast::stable_layer_norm_backward: rstd must be a Float tensor of 3"):
        torch.ops.imer_fast.stable_layer_norm_backward(x, x, None, mean, rstd[:2], row_max, [True, False, False])


def test_backend_selection_is_explained():
    choice = backends.explain("stable_layer_norm", torch.randn(2, 2))
    assert choice.backend == "cpp" and "triton" in choice.passed_over
    with backends.force("reference"):
        assert backends.explain("stable_layer_norm", torch.randn(2, 2)).backend == "reference"
    assert backends.explain("stable_layer_norm", torch.randn(2, 2, device="meta")).backend == "reference"


@pytest.mark.parametrize("n", [1, 3, 8, 16, 21, 24, 32, 40, 67])
@pytest.mark.parametrize("stable", [True, False])
def test_backward_rebuilds_the_forward_rows_bit_for_bit(backend, n, stable):
    """dweight with weight 1, no bias and grad_y one row of ones is that row's normalised values, which
    must equal the forward's output exactly: near-constant rows (rstd up to 1 / sqrt(eps)) magnify any
    last-bit difference between the two (found in review: x / a against x * (1 / a), fused multiply-adds).
    The reference backend (torch autograd) makes no such promise."""
    if backend == "reference":
        pytest.skip("torch autograd's backward does not rebuild the forward's rows bit for bit")
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=gen) * 3 + 0.5
    x[0] = 41.0  # constant rows: where their mean comes out exact, y == 0, and then dx must be 0 too
    x[1] = 0.01
    x[2] = x[2] * 1e-4 + 7.3  # nearly constant
    weight = torch.ones(n, requires_grad=True)
    x.requires_grad_()
    y = stable_layer_norm(x, weight, None, 1e-10, stable)
    for row in range(6):
        grad = torch.zeros(6, n)
        grad[row] = 1.0
        dx, dweight = torch.autograd.grad(y, [x, weight], grad, retain_graph=True)
        assert torch.equal(dweight, y[row].detach()), (row, dweight - y[row])
        if row < 2 and not y[row].any():
            assert not dx.any(), (row, dx)
