"""Ordinary-module behaviour of the nn modules and models: constructor arguments named when they are
wrong, dropout at its limits as torch's, empty batches, whole-model pickling."""
import io

import pytest
import torch

from imer_fast.data import make_synthetic
from imer_fast.models.mult_classifier import MulTClassifier
from imer_fast.nn import ConditionalUNet1d, CrossModalTransformer, GraphConv, RGCNConv
from imer_fast.nn.cond_cross_attention import CondCrossAttention
from imer_fast.nn.dialogue_graph_network import DialogueGraphNetwork
from imer_fast.nn.dit import DiT1d
from imer_fast.nn.rcan import rcan_refiner
from imer_fast.nn.score_net import ScoreNet
from imer_fast.testing.reference_mult import ReferenceTransformerEncoder


def test_dropout_of_one_zeroes_the_branch_as_the_release_does():
    """res/relu dropout 1.0 in training: F.dropout gives zeros (the release's output is deterministic);
    the fused layer used to divide by 1 - p = 0 and return NaN everywhere."""
    torch.manual_seed(0)
    kwargs = dict(attn_dropout=0.0, relu_dropout=1.0, res_dropout=1.0, attn_mask=True)
    ours = CrossModalTransformer(16, 4, 2, **kwargs).train()
    reference = ReferenceTransformerEncoder(16, 4, 2, **kwargs).train()
    reference.load_state_dict(ours.state_dict())
    x, context = torch.randn(5, 3, 16), torch.randn(4, 3, 16)
    torch.testing.assert_close(ours(x, context, context), reference(x, context, context))


@pytest.mark.parametrize("name,value,match", [
    ("res_dropout", -0.1, r"res_dropout must lie in \[0, 1\]"),
    ("relu_dropout", 1.5, r"relu_dropout must lie in \[0, 1\]"),
    ("attn_dropout", 1.0, r"attn_dropout must lie in \[0, 1\)"),
    ("embed_dropout", float("nan"), r"embed_dropout must lie in \[0, 1\]"),
])
def test_dropout_outside_its_range_is_refused_at_construction(name, value, match):
    with pytest.raises(ValueError, match=f"CrossModalTransformer: {match}"):
        CrossModalTransformer(16, 4, 1, **{name: value})


def test_numpy_and_tensor_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    encoder = CrossModalTransformer(16, 4, np.int64(2), res_dropout=np.float32(0.1), attn_dropout=torch.tensor(0.1))
    assert len(encoder.layers) == 2


@pytest.mark.parametrize("build,match", [
    (lambda: CrossModalTransformer(16, 4, -1), "layers must be an int >= 0; got -1"),
    (lambda: ConditionalUNet1d(model_channels=32, num_res_blocks=-1), "num_res_blocks must be an int >= 0"),
    (lambda: ConditionalUNet1d(model_channels=32, channel_mult=()), "channel_mult must list at least one"),
    (lambda: ConditionalUNet1d(model_channels=32, num_heads=0), "num_heads must be an int >= 1; got 0"),
    (lambda: ConditionalUNet1d(model_channels=32, num_time_tokens=0), "num_time_tokens must be an int >= 1"),
    (lambda: CondCrossAttention(32, context_dim=0), "context_dim must be an int >= 1; got 0"),
    (lambda: ScoreNet(lambda t: t, embed_dim=3), "embed_dim must be even"),
    (lambda: RGCNConv(4, 4, num_relations=0), "num_relations must be an int >= 1; got 0"),
    (lambda: RGCNConv(4, 4, 2, num_blocks=0), "num_blocks must be an int >= 1; got 0"),
    (lambda: RGCNConv(4, 4, 2, num_bases=0), "num_bases must be an int >= 1; got 0"),
    (lambda: GraphConv(5, -1), "out_channels must be an int >= 1; got -1"),
    (lambda: rcan_refiner(16, reduction=0), "reduction must be an int >= 1; got 0"),
    (lambda: DiT1d(mlp_ratio=0), "mlp_ratio must be a number > 0; got 0"),
    (lambda: DialogueGraphNetwork("LSTM", 4, 4, -1, 8, 8, 2, 1, 1, 3), "vdim must be an int >= 0; got -1"),
    (lambda: DialogueGraphNetwork("LSTM", 4, 4, 4, 8, 8, 2, 1, 1, 0), "n_classes must be an int >= 1; got 0"),
    (lambda: MulTClassifier(num_heads=0), "num_heads must be an int >= 1; got 0"),
])
def test_bad_sizes_are_named_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_an_empty_batch_gives_an_empty_output():
    encoder = CrossModalTransformer(16, 4, 2)
    assert encoder(torch.randn(5, 0, 16)).shape == (5, 0, 16)
    assert encoder(torch.randn(5, 0, 16), torch.randn(3, 0, 16), torch.randn(3, 0, 16)).shape == (5, 0, 16)
    assert encoder.layers[0](torch.randn(5, 0, 16)).shape == (5, 0, 16)


@pytest.mark.parametrize("system", ["feddisc", "rohydr", "drkf"])
@pytest.mark.parametrize("layers", ["fused", "reference"])
def test_whole_models_pickle(system, layers):
    """torch.save of the model object (not only its state_dict) round-trips: the layer set it keeps holds
    no lambdas."""
    if system == "feddisc":
        from imer_fast.train.feddisc import FedDISCConfig as Config, build_model
        corpus = make_synthetic("iemocap6", seed=0, scale=0.05, feature_dims=8)
    elif system == "rohydr":
        from imer_fast.train.rohydr import RoHyDRConfig as Config, build_model
        corpus = make_synthetic("mosi", seed=0, scale=0.05, feature_dims=8)
    else:
        from imer_fast.train.drkf import DRKFConfig as Config, build_model
        corpus = make_synthetic("iemocap4", seed=0, scale=0.05, feature_dims=8)
    model = build_model(corpus, Config(preset="small", layers=layers))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
