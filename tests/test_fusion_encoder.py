"""FusionEncoder: BERT math over input vectors, HF names, padded keys ignored, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from imer_fast import backends
from imer_fast.nn.fusion_encoder import FusionEncoder

SMALL = dict(hidden=16, layers=2, heads=4, intermediate=32, max_positions=24)


def eager_bert(state, x, key_mask, layers, heads, token_type_ids=None):
    """BERT's encoder written from its definition (post-LN, erf GELU, eps 1e-12), scores materialised."""
    batch, length, hidden = x.shape
    types = torch.zeros(batch, length, dtype=torch.long) if token_type_ids is None else token_type_ids
    h = x + state["embeddings.position_embeddings.weight"][:length] + state["embeddings.token_type_embeddings.weight"][types]
    h = F.layer_norm(h, (hidden,), state["embeddings.LayerNorm.weight"], state["embeddings.LayerNorm.bias"], 1e-12)
    additive = torch.zeros(batch, 1, 1, length) if key_mask is None else \
        torch.where(key_mask, 0.0, float("-inf"))[:, None, None, :]
    dh = hidden // heads
    for i in range(layers):
        p = lambda name: state[f"encoder.layer.{i}.{name}"]  # noqa: E731

        def split(t):
            return t.view(batch, length, heads, dh).transpose(1, 2)
        q = split(h @ p("attention.self.query.weight").t() + p("attention.self.query.bias"))
        k = split(h @ p("attention.self.key.weight").t() + p("attention.self.key.bias"))
        v = split(h @ p("attention.self.value.weight").t() + p("attention.self.value.bias"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + additive, dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(batch, length, hidden)
        a = context @ p("attention.output.dense.weight").t() + p("attention.output.dense.bias")
        h = F.layer_norm(a + h, (hidden,), p("attention.output.LayerNorm.weight"), p("attention.output.LayerNorm.bias"),
                         1e-12)
        u = h @ p("intermediate.dense.weight").t() + p("intermediate.dense.bias")
        u = 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))
        f = u @ p("output.dense.weight").t() + p("output.dense.bias")
        h = F.layer_norm(f + h, (hidden,), p("output.LayerNorm.weight"), p("output.LayerNorm.bias"), 1e-12)
    return h


def encoder(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = FusionEncoder(**{**SMALL, **kwargs}).eval()
    with torch.no_grad():  # move LayerNorms and biases off their initial 1 / 0 so they are exercised
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_matches_eager_bert_math(backend):
    model = encoder()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 16, generator=gen)
    key_mask = torch.ones(3, 11, dtype=torch.bool)
    key_mask[1, 7:] = False
    key_mask[2, 4:] = False
    types = torch.randint(0, 2, (3, 11), generator=gen)
    want = eager_bert(model.state_dict(), x, key_mask, 2, 4, types)
    with backends.force("reference") if backend == "reference" else torch.no_grad():
        got = model(x, key_mask, types)
    real = key_mask[..., None].expand_as(want)
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    full = model(x)
    torch.testing.assert_close(full, eager_bert(model.state_dict(), x, None, 2, 4), atol=2e-5, rtol=1e-4)


def test_padded_keys_are_ignored():
    model = encoder()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 16, generator=gen)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[:, 6:] = False
    garbage = x.clone()
    garbage[:, 6:] = 1e3 * torch.randn(2, 3, 16, generator=gen)
    a, b = model(x, key_mask), model(garbage, key_mask)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-5, rtol=1e-5)
    # and equal to the unpadded sequence alone
    torch.testing.assert_close(a[:, :6], model(x[:, :6]), atol=1e-5, rtol=1e-5)


def test_gradients_match_eager_math():
    model = encoder()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[0, 5:] = False
    model(x, key_mask)[:, 0].square().sum().backward()
    ours = x.grad.clone()
    x.grad = None
    eager_bert(model.state_dict(), x, key_mask, 2, 4)[:, 0].square().sum().backward()
    torch.testing.assert_close(ours, x.grad, atol=1e-5, rtol=1e-4)


def test_hugging_face_names_and_release_sizes():
    model = FusionEncoder(hidden=64, layers=6, heads=8, intermediate=256, max_positions=2800)
    state = model.state_dict()
    assert state["embeddings.position_embeddings.weight"].shape == (2800, 64)
    assert state["embeddings.token_type_embeddings.weight"].shape == (2, 64)
    for name, shape in (("attention.self.query.weight", (64, 64)), ("attention.self.key.bias", (64,)),
                        ("attention.self.value.weight", (64, 64)), ("attention.output.dense.weight", (64, 64)),
                        ("attention.output.LayerNorm.weight", (64,)), ("intermediate.dense.weight", (256, 64)),
                        ("output.dense.weight", (64, 256)), ("output.LayerNorm.bias", (64,))):
        assert state[f"encoder.layer.5.{name}"].shape == shape, name
    assert len([k for k in state if k.startswith("encoder.layer.0.")]) == 16
    # BERT initialisation: N(0, 0.02) weights, zero biases
    w = state["encoder.layer.0.intermediate.dense.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and not state["encoder.layer.0.output.dense.bias"].any()


def test_bert_state_dict_loads_without_vocabulary_or_pooler():
    donor = encoder(seed=5)
    release = {f"bert.{k}": v for k, v in donor.state_dict().items()}
    release["bert.embeddings.word_embeddings.weight"] = torch.zeros(30522, 16)
    release["bert.embeddings.position_ids"] = torch.arange(24)[None]
    release["bert.pooler.dense.weight"] = torch.zeros(16, 16)
    release["classifier.weight"] = torch.zeros(4, 16)  # another prefix: not ours
    model = encoder(seed=6)
    model.load_bert_state_dict(release, prefix="bert.")
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="missing"):
        model.load_bert_state_dict({"bert.embeddings.LayerNorm.weight": torch.ones(16)}, prefix="bert.")


def test_matches_transformers_bert_model_when_available():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                                     max_position_embeddings=24)
    bert = transformers.BertModel(config).eval()
    model = encoder()
    state = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    model.load_bert_state_dict(state, prefix="bert.")
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 8:] = 0
    want = bert(inputs_embeds=x, attention_mask=mask).last_hidden_state
    got = model(x, mask.bool())
    torch.testing.assert_close(got[:, :8], want[:, :8], atol=1e-5, rtol=1e-4)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="FusionEncoder: hidden .* multiple of heads"):
        FusionEncoder(hidden=10, heads=4, layers=1, intermediate=8, max_positions=8)
    model = encoder()
    with pytest.raises(ValueError, match=r"inputs_embeds must be .*hidden=16"):
        model(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="max_positions is 24"):
        model(torch.randn(1, 25, 16))
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        model(torch.randn(2, 5, 16), torch.ones(2, 5))
