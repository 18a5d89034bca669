"""ConditionalUNet1d against the release-semantics ReferenceUNetModel: state_dict, init, outputs, gradients."""
import pytest
import torch

from imer_fast.nn.conditional_unet import ConditionalUNet1d
from imer_fast.testing.reference_feddisc import ReferenceUNetModel

SMALL = dict(label_num=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
             num_heads=2)
CONFIGS = {"release-default": dict(label_num=6), "small": SMALL}


def pair(config, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceUNetModel(**config)
    torch.manual_seed(seed)
    ours = ConditionalUNet1d(**config)
    return ref, ours


def inputs(config, batch=3, length=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 32, length, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.softmax(torch.randn(batch, config["label_num"], generator=g), 1)
    return x, t, y


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_state_dict_keys_shapes_and_init(name):
    ref, ours = pair(CONFIGS[name])
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ours.load_state_dict(a, strict=True)
    ref.load_state_dict(b, strict=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_and_gradients_match_reference(name):
    config = CONFIGS[name]
    ref, ours = pair(config)
    torch.manual_seed(5)  # different weights from the init test: load ours from the reference
    for p in ref.parameters():
        p.data.normal_(0, 0.2) if p.dim() == 1 else None
    ours.load_state_dict(ref.state_dict())
    x, t, y = inputs(config)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    xo, yo = x.clone().requires_grad_(), y.clone().requires_grad_()
    out_ref, out = ref(xr, t, yr), ours(xo, t, yo)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    probe = torch.randn_like(out)
    (out_ref * probe).sum().backward()
    (out * probe).sum().backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for (n, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5 * scale, msg=n)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(yo.grad, yr.grad, rtol=1e-3, atol=1e-5)


def test_one_timestep_for_the_whole_batch_matches_reference():
    """A sampler step (every t equal) runs the time MLP on one broadcast row: same outputs and
    gradients (the time MLP's included) as the reference's per-row computation."""
    ref, ours = pair(CONFIGS["release-default"])
    x, _, y = inputs(CONFIGS["release-default"], batch=4)
    t = torch.full((4,), 637)
    out_ref, out = ref(x, t, y), ours(x, t, y)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for name in ("time_embed.0.weight", "down_blocks.1.0.time_emb.1.weight"):
        p_ref, p = ref.get_parameter(name), ours.get_parameter(name)
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_other_lengths_and_batch_of_one():
    ref, ours = pair(SMALL)
    for length, batch in ((16, 1), (24, 2)):
        x, t, y = inputs(SMALL, batch, length)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t, y), ref(x, t, y), rtol=1e-4, atol=1e-5)


def test_repeatable():
    _, ours = pair(SMALL)
    x, t, y = inputs(SMALL)
    with torch.no_grad():
        assert torch.equal(ours(x, t, y), ours(x, t, y))


def test_errors_name_the_argument():
    _, ours = pair(SMALL)
    x, t, y = inputs(SMALL)
    with pytest.raises(ValueError, match=r"length of x \(L = 47\) must be divisible by .* = 2"):
        ours(torch.randn(3, 32, 47), t, y)
    with pytest.raises(ValueError, match=r"x must be \[B, in_channels=32, L\]"):
        ours(torch.randn(3, 16, 48), t, y)
    with pytest.raises(ValueError, match="t must be an integer tensor"):
        ours(x, t.float(), y)
    with pytest.raises(ValueError, match=r"y must be \[B = 3, label_num = 3\]"):
        ours(x, t, y[:, :2])
    with pytest.raises(ValueError, match="y is torch.float64 but the model's parameters are torch.float32"):
        ours(x, t, y.double())
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        ours(bad, t, y)
    bad_y = y.clone()
    bad_y[1, 0] = float("nan")
    with pytest.raises(ValueError, match="y contains NaN"):
        ours(x, t, bad_y)
    with pytest.raises(ValueError, match="x is torch.float64 but the model's parameters are torch.float32"):
        ours(x.double(), t, y)
    with pytest.raises(ValueError, match="length L >= 1"):
        ours(x[:, :, :0], t, y)
    empty = ours(x[:0], t[:0], y[:0])  # an empty sampler batch
    assert empty.shape == (0, 32, x.shape[2])
    with pytest.raises(ValueError, match="model_channels must be a multiple of 32"):
        ConditionalUNet1d(model_channels=48)
