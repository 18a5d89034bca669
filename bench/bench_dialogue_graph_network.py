"""Whole Dialogue Graph Network (GCNet's GraphModel) forward + backward on one IEMOCAP-like batch:
imer_fast's drop-in vs the release-style reference (PyG layers, per-edge Python graph builder,
per-step matching attention). Shapes: 32 dialogues of IEMOCAP lengths, GCNet features
(audio 512 + text 1024 + video 1024), hidden 100 (D_e 100, graph 50), windows 6/6, fp32."""
import pytest
import torch

import imer_fast
from imer_fast.testing.reference_gcnet import ReferenceGraphModel

from conftest import iemocap_like_lengths, sync

pytest.importorskip("torch_geometric")
DIMS = dict(adim=512, tdim=1024, vdim=1024)


@pytest.fixture(scope="module")
def models_and_batch(device):
    torch.manual_seed(0)
    ref = ReferenceGraphModel(**DIMS, D_e=100, graph_hidden_size=50, n_speakers=2, window_past=6, window_future=6,
                              n_classes=6).to(device)
    lengths = iemocap_like_lengths(32)
    max_len = max(lengths)
    x = torch.randn(max_len, 32, sum(DIMS.values()), device=device)
    qmask = torch.randint(0, 2, (32, max_len), device=device)
    umask = (torch.arange(max_len, device=device) < torch.tensor(lengths, device=device).unsqueeze(1)).float()
    ref([x], qmask, umask, lengths)  # fixes the reference's relation ids
    ours = imer_fast.DialogueGraphNetwork("LSTM", **DIMS, D_e=100, graph_hidden_size=50, n_speakers=2,
                                          window_past=6, window_future=6, n_classes=6,
                                          temporal_relation_map=ref.relation_ids["temporal"],
                                          speaker_relation_map=ref.relation_ids["speaker"]).to(device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours, (x, qmask, umask, lengths)


def _step(model, batch, device):
    x, qmask, umask, lengths = batch

    def run():
        model.zero_grad(set_to_none=True)
        model([x], qmask, umask, lengths)[0].square().mean().backward()
        sync(device)

    return run


@pytest.mark.benchmark(group="dialogue graph network fwd+bwd")
def test_dgn_imer_fast(benchmark, models_and_batch, device):
    _, ours, batch = models_and_batch
    benchmark.pedantic(_step(ours, batch, device), rounds=10, warmup_rounds=1)


@pytest.mark.benchmark(group="dialogue graph network fwd+bwd")
def test_dgn_release_style_reference(benchmark, models_and_batch, device):
    ref, _, batch = models_and_batch
    benchmark.pedantic(_step(ref, batch, device), rounds=10, warmup_rounds=1)
