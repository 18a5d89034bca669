"""What every system's run (FedDISC, RoHyDR, DRKF) shares: its batches and its per-batch seeds."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..data import make_loader
from ..data.missing import FixedAvailability, make_protocol
from .trainer import TrainerConfig


def require_trainable_generators(system: str, missing, modalities, recovery: str) -> None:
    """Diffusion recovery learns each modality from its available training entries: refuse, before any
    stage runs, a training protocol that never makes one available (the generator stage would fail
    after the first stage had trained)."""
    if recovery != "diffusion":
        return
    protocol = make_protocol(missing)
    unseen = [m for m in modalities if m not in protocol.modalities] if isinstance(protocol,
                                                                                   FixedAvailability) else []
    if unseen:
        raise ValueError(f"{system}: the training protocol missing={protocol.spec!r} never makes {unseen} "
                         f"available, so diffusion recovery has nothing to learn {'it' if len(unseen) == 1 else 'them'}"
                         f" from; train with a protocol that shows every modality (e.g. 'gcnet:0.3') - every "
                         f"fixed pattern is evaluated anyway - or use recovery='zero'")


def read_model_checkpoint(path, model: str, title: str, device: str = "cpu") -> Tuple[Dict, Dict, TrainerConfig]:
    """A ``model.pt`` written by ``train_<model>``: (the whole saved dict, its config fields with
    ``layers="fused"``, its trainer settings). Refuses a checkpoint of another model."""
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict) or state.get("model") != model:
        got = state.get("model") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"load_{model}: {path} is not a {title} checkpoint (its model is {got!r})")
    fields = dict(state["config"])
    trainer = TrainerConfig(**fields.pop("trainer"))
    return state, {**fields, "layers": "fused"}, trainer


# Config fields that do not change what a run trains: a resume may change them.
_FREE_ON_RESUME = {"eval_rates", "eval_patterns"}
_FREE_TRAINER_ON_RESUME = {"resume", "progress", "out_dir", "device"}


def run_settings(config_dict: Dict, corpus) -> Dict:
    """What defines a run for the Trainer's resume check: the system's config (less evaluation and
    bookkeeping fields) and the corpus it trains on."""
    settings = {k: v for k, v in config_dict.items() if k not in _FREE_ON_RESUME}
    settings["trainer"] = {k: v for k, v in config_dict["trainer"].items() if k not in _FREE_TRAINER_ON_RESUME}
    settings["corpus"] = corpus_identity(corpus)
    return settings


def corpus_identity(corpus) -> Dict:
    """What tells two corpora apart for a resume check: name, feature widths, and per split its
    dialogue count and a digest of its dialogue ids and lengths (another --scale or --data-seed)."""
    import hashlib

    def digest(ids) -> str:
        text = ";".join(f"{i}:{corpus.dialogues[i].length}" for i in ids)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return {"name": corpus.name, "feature_dims": dict(corpus.feature_dims),
            "splits": {k: f"{len(v)} dialogues, {digest(v)}" for k, v in sorted(corpus.splits.items())}}


class SystemRun:
    """Loaders of one model on one corpus under the config's ``batch_size``, ``missing`` protocol and
    ``trainer.seed``; counts the all-missing utterances its subclass leaves out of the losses."""

    def __init__(self, model, corpus, config):
        self.model, self.corpus, self.config = model, corpus, config
        self.device = config.trainer.device
        # the Trainer checkpoints this dict (its extra_state), so the count survives a resume
        self.state = {"skipped_utterances": 0}
        self._batch_index = 0

    @property
    def skipped_utterances(self) -> int:
        return self.state["skipped_utterances"]

    @skipped_utterances.setter
    def skipped_utterances(self, value: int) -> None:
        self.state["skipped_utterances"] = value

    def loader(self, split: str, epoch: int = 0, missing=None, shuffle: bool = False, seed: Optional[int] = None):
        cfg = self.config
        for batch in make_loader(self.corpus, split, cfg.batch_size, shuffle=shuffle,
                                 missing=cfg.missing if missing is None else missing,
                                 seed=cfg.trainer.seed if seed is None else seed, epoch=epoch):
            yield batch.to(self.device)

    def train_batches(self, epoch: int):
        for i, batch in enumerate(self.loader("train", epoch, shuffle=True)):
            self._batch_index = i
            yield batch

    def batch_seed(self, epoch: int) -> int:
        """A function of (run seed, epoch, batch), so a resumed run draws the same samples."""
        return (self.config.trainer.seed * 1_000_003 + epoch) * 100_003 + self._batch_index
