"""ScoreNet (IMDer's score network on the fused ops) against the eager release-semantics
ReferenceScoreNet: state_dict layout and initial values, outputs and gradients (with and without a
condition, float32 and float64, on the C++ and reference backends of the fused ops), a condition of
another length, non-default widths, and input errors."""
import functools

import pytest
import torch

import imer_fast.backends
from imer_fast.nn.score_net import ScoreNet
from imer_fast.testing.reference_imder import ReferenceScoreNet, marginal_prob_std

STD = functools.partial(marginal_prob_std, sigma=25.0)
SMALL = dict(channels=[32, 32, 64, 64], embed_dim=64)


def pair(seed=0, **config):
    """(ours, reference) built from the same seed, then given the same perturbed weights (GroupNorm affine,
    biases and the injectors' LayerNorms away from their trivial initial values)."""
    torch.manual_seed(seed)
    ref = ReferenceScoreNet(STD, **config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ours = ScoreNet(STD, **config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(batch=2, length=48, cond_length=None, dtype=torch.float32, seed=2, channels0=32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 32, length, generator=gen, dtype=dtype)
    cond = torch.randn(batch, channels0, cond_length or length, generator=gen, dtype=dtype)
    cond[0, 0, 3] = 0.0  # an exact zero in feature 0: MulT gives that key the padding position
    t = torch.rand(batch, generator=gen, dtype=dtype) * 0.95 + 0.04
    return x, t, cond


def run(model, x, t, cond):
    """Output and gradients of (x, condition, every trainable parameter) for a fixed output gradient."""
    x = x.clone().requires_grad_()
    cond = cond.clone().requires_grad_() if cond is not None else None
    out = model(x, t, cond)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    leaves = [x] + ([cond] if cond is not None else []) + [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, leaves, probe, allow_unused=True)
    return out.detach(), grads


def assert_same(got, want, rtol, atol):
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol * ref_out.abs().max().item())
    assert len(grads) == len(ref_grads)
    # Gradients that are zero in exact arithmetic (the time bias before a GroupNorm of one channel per
    # group) are rounding noise in both: compare against the overall gradient scale.
    scale = max(g.abs().max().item() for g in ref_grads if g is not None)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None or not g.any(), i
        else:
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol * scale, msg=lambda m: f"gradient {i}: {m}")


def test_state_dict_layout_and_initial_values_match_the_release_order():
    torch.manual_seed(11)
    ref = ReferenceScoreNet(STD)
    torch.manual_seed(11)
    ours = ScoreNet(STD)
    keys = list(ref.state_dict())
    assert list(ours.state_dict()) == keys
    assert {"embed.0.W", "embed.1.weight", "conv1.weight", "attention_1.layers.1.self_attn.in_proj_weight",
            "dense1.dense.weight", "gnorm1.weight", "conv2_cond.weight", "attention_4.layer_norm.bias",
            "tconv4_cond.weight", "dense7.dense.bias", "tgnorm2.weight", "tconv1.bias", "tconv1_cond.bias",
            "attention_t1.version"} <= set(keys)
    assert not any(k.startswith(("conv1_cond", "dense8", "tgnorm1")) or k == "conv1.bias" for k in keys)
    for key, value in ref.state_dict().items():  # same draws in the same order
        assert torch.equal(ours.state_dict()[key], value), key
    assert not ours.embed[0].W.requires_grad and ours.embed[0].W.shape == (128,)
    assert 20 < ours.embed[0].W.std() < 40  # N(0, 30²) Fourier weights
    assert ours.gnorm1.num_groups == 4 and ours.tgnorm2.num_groups == 32
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("op_backend", ["cpp", "reference"])
@pytest.mark.parametrize("with_condition", [False, True])
def test_outputs_and_gradients_match_reference_float32(op_backend, with_condition):
    ours, ref = pair()
    x, t, cond = inputs()
    cond = cond if with_condition else None
    want = run(ref, x, t, cond)
    if op_backend == "reference":
        with imer_fast.backends.force("reference"):
            got = run(ours, x, t, cond)
    else:
        got = run(ours, x, t, cond)
    assert_same(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("with_condition", [False, True])
def test_outputs_and_gradients_match_reference_float64(with_condition):
    ours, ref = pair(seed=3, **SMALL)
    ours.double()
    ref.double()
    x, t, cond = inputs(dtype=torch.float64, length=16)
    cond = cond if with_condition else None
    # The release's attention softmax runs in float32 even for float64 inputs; ours in float64.
    tol = 1e-6 if with_condition else 1e-10
    assert_same(run(ours, x, t, cond), run(ref, x, t, cond), rtol=tol, atol=tol)


def test_condition_of_another_length_and_float32_time_with_float64_weights():
    ours, ref = pair(seed=4, **SMALL)
    x, t, cond = inputs(length=24, cond_length=20)
    assert_same(run(ours, x, t, cond), run(ref, x, t, cond), rtol=1e-4, atol=2e-5)
    # ve_sde_loss hands float32 times (torch's default dtype) to float64 models, as the release does.
    ours.double()
    ref.double()
    x, cond = x.double(), cond.double()
    torch.testing.assert_close(ours(x, t, cond), ref(x, t, cond), rtol=1e-6, atol=1e-6)


def test_non_default_widths_match_reference():
    ours, ref = pair(seed=5, channels=[64, 32, 32, 64], embed_dim=32)
    x, t, cond = inputs(length=8, channels0=64)
    assert ours.attention_1.embed_dim == 64 and ours.attention_t1.embed_dim == 32
    assert_same(run(ours, x, t, cond), run(ref, x, t, cond), rtol=1e-4, atol=2e-5)


def test_output_is_divided_by_the_marginal_std():
    torch.manual_seed(0)
    ours = ScoreNet(STD, **SMALL)
    x, t, _ = inputs(length=8)
    scaled = ScoreNet(lambda s: 2 * STD(s), **SMALL)
    scaled.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, t), ours(x, t) / 2)


def test_bitwise_repeatable():
    ours, _ = pair(seed=6, **SMALL)
    x, t, cond = inputs(length=16)
    a, b = run(ours, x, t, cond), run(ours, x, t, cond)
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(p, q) for p, q in zip(a[1], b[1]) if p is not None)


def test_input_errors_name_the_argument():
    torch.manual_seed(0)
    model = ScoreNet(STD, **SMALL)
    x, t, cond = inputs(length=16)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        model(x[:, :16], t)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        model(x[0], t)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        model(x.long(), t)
    with pytest.raises(ValueError, match="x is torch.float64 but the model's parameters are torch.float32"):
        model(x.double(), t.double())
    with pytest.raises(ValueError, match="length of x"):
        model(x[:, :, :12], t)
    with pytest.raises(ValueError, match="t must be a floating tensor"):
        model(x, t[:1])
    with pytest.raises(ValueError, match="t must be a floating tensor"):
        model(x, t[0])
    with pytest.raises(ValueError, match="t must be a floating tensor"):
        model(x, torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="condition must be"):
        model(x, t, cond[:1])
    with pytest.raises(ValueError, match="condition must be"):
        model(x, t, cond[:, :16])
    with pytest.raises(ValueError, match="condition is torch.float64"):
        model(x, t, cond.double())
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        model(bad, t)
    bad_cond = cond.clone()
    bad_cond[-1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="condition contains NaN"):
        model(x, t, bad_cond)
    for times in (torch.zeros_like(t), t + 1.0):
        with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
            model(x, times)
    with pytest.raises(ValueError, match="channels must list 4"):
        ScoreNet(STD, channels=[32, 64, 128])
