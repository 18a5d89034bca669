"""Train the Dialogue Graph Network (GCNet's model) as an emotion classifier under missing modalities.

Inputs follow GCNet: per utterance the audio, text and video features are concatenated (in that
order) with unavailable modalities zeroed; the model sees the speaker ids and the dialogue graph.
Loss: cross-entropy on the labelled utterances plus, with ``recon_weight > 0``, GCNet's
reconstruction objective (MSE between the reconstruction head and the ground-truth features of the
modalities that were dropped). Evaluation reports WA / UA / weighted F1 on the test split under the
training protocol and under every fixed availability pattern.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import Corpus, classification_report, evaluate_patterns, make_loader, present_modalities
from ..io import atomic_torch_save, atomic_write_json
from ..nn import DialogueGraphNetwork
from ..nn.dialogue_graph_network import GCNET_ORDER



@dataclass
class DGNConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    hidden: int = 100  # GCNet: D_e = hidden, graph hidden = hidden // 2
    window_past: int = 2
    window_future: int = 2
    dropout: float = 0.2
    time_attn: bool = True
    recon_weight: float = 1.0
    missing: str = "gcnet:0.3"
    seed: int = 0
    device: str = "cpu"
    out_dir: Optional[str] = None
    progress: bool = True
    eval_patterns: bool = True
    extra: Dict[str, str] = field(default_factory=dict)


def batch_inputs(batch, device):
    """GCNet-layout inputs of a DialogueBatch: ([L, B, a+t+v], qmask, umask, lengths, targets, drop)."""
    feats = torch.cat([batch.features[m] for m in GCNET_ORDER], dim=-1).transpose(0, 1).to(device)
    truth = torch.cat([batch.ground_truth[m] for m in GCNET_ORDER], dim=-1).transpose(0, 1).to(device)
    order = {"text": 0, "audio": 1, "video": 2}  # availability columns follow imer_fast.data.MODALITIES
    dropped = torch.cat(
        [(~batch.availability[..., order[m]]).unsqueeze(-1).expand_as(batch.features[m]) for m in GCNET_ORDER], dim=-1
    ) & batch.utterance_mask.unsqueeze(-1)
    return (feats, batch.speakers.to(device), batch.utterance_mask.float().to(device), batch.lengths.tolist(),
            batch.labels.to(device), truth, dropped.transpose(0, 1).to(device))


def build_model(corpus: Corpus, config: DGNConfig) -> DialogueGraphNetwork:
    dims = corpus.feature_dims
    return DialogueGraphNetwork(
        "LSTM", dims["audio"], dims["text"], dims["video"], config.hidden, config.hidden // 2,
        max(corpus.num_speakers, 1), config.window_past, config.window_future, corpus.num_classes,
        dropout=config.dropout, time_attn=config.time_attn,
    )


@torch.no_grad()
def evaluate_dgn(model: DialogueGraphNetwork, corpus: Corpus, split: str, missing, config: DGNConfig,
                 epoch: int = 0) -> Dict[str, float]:
    model.eval()
    preds, labels = [], []
    for batch in make_loader(corpus, split, config.batch_size, missing=missing, seed=config.seed + 1, epoch=epoch):
        feats, qmask, umask, lengths, y, _, _ = batch_inputs(batch, config.device)
        logits = model([feats], qmask, umask, lengths)[0].transpose(0, 1)  # [B, L, C]
        valid = y[:, : logits.shape[1]] != -100
        preds.append(logits.argmax(-1)[valid].cpu().numpy())
        labels.append(y[:, : logits.shape[1]][valid].cpu().numpy())
    report = classification_report(np.concatenate(preds), np.concatenate(labels))
    return {k: float(report[k]) for k in ("WA", "UA", "F1_weighted")}


def train_dgn(corpus: Corpus, config: DGNConfig) -> Dict:
    """Train, evaluate, write ``metrics.json`` (per epoch, atomically) and ``model.pt`` to out_dir."""
    if corpus.task != "classification":
        raise ValueError(f"train_dgn: the corpus must be a classification corpus; got task={corpus.task!r}")
    absent = [m for m in GCNET_ORDER if m not in corpus.feature_dims]
    if absent:
        raise ValueError(f"train_dgn: the corpus {corpus.name!r} has no {absent} features; the Dialogue Graph "
                         f"Network reads all of {list(GCNET_ORDER)} (a missing-modality protocol decides which "
                         f"are seen)")
    torch.manual_seed(config.seed)
    model = build_model(corpus, config).to(config.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    out_dir = Path(config.out_dir) if config.out_dir else None
    history: List[Dict] = []
    result: Dict = {"config": asdict(config), "corpus": corpus.name, "history": history}
    for epoch in range(config.epochs):
        model.train()
        start, total, count = time.perf_counter(), 0.0, 0
        loader = make_loader(corpus, "train", config.batch_size, shuffle=True, missing=config.missing,
                             seed=config.seed, epoch=epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress, leave=False)
        for batch in bar:
            feats, qmask, umask, lengths, y, truth, dropped = batch_inputs(batch, config.device)
            logits, rec, _ = model([feats], qmask, umask, lengths)
            steps = logits.shape[0]
            loss = F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.shape[-1]),
                                   y[:, :steps].reshape(-1), ignore_index=-100)
            if config.recon_weight > 0 and bool(dropped.any()):
                mask = dropped[:steps]
                loss = loss + config.recon_weight * ((rec[0] - truth[:steps]).square() * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.detach().item() * len(lengths), count + len(lengths)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        entry = {"epoch": epoch + 1, "train_loss": total / max(count, 1), "seconds": time.perf_counter() - start,
                 "test": evaluate_dgn(model, corpus, "test", config.missing, config, epoch)}
        history.append(entry)
        if config.progress:
            t = entry["test"]
            print(f"epoch {epoch + 1:3d}  loss {entry['train_loss']:.4f}  test WA {t['WA']:.4f}  UA {t['UA']:.4f}  "
                  f"WF1 {t['F1_weighted']:.4f}  ({entry['seconds']:.1f}s)", flush=True)
        if out_dir:
            atomic_write_json(out_dir / "metrics.json", result)
    result["test"] = history[-1]["test"] if history else evaluate_dgn(model, corpus, "test", config.missing, config)
    if config.eval_patterns:
        patterns = evaluate_patterns(present=present_modalities(corpus.feature_dims))
        result["patterns"] = {name: evaluate_dgn(model, corpus, "test", protocol, config) for name, protocol in patterns}
    if out_dir:
        atomic_write_json(out_dir / "metrics.json", result)
        atomic_torch_save(out_dir / "model.pt", {"model": "dgn", "state_dict": model.state_dict(),
                                                 "config": asdict(config), "feature_dims": corpus.feature_dims})
    return result
