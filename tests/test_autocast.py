"""imer_fast under torch.autocast: bf16 activations meet fp32 parameters, as in the Trainer's ``amp`` runs.

Every operator computes in float32 there (its inputs cast, autocast off inside it), as torch's own
normalisations do. Checked on the CPU's autocast, which goes through the same registrations as CUDA's
(``torch.library.register_autocast`` for both device types); the CUDA run is in tests/test_gpu_modules.py.
"""
import functools

import torch

from imer_fast.diffusion.disc import DISCDiffusion
from imer_fast.nn import CrossModalTransformer
from imer_fast.nn.cond_cross_attention import CondCrossAttention
from imer_fast.nn.score_net import ScoreNet
from imer_fast.ops import attention, ddim_step, group_norm_film_silu, stable_layer_norm
from imer_fast.testing.reference_imder import ReferenceScoreNet, marginal_prob_std


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_norms_take_bf16_activations_with_fp32_parameters_and_compute_in_fp32():
    x = randn(4, 16, 12, seed=0, dtype=torch.bfloat16).requires_grad_()
    w, b = randn(16, seed=1).requires_grad_(), randn(16, seed=2).requires_grad_()
    with autocast():
        y = group_norm_film_silu(x, 4, w, b)
        z = stable_layer_norm(x, w[:12], b[:12], 1e-5, True)
    assert y.dtype == z.dtype == torch.float32
    torch.testing.assert_close(y, group_norm_film_silu(x.detach().float(), 4, w, b))
    torch.testing.assert_close(z, stable_layer_norm(x.detach().float(), w[:12], b[:12], 1e-5, True))
    gx, gw = torch.autograd.grad((y.sum() + z.sum()), [x, w])
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32 and torch.isfinite(gx.float()).all()


def test_attention_takes_mixed_dtypes_and_matches_fp32():
    q, k, v = (randn(2, 4, 9, 8, seed=s, dtype=torch.bfloat16) for s in (3, 4, 5))
    null_k, null_v = randn(4, 1, 8, seed=6), randn(4, 1, 8, seed=7)  # fp32 parameters
    with autocast():
        out = attention(q, k, v, null_k=null_k, null_v=null_v, mask="causal")
    assert out.dtype == torch.float32
    want = attention(q.float(), k.float(), v.float(), null_k=null_k, null_v=null_v, mask="causal")
    torch.testing.assert_close(out, want)


def test_sampler_step_takes_a_bf16_model_output():
    x, eps = randn(2, 4, 8, seed=8), randn(2, 4, 8, seed=9, dtype=torch.bfloat16)
    with autocast():
        got = ddim_step(x, eps, alpha_bar=0.5, alpha_bar_prev=0.7)
    torch.testing.assert_close(got, ddim_step(x, eps.float(), alpha_bar=0.5, alpha_bar_prev=0.7))


def test_condition_cross_attention_and_disc_diffusion_train_under_autocast():
    torch.manual_seed(0)
    layer = CondCrossAttention(32, context_dim=6, dim_head=8, heads=4)
    x, context = randn(2, 12, 32, seed=10, dtype=torch.bfloat16), randn(2, 2, 6, seed=11)
    with autocast():
        out = layer(x, context)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)

    dims = {"text": 12, "audio": 10, "video": 8}
    model = DISCDiffusion(dims, 3, latent_channels=4, latent_length=8, timesteps=100, sampling_steps=4,
                          unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(2,), num_heads=2))
    features = {m: randn(6, d, seed=20 + d) for m, d in dims.items()}
    availability = torch.ones(6, 3, dtype=torch.bool)
    availability[:3, 0] = False
    model.fit_scaling([(features, availability)])
    with autocast():
        loss, _ = model.loss(features, availability, randn(6, 3, seed=30))
        recovered = model.recover(features, availability, randn(6, 3, seed=31), seed=1)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v.float()).all() for v in recovered.values())


def test_mult_encoder_takes_bf16_inputs_with_fp32_parameters_and_matches_fp32():
    """MulT fed by a bf16 Conv1d under autocast (as the classifiers do): the fused layer casts like the other
    operators instead of refusing its fp32 LayerNorm weights."""
    torch.manual_seed(0)
    encoder = CrossModalTransformer(16, 4, layers=2, attn_mask=True).eval()
    x, context = randn(7, 3, 16, seed=14, dtype=torch.bfloat16), randn(5, 3, 16, seed=15, dtype=torch.bfloat16)
    with autocast():
        cross = encoder(x, context, context)
        own = encoder(x)
    assert cross.dtype == own.dtype == torch.float32
    torch.testing.assert_close(cross, encoder(x.float(), context.float(), context.float()))
    torch.testing.assert_close(own, encoder(x.float()))


def test_score_net_runs_under_autocast_as_the_release_does():
    """The condition (fp32) meets bf16 conv activations in the cross-modal layers of every level."""
    std = functools.partial(marginal_prob_std, sigma=25.0)
    torch.manual_seed(0)
    ours = ScoreNet(std, channels=[32, 32, 64, 64], embed_dim=64)
    reference = ReferenceScoreNet(std, channels=[32, 32, 64, 64], embed_dim=64)
    reference.load_state_dict(ours.state_dict())
    x, cond, t = randn(2, 32, 16, seed=16), randn(2, 32, 16, seed=17), torch.tensor([0.3, 0.7])
    with autocast():
        got, want = ours(x, t, cond), reference(x, t, cond)
    assert torch.isfinite(got).all()
    # Both run bf16 convolutions; the MulT blocks of ours compute in fp32, so agree to bf16 precision only.
    torch.testing.assert_close(got.float(), want.float(), rtol=0.1, atol=0.1 * want.float().abs().max().item())


def test_float64_is_left_alone():
    x, w = randn(3, 8, seed=12, dtype=torch.float64), randn(8, seed=13, dtype=torch.float64)
    with autocast():
        assert stable_layer_norm(x, w).dtype == torch.float64
