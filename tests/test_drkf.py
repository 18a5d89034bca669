"""DRKF model: loss formulas vs hand-written math, the KL fix, tokens and missing modes, bad input."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from imer_fast.data import Dialogue, collate_dialogues, make_loader, make_synthetic
from imer_fast.models.drkf import (DRKF, ResidualAE, consistency_kl, inter_modal_info_nce, nt_xent, ordered_pairs,
                                   pair_targets)

TINY = dict(latent_channels=4, latent_length=3, hidden=16, num_layers=1, heads=2, intermediate=32, max_positions=32,
            ae_layers=(8, 4), ae_blocks=2, timesteps=25, sampling_steps=3,
            unet=dict(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), num_heads=2))


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap4", seed=0, scale=0.05, feature_dims=12)


def packed_batch(corpus, missing="gcnet:0.5", batch_size=3):
    return next(iter(make_loader(corpus, "train", batch_size, missing=missing, seed=0))).packed()


def tiny(corpus, recovery="token", **kwargs):
    torch.manual_seed(0)
    model = DRKF(corpus.feature_dims, corpus.num_classes, recovery=recovery, **{**TINY, **kwargs})
    if recovery == "diffusion":
        p = packed_batch(corpus, "none", 8)
        model.recovery.fit_scaling([(p.features, p.availability)])
    return model.eval()


# ---- the loss functions against formulas written out term by term ------------------------------


def test_nt_xent_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    a, b, t = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen), 0.4
    z = [v / v.norm() for v in torch.cat([a, b])]
    n, total = 5, 0.0
    for k in range(2 * n):
        positive = k + n if k < n else k - n
        logits = [torch.dot(z[k], z[c]) / t for c in range(2 * n) if c != k]
        total += -(torch.dot(z[k], z[positive]) / t - torch.logsumexp(torch.stack(logits), 0))
    torch.testing.assert_close(nt_xent(a, b, t), total / (2 * n))


def test_inter_modal_info_nce_matches_the_formula():
    gen = torch.Generator().manual_seed(1)
    audio, text, t = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen), torch.tensor(0.7)
    cos = lambda u, v: torch.dot(u, v) / (u.norm() * v.norm())  # noqa: E731
    total = 0.0
    for i in range(4):
        row = torch.stack([cos(audio[i], text[j]) / t for j in range(4)])
        total += -(row[i] - torch.logsumexp(row, 0))
    torch.testing.assert_close(inter_modal_info_nce(audio, text, t), total / 4)


def test_ordered_pairs_and_their_labels():
    i, j = ordered_pairs(4)
    assert list(zip(i.tolist(), j.tolist())) == [(a, b) for a in range(4) for b in range(4) if a != b]
    labels = torch.tensor([2, 0, 2, 1])
    assert pair_targets(labels, i, j).tolist() == [int(labels[a] == labels[b]) for a, b in zip(i.tolist(), j.tolist())]
    si, sj = ordered_pairs(30, max_pairs=50, generator=torch.Generator().manual_seed(0))
    assert si.numel() == 50 and not (si == sj).any()
    assert len(set(zip(si.tolist(), sj.tolist()))) == 50
    with pytest.raises(ValueError, match="at least 2 samples"):
        ordered_pairs(1)


def test_kl_uses_log_probabilities():
    """A true KL: zero for equal distributions, positive otherwise, equal to sum p_aug log(p_aug / p_raw). The
    release's call (probabilities as F.kl_div's input) is negative here, which a divergence never is."""
    gen = torch.Generator().manual_seed(2)
    raw, aug = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    p_raw, p_aug = raw.softmax(-1), aug.softmax(-1)
    want = (p_aug * (p_aug.log() - p_raw.log())).sum(-1).mean()
    torch.testing.assert_close(consistency_kl(raw, aug), want)
    assert consistency_kl(raw, raw).abs() < 1e-6
    assert F.kl_div(p_raw, p_aug, reduction="batchmean") < 0  # the release's defect: a "divergence" below zero
    assert consistency_kl(raw, aug) > 0


def test_kl_term_uses_each_modalitys_own_classifier(corpus):
    model = tiny(corpus)
    p = packed_batch(corpus, "none")
    observed = model.observed_tokens(p.features, p.availability)
    with torch.no_grad():
        model.kl_classifier["audio"].weight.zero_()
        model.kl_classifier["audio"].bias.zero_()
    parts = model.representation_losses(observed)
    assert parts["kl_audio"].abs() < 1e-6 and parts["kl_text"] > 0  # the release scores audio with text's


def test_residual_ae_shapes_follow_the_release():
    ae = ResidualAE((256, 128, 64), 5, 1024)
    state = ae.state_dict()
    assert state["encoder_4.0.weight"].shape == (256, 1024) and state["encoder_4.4.weight"].shape == (64, 128)
    assert state["decoder_0.0.weight"].shape == (128, 64) and state["decoder_0.4.weight"].shape == (1024, 256)
    assert state["transition.2.weight"].shape == (1024, 1024)
    out, latents = ae(torch.randn(2, 3, 1024))
    assert out.shape == (2, 3, 1024) and latents.shape == (2, 3, 5 * 64)


# ---- tokens, missing modes, prediction -----------------------------------------------------------


def test_vector_tokens_are_the_diffusion_projection(corpus):
    model = tiny(corpus, "diffusion")
    p = packed_batch(corpus)
    with torch.no_grad():
        out = model(p.features, p.availability, seed=0)
        for m in model.modalities:
            present = p.availability[:, ("text", "audio", "video").index(m)]
            latent = model.recovery.project(m, p.features[m])
            assert torch.equal(out["tokens"][m][present], latent[present].transpose(1, 2))
            assert out["tokens"][m][~present].abs().sum() > 0
    assert out["logits"].shape == (p.num_utterances, 4) and out["pseudo_logits"].shape == (p.num_utterances, 4)


def test_missing_modes_fill_as_documented(corpus):
    p = packed_batch(corpus)
    gone = ~p.availability[:, 1]  # audio
    assert gone.any()
    zero = tiny(corpus, "zero")
    assert not any(k.startswith(("missing_tokens", "recovery.score_")) for k in zero.state_dict())
    with torch.no_grad():
        assert not zero(p.features, p.availability)["tokens"]["audio"][gone].any()
        token = tiny(corpus, "token")
        token.missing_tokens["audio"].fill_(0.5)
        assert (token(p.features, p.availability)["tokens"]["audio"][gone] == 0.5).all()


def test_prediction_never_depends_on_labels(corpus):
    model = tiny(corpus, "diffusion")
    batch = next(iter(make_loader(corpus, "train", 3, missing="gcnet:0.5", seed=0)))
    scrambled = dataclasses.replace(batch, labels=torch.randint_like(batch.labels, 0, 4))
    with torch.no_grad():
        a, b = model.predict_batch(batch, seed=4), model.predict_batch(scrambled, seed=4)
    assert torch.equal(a["logits"], b["logits"])


def test_sequences_with_lengths_ignore_padding(corpus):
    torch.manual_seed(0)
    model = DRKF({"audio": 6, "text": 5}, 4, inputs="sequence", **{k: v for k, v in TINY.items()
                                                                  if k not in ("unet", "timesteps", "sampling_steps")})
    model.eval()
    gen = torch.Generator().manual_seed(0)
    feats = {"audio": torch.randn(3, 7, 6, generator=gen), "text": torch.randn(3, 4, 5, generator=gen)}
    lengths = {"audio": torch.tensor([7, 3, 5]), "text": torch.tensor([4, 2, 1])}
    out = model(feats, lengths=lengths)["logits"]
    noisy = {m: f.clone() for m, f in feats.items()}
    noisy["audio"][1, 3:] = 100.0
    noisy["text"][2, 1:] = -100.0
    torch.testing.assert_close(model(noisy, lengths=lengths)["logits"], out, atol=1e-5, rtol=1e-5)
    alone = model({m: f[1:2, :lengths[m][1]] for m, f in feats.items()})["logits"]
    torch.testing.assert_close(alone, out[1:2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inputs='vector'"):
        DRKF({"audio": 6, "text": 5}, 4, inputs="sequence", recovery="diffusion")


def test_user_encoder_hook(corpus):
    torch.manual_seed(0)
    frames = torch.nn.Sequential(torch.nn.Unflatten(1, (5, 3)))  # raw [N, 15] -> 5 tokens of width 3
    model = DRKF({"audio": 3, "text": 5}, 4, inputs="sequence", encoders={"audio": frames}, hidden=16, num_layers=1,
                 heads=2, intermediate=16, max_positions=32, ae_layers=(4,), ae_blocks=1).eval()
    out = model({"audio": torch.randn(2, 15), "text": torch.randn(2, 4, 5)})
    assert out["tokens"]["audio"].shape == (2, 5, 3) and out["logits"].shape == (2, 4)


def test_release_fusion_checkpoint_loads(corpus):
    model = tiny(corpus)
    donor = tiny(corpus)
    for p in donor.parameters():
        p.data.normal_()
    release = {f"bert.{k}": v for k, v in donor.fusion.state_dict().items()}
    release.update({"bert.embeddings.word_embeddings.weight": torch.zeros(8, 16), "bert.pooler.dense.weight":
                    torch.zeros(16, 16), "bert.pooler.dense.bias": torch.zeros(16)})
    release.update({f"classifier.{k}": v for k, v in donor.classifier.state_dict().items()})
    release.update({f"binary_classifier.{k}": v for k, v in donor.binary_classifier.state_dict().items()})
    model.load_release_fusion(release)
    for k, v in donor.state_dict().items():
        if k.startswith(("fusion.", "classifier.", "binary_classifier.")):
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="not part of MultimodalBertModel"):
        model.load_release_fusion({**release, "temperature": torch.zeros(())})
    # A checkpoint of another class count changes nothing and names the head.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = {**release, "bert.encoder.layer.0.output.dense.bias": torch.ones(16),
             "classifier.weight": torch.zeros(6, 16), "classifier.bias": torch.zeros(6)}
    with pytest.raises(ValueError, match=r"classifier.weight must be \(4, 16\) .*4 classes.*got \(6, 16\)"):
        model.load_release_fusion(wrong)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    broken = {k: v for k, v in release.items() if k != "bert.encoder.layer.0.output.dense.bias"}
    with pytest.raises(ValueError, match="DRKF.load_release_fusion"):
        model.load_release_fusion(broken)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_and_reference_layers_agree(corpus):
    model = tiny(corpus, "diffusion")
    twin = DRKF(corpus.feature_dims, 4, recovery="diffusion", layers="reference", **TINY).eval()
    twin.load_state_dict(model.state_dict())
    p = packed_batch(corpus)
    with torch.no_grad():
        a, b = model(p.features, p.availability, seed=2), twin(p.features, p.availability, seed=2)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)


def test_variants_start_from_the_same_shared_weights(corpus):
    """Seeded alike, the diffusion, token and zero-fill models differ only in what their recovery adds."""
    states = {}
    for recovery in ("diffusion", "token", "zero"):
        torch.manual_seed(5)
        states[recovery] = DRKF(corpus.feature_dims, 4, recovery=recovery, condition_context=True, **TINY).state_dict()
    for other in ("diffusion", "token"):
        assert set(states["zero"]) < set(states[other])
        for key in states["zero"]:
            assert torch.equal(states["zero"][key], states[other][key]), (other, key)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_input_names_the_argument(corpus):
    with pytest.raises(ValueError, match=r"DRKF: feature_dims has no width for \['audio'\]"):
        DRKF({"text": 4}, 4, modalities=("audio", "text"))
    with pytest.raises(ValueError, match="DRKF: recovery must be one of"):
        DRKF(corpus.feature_dims, 4, recovery="mean")
    with pytest.raises(ValueError, match="at least two modalities"):
        DRKF(corpus.feature_dims, 4, modalities=("text",))
    model = tiny(corpus)
    p = packed_batch(corpus)
    wide = {**p.features, "text": torch.zeros(p.num_utterances, 20)}
    with pytest.raises(ValueError, match=r"DRKF: features\['text'\] must be \[N=\d+, 12\]"):
        model(wide, p.availability)
    with pytest.raises(ValueError, match=r"features has no entry for \['audio'\]"):
        model({"text": p.features["text"]}, p.availability)
    with pytest.raises(ValueError, match="availability must be a bool tensor"):
        model(p.features, p.availability.float())
    with pytest.raises(ValueError, match="at least 2 samples"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3), 0.5)


def test_length_one_dialogue_and_all_missing_utterances_stay_finite(corpus):
    model = tiny(corpus, "diffusion")
    d = corpus.split("train")[0]
    short = Dialogue(id="short", features={m: f[:1] for m, f in d.features.items()}, labels=d.labels[:1],
                     speakers=d.speakers[:1])
    one = collate_dialogues([short]).packed()
    with torch.no_grad():
        out = model(one.features, one.availability, seed=0)
        parts = model.representation_losses(model.observed_tokens(one.features, one.availability))
    assert out["logits"].shape == (1, 4) and torch.isfinite(out["logits"]).all()
    assert set(parts) == {"recon_audio", "recon_text", "kl_audio", "kl_text"}  # no contrastive term from one row
    assert all(math.isfinite(float(v)) for v in parts.values())
    p = packed_batch(corpus, "none")
    none = torch.zeros_like(p.availability)
    with torch.no_grad():
        out = model(p.features, none, seed=0)
        parts = model.representation_losses(model.observed_tokens(p.features, none))
    assert torch.isfinite(out["logits"]).all() and parts == {}


def test_padded_sequences_of_mixed_widths_under_autocast():
    """A modality as wide as ``hidden`` has an Identity token_in (stays fp32 under autocast), another a
    Linear (bf16): the padded layout must still assemble, and agree with fp32 to bf16 precision."""
    torch.manual_seed(0)
    model = DRKF({"audio": 16, "text": 6}, 4, inputs="sequence", recovery="token", hidden=16, num_layers=1, heads=2,
                 intermediate=32, max_positions=32, ae_layers=(8,), ae_blocks=1).eval()
    feats = {"audio": torch.randn(3, 6, 16), "text": torch.randn(3, 5, 6)}
    lengths = {"audio": torch.tensor([6, 2, 4]), "text": torch.tensor([5, 3, 1])}
    with torch.no_grad():
        exact = model(feats, None, lengths)["logits"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(feats, None, lengths)["logits"]
    torch.testing.assert_close(low.float(), exact, atol=0.1, rtol=0.1)
