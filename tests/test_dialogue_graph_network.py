"""DialogueGraphNetwork: drop-in parity with GCNet's GraphModel semantics (PyG + per-edge builder)."""
import pytest
import torch

import imer_fast
from imer_fast.ops import relation_names

ref_module = pytest.importorskip("imer_fast.testing.reference_gcnet")
pytest.importorskip("torch_geometric")


def batch(lengths, dim, seed, max_len=None):
    gen = torch.Generator().manual_seed(seed)
    max_len = max_len or max(lengths)
    x = torch.randn(max_len, len(lengths), dim, generator=gen)
    qmask = torch.randint(0, 2, (len(lengths), max_len), generator=gen)
    umask = (torch.arange(max_len) < torch.tensor(lengths).unsqueeze(1)).float()
    return x, qmask, umask


def make_pair(time_attn, windows, seed=0):
    torch.manual_seed(seed)
    ref = ref_module.ReferenceGraphModel(4, 6, 5, 8, 4, 2, *windows, 6, time_attn=time_attn).eval()
    # The reference numbers relations by iterating a set, as GCNet does; hand the same ids to ours.
    ref.relation_ids = {k: {name: i for i, name in enumerate(reversed(relation_names(k, 2)))}
                        for k in ("temporal", "speaker")}
    ours = imer_fast.DialogueGraphNetwork("LSTM", 4, 6, 5, 8, 4, 2, *windows, 6, time_attn=time_attn,
                                          temporal_relation_map=ref.relation_ids["temporal"],
                                          speaker_relation_map=ref.relation_ids["speaker"]).eval()
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    return ref, ours


@pytest.mark.parametrize("time_attn", [True, False])
@pytest.mark.parametrize("windows", [(2, 2), (6, 6), (-1, -1), (3, -1)])
def test_same_outputs_and_gradients_as_reference(time_attn, windows):
    ref, ours = make_pair(time_attn, windows)
    lengths = [9, 4, 1, 6]
    x, qmask, umask = batch(lengths, 15, seed=1)
    got, want = ours([x], qmask, umask, lengths), ref([x], qmask, umask, lengths)
    for a, b in zip((got[0], got[1][0], got[2]), (want[0], want[1][0], want[2])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad(got[0].square().sum(), list(ours.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(want[0].square().sum(), list(ref.parameters()), allow_unused=True)
    for (name, _), a, b in zip(ours.named_parameters(), g_ours, g_ref):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_wrong_relation_ids_change_the_output():
    ref, ours = make_pair(True, (2, 2))
    lengths = [7, 5]
    x, qmask, umask = batch(lengths, 15, seed=2)
    canonical = imer_fast.DialogueGraphNetwork("LSTM", 4, 6, 5, 8, 4, 2, 2, 2, 6).eval()
    canonical.load_state_dict(ref.state_dict())
    assert not torch.allclose(canonical([x], qmask, umask, lengths)[0], ref([x], qmask, umask, lengths)[0])


def test_gru_base_model_runs_and_trains():
    model = imer_fast.DialogueGraphNetwork("GRU", 4, 6, 5, 8, 4, 2, 2, 2, 3)
    x, qmask, umask = batch([5, 3], 15, seed=3)
    logits, rec, hidden = model([x], qmask, umask, [5, 3])
    logits.sum().backward()
    assert model.gru.weight_ih_l0.grad is not None and model.lstm.weight_ih_l0.grad is None


def test_single_speaker_and_float_qmask():
    model = imer_fast.DialogueGraphNetwork("LSTM", 2, 2, 2, 4, 2, 1, 1, 1, 2).eval()
    x, _, umask = batch([3, 2], 6, seed=4)
    out = model(x, torch.zeros(2, 3), umask, [3, 2])[0]
    assert out.shape == (3, 2, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(x=torch.randn(5, 2, 14)), "inputfeats must be \\[seq_len, batch, adim \\+ tdim \\+ vdim = 15\\]"),
        (dict(lengths=[5]), "seq_lengths must have batch = 2 entries"),
        (dict(lengths=[6, 2]), "seq_lengths must lie in \\[0, seq_len = 5\\]"),
        (dict(qmask=torch.zeros(3, 5)), "qmask must be \\[batch = 2, seq_len\\]"),
        (dict(qmask=torch.full((2, 5), 0.5)), "qmask must hold integer speaker ids"),
        (dict(qmask=torch.full((2, 5), 2)), "speaker ids must lie in \\[0, num_speakers = 2\\)"),
    ],
)
def test_bad_input_is_named(args, match):
    model = imer_fast.DialogueGraphNetwork("LSTM", 4, 6, 5, 8, 4, 2, 2, 2, 3)
    x, qmask, umask = batch([5, 3], 15, seed=5)
    call = dict(x=x, qmask=qmask, umask=umask, lengths=[5, 3])
    call.update(args)
    with pytest.raises(ValueError, match=match):
        model([call["x"]], call["qmask"], call["umask"], call["lengths"])


def test_constructor_errors():
    with pytest.raises(ValueError, match="base_model must be 'LSTM' or 'GRU'"):
        imer_fast.DialogueGraphNetwork("RNN", 1, 1, 1, 2, 2, 2, 1, 1, 2)
    with pytest.raises(ValueError, match="relation_map_from_names: edge_type_mapping must map exactly"):
        imer_fast.DialogueGraphNetwork("LSTM", 1, 1, 1, 2, 2, 2, 1, 1, 2, temporal_relation_map={"past": 0})
