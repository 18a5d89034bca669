"""DiT1d against the DiT paper's math: adaLN-Zero initialisation, the block and final layer written out by
hand, the timestep and position tables, shapes, bad input, and a float64 gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from imer_fast.nn.dit import DiT1d, DiTBlock, FinalLayer, TimestepEmbedder, sincos_positions


def tiny(**kwargs):
    torch.manual_seed(0)
    return DiT1d(**{**dict(in_channels=6, length=5, hidden_size=16, depth=2, num_heads=4, cond_channels=3), **kwargs})


def randomise(module, std=0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def test_adaln_zero_initialisation_gives_identity_blocks_and_zero_output():
    model = tiny()
    x, t, cond = torch.randn(3, 6, 5), torch.tensor([0, 7, 99]), torch.randn(3, 3, 4)
    assert torch.equal(model(x, t, cond), torch.zeros(3, 6, 5))
    h, c = torch.randn(3, 5, 16), torch.randn(3, 16)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)  # gates α₁ = α₂ = 0
    assert torch.equal(model.final_layer(h, c), torch.zeros(3, 5, 6))


def reference_block(block: DiTBlock, x, c):
    """The DiT paper's adaLN-Zero block with torch's own LayerNorm, attention and GELU."""
    b, length, d = x.shape
    s1, g1, a1, s2, g2, a2 = F.linear(F.silu(c), block.adaLN_modulation[1].weight,
                                      block.adaLN_modulation[1].bias).chunk(6, dim=1)

    def norm_mod(h, shift, scale):
        return F.layer_norm(h, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    qkv = block.qkv(norm_mod(x, s1, g1)).view(b, length, 3, block.num_heads, d // block.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, d)
    x = x + a1[:, None] * block.proj(attn)
    mlp = block.fc2(F.gelu(block.fc1(norm_mod(x, s2, g2)), approximate="tanh"))
    return x + a2[:, None] * mlp


def test_block_and_final_layer_match_the_paper_formulas():
    block, final = DiTBlock(16, 4), FinalLayer(16, 6)
    randomise(block)
    randomise(final)
    x, c = torch.randn(3, 5, 16), torch.randn(3, 16)
    torch.testing.assert_close(block(x, c), reference_block(block, x, c), atol=1e-5, rtol=1e-5)
    shift, scale = F.linear(F.silu(c), final.adaLN_modulation[1].weight, final.adaLN_modulation[1].bias).chunk(2, 1)
    expected = final.linear(F.layer_norm(x, (16,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(final(x, c), expected, atol=1e-5, rtol=1e-5)


def test_whole_network_matches_composition_of_reference_parts():
    model = tiny()
    randomise(model)
    x, t, cond = torch.randn(2, 6, 5), torch.tensor([3, 50]), torch.randn(2, 3, 7)
    c = model.t_embedder(t) + model.y_embedder(cond.mean(dim=2))
    h = model.x_embedder(x.transpose(1, 2)) + model.pos_embed
    for block in model.blocks:
        h = reference_block(block, h, c)
    torch.testing.assert_close(model(x, t, cond), model.final_layer(h, c).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_timestep_features_and_sincos_positions():
    emb = TimestepEmbedder(8, frequency_size=6)
    t = torch.tensor([0.0, 3.0, 250.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(3) / 3)
    features = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb(t), emb.mlp(features))
    table = sincos_positions(4, 6)
    omega = 1.0 / 10000 ** (torch.arange(3, dtype=torch.float64) / 3)
    p = torch.arange(4, dtype=torch.float64)[:, None] * omega
    torch.testing.assert_close(table, torch.cat([p.sin(), p.cos()], 1).float())
    fixed = tiny(positions="sinusoidal")
    assert "pos_embed" not in dict(fixed.named_parameters()) and fixed.pos_embed.shape == (1, 5, 16)
    assert tiny().pos_embed.requires_grad


def test_release_sizes_and_shapes():
    model = DiT1d()  # hidden 64, depth 6, 16 heads, MLP ratio 4, learned positions (1, 48, 64)
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 48, 64) and state["x_embedder.weight"].shape == (64, 32)
    assert state["y_embedder.weight"].shape == (64, 32) and state["blocks.5.fc1.weight"].shape == (256, 64)
    assert state["blocks.0.adaLN_modulation.1.weight"].shape == (384, 64)
    assert state["final_layer.linear.weight"].shape == (32, 64) and "blocks.6.qkv.weight" not in state
    out = model(torch.randn(2, 32, 48), torch.tensor([1, 999]), torch.randn(2, 32, 48))
    assert out.shape == (2, 32, 48)


def test_gradcheck_float64():
    model = tiny(depth=1).double()
    randomise(model)
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([4, 17])
    assert torch.autograd.gradcheck(lambda a, b: model(a, t, b), (x, cond))


def test_bad_input_names_the_argument():
    model = tiny()
    with pytest.raises(ValueError, match=r"DiT1d: x must be .*\[B, 6, 5\]"):
        model(torch.randn(2, 6, 4), torch.tensor([1, 2]), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="DiT1d: t must be"):
        model(torch.randn(2, 6, 5), torch.tensor([1]), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="DiT1d: condition must be"):
        model(torch.randn(2, 6, 5), torch.tensor([1, 2]), torch.randn(2, 4, 4))
    x, t, condition = torch.randn(2, 6, 5), torch.tensor([1, 2]), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="DiT1d: x is torch.float64 but the model's parameters are torch.float32"):
        model(x.double(), t, condition.double())
    for bad_x, name in ((x.clone().fill_(float("nan")), "x"), (x, "condition")):
        bad_c = condition.clone()
        if name == "condition":
            bad_c[1, 0, 0] = float("inf")
        with pytest.raises(ValueError, match=f"DiT1d: {name} contains NaN or inf"):
            model(bad_x, t, bad_c)
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_heads"):
        DiT1d(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="positions"):
        DiT1d(positions="rotary")
