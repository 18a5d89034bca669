"""RoHyDR model: release names and shapes, the RCAN refiner against its formulas, label- and ground-truth-free
prediction, recovery of exactly the missing entries, sequence inputs, fused vs eager-twin parity, bad input."""
import dataclasses

import pytest
import torch

from imer_fast.data import MODALITIES, make_loader, make_synthetic
from imer_fast.models.rohydr import RoHyDR
from imer_fast.nn.rcan import ChannelAttention, ResidualChannelAttentionBlock, ResidualGroup

TINY = dict(latent_channels=8, latent_length=8, dit=dict(hidden_size=16, depth=1, num_heads=2), timesteps=25,
            sampling_steps=3, refiner_blocks=1, refiner_reduction=4, mult=dict(num_heads=2, layers=1, mem_layers=1),
            reconstructor_hidden=(8, 8), discriminator_hidden=(8, 8))


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("mosi", seed=0, scale=0.1, feature_dims=6)


def first_batch(corpus, missing="gcnet:0.5", batch_size=3):
    return next(iter(make_loader(corpus, "train", batch_size, missing=missing, seed=0)))


def tiny_model(corpus, **kwargs):
    torch.manual_seed(0)
    model = RoHyDR(corpus.feature_dims, **{**TINY, **kwargs})
    packed = first_batch(corpus, "none", batch_size=6).packed()
    if model.recovery_mode == "diffusion":
        model.fit_scaling([(packed.features, packed.availability)])
    return model.eval()


def test_state_dict_follows_the_release_names_and_shapes():
    """trains/mainNets/model/rohydr.py at MOSI settings (docs/releases/rohydr.md §2)."""
    model = RoHyDR({"text": 768, "audio": 5, "video": 20}, input_length=50)
    state = model.state_dict()
    assert state["proj_l.weight"].shape == (32, 768, 3) and "proj_l.bias" not in state
    assert state["proj_a.weight"].shape == (32, 5, 3) and state["proj_v.weight"].shape == (32, 20, 3)
    for name in ("cat_lv", "cat_la", "cat_va"):
        assert state[f"{name}.weight"].shape == (32, 64, 1)
    for s in "lav":
        assert state[f"score_{s}.pos_embed"].shape == (1, 48, 64)
        assert state[f"rec_{s}.0.weight"].shape == (64, 32, 1) and state[f"rec_{s}.2.weight"].shape == (32, 64, 1)
        assert state[f"rec_{s}.1.body.19.body.3.conv_du.0.weight"].shape == (4, 64, 1)  # reduction 16
        assert state[f"rec_{s}.1.body.20.weight"].shape == (64, 64, 3) and f"rec_{s}.1.body.21.weight" not in state
        assert state[f"trans_{s}_mem.layers.3.fc1.weight"].shape == (256, 64)  # max(nlevels 4, 3) layers
    assert state["trans_l_with_a.layers.3.self_attn.in_proj_weight"].shape == (96, 32)
    assert state["proj1.weight"].shape == (192, 192) and state["out_layer.weight"].shape == (1, 192)
    rec = {k: v.shape for k, v in state.items() if k.startswith("reconstruction.") and k.endswith("weight")}
    assert rec == {"reconstruction.model.0.weight": (80, 192), "reconstruction.model.3.weight": (96, 80),
                   "reconstruction.model.5.weight": (96,), "reconstruction.model.7.weight": (192, 96)}
    disc = {k: v.shape for k, v in state.items() if k.startswith("discriminator.") and k.endswith("weight")}
    assert disc == {"discriminator.model.0.weight": (192,), "discriminator.model.1.weight": (128, 192),
                    "discriminator.model.3.weight": (64, 128), "discriminator.model.5.weight": (1, 64)}
    assert model.trans_l_with_a.attn_dropout == 0.5 and model.output_dropout == 0.5
    # RoHyDR's encoders (subNets_adv) add no positions: scaled inputs only, no embed_positions buffer
    assert not [k for k in state if "embed_positions" in k]
    assert all(getattr(model, f"trans_{s}").embed_positions is None
               for s in ("l_with_a", "l_with_v", "a_with_l", "a_with_v", "v_with_l", "v_with_a", "l_mem", "a_mem",
                         "v_mem"))
    z = model.project("text", torch.randn(2, 50, 768))
    assert z.shape == (2, 32, 48)  # T = 50 -> 48 steps


def test_rcan_parts_match_their_formulas():
    torch.manual_seed(0)
    ca = ChannelAttention(8, reduction=4)
    x = torch.randn(3, 8, 5)
    w1, b1 = ca.conv_du[0].weight[:, :, 0], ca.conv_du[0].bias
    w2, b2 = ca.conv_du[2].weight[:, :, 0], ca.conv_du[2].bias
    gate = torch.sigmoid(torch.relu(x.mean(2) @ w1.T + b1) @ w2.T + b2)  # [N, C]
    torch.testing.assert_close(ca(x), x * gate[:, :, None])
    block = ResidualChannelAttentionBlock(8, 4, res_scale=0.5)
    conv1, conv2 = block.body[0], block.body[2]
    inner = conv2(torch.relu(conv1(x)))
    torch.testing.assert_close(block(x), x + 0.5 * block.body[3](inner))
    group = ResidualGroup(8, num_blocks=2, reduction=4)
    torch.testing.assert_close(group(x), x + group.body[2](group.body[1](group.body[0](x))))
    with pytest.raises(ValueError, match="multiple of reduction"):
        ChannelAttention(8, reduction=16)


def test_prediction_reads_neither_labels_nor_missing_ground_truth(corpus):
    model = tiny_model(corpus)
    batch = first_batch(corpus)
    packed = batch.packed()
    assert (~packed.availability).any() and packed.availability.any(1).all()
    scrambled = dataclasses.replace(batch, labels=torch.randn_like(batch.labels),
                                    ground_truth={m: torch.randn_like(v) for m, v in batch.ground_truth.items()})
    with torch.no_grad():
        a, b = model(batch, seed=5), model(scrambled, seed=5)
    assert torch.equal(a["prediction"], b["prediction"]) and a["prediction"].shape == (packed.num_utterances,)
    # unavailable features are never read either: replace them by noise
    noisy = {m: torch.where(packed.availability[:, k:k + 1], packed.features[m], torch.randn_like(packed.features[m]))
             for k, m in enumerate(MODALITIES)}
    with torch.no_grad():
        c = model.predict(noisy, packed.availability, seed=5)
    torch.testing.assert_close(c["prediction"], a["prediction"])


def test_only_missing_entries_are_generated_and_zero_fill_keeps_zeros(corpus):
    model = tiny_model(corpus)
    packed = first_batch(corpus).packed()
    with torch.no_grad():
        out = model(packed, seed=1)
        for k, m in enumerate(MODALITIES):
            present = packed.availability[:, k]
            truth = model.project(m, packed.features[m])
            assert torch.equal(out["latents"][m][present], truth[present])
            assert (out["latents"][m][~present].abs().sum(dim=(1, 2)) > 0).all()
        again = model(packed, seed=1)
    assert torch.equal(out["prediction"], again["prediction"])  # seeded sampling is repeatable
    zero = tiny_model(corpus, recovery="zero")
    assert not any(k.startswith(("score_", "rec_", "cat_", "reconstruction.", "discriminator."))
                   for k in zero.state_dict())
    assert set(zero.parameter_groups()) == {"fusion"}
    with torch.no_grad():
        z = zero(packed)
    for k, m in enumerate(MODALITIES):
        assert not z["latents"][m][~packed.availability[:, k]].any()


def test_condition_is_the_single_latent_or_the_merged_pair(corpus):
    model = tiny_model(corpus)
    z = {m: torch.randn(3, 8, 8) for m in MODALITIES}
    avail = torch.tensor([[False, True, True], [False, True, False], [False, False, True]])
    cond, has = model.condition("text", z, avail)  # text missing: video‖audio through cat_va
    torch.testing.assert_close(cond[0], model.cat_va(torch.cat([z["video"], z["audio"]], 1))[0])
    assert torch.equal(cond[1], z["audio"][1]) and torch.equal(cond[2], z["video"][2]) and has.all()
    _, none = model.condition("text", z, torch.tensor([[True, False, False]]).expand(3, 3))
    assert not none.any()


def test_fused_model_matches_the_eager_twin(corpus):
    model = tiny_model(corpus)
    twin = RoHyDR(corpus.feature_dims, layers="reference", **TINY).eval()
    twin.load_state_dict(model.state_dict())
    batch = first_batch(corpus)
    with torch.no_grad():
        ours, ref = model(batch, seed=3), twin(batch, seed=3)
    for m in MODALITIES:
        torch.testing.assert_close(ours["latents"][m], ref["latents"][m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours["prediction"], ref["prediction"], atol=1e-4, rtol=1e-4)


def test_score_generator_trains_and_samples(corpus):
    model = tiny_model(corpus, generator="score", latent_channels=32, mult=dict(num_heads=4, layers=1, mem_layers=1),
                       score=dict(channels=(32, 32, 32, 32), embed_dim=16))
    z = torch.randn(2, 32, 8)
    loss = model.generator_loss("audio", z, torch.randn(2, 32, 8))
    loss.backward()
    assert torch.isfinite(loss) and model.score_a.conv1.weight.grad is not None
    with torch.no_grad():
        out = model(first_batch(corpus), seed=2, steps=3)
    assert torch.isfinite(out["prediction"]).all()
    assert all(torch.isfinite(v).all() for v in out["latents"].values())


def test_classification_head_and_bad_input(corpus):
    clf = RoHyDR(corpus.feature_dims, task="classification", num_classes=3, recovery="zero", **TINY).eval()
    with torch.no_grad():
        assert clf(first_batch(corpus))["prediction"].shape[1] == 3
    with pytest.raises(ValueError, match="RoHyDR: feature_dims .*video"):
        RoHyDR({"text": 4, "audio": 4})
    with pytest.raises(ValueError, match="RoHyDR: generator must be one of"):
        RoHyDR(corpus.feature_dims, generator="unet")
    with pytest.raises(ValueError, match="RoHyDR: num_classes"):
        RoHyDR(corpus.feature_dims, task="classification")
    with pytest.raises(ValueError, match="RoHyDR: input_length must be latent_length \\+ 2 = 50"):
        RoHyDR(corpus.feature_dims, input_length=48)
    with pytest.raises(ValueError, match="generator='score'.*latent_channels = 32"):
        RoHyDR(corpus.feature_dims, generator="score", latent_channels=16)
    model = tiny_model(corpus)
    packed = first_batch(corpus).packed()
    with pytest.raises(ValueError, match=r"RoHyDR: features\['text'\] must be \[N, 6\]"):
        model.predict({**packed.features, "text": torch.zeros(packed.num_utterances, 7)}, packed.availability)
    with pytest.raises(ValueError, match="RoHyDR: availability must be a bool tensor"):
        model.predict(packed.features, packed.availability.float())
    with pytest.raises(RuntimeError, match="scaling is not fitted"):
        RoHyDR(corpus.feature_dims, **TINY).eval()(packed)


def test_all_missing_utterances_are_predicted_from_zero_latents(corpus):
    model = tiny_model(corpus)
    packed = first_batch(corpus).packed()
    avail = packed.availability.clone()
    avail[0] = False
    with torch.no_grad():
        out = model.predict(packed.features, avail, seed=0)
    assert torch.isfinite(out["prediction"]).all()
    assert all(not out["latents"][m][0].any() for m in MODALITIES)
