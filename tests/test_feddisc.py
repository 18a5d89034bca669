"""FedDISC model: release names, fused vs eager-twin parity, label-free prediction, bad input."""
import dataclasses

import pytest
import torch

from imer_fast.data import MODALITIES, Dialogue, collate_dialogues, make_loader, make_synthetic
from imer_fast.models import FedDISC, MulTClassifier
from imer_fast.testing.reference_mult import ReferenceTransformerEncoder

TINY = dict(latent_channels=8, latent_length=8, timesteps=50, sampling_steps=4, dgn_hidden=16,
            unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2),
            mult=dict(num_heads=2, layers=1))


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap6", seed=0, scale=0.05, feature_dims=12)


def first_batch(corpus, missing="gcnet:0.5", batch_size=3):
    return next(iter(make_loader(corpus, "train", batch_size, missing=missing, seed=0)))


def tiny_model(corpus, **kwargs):
    torch.manual_seed(0)
    model = FedDISC(corpus.feature_dims, corpus.num_classes, **{**TINY, **kwargs})
    batch = first_batch(corpus, "none", batch_size=8)
    packed = batch.packed()
    model.recovery.fit_scaling([(packed.features, packed.availability)])
    return model.eval()


def test_classifier_keys_and_shapes_follow_the_release():
    """The release's FedDISC_train_class classifier entries (docs/releases/feddisc.md §2.1-2.2)."""
    clf = MulTClassifier(32, 48, 6)
    state = clf.state_dict()
    for s in "lav":
        assert state[f"prompt{s}_m"].shape == (32, 48) and state[f"prompt{s}_nm"].shape == (32, 48)
        assert not state[f"prompt{s}_m"].any()
    for name in ("l_with_a", "l_with_v", "a_with_l", "a_with_v", "v_with_l", "v_with_a"):
        assert state[f"trans_{name}.layers.3.self_attn.in_proj_weight"].shape == (96, 32)
        assert len([k for k in state if k.startswith(f"trans_{name}.")]) == 52
    assert state["trans_l_mem.layers.3.fc1.weight"].shape == (256, 64)
    assert state["proj1_3.weight"].shape == (192, 192) and state["out_layer_3.weight"].shape == (6, 192)
    # attention dropout by key modality: audio keys 0.5, the rest 0.2
    assert clf.trans_l_with_a.attn_dropout == 0.5 and clf.trans_v_with_a.attn_dropout == 0.5
    assert clf.trans_l_with_v.attn_dropout == 0.2 and clf.trans_a_with_l.attn_dropout == 0.2
    # the same names as a classifier built from the eager MulT twin
    ref = MulTClassifier(32, 48, 6, transformer_cls=ReferenceTransformerEncoder)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in state.items()}


def test_fused_model_matches_the_eager_twin(corpus):
    model = tiny_model(corpus)
    twin = FedDISC(corpus.feature_dims, corpus.num_classes, layers="reference", **TINY).eval()
    twin.load_state_dict(model.state_dict())
    batch = first_batch(corpus)
    with torch.no_grad():
        ours, ref = model(batch, seed=3), twin(batch, seed=3)
    torch.testing.assert_close(ours["pseudo_logits"], ref["pseudo_logits"], atol=2e-5, rtol=1e-4)
    for m in MODALITIES:
        torch.testing.assert_close(ours["latents"][m], ref["latents"][m], atol=1e-3, rtol=1e-3)  # 4 clipped DDIM steps
    torch.testing.assert_close(ours["logits"], ref["logits"], atol=1e-3, rtol=1e-3)


def test_prediction_never_depends_on_labels(corpus):
    model = tiny_model(corpus)
    batch = first_batch(corpus)
    scrambled = dataclasses.replace(batch, labels=torch.randint_like(batch.labels, 0, corpus.num_classes))
    with torch.no_grad():
        a, b = model(batch, seed=5), model(scrambled, seed=5)
    assert torch.equal(a["logits"], b["logits"])
    assert torch.equal(a["pseudo_logits"], b["pseudo_logits"])


def test_observed_latents_kept_missing_ones_generated(corpus):
    model = tiny_model(corpus)
    batch = first_batch(corpus)
    packed = batch.packed()
    assert (~packed.availability).any()
    with torch.no_grad():
        out = model(batch, seed=1)
        for k, m in enumerate(MODALITIES):
            present = packed.availability[:, k]
            truth = model.recovery.project(m, packed.features[m])
            assert torch.equal(out["latents"][m][present], truth[present])
            assert out["latents"][m][~present].abs().sum() > 0  # sampled, not zero-filled
    zero = FedDISC(corpus.feature_dims, corpus.num_classes, recovery="zero", **TINY).eval()
    assert not any(k.startswith("recovery.score_") for k in zero.state_dict())
    with torch.no_grad():
        z = zero(batch)
    for k, m in enumerate(MODALITIES):
        assert not z["latents"][m][~packed.availability[:, k]].any()


def test_release_classifier_checkpoint_loads(corpus):
    model = tiny_model(corpus)
    donor = tiny_model(corpus)
    for p in donor.parameters():
        p.data.normal_()
    release = {k[len("classifier."):]: v for k, v in donor.state_dict().items() if k.startswith("classifier.")}
    release.update({k[len("recovery."):]: v for k, v in donor.state_dict().items()
                    if k.startswith("recovery.") and k.split(".")[1].startswith(("score_", "proj_"))})
    release["text_model.bert.embeddings.word_embeddings.weight"] = torch.zeros(2, 2)  # ignored (unused BERT)
    model.load_release_classifier(release)
    for k, v in release.items():
        if k.startswith("text_model."):
            continue
        where = "recovery." if k.startswith(("score_", "proj_l", "proj_a", "proj_v")) else "classifier."
        assert torch.equal(model.state_dict()[where + k], v), k
    with pytest.raises(ValueError, match="not part of FedDISC_train_class"):
        model.load_release_classifier({**release, "label_embedding.weight": torch.zeros(6, 32)})


def test_a_release_classifier_with_deeper_memory_encoders_loads_when_built_so(corpus):
    """The release's classifier gives its memory encoders max(nlevels, 3) layers: 3 against 2 cross-modal
    ones in a MOSI checkpoint (nlevels 2)."""
    mult = dict(TINY["mult"], layers=2)
    donor = FedDISC(corpus.feature_dims, corpus.num_classes, **dict(TINY, mult=mult),
                    classifier_mult=dict(mem_layers=3))
    assert len(donor.classifier.trans_l_mem.layers) == 3 and len(donor.classifier.trans_l_with_a.layers) == 2
    assert len(donor.pseudo.trans_l_mem.layers) == 2          # the pseudo-labeller's: max(nlevels, 2)
    release = {k[len("classifier."):]: v for k, v in donor.state_dict().items() if k.startswith("classifier.")}
    release.update({k[len("recovery."):]: v for k, v in donor.state_dict().items()
                    if k.startswith("recovery.") and k.split(".")[1].startswith(("score_", "proj_"))})
    shallow = FedDISC(corpus.feature_dims, corpus.num_classes, **dict(TINY, mult=mult))
    with pytest.raises(ValueError, match="memory encoders have 3 layers, this model's 2 .* "
                                         "classifier_mult=dict\\(mem_layers=3\\)"):
        shallow.load_release_classifier(release)
    deep = FedDISC(corpus.feature_dims, corpus.num_classes, **dict(TINY, mult=mult), classifier_mult=dict(mem_layers=3))
    deep.load_release_classifier(release)
    deepest = (deep.classifier.trans_v_mem.layers[2], donor.classifier.trans_v_mem.layers[2])
    assert torch.equal(deepest[0].fc1.weight, deepest[1].fc1.weight)


def test_bad_input_names_the_argument(corpus):
    with pytest.raises(ValueError, match="feature_dims.*video"):
        FedDISC({"text": 4, "audio": 4}, 6)
    with pytest.raises(ValueError, match="recovery"):
        FedDISC(corpus.feature_dims, 6, recovery="mean")
    with pytest.raises(ValueError, match="layers"):
        FedDISC(corpus.feature_dims, 6, layers="eager")
    model = tiny_model(corpus)
    wide = make_synthetic("iemocap6", seed=0, scale=0.05, feature_dims=20)
    with pytest.raises(ValueError, match=r"features\['text'\] must be \[N, 12\]|inputfeats must be"):
        model(first_batch(wide))


def test_length_one_dialogues_and_all_missing_utterances(corpus):
    model = tiny_model(corpus)
    d = corpus.split("train")[0]
    short = Dialogue(id="short", features={m: f[:1] for m, f in d.features.items()}, labels=d.labels[:1],
                     speakers=d.speakers[:1])
    one = collate_dialogues([short])
    batch = first_batch(corpus, "none")
    with torch.no_grad():
        out = model(one, seed=0)
    assert out["logits"].shape == (1, corpus.num_classes) and torch.isfinite(out["logits"]).all()
    # an utterance with no modality at all: still predicted, from context and generated latents
    gone = dataclasses.replace(batch, availability=torch.zeros_like(batch.availability))
    with torch.no_grad():
        out = model(gone, seed=0)
    assert torch.isfinite(out["logits"]).all()
