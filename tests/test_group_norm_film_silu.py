"""group_norm_film_silu: parity with the eager sequence, gradients, opcheck, fuzz, layouts, errors."""
import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from imer_fast.ops.group_norm import group_norm_film_silu, group_norm_film_silu_ref

SHAPES = [((3, 32, 48), 8), ((2, 64, 6), 32), ((2, 32, 12), 4)]
OPTIONALS = ("weight", "bias", "input_bias", "scale", "shift")


def make(shape, groups, present, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[0], shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 1
    sizes = {"weight": (c,), "bias": (c,), "input_bias": (b, c), "scale": (b, c), "shift": (b, c, 1)}
    kw = {k: torch.randn(sizes[k], generator=g, dtype=dtype) for k in present}
    if requires_grad:
        x.requires_grad_()
        for t in kw.values():
            t.requires_grad_()
    return x, kw


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("silu", [True, False])
def test_matches_eager_sequence_for_every_option_combination(backend, shape, groups, silu):
    combos = [c for r in range(len(OPTIONALS) + 1) for c in itertools.combinations(OPTIONALS, r)]
    if backend == "triton":
        combos = [(), OPTIONALS, ("weight", "bias", "scale", "shift")]
    for present in combos:
        x, kw = make(shape, groups, present)
        got = group_norm_film_silu(x, groups, apply_silu=silu, **kw)
        want = group_norm_film_silu_ref(x, groups, apply_silu=silu, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(present))


def test_reference_equals_release_block_math():
    """The ref twin restates FedDISC's Block prologue: GroupNorm -> x * (scale + 1) + shift -> SiLU."""
    x, kw = make((2, 32, 12), 8, OPTIONALS)
    gn = torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        gn.weight.copy_(kw["weight"])
        gn.bias.copy_(kw["bias"])
    h = gn(x + kw["input_bias"][:, :, None])
    release = torch.nn.functional.silu(h * (kw["scale"][:, :, None] + 1) + kw["shift"])
    torch.testing.assert_close(group_norm_film_silu(x, 8, **kw), release, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("silu", [True, False])
def test_gradcheck_float64(backend, silu):
    shape = (2, 8, 5) if backend == "triton" else (3, 16, 7)
    x, kw = make(shape, 4, OPTIONALS, dtype=torch.float64, requires_grad=True)
    names = list(kw)

    def fn(x, *ts):
        return group_norm_film_silu(x, 4, apply_silu=silu, **dict(zip(names, ts)))

    assert torch.autograd.gradcheck(fn, (x, *kw.values()), fast_mode=backend == "triton")


def test_gradients_match_ref_float32_partial_inputs(backend):
    x, kw = make((2, 32, 12), 8, ("weight", "scale"), requires_grad=True)
    out = group_norm_film_silu(x, 8, **kw)
    grads = torch.autograd.grad(out.square().sum(), [x, *kw.values()])
    x2, kw2 = make((2, 32, 12), 8, ("weight", "scale"), requires_grad=True)
    ref = group_norm_film_silu_ref(x2, 8, **kw2)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x2, *kw2.values()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_opcheck():
    x, kw = make((2, 16, 6), 4, OPTIONALS, requires_grad=True)
    args = (x, kw["weight"], kw["bias"], kw["input_bias"], kw["scale"], kw["shift"].reshape(2, 16), 4, 1e-5, True)
    torch.library.opcheck(torch.ops.imer_fast.group_norm_film_silu.default, args)
    y, mean, rstd = torch.ops.imer_fast.group_norm_film_silu(*args)
    bargs = (torch.randn_like(y), x.detach(), kw["weight"].detach(), kw["bias"].detach(), kw["input_bias"].detach(),
             kw["scale"].detach(), kw["shift"].detach().reshape(2, 16), mean, rstd, 4, True, [True] * 6)
    torch.library.opcheck(torch.ops.imer_fast.group_norm_film_silu_backward.default, bargs)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(0, 3), groups=st.sampled_from([1, 2, 4]), cpg=st.integers(1, 4),
       spatial=st.lists(st.integers(1, 6), min_size=0, max_size=2),
       present=st.sets(st.sampled_from(OPTIONALS)), silu=st.booleans())
def test_fuzz_shapes(b, groups, cpg, spatial, present, silu):
    shape = (b, groups * cpg, *spatial)
    assume(cpg * math.prod(spatial) >= 2)  # torch's group_norm (the ref) rejects one-element groups
    x, kw = make(shape, groups, present)
    torch.testing.assert_close(group_norm_film_silu(x, groups, apply_silu=silu, **kw),
                               group_norm_film_silu_ref(x, groups, apply_silu=silu, **kw), rtol=1e-5, atol=1e-5)


def test_non_contiguous_and_zero_size(backend):
    x = torch.randn(48, 16, 3).permute(2, 1, 0)  # [3, 16, 48] with strides
    kw = {"scale": torch.randn(16, 3).t(), "weight": torch.randn(16)}
    torch.testing.assert_close(group_norm_film_silu(x, 4, **kw), group_norm_film_silu_ref(x.contiguous(), 4, **kw),
                               rtol=1e-5, atol=1e-5)
    empty = torch.randn(0, 16, 5, requires_grad=True)
    out = group_norm_film_silu(empty, 4)
    assert out.shape == (0, 16, 5)
    out.sum().backward()
    assert empty.grad.shape == (0, 16, 5)


def test_bitwise_repeatable(backend):
    x, kw = make((4, 32, 24), 8, OPTIONALS, requires_grad=True)
    runs = []
    for _ in range(2):
        out = group_norm_film_silu(x, 8, **kw)
        grads = torch.autograd.grad(out.sum(), [x, *kw.values()])
        runs.append((out, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_double_backward_is_a_clear_error():
    x, kw = make((2, 8, 4), 2, ("weight",), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(group_norm_film_silu(x, 2, **kw).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_errors_name_the_argument():
    x = torch.randn(2, 12, 5)
    with pytest.raises(ValueError, match="num_groups must be a positive int dividing C = 12"):
        group_norm_film_silu(x, 5)
    with pytest.raises(ValueError, match=r"scale must have shape \[B, C\] = \[2, 12\]"):
        group_norm_film_silu(x, 4, scale=torch.randn(12))
    with pytest.raises(ValueError, match=r"weight must have shape \[C\] = \[12\]"):
        group_norm_film_silu(x, 4, torch.randn(11))
    with pytest.raises(TypeError, match="input_bias has dtype torch.float64"):
        group_norm_film_silu(x, 4, input_bias=torch.randn(2, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[B, C, \*spatial\]"):
        group_norm_film_silu(torch.randn(5), 1)


@pytest.mark.parametrize("route", ["cpp", "triton"])
@pytest.mark.parametrize("name, bad", [("weight", (1,)), ("bias", (5,)), ("input_bias", (2, 3)),
                                       ("scale", (1, 4)), ("shift", (4,))])
def test_direct_op_calls_check_parameter_shapes(route, name, bad):
    """torch.ops.imer_fast.group_norm_film_silu (what opcheck and compiled graphs call) skips the
    Python checks: a parameter smaller than its contract is refused, never read past its end."""
    import contextlib

    from imer_fast.ops import triton_on_cpu

    x = torch.randn(2, 4, 3)
    big = torch.arange(1.0, 101.0)
    args = dict(weight=None, bias=None, input_bias=None, scale=None, shift=None)
    args[name] = big[:math.prod(bad)].view(bad)   # storage continues past the view
    with triton_on_cpu() if route == "triton" else contextlib.nullcontext():
        with pytest.raises((RuntimeError, ValueError), match=rf"group_norm_film_silu: {name} must be a \["):
            torch.ops.imer_fast.group_norm_film_silu(x, *args.values(), 2, 1e-5, True)
        y, mean, rstd = torch.ops.imer_fast.group_norm_film_silu(x, None, None, None, None, None, 2, 1e-5, True)
        args[name] = args[name].clone().requires_grad_()
        with pytest.raises((RuntimeError, ValueError), match=rf"group_norm_film_silu_backward: {name} must be a"):
            torch.ops.imer_fast.group_norm_film_silu_backward(torch.ones_like(y), x, *args.values(), mean, rstd, 2,
                                                              True, [True] * 6)


def test_reference_agrees_with_the_kernels_on_edge_cases(backend):
    """A bias without a weight (torch's own group_norm backward fails there on the CPU), groups of one
    element (F.group_norm refuses them in training), empty spatial dims (aten's parameter gradients
    are NaN): every backend gives the kernels' answer."""
    x, kw = make((3, 8, 5), 4, ("bias", "scale"), dtype=torch.float64, requires_grad=True)
    out = group_norm_film_silu(x, 4, **kw)
    grads = torch.autograd.grad(out.sum(), [x, *kw.values()])
    with torch.no_grad():
        y, _, _ = torch.ops.imer_fast.group_norm_film_silu(x, None, kw["bias"], None, kw["scale"], None, 4, 1e-5,
                                                           True)
    torch.testing.assert_close(out, y)
    x2 = x.detach().clone().requires_grad_()
    h = torch.nn.functional.group_norm(x2, 4, torch.ones(8, dtype=torch.float64), kw["bias"].detach())
    expected = torch.autograd.grad(torch.nn.functional.silu(h * (kw["scale"].detach()[..., None] + 1)).sum(), x2)
    torch.testing.assert_close(grads[0], expected[0])
    single = torch.randn(1, 8)
    assert torch.equal(group_norm_film_silu(single, 8, apply_silu=False), torch.zeros(1, 8))
    empty, kw = make((2, 8, 0), 2, ("weight", "bias", "scale"), requires_grad=True)
    grads = torch.autograd.grad(group_norm_film_silu(empty, 2, **kw).sum(), [*kw.values()])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def channels_last(t):
    """[B, C, S] stored as [B, S, C]: the layout the U-Nets use on the CPU."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("shape,groups", SHAPES + [((2, 40, 7), 5), ((1, 256, 6), 32)])
@pytest.mark.parametrize("silu", [True, False])
def test_channels_last_matches_ref_and_keeps_layout(backend, shape, groups, silu):
    for present in [(), OPTIONALS, ("weight", "bias", "scale", "shift"), ("input_bias",)]:
        x, kw = make(shape, groups, present, dtype=torch.float64, requires_grad=True)
        xcl = channels_last(x.detach()).requires_grad_()
        got = group_norm_film_silu(xcl, groups, apply_silu=silu, **kw)
        if backend != "reference":
            assert got.stride() == xcl.stride()  # the op's y comes back channels-last
        want = group_norm_film_silu_ref(x, groups, apply_silu=silu, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=str(present))
        grad = torch.randn(shape, dtype=torch.float64)
        got_grads = torch.autograd.grad(got, [xcl, *kw.values()], grad)
        want_grads = torch.autograd.grad(want, [x, *kw.values()], grad)
        if backend != "reference":
            assert got_grads[0].stride() == xcl.stride()
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=str(present))


def test_outputs_have_the_fake_impls_strides_with_a_size_one_spatial_dim(backend):
    """x [2, 8, 1] viewed with strides (8, 1, 8): contiguous in memory but with an odd stride on the size-1
    dim; y and dx come back with the canonical strides the fake impl declares (torch.compile relies on it)."""
    if backend == "reference":
        pytest.skip("the reference is aten's group norm, not the op")
    x = torch.randn(2, 1, 8).transpose(1, 2).requires_grad_()
    assert x.stride() == (8, 1, 8)
    y = group_norm_film_silu(x, 4)
    (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    assert y.stride() == dx.stride() == (8, 1, 1)


def test_channels_last_float32_vector_path_equals_contiguous_path():
    x, kw = make((4, 256, 24), 32, OPTIONALS)
    got = group_norm_film_silu(channels_last(x), 32, **kw)
    torch.testing.assert_close(got, group_norm_film_silu(x, 32, **kw), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, group_norm_film_silu(channels_last(x), 32, **kw))  # bitwise-repeatable


@pytest.mark.parametrize("shape,groups", [((3, 256, 24), 32), ((2, 40, 7), 5), ((2, 12, 9), 3), ((1, 8, 1), 2),
                                          ((2, 16, 48), 4), ((2, 24, 12), 8)])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_float32_vector_backward_matches_float64_ref(shape, groups, silu, layout):
    """The float32 backward runs vectorised rows of channels (tails beyond a multiple of 8 included: C = 40,
    12), channels-first inputs on channels-last copies (S = 48, 24, 12, 9, 7; S = 1 stays on the scalar loop)
    with dx returned in their layout; gradients match the float64 reference and repeat bitwise."""
    arrange = channels_last if layout == "channels_last" else (lambda t: t.contiguous())
    for present in [OPTIONALS, ()]:
        x64, kw64 = make(shape, groups, present, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(shape, dtype=torch.float64)
        want = torch.autograd.grad(group_norm_film_silu_ref(x64, groups, apply_silu=silu, **kw64),
                                   [x64, *kw64.values()], grad)
        runs = []
        for _ in range(2):
            x = arrange(x64.detach().float()).requires_grad_()
            kw = {k: v.detach().float().requires_grad_() for k, v in kw64.items()}
            got = group_norm_film_silu(x, groups, apply_silu=silu, **kw)
            runs.append(torch.autograd.grad(got, [x, *kw.values()], arrange(grad.float())))
        assert runs[0][0].stride() == x.stride()
        for g, w in zip(runs[0], want):
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=str(present))
        assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_channels_last_gradcheck_and_opcheck():
    x, kw = make((2, 8, 5), 4, OPTIONALS, dtype=torch.float64, requires_grad=True)
    xcl = channels_last(x.detach()).requires_grad_()
    fn = lambda x, *ts: group_norm_film_silu(x, 4, **dict(zip(OPTIONALS, ts)))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xcl, *kw.values()))
    torch.library.opcheck(torch.ops.imer_fast.group_norm_film_silu,
                          (xcl, kw["weight"], kw["bias"], kw["input_bias"], kw["scale"], kw["shift"].squeeze(-1), 4,
                           1e-5, True))
