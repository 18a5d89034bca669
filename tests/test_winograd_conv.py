"""winograd_conv1d: equality with F.conv1d, gradients, opcheck, fuzz, layouts, errors, and the U-Net's
reuse of transformed weights inside a sampler."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imer_fast.diffusion import GaussianDiffusion
from imer_fast.nn import ConditionalUNet1d
from imer_fast.nn.conditional_unet import Conv1d, reuse_transformed_weights
from imer_fast.ops import (fewest_rows_tile, select_winograd_conv1d_backend, winograd_conv1d, winograd_conv1d_ref,
                           winograd_weight)
from imer_fast.ops.winograd_conv import TRANSFORMS
from imer_fast.testing.reference_feddisc import ReferenceUNetModel


def _conv1d(x, w, b):
    """F.conv1d(..., padding=1) where it is defined; it rejects L = 0 and Co = 0 and gets C = 0 wrong
    (it returns [B, 0, L]): there the convolution is the bias alone, broadcast to [B, Co, L]."""
    if 0 in x.shape or 0 in w.shape:
        out = x.new_zeros(x.shape[0], w.shape[0], x.shape[2])
        return out if b is None else out + b[:, None]
    return F.conv1d(x, w, b, padding=1)


def _case(b, c, co, length, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, length, generator=g, dtype=dtype)
    w = torch.randn(co, c, 3, generator=g, dtype=dtype) / (3 * max(c, 1)) ** 0.5
    bb = torch.randn(co, generator=g, dtype=dtype) if bias else None
    return x, w, bb


TILES = [2, 4, 6]  # outputs per tile: F(2, 3), F(4, 3) and F(6, 3)


@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (3, 4, 6, 7), (1, 3, 2, 1), (2, 1, 1, 2), (4, 64, 33, 48),
                                   (2, 3, 4, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tile", TILES)
def test_equals_conv1d_float64(backend, shape, bias, tile):
    x, w, b = _case(*shape, bias=bias)
    out = winograd_conv1d(x, winograd_weight(w, tile), b)
    assert out.shape == (shape[0], shape[2], shape[3])
    torch.testing.assert_close(out, F.conv1d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", TILES)
def test_ref_equals_conv1d_float64(tile):
    x, w, b = _case(3, 6, 5, 9)
    torch.testing.assert_close(winograd_conv1d_ref(x, winograd_weight(w, tile), b), F.conv1d(x, w, b, padding=1),
                               rtol=1e-12, atol=1e-12)


def test_transform_matrices_reproduce_the_convolution():
    # Y = AT [(G g) * (BT d)] is the correlation of a tile's R inputs with the 3 taps, for any g and d.
    for n, (BT, G, AT) in TRANSFORMS.items():
        g, d = torch.randn(3, dtype=torch.float64), torch.randn(n + 2, dtype=torch.float64)
        expected = torch.stack([(g * d[i:i + 3]).sum() for i in range(n)])
        torch.testing.assert_close(AT @ ((G @ g) * (BT @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile,factor", [(2, 4), (4, 16), (6, 20)])
def test_float32_within_rounding_of_conv1d(backend, tile, factor):
    # F(4, 3)'s transforms scale by up to 8, so its rounding is ~10x the direct convolution's
    # (still ~1e-6 relative here); F(6, 3)'s (integers up to 21, powers of two to 32) ~1.2x F(4, 3)'s;
    # F(2, 3)'s stays within a few times the direct convolution's.
    x, w, b = _case(8, 128, 96, 24, dtype=torch.float32)
    out = winograd_conv1d(x, winograd_weight(w, tile), b)
    exact = F.conv1d(x.double(), w.double(), b.double(), padding=1)
    direct = F.conv1d(x, w, b, padding=1)
    err_ours, err_direct = (out.double() - exact).abs().max(), (direct.double() - exact).abs().max()
    assert err_ours < factor * err_direct + 1e-6, (err_ours, err_direct)
    assert err_ours < 2e-5 * exact.abs().max(), err_ours


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_are_computed_in_float32_and_rounded_once(dtype):
    x, w, b = _case(4, 64, 64, 48, dtype=torch.float32)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    out = winograd_conv1d(x, winograd_weight(w, 6), b)
    assert out.dtype == dtype
    want = winograd_conv1d(x.float(), winograd_weight(w, 6).float(), b.float()).to(dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_output_is_channels_last_and_input_layout_does_not_matter(backend):
    x, w, b = _case(3, 8, 5, 10)
    weight_tf = winograd_weight(w)
    channels_last = x.transpose(1, 2).contiguous().transpose(1, 2)
    strided = torch.randn(3, 8, 20, dtype=torch.float64)[:, :, ::2]
    out = winograd_conv1d(channels_last, weight_tf, b)
    assert out.stride() == (10 * 5, 1, 5)
    torch.testing.assert_close(out, winograd_conv1d(x, weight_tf, b), rtol=0, atol=0)
    torch.testing.assert_close(winograd_conv1d(strided, weight_tf, b), F.conv1d(strided, w, b, padding=1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 4, 3, 6), (2, 4, 3, 0), (2, 0, 3, 5), (2, 4, 0, 5)])
@pytest.mark.parametrize("tile", TILES)
def test_zero_size(backend, shape, tile):
    x, w, b = _case(*shape)
    out = winograd_conv1d(x, winograd_weight(w, tile), b)
    torch.testing.assert_close(out, _conv1d(x, w, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("length", [1, 4, 7])
@pytest.mark.parametrize("tile", TILES)
def test_gradcheck_float64(backend, length, tile):
    x, w, b = _case(2, 3, 4, length)
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: winograd_conv1d(x, winograd_weight(w, tile), b), inputs)
    assert torch.autograd.gradgradcheck(lambda x, w, b: winograd_conv1d(x, winograd_weight(w, tile), b), inputs)


@pytest.mark.parametrize("tile", TILES)
def test_gradients_equal_conv1d_gradients_float64(tile):
    x, w, b = _case(3, 5, 6, 9)
    grad = torch.randn(3, 6, 9, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    winograd_conv1d(ours[0], winograd_weight(ours[1], tile), ours[2]).backward(grad)
    F.conv1d(theirs[0], theirs[1], theirs[2], padding=1).backward(grad)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", TILES)
def test_opcheck(tile):
    x, w, b = _case(2, 6, 5, 7, dtype=torch.float32)
    weight_tf = winograd_weight(w, tile).requires_grad_()
    residual = torch.randn(2, 5, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.imer_fast.winograd_conv1d.default, (x.requires_grad_(), weight_tf, b, None))
    torch.library.opcheck(torch.ops.imer_fast.winograd_conv1d.default, (x.detach(), weight_tf.detach(), None, None))
    torch.library.opcheck(torch.ops.imer_fast.winograd_conv1d.default, (x, weight_tf, b, residual))


# ---- the residual epilogue --------------------------------------------------------------------------


@pytest.mark.parametrize("tile", TILES)
def test_residual_adds_after_the_bias_like_a_separate_add(backend, tile):
    # (conv + bias) + residual in that order: the same floats as adding the residual afterwards.
    x, w, b = _case(4, 16, 12, 13, dtype=torch.float32)
    weight_tf = winograd_weight(w, tile)
    residual = torch.randn(4, 13, 12).transpose(1, 2)  # channels-last, as the U-Net's shortcuts
    fused = winograd_conv1d(x, weight_tf, b, residual)
    assert torch.equal(fused, winograd_conv1d(x, weight_tf, b) + residual)
    strided = torch.randn(4, 12, 26)[:, :, ::2]
    torch.testing.assert_close(winograd_conv1d(x, weight_tf, None, strided), winograd_conv1d(x, weight_tf) + strided,
                               rtol=0, atol=0)


@pytest.mark.parametrize("tile", TILES)
def test_float32_vector_lanes_and_channel_tail(backend, tile):
    # 40 input and 36 output channels: 16-lane vectors plus a scalar tail in both CPU transforms.
    x, w, b = _case(4, 40, 36, 13, dtype=torch.float32)
    weight_tf = winograd_weight(w, tile)
    residual = torch.randn(4, 13, 36).transpose(1, 2)
    fused = winograd_conv1d(x, weight_tf, b, residual)
    assert torch.equal(fused, winograd_conv1d(x, weight_tf, b) + residual)
    exact = F.conv1d(x.double(), w.double(), b.double(), padding=1) + residual.double()
    torch.testing.assert_close(fused.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", TILES)
def test_residual_equals_conv1d_plus_residual_float64_with_gradients(backend, tile):
    x, w, b = _case(2, 3, 4, 7)
    residual = torch.randn(2, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(winograd_conv1d(x, winograd_weight(w, tile), b, residual),
                               F.conv1d(x, w, b, padding=1) + residual, rtol=1e-12, atol=1e-12)
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b, residual))
    assert torch.autograd.gradcheck(lambda x, w, b, r: winograd_conv1d(x, winograd_weight(w, tile), b, r), inputs)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(0, 3), c=st.integers(1, 9), co=st.integers(1, 9), length=st.integers(0, 13),
       bias=st.booleans(), tile=st.sampled_from(TILES), seed=st.integers(0, 2 ** 16))
def test_fuzz_shapes(b, c, co, length, bias, tile, seed):
    x, w, bb = _case(b, c, co, length, bias=bias, seed=seed)
    torch.testing.assert_close(winograd_conv1d(x, winograd_weight(w, tile), bb), _conv1d(x, w, bb),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", TILES)
def test_bitwise_repeatable(backend, tile):
    x, w, b = _case(16, 96, 80, 24, dtype=torch.float32)
    weight_tf = winograd_weight(w, tile)
    first = winograd_conv1d(x, weight_tf, b)
    for _ in range(3):
        assert torch.equal(winograd_conv1d(x, weight_tf, b), first)


def test_inference_mode_then_normal_calls():
    """The C++ kernel's per-thread scratch made under torch.inference_mode() must not be written by
    later calls outside it (out= into an inference tensor is an error there). Larger than any other
    test's problem, so that the inference-mode call is the one that allocates the scratch."""
    x, w = torch.randn(8, 128, 1024, dtype=torch.float64), torch.randn(128, 128, 3, dtype=torch.float64)
    weight_tf = winograd_weight(w, 4)
    with torch.inference_mode():
        first = winograd_conv1d(x, weight_tf)
    with torch.no_grad():
        torch.testing.assert_close(winograd_conv1d(x, weight_tf), first)
    torch.testing.assert_close(first, F.conv1d(x, w, padding=1))


def test_fewest_rows_tile_minimises_gemm_rows():
    for length in range(1, 100):
        rows = {n: (n + 2) * -(-length // n) for n in TILES}
        assert rows[fewest_rows_tile(length)] == min(rows.values()), length
    assert [fewest_rows_tile(length) for length in (48, 24, 12, 6, 8, 4, 1)] == [6, 6, 6, 6, 4, 4, 2]


def test_backend_selection():
    assert select_winograd_conv1d_backend(torch.zeros(1, 1, 1)).backend == "cpp"
    assert select_winograd_conv1d_backend(torch.zeros(1, 1, 1, dtype=torch.float16)).backend == "reference"


def test_errors_name_the_argument():
    x, w, b = _case(2, 4, 3, 6)
    weight_tf = winograd_weight(w)
    with pytest.raises(ValueError, match="winograd_weight: weight must be a Conv1d weight"):
        winograd_weight(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"outputs_per_tile must be one of \[2, 4, 6\]; got 3"):
        winograd_weight(w, 3)
    with pytest.raises(ValueError, match=r"winograd_conv1d: x must be a floating tensor \[B, C, L\]"):
        winograd_conv1d(x[0], weight_tf, b)
    with pytest.raises(ValueError, match=r"weight_tf must be \[R, C = 4, Co\] with R = 4, 6 or 8"):
        winograd_conv1d(x, w, b)
    with pytest.raises(ValueError, match="weight_tf must match x"):
        winograd_conv1d(x, weight_tf.float(), b)
    with pytest.raises(ValueError, match=r"bias must be a \[Co = 3\]"):
        winograd_conv1d(x, weight_tf, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"residual must be a \[B, Co, L\] = \[2, 3, 6\] torch.float64 tensor"):
        winograd_conv1d(x, weight_tf, b, torch.zeros(2, 3, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"imer_fast::winograd_conv1d: residual must be a \[B, Co, L\]"):
        torch.ops.imer_fast.winograd_conv1d(x, weight_tf, None, torch.zeros(2, 3, 6))
    with pytest.raises(RuntimeError, match="imer_fast::winograd_conv1d: x and weight_tf must share a dtype"):
        torch.ops.imer_fast.winograd_conv1d(x, weight_tf.float(), None, None)


# ---- the U-Net's use of it -----------------------------------------------------------------------


def _unet_pair(seed=0):
    torch.manual_seed(seed)
    ours = ConditionalUNet1d(label_num=6).eval()
    reference = ReferenceUNetModel(label_num=6).eval()
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def test_unet_inside_reuse_block_equals_reference_and_plain_path():
    ours, reference = _unet_pair()
    x, t, y = torch.randn(4, 32, 48), torch.randint(0, 1000, (4,)), torch.softmax(torch.randn(4, 6), -1)
    with torch.no_grad():
        expected, plain = reference(x, t, y), ours(x, t, y)
        with reuse_transformed_weights():
            first, second = ours(x, t, y), ours(x, t, y)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first, plain, rtol=1e-4, atol=1e-5)
    assert not any(m._winograd_copy for m in ours.modules() if isinstance(m, Conv1d))  # dropped on exit


def test_reuse_block_sees_in_place_weight_updates():
    conv = Conv1d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 10)
    with torch.no_grad(), reuse_transformed_weights():
        conv(x)
        conv.weight.mul_(2)  # bumps the version: the transformed copy is rebuilt (a stale one is off by O(1))
        torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight, conv.bias, padding=1), rtol=1e-4, atol=1e-4)
        conv.weight = torch.nn.Parameter(torch.randn(64, 64, 3) * 0.07)  # a new tensor
        torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight, conv.bias, padding=1), rtol=1e-4, atol=1e-4)


def test_reuse_block_keeps_autograd_on_the_direct_convolution():
    conv = Conv1d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 10, requires_grad=True)
    with reuse_transformed_weights():
        conv(x).sum().backward()
    assert conv._winograd_copy is None and conv.weight.grad is not None


def test_one_tap_convolution_rows_path_matches_conv1d_with_gradients():
    conv = Conv1d(12, 7, 1)
    x = torch.randn(3, 10, 12).transpose(1, 2).requires_grad_()
    out = conv(x)
    expected = F.conv1d(x, conv.weight, conv.bias)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (x, conv.weight, conv.bias))
    expected_grads = torch.autograd.grad(expected.sum(), (x, conv.weight, conv.bias))
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e)


def test_ddim_sampler_uses_reuse_block_and_matches_reference_sampler():
    ours, reference = _unet_pair(seed=1)
    diffusion = GaussianDiffusion(1000)
    y = torch.softmax(torch.randn(3, 6), -1)
    noise = torch.randn(3, 32, 48)
    fast = diffusion.ddim_sample(ours, y, 48, 3, 32, ddim_timesteps=5, noise=noise)
    slow = diffusion.ddim_sample(reference, y, 48, 3, 32, ddim_timesteps=5, noise=noise)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
