"""dialogue_context: the vectorised neighbour means against the loop written from the definition, edge cases,
gradients and bad input; and DRKF's context-aware generator condition (neighbours change the recovery, labels
never do)."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imer_fast.data import make_loader, make_synthetic
from imer_fast.models.dialogue_context import DialogueLayout, dialogue_context, dialogue_context_ref
from imer_fast.models.drkf import DRKF

TINY = dict(latent_channels=4, latent_length=3, hidden=16, num_layers=1, heads=2, intermediate=32, max_positions=32,
            ae_layers=(8, 4), ae_blocks=2, timesteps=25, sampling_steps=3,
            unet=dict(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), num_heads=2))


def layout_of(lengths, speakers_seed=0, num_speakers=2, shuffle=False):
    gen = torch.Generator().manual_seed(speakers_seed)
    batch_index = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] or [torch.zeros(0, dtype=torch.long)])
    position = torch.cat([torch.arange(n) for n in lengths] or [torch.zeros(0, dtype=torch.long)])
    speakers = torch.randint(0, num_speakers, (len(position),), generator=gen)
    layout = DialogueLayout(batch_index, position, speakers)
    if shuffle:  # packed order is not required to follow the dialogues
        order = torch.randperm(len(position), generator=gen)
        layout = DialogueLayout(*(x[order] for x in layout))
    return layout


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), window=st.integers(1, 6),
       num_speakers=st.integers(1, 3), shuffle=st.booleans(), seed=st.integers(0, 1000))
def test_matches_the_loop_written_from_the_definition(lengths, window, num_speakers, shuffle, seed):
    layout = layout_of(lengths, seed, num_speakers, shuffle)
    probs = torch.rand(len(layout.position), 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(dialogue_context(probs, layout, window), dialogue_context_ref(probs, layout, window))


def test_hand_worked_dialogue():
    # One dialogue, speakers A B A A; window 1 around utterance 2 (A): same = {3}, other = {1}.
    layout = DialogueLayout(torch.zeros(4, dtype=torch.long), torch.arange(4), torch.tensor([0, 1, 0, 0]))
    probs = torch.eye(4)[:, :2].contiguous() + torch.arange(4.0)[:, None]
    out = dialogue_context(probs, layout, 1)
    torch.testing.assert_close(out[2], torch.cat([probs[3], probs[1]]))
    torch.testing.assert_close(out[0], torch.cat([torch.zeros(2), probs[1]]))       # no same-speaker neighbour
    torch.testing.assert_close(out[3], torch.cat([probs[2], torch.zeros(2)]))       # no other-speaker neighbour


def test_empty_single_and_other_dialogues_give_zeros():
    assert dialogue_context(torch.zeros(0, 4), layout_of([]), 2).shape == (0, 8)
    layout = layout_of([1, 1, 1])  # three one-utterance dialogues: nobody has a neighbour
    assert not dialogue_context(torch.rand(3, 4), layout, 5).any()


def test_non_contiguous_probs_and_gradients():
    layout = layout_of([5, 7], shuffle=True)
    wide = torch.rand(12, 8, dtype=torch.float64)
    probs = wide[:, ::2]
    assert not probs.is_contiguous()
    torch.testing.assert_close(dialogue_context(probs, layout, 3), dialogue_context_ref(probs.contiguous(), layout, 3))
    leaf = probs.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: dialogue_context(p, layout, 2), (leaf,))


def test_bad_input_names_the_argument():
    layout = layout_of([3])
    with pytest.raises(ValueError, match="dialogue_context: window must be an int >= 1; got 0"):
        dialogue_context(torch.rand(3, 2), layout, 0)
    with pytest.raises(ValueError, match=r"dialogue_context: probs must be a \[N, C\] tensor; got \(3,\)"):
        dialogue_context(torch.rand(3), layout)
    with pytest.raises(ValueError, match=r"layout.speakers must be a \[3\] tensor .*got \(2,\)"):
        dialogue_context(torch.rand(3, 2), layout._replace(speakers=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"layout.speakers must be >= 0; got -1"):
        dialogue_context(torch.rand(3, 2), layout._replace(speakers=torch.tensor([0, -1, 1])))


# ---- DRKF's generators with the context condition -------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    return make_synthetic("iemocap4", seed=0, scale=0.05, feature_dims=12)


def context_model(corpus, **kwargs):
    torch.manual_seed(0)
    model = DRKF(corpus.feature_dims, corpus.num_classes, recovery="diffusion",
                 **{**TINY, "condition_context": True, "context_window": 2, **kwargs})
    packed = next(iter(make_loader(corpus, "train", 8, missing="none", seed=0))).packed()
    model.recovery.fit_scaling([(packed.features, packed.availability)])
    if model.condition_context:  # a trained head: the neighbours now move the condition
        torch.nn.init.normal_(model.context_head.weight, std=3.0)
    return model.eval()


def test_context_head_starts_as_the_identity_and_trains_with_the_fusion(corpus):
    model = DRKF(corpus.feature_dims, corpus.num_classes, recovery="diffusion", condition_context=True, **TINY).eval()
    packed = next(iter(make_loader(corpus, "train", 2, missing="gcnet:0.5", seed=0))).packed()
    with torch.no_grad():
        tokens = model.observed_tokens(packed.features, packed.availability)
        own = model.hidden_pseudo_logits(tokens)
        conditioned = model.generator_conditions(tokens, DialogueLayout.of(packed))
    for m in model.modalities:
        torch.testing.assert_close(conditioned[m], own[m])
    fusion = {id(p) for p in model.parameter_groups()["fusion"]}
    assert all(id(p) in fusion for p in model.context_head.parameters())
    for recovery in ("token", "zero"):  # the context only enters through the generators
        other = DRKF(corpus.feature_dims, corpus.num_classes, recovery=recovery, condition_context=True, **TINY)
        assert not other.condition_context and not hasattr(other, "context_head")


def test_neighbours_change_the_recovery_and_labels_never_do(corpus):
    batch = next(iter(make_loader(corpus, "train", 2, missing="fixed:a", seed=0)))
    packed = batch.packed()
    first = int(packed.cu_seqlens[1])  # the first dialogue's utterances are rows [0, first)
    with torch.no_grad():
        for condition_context in (True, False):
            model = context_model(corpus, condition_context=condition_context)
            base = model.predict_batch(packed, seed=3)
            # Other utterances of the first dialogue say something else; utterance 0 itself is unchanged.
            edited = {m: f.clone() for m, f in packed.features.items()}
            edited["audio"][1:first] = torch.randn(first - 1, edited["audio"].shape[1],
                                                   generator=torch.Generator().manual_seed(1)) * 3
            moved = model.predict_batch(dataclasses.replace(packed, features=edited), seed=3)
            changed = not torch.equal(base["tokens"]["text"][0], moved["tokens"]["text"][0])
            assert changed == condition_context, condition_context
            # The second dialogue is out of the window of the edits either way.
            torch.testing.assert_close(base["tokens"]["text"][first:], moved["tokens"]["text"][first:])
            scrambled = dataclasses.replace(batch, labels=torch.randint_like(batch.labels, 0, 4))
            assert torch.equal(model.predict_batch(scrambled, seed=3)["logits"], base["logits"])


def test_context_model_refuses_to_recover_without_a_layout(corpus):
    model = context_model(corpus)
    packed = next(iter(make_loader(corpus, "train", 2, missing="fixed:a", seed=0))).packed()
    with pytest.raises(ValueError, match="DRKF: condition_context needs the utterances' dialogue layout"):
        model(packed.features, packed.availability, seed=0)
    with pytest.raises(ValueError, match="DRKF: context_window must be an int >= 1; got 0"):
        DRKF(corpus.feature_dims, corpus.num_classes, context_window=0, **TINY)
