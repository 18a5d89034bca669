"""Dialogue context of every utterance from its neighbours' label-free class probabilities.

A per-utterance classifier (DRKF's) never sees the rest of the conversation, yet emotions in a
conversation are sticky: a speaker tends to keep their state and to pick up the other speaker's. What
the neighbouring utterances' own predictions say is therefore evidence about an utterance that its
classifier lacks. Given to a missing modality's generator as its dialogue-context condition, it lets
the recovered latent carry that evidence — the "consistency in context" FedDISC gets from its dialogue
graph, here without a learned graph network.

The context of utterance ``i`` is the mean class-probability vector of the other utterances of its
dialogue within ``window`` turns of it, taken separately over the same speaker and over the other
speakers (zeros where there is none): ``[N, 2C]``. ``i`` itself is left out (its own prediction is
already the condition's semantic part). Probabilities come from predictions, never from labels.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DialogueLayout(NamedTuple):
    """Where the ``N`` packed utterances sit: dialogue ``batch_index`` [N], ``position`` in it [N] and
    ``speakers`` [N] (the fields of :class:`~imer_fast.data.PackedBatch`)."""
    batch_index: Tensor
    position: Tensor
    speakers: Tensor

    @classmethod
    def of(cls, packed) -> "DialogueLayout":
        return cls(packed.batch_index, packed.position, packed.speakers)


def _check(probs: Tensor, layout: DialogueLayout, window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"dialogue_context: window must be an int >= 1; got {window!r}")
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        raise ValueError(f"dialogue_context: probs must be a [N, C] tensor; got "
                         f"{tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__}")
    n = probs.shape[0]
    for name, value in layout._asdict().items():
        if not isinstance(value, Tensor) or tuple(value.shape) != (n,):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"dialogue_context: layout.{name} must be a [{n}] tensor (one per row of probs); "
                             f"got {got}")
        if n and int(value.min()) < 0:
            raise ValueError(f"dialogue_context: layout.{name} must be >= 0; got {int(value.min())}")


def dialogue_context(probs: Tensor, layout: DialogueLayout, window: int = 4) -> Tensor:
    """``[N, 2C]``: same-speaker then other-speaker mean of ``probs`` over the utterances within
    ``window`` turns (module doc)."""
    _check(probs, layout, window)
    n, c = probs.shape
    if n == 0:
        return probs.new_zeros(0, 2 * c)
    dialogues = int(layout.batch_index.max()) + 1
    length = int(layout.position.max()) + 1 + 2 * window  # room for the shifts on either side
    flat = layout.batch_index * length + layout.position + window
    padded = probs.new_zeros(dialogues * length, c).index_copy_(0, flat, probs).view(dialogues, length, c)
    speaker = torch.full((dialogues * length,), -1, dtype=torch.long, device=probs.device)
    speaker = speaker.index_copy_(0, flat, layout.speakers.long()).view(dialogues, length)
    here = speaker[:, window:length - window]
    sums = probs.new_zeros(2, dialogues, length - 2 * window, c)
    counts = probs.new_zeros(2, dialogues, length - 2 * window, 1)
    for shift in [s for d in range(1, window + 1) for s in (-d, d)]:
        neighbour = slice(window + shift, length - window + shift)
        there = speaker[:, neighbour]
        for k, group in enumerate((there == here, (there != here) & (there >= 0))):
            weight = group.unsqueeze(-1).to(probs.dtype)
            sums[k] += weight * padded[:, neighbour]
            counts[k] += weight
    means = (sums / counts.clamp(min=1)).view(2, -1, c)
    rows = layout.batch_index * (length - 2 * window) + layout.position
    return torch.cat([means[0, rows], means[1, rows]], dim=1)


def dialogue_context_ref(probs: Tensor, layout: DialogueLayout, window: int = 4) -> Tensor:
    """Loop-per-utterance twin of :func:`dialogue_context`, written straight from the definition."""
    _check(probs, layout, window)
    n, c = probs.shape
    out = probs.new_zeros(n, 2 * c)
    for i in range(n):
        same, other = [], []
        for j in range(n):
            if j == i or int(layout.batch_index[j]) != int(layout.batch_index[i]):
                continue
            if abs(int(layout.position[j]) - int(layout.position[i])) > window:
                continue
            (same if int(layout.speakers[j]) == int(layout.speakers[i]) else other).append(probs[j])
        if same:
            out[i, :c] = torch.stack(same).mean(0)
        if other:
            out[i, c:] = torch.stack(other).mean(0)
    return out


__all__ = ["DialogueLayout", "dialogue_context", "dialogue_context_ref"]
