"""What every system's run (FedDISC, RoHyDR, DRKF) shares: its batches and its per-batch seeds."""
from __future__ import annotations

from typing import Optional

from ..data import make_loader


class SystemRun:
    """Loaders of one model on one corpus under the config's ``batch_size``, ``missing`` protocol and
    ``trainer.seed``; counts the all-missing utterances its subclass leaves out of the losses."""

    def __init__(self, model, corpus, config):
        self.model, self.corpus, self.config = model, corpus, config
        self.device = config.trainer.device
        self.skipped_utterances = 0
        self._batch_index = 0

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
