"""DRKF (arXiv 2508.01644) as one recovery-plus-classification model.

Pieces (state-dict prefixes in brackets):

- modality tokens: for utterance vectors ``[N, D_m]``, the modality's projection to a ``C × L`` latent
  [``recovery.proj_*``, :class:`~imer_fast.diffusion.DISCDiffusion`] read as ``L`` tokens of width ``C``
  (so diffusion-recovered latents are exactly the tokens the encoder consumes); for token-level features
  ``[N, T_m, D_m]`` with lengths (DRKF's own data: RoBERTa / wav2vec2 sequences), the features themselves,
  or what a user's ``encoders[m]`` module makes of its input. A per-modality linear map [``token_in.*``]
  lifts tokens to the fusion width (the identity when the widths agree, as in the release);
- Optimized Representation Learning (ORL), per modality: a residual autoencoder augments the token
  sequence [``augment.*``, the release's ``ResidualAE``]; a projection head [``projection.*``] maps the
  pooled raw tokens; NT-Xent pulls raw and augmented representations of the same utterance together,
  an InfoNCE with the learnable temperature ``sigmoid(p)`` [``temperature.temperature``] aligns the
  modalities, a reconstruction MSE ties the augmentation to its input and a KL term ties the class
  distributions of raw and augmented representations [``kl_classifier.*``]. This is the release's
  shared/specific decoupling: there are no separate shared and specific encoders; the inter-modal InfoNCE
  makes the projected representations shared across modalities while the intra-modal NT-Xent, the
  reconstruction and the KL keep each modality's augmented view specific to it;
- Knowledge Fusion (KF): a randomly initialised BERT encoder (:class:`~imer_fast.nn.FusionEncoder`)
  [``fusion.*``] over ``[CLS] + audio + [SEP] + text + [SEP]`` (``+ video + [SEP]`` when video is used);
- heads on ``[CLS]``: Emotion Classification [``classifier``] and Emotion Discrimination
  [``binary_classifier``] on ordered pairs ``(i, j), i ≠ j`` (audio of ``i`` with text of ``j``; label 1
  when their emotions match).

Missing modalities (our extension; the release is complete-modality only). ``recovery`` selects what
replaces a missing modality's tokens:

- ``"token"``: a learned missing token [``missing_tokens.*``] (a ``C × L`` latent for vectors, one token
  for sequences), zero-initialised;
- ``"diffusion"``: DISC-Diffusion samples [``recovery.score_*``], conditioned on
  ``softmax(pseudo_logits / T)`` where the pseudo logits are DRKF's own prediction with every missing
  modality replaced by its learned missing token — labels are never read. With ``condition_context``
  (ours) the pseudo logits also read the dialogue: a linear context head [``context_head``] adds what
  the neighbouring utterances' own predictions say (:func:`~imer_fast.models.dialogue_context.
  dialogue_context`), as FedDISC adds its dialogue graph's logits to its per-utterance logits. DRKF's
  classifier sees one utterance; the recovered latents then carry the conversation's evidence to it;
- ``"zero"``: zero tokens (the no-recovery baseline).

The release's KL term passes probabilities where ``F.kl_div`` needs log-probabilities and scores the
audio term with the text classifier on text representations; here it is a true KL between log-softmax
outputs of one classifier per modality (:func:`consistency_kl`). Every difference from the release is
listed in ``docs/releases/drkf.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batching import DialogueBatch, PackedBatch
from ..data.corpus import MODALITIES
from ..diffusion.disc import DISCDiffusion
from ..nn.fusion_encoder import FusionEncoder
from .dialogue_context import DialogueLayout, dialogue_context
from .layers import IMPLEMENTATIONS, layer_set

RECOVERY_MODES = ("diffusion", "token", "zero")
INPUT_KINDS = ("vector", "sequence")
FUSION_ORDER = ("audio", "text", "video")  # the release's sequence order: audio first, then text
# config/hyper_params_config.py of the release (aug_classification_loss_w = 1 is defined there but its
# loss is commented out in train.py, so it is not a term here).
RELEASE_LOSS_WEIGHTS = {"ce": 1.0, "pair": 0.2, "nt_xent": 0.2, "info_nce": 0.2, "recon": 0.2, "kl": 1.0}


# ---- the losses, as functions of tensors -------------------------------------------------------


def nt_xent(raw: Tensor, augmented: Tensor, temperature) -> Tensor:
    """NT-Xent between two views [N, D] of the same N samples: the 2N L2-normalised rows, cosine
    similarities / temperature, self-similarity excluded; row k's positive is its other view; mean
    cross-entropy over the 2N rows."""
    _check_views("nt_xent", raw, augmented)
    n = raw.shape[0]
    z = F.normalize(torch.cat([raw, augmented]), dim=1)
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=sim.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(sim.device)
    return F.cross_entropy(sim, positives)


def inter_modal_info_nce(first: Tensor, second: Tensor, temperature) -> Tensor:
    """InfoNCE from ``first`` to ``second`` (the release: audio rows against text columns): row i's
    positive is column i of the cosine-similarity matrix / temperature."""
    _check_views("inter_modal_info_nce", first, second)
    sim = (F.normalize(first, dim=1) @ F.normalize(second, dim=1).t()) / temperature
    return F.cross_entropy(sim, torch.arange(first.shape[0], device=sim.device))


def consistency_kl(raw_logits: Tensor, augmented_logits: Tensor) -> Tensor:
    """KL(p_augmented || p_raw), averaged over samples, from log-softmax outputs (the release's
    ``F.kl_div(origin_probs, aug_probs)`` gives probabilities where log-probabilities are required)."""
    return F.kl_div(F.log_softmax(raw_logits, dim=-1), F.log_softmax(augmented_logits, dim=-1),
                    log_target=True, reduction="batchmean")


def ordered_pairs(n: int, max_pairs: Optional[int] = None,
                  generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Row indices (i, j) of the ordered pairs i ≠ j of n samples, in row-major order (the release's
    double loop); with ``max_pairs`` below n(n−1), a uniform sample of that many distinct pairs."""
    if n < 2:
        raise ValueError(f"ordered_pairs: pairs need at least 2 samples; got n = {n}")
    total = n * (n - 1)
    if max_pairs is not None and max_pairs < total:
        if max_pairs < 1:
            raise ValueError(f"ordered_pairs: max_pairs must be >= 1; got {max_pairs}")
        flat = torch.randperm(total, generator=generator)[:max_pairs].sort().values
    else:
        flat = torch.arange(total)
    i = torch.div(flat, n - 1, rounding_mode="floor")
    j = flat - i * (n - 1)
    return i, j + (j >= i).long()  # skip the diagonal


def pair_targets(labels: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """1 where the emotions of samples i and j match, else 0 (the Emotion Discrimination targets)."""
    return (labels[i] == labels[j]).long()


def _check_views(who: str, a: Tensor, b: Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{who}: the two views must be [N, D] of the same shape; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"{who}: a contrastive loss needs at least 2 samples (negatives); got N = {a.shape[0]}")


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean over the first ``lengths[n]`` tokens of each row of x [N, T, D]."""
    valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    return (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1.0)


# ---- ORL modules (release names) ---------------------------------------------------------------


class ResidualAE(nn.Module):
    """MMIN-style residual autoencoder (the release's ``ResidualAE``, dropout 0, no batch norm): blocks
    ``encoder_i`` (Linear+LeakyReLU down ``layers``, no activation after the last) and ``decoder_i``
    (Linear+ReLU back up, a plain Linear to the input width); block i reads the running sum of the input
    and the previous block's output; ``transition`` (Linear, ReLU, Linear) maps the final sum.
    ``forward(x [..., D])`` returns (augmented [..., D], concatenated block latents)."""

    def __init__(self, layers: Sequence[int], blocks: int, input_dim: int, dropout: float = 0.0):
        super().__init__()
        if not layers or any(int(w) < 1 for w in layers) or blocks < 1:
            raise ValueError(f"ResidualAE: layers must be positive widths and blocks >= 1; got {list(layers)}, "
                             f"{blocks}")
        self.blocks = blocks
        self.transition = nn.Sequential(nn.Linear(input_dim, input_dim), nn.ReLU(), nn.Linear(input_dim, input_dim))
        for b in range(blocks):
            setattr(self, f"encoder_{b}", self._encoder(list(layers), input_dim, dropout))
            setattr(self, f"decoder_{b}", self._decoder(list(layers), input_dim, dropout))

    @staticmethod
    def _encoder(layers, input_dim, dropout) -> nn.Sequential:
        parts, width = [], input_dim
        for k, out in enumerate(layers):
            parts.append(nn.Linear(width, out))
            if k < len(layers) - 1:
                parts.append(nn.LeakyReLU())
                if dropout > 0:
                    parts.append(nn.Dropout(dropout))
            width = out
        return nn.Sequential(*parts)

    @staticmethod
    def _decoder(layers, input_dim, dropout) -> nn.Sequential:
        widths = list(reversed(layers)) + [input_dim]
        parts = []
        for k in range(len(widths) - 2):
            parts += [nn.Linear(widths[k], widths[k + 1]), nn.ReLU()]
            if dropout > 0:
                parts.append(nn.Dropout(dropout))
        parts.append(nn.Linear(widths[-2], widths[-1]))
        return nn.Sequential(*parts)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        running, out, latents = x, torch.zeros_like(x), []
        for b in range(self.blocks):
            running = running + out
            latent = getattr(self, f"encoder_{b}")(running)
            out = getattr(self, f"decoder_{b}")(latent)
            latents.append(latent)
        return self.transition(running + out), torch.cat(latents, dim=-1)


class ProjectionHead(nn.Module):
    """``fc1`` (in → in), ReLU, ``fc2`` (in → out): the release's audio/text projection heads."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, input_dim)
        self.fc2 = nn.Linear(input_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class LearnableTemperature(nn.Module):
    """``sigmoid(temperature)``, the parameter initialised to ``initial`` (release 1.0, i.e. 0.731)."""

    def __init__(self, initial: float = 1.0):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(float(initial)))

    def forward(self) -> Tensor:
        return torch.sigmoid(self.temperature)


# ---- the model ---------------------------------------------------------------------------------


@dataclass
class Tokens:
    """Per-modality token sequences of N utterances: ``tokens[m]`` [N, T_m, W_m], ``lengths[m]`` [N]."""
    tokens: Dict[str, Tensor]
    lengths: Dict[str, Tensor]
    availability: Tensor  # bool [N, 3] in MODALITIES order


class DRKF(nn.Module):
    """DRKF recovery + classification (module doc).

    Args:
        feature_dims: modality -> input width (utterance-vector width, or token width for sequences).
        num_classes: emotion classes (release 4).
        modalities: the modalities fused, among ``FUSION_ORDER`` (release audio + text).
        inputs: ``"vector"`` (``[N, D_m]`` per modality) or ``"sequence"`` (``[N, T_m, D_m]`` + lengths).
        recovery: ``"diffusion"``, ``"token"`` or ``"zero"`` (module doc); diffusion needs vectors.
        latent_channels, latent_length: the C × L latent of a vector (tokens: L of width C).
        hidden, num_layers, heads, intermediate, max_positions, dropout, attention_dropout: the fusion
            BERT (release 1,024 / 6 / 8 / 4,096 / 2,800 / 0.1 / 0.1).
        ae_layers, ae_blocks, ae_dropout: the augmentation autoencoders (release 256-128-64, 5, 0).
        temperature_init: initial value of the temperature parameter (release 1.0).
        pseudo_temperature: softmax temperature of the diffusion condition.
        unet, timesteps, sampling_steps: DISC-Diffusion generators (``recovery="diffusion"``).
        prediction, scaling, condition_observed: the generators' parameterisation, latent scaling and
            conditioning on the other observed modality (see :class:`~imer_fast.diffusion.DISCDiffusion`).
        recovery_samples: recovered latent = mean of this many samples (1: one sample, as FedDISC); more
            samples approach the conditional mean, the minimum-MSE estimate of the missing latent.
        condition_context, context_window: condition the generators on context-aware pseudo logits: the
            utterance's own plus a linear head on its neighbours' label-free class probabilities within
            ``context_window`` turns, same speaker and other speakers (see
            :mod:`~imer_fast.models.dialogue_context`); the model then needs the utterances' dialogue
            layout to recover. Diffusion recovery only (ignored for ``token`` and ``zero``).
        encoders: optional modality -> module mapping the raw input of that modality to tokens
            [N, T, D_m] (or a tuple (tokens, lengths)); sequence inputs only.
        layers: "fused" (imer_fast ops) or "reference" (every fused op forced to its eager ``_ref``).
    """

    def __init__(self, feature_dims: Mapping[str, int], num_classes: int, *,
                 modalities: Sequence[str] = ("audio", "text"), inputs: str = "vector", recovery: str = "token",
                 latent_channels: int = 32, latent_length: int = 48, hidden: int = 1024, num_layers: int = 6,
                 heads: int = 8, intermediate: int = 4096, max_positions: int = 2800, dropout: float = 0.1,
                 attention_dropout: float = 0.1, ae_layers: Sequence[int] = (256, 128, 64), ae_blocks: int = 5,
                 ae_dropout: float = 0.0, temperature_init: float = 1.0, pseudo_temperature: float = 1.0,
                 unet: Optional[Mapping] = None, timesteps: int = 1000, sampling_steps: int = 50,
                 prediction: str = "eps", scaling: str = "minmax", condition_observed: bool = False,
                 recovery_samples: int = 1, condition_context: bool = False, context_window: int = 4,
                 encoders: Optional[Mapping[str, nn.Module]] = None, layers: str = "fused"):
        super().__init__()
        modalities = tuple(modalities)
        if not modalities or len(set(modalities)) != len(modalities) or any(m not in FUSION_ORDER for m in modalities):
            raise ValueError(f"DRKF: modalities must be distinct names among {FUSION_ORDER}; got {modalities}")
        if len(modalities) < 2:
            raise ValueError(f"DRKF: fusion needs at least two modalities; got {modalities}")
        absent = [m for m in modalities if m not in feature_dims]
        if absent:
            raise ValueError(f"DRKF: feature_dims has no width for {absent} (modalities {modalities})")
        if inputs not in INPUT_KINDS:
            raise ValueError(f"DRKF: inputs must be one of {INPUT_KINDS}; got {inputs!r}")
        if recovery not in RECOVERY_MODES:
            raise ValueError(f"DRKF: recovery must be one of {RECOVERY_MODES}; got {recovery!r}")
        if recovery == "diffusion" and inputs != "vector":
            raise ValueError("DRKF: recovery='diffusion' generates utterance latents, so it needs inputs='vector'; "
                             "use recovery='token' or 'zero' for token-level sequences")
        if encoders and inputs != "sequence":
            raise ValueError("DRKF: encoders map raw inputs to token sequences; they need inputs='sequence'")
        if layers not in IMPLEMENTATIONS:
            raise ValueError(f"DRKF: layers must be one of {IMPLEMENTATIONS}; got {layers!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"DRKF: num_classes must be an int >= 2; got {num_classes!r}")
        self.layers = layer_set(layers)
        self.modalities = tuple(m for m in FUSION_ORDER if m in modalities)
        if not isinstance(recovery_samples, int) or recovery_samples < 1:
            raise ValueError(f"DRKF: recovery_samples must be an int >= 1; got {recovery_samples!r}")
        if not isinstance(context_window, int) or context_window < 1:
            raise ValueError(f"DRKF: context_window must be an int >= 1; got {context_window!r}")
        self.inputs, self.recovery_mode, self.num_classes = inputs, recovery, num_classes
        # The context enters through the generators' condition, so it means nothing without them.
        self.condition_context = condition_context and recovery == "diffusion"
        self.context_window = context_window
        self.recovery_samples = recovery_samples
        self.feature_dims = {m: int(feature_dims[m]) for m in self.modalities}
        self.latent_shape = (latent_channels, latent_length)
        token_width = {m: latent_channels if inputs == "vector" else self.feature_dims[m] for m in self.modalities}
        self.encoders = nn.ModuleDict(dict(encoders or {}))
        self.token_in = nn.ModuleDict({m: nn.Identity() if token_width[m] == hidden else nn.Linear(token_width[m], hidden)
                                       for m in self.modalities})
        if recovery != "zero":
            shape = {m: (latent_length, latent_channels) if inputs == "vector" else (1, token_width[m])
                     for m in self.modalities}
            self.missing_tokens = nn.ParameterDict({m: nn.Parameter(torch.zeros(shape[m])) for m in self.modalities})
        self.augment = nn.ModuleDict({m: ResidualAE(ae_layers, ae_blocks, hidden, ae_dropout) for m in self.modalities})
        self.projection = nn.ModuleDict({m: ProjectionHead(hidden, hidden) for m in self.modalities})
        self.temperature = LearnableTemperature(temperature_init)
        self.kl_classifier = nn.ModuleDict({m: nn.Linear(hidden, num_classes) for m in self.modalities})
        self.fusion = FusionEncoder(hidden, num_layers, heads, intermediate, max_positions, dropout=dropout,
                                    attention_dropout=attention_dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.binary_classifier = nn.Linear(hidden, 2)
        # Built last, what only the diffusion model has after what every model has: seeded alike, the
        # diffusion, token and zero-fill variants start from the same weights wherever they share them.
        if inputs == "vector":
            self.recovery = DISCDiffusion(self.feature_dims, num_classes, latent_channels=latent_channels,
                                          latent_length=latent_length, temperature=pseudo_temperature,
                                          timesteps=timesteps, unet=unet, sampling_steps=sampling_steps,
                                          prediction=prediction, scaling=scaling,
                                          condition_observed=condition_observed, unet_cls=self.layers.unet,
                                          build_generators=recovery == "diffusion")
        if self.condition_context:  # starts as the identity on the utterance's own logits
            self.context_head = nn.Linear(2 * num_classes, num_classes)
            nn.init.zeros_(self.context_head.weight)
            nn.init.zeros_(self.context_head.bias)
        longest = 1 + len(self.modalities) + (latent_length * len(self.modalities) if inputs == "vector" else 0)
        if longest > max_positions:
            raise ValueError(f"DRKF: {len(self.modalities)} modalities of {latent_length} tokens need {longest} "
                             f"positions but max_positions is {max_positions}")

    # ---- parameter groups (the stages train and freeze these) ------------------------------------

    def parameter_groups(self) -> Dict[str, list]:
        """``drkf`` (everything but the generators: stage 1), ``recovery`` (the generators) and ``fusion``
        (token maps, missing tokens, fusion encoder and heads: the fine-tuning stage)."""
        generators = [p for n, p in self.named_parameters() if n.startswith("recovery.score_")]
        generator_ids = {id(p) for p in generators}
        fusion = [p for prefix in ("token_in.", "missing_tokens.", "fusion.", "classifier.", "binary_classifier.",
                                   "context_head.")
                  for n, p in self.named_parameters() if n.startswith(prefix)]
        return {"drkf": [p for p in self.parameters() if id(p) not in generator_ids], "recovery": generators,
                "fusion": fusion}

    # ---- tokens ---------------------------------------------------------------------------------

    def observed_tokens(self, features: Mapping[str, Tensor], availability: Optional[Tensor] = None,
                        lengths: Optional[Mapping[str, Tensor]] = None) -> Tokens:
        """Tokens of every modality as given (missing entries not yet replaced; see :meth:`fill`)."""
        if not isinstance(features, Mapping):
            raise ValueError(f"DRKF: features must map modality -> tensor; got {type(features).__name__}")
        absent = [m for m in self.modalities if m not in features]
        if absent:
            raise ValueError(f"DRKF: features has no entry for {absent} (give zeros and availability False for "
                             f"a missing modality)")
        n = int(features[self.modalities[0]].shape[0])
        availability = self._availability(availability, n, features[self.modalities[0]].device)
        tokens, token_lengths = {}, {}
        for m in self.modalities:
            x = features[m]
            if self.inputs == "vector":
                if not isinstance(x, Tensor) or x.dim() != 2 or x.shape != (n, self.feature_dims[m]):
                    raise ValueError(f"DRKF: features[{m!r}] must be [N={n}, {self.feature_dims[m]}] (utterance "
                                     f"vectors); got {_shape(x)}")
                tokens[m] = self.recovery.project(m, x).transpose(1, 2)  # [N, L, C]: L tokens of width C
                token_lengths[m] = torch.full((n,), tokens[m].shape[1], dtype=torch.long, device=x.device)
                continue
            given = None if lengths is None else lengths.get(m)
            if m in self.encoders:
                x = self.encoders[m](x)
                if isinstance(x, tuple):
                    x, given = x
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] != n or x.shape[2] != self.feature_dims[m]:
                raise ValueError(f"DRKF: features[{m!r}] must be token sequences [N={n}, T, {self.feature_dims[m]}]; "
                                 f"got {_shape(x)}")
            if given is None:
                given = torch.full((n,), x.shape[1], dtype=torch.long, device=x.device)
            if not isinstance(given, Tensor) or given.shape != (n,) or given.is_floating_point() \
                    or bool((given < 0).any()) or bool((given > x.shape[1]).any()):
                raise ValueError(f"DRKF: lengths[{m!r}] must be integers [N={n}] in [0, {x.shape[1]}]; got "
                                 f"{_shape(given)}")
            tokens[m], token_lengths[m] = x, given.long()
        return Tokens(tokens, token_lengths, availability)

    def _availability(self, availability: Optional[Tensor], n: int, device) -> Tensor:
        if availability is None:
            return torch.ones(n, len(MODALITIES), dtype=torch.bool, device=device)
        if not isinstance(availability, Tensor) or availability.dtype != torch.bool \
                or tuple(availability.shape) != (n, len(MODALITIES)):
            raise ValueError(f"DRKF: availability must be a bool tensor [N={n}, {len(MODALITIES)}] in {MODALITIES} "
                             f"order; got {_shape(availability)}")
        return availability

    def present(self, tokens: Tokens, modality: str) -> Tensor:
        """bool [N]: the modality is available and has at least one token."""
        return tokens.availability[:, MODALITIES.index(modality)] & (tokens.lengths[modality] > 0)

    def fill(self, tokens: Tokens, mode: Optional[str] = None) -> Tokens:
        """Missing entries replaced by zeros (``"zero"``) or the learned missing token (``"token"``);
        ``mode`` defaults to the model's (diffusion models fill with the missing token, as their
        pseudo-labeller does)."""
        mode = mode or ("token" if self.recovery_mode == "diffusion" else self.recovery_mode)
        out, out_lengths = {}, {}
        for m in self.modalities:
            x, length = tokens.tokens[m], tokens.lengths[m]
            gone = ~self.present(tokens, m)
            if mode == "token":
                replacement = self.missing_tokens[m].to(x.dtype)
            else:
                replacement = x.new_zeros(self.missing_tokens_shape(m))
            if self.inputs == "vector":
                out[m] = torch.where(gone[:, None, None], replacement.expand_as(x), x)
                out_lengths[m] = length
            else:
                # A missing sequence becomes one replacement token at position 0.
                if x.shape[1] == 0:
                    x = x.new_zeros(x.shape[0], 1, x.shape[2])
                first = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
                first[0] = True
                use = gone[:, None] & first[None, :]
                out[m] = torch.where(use[..., None], replacement[0].expand_as(x), x)
                out_lengths[m] = torch.where(gone, torch.ones_like(length), length)
        return Tokens(out, out_lengths, tokens.availability)

    def missing_tokens_shape(self, modality: str) -> Tuple[int, int]:
        c, length = self.latent_shape
        return (length, c) if self.inputs == "vector" else (1, self.feature_dims[modality])

    # ---- fusion ---------------------------------------------------------------------------------

    def embed(self, modality: str, x: Tensor) -> Tensor:
        return self.token_in[modality](x)

    def encode(self, tokens: Mapping[str, Tensor], lengths: Mapping[str, Tensor]) -> Tensor:
        """The fusion encoder's ``[CLS]`` state [N, hidden] for ``[CLS] + m_1 + [SEP] + m_2 + [SEP] ...``
        (zero vectors for CLS and SEP, as the release); each row's real tokens are contiguous and its
        padding sits at the end, masked out of the attention."""
        first = tokens[self.modalities[0]]
        n, device = first.shape[0], first.device
        embedded = {m: self.embed(m, tokens[m]) for m in self.modalities}
        hidden = self.fusion.hidden
        full = all(bool((lengths[m] == tokens[m].shape[1]).all()) for m in self.modalities)
        if full:  # every row has the same layout: plain concatenation, no mask
            marker = embedded[self.modalities[0]].new_zeros(n, 1, hidden)
            parts = [marker]
            for m in self.modalities:
                parts += [embedded[m], marker]
            return self.fusion(torch.cat(parts, dim=1))[:, 0]
        totals = 1 + sum(lengths[m] + 1 for m in self.modalities)
        width = int(totals.max())
        dtype = embedded[self.modalities[0]].dtype
        sequence = torch.zeros(n, width, hidden, dtype=dtype, device=device)
        offset = torch.ones(n, dtype=torch.long, device=device)
        rows = torch.arange(n, device=device)[:, None]
        for m in self.modalities:
            steps = torch.arange(tokens[m].shape[1], device=device)[None, :]
            valid = steps < lengths[m][:, None]
            target = offset[:, None] + steps
            # .to: under autocast a Linear token_in gives bf16, an Identity (width = hidden) keeps fp32
            sequence = sequence.index_put((rows.expand_as(target)[valid], target[valid]),
                                          embedded[m][valid].to(dtype))
            offset = offset + lengths[m] + 1  # the [SEP] after this modality stays zero
        key_mask = torch.arange(width, device=device)[None, :] < totals[:, None]
        return self.fusion(sequence, key_mask)[:, 0]

    def classify(self, tokens: Tokens) -> Tuple[Tensor, Tensor]:
        """(logits [N, classes], CLS [N, hidden]) of filled or recovered tokens."""
        cls = self.encode(tokens.tokens, tokens.lengths)
        return self.classifier(cls), cls

    def pair_logits(self, tokens: Tokens, i: Tensor, j: Tensor) -> Tensor:
        """Emotion Discrimination logits [P, 2] of the ordered pairs: the first modality (audio) of row i
        with the other modalities of row j, through the fusion encoder."""
        first = self.modalities[0]
        picked = {m: (tokens.tokens[m][i], tokens.lengths[m][i]) if m == first else
                  (tokens.tokens[m][j], tokens.lengths[m][j]) for m in self.modalities}
        cls = self.encode({m: t for m, (t, _) in picked.items()}, {m: n for m, (_, n) in picked.items()})
        return self.binary_classifier(cls)

    # ---- ORL ------------------------------------------------------------------------------------

    def representation_losses(self, tokens: Tokens) -> Dict[str, Tensor]:
        """ORL terms on the available entries: per modality ``nt_xent_<m>``, ``recon_<m>``, ``kl_<m>``, and
        ``info_nce`` (mean over modality pairs, the first modality's rows against the second's). A term
        whose modality has too few available rows (2 for contrastive terms, 1 otherwise) is left out."""
        temperature = self.temperature()
        raw_pooled, out = {}, {}
        for m in self.modalities:
            rows = self.present(tokens, m)
            if not bool(rows.any()):
                continue
            length = tokens.lengths[m][rows]
            x = self.embed(m, tokens.tokens[m][rows])
            augmented, _ = self.augment[m](x)
            valid = (torch.arange(x.shape[1], device=x.device)[None, :] < length[:, None]).to(x.dtype)[..., None]
            out[f"recon_{m}"] = ((augmented - x) * valid).pow(2).sum() / (valid.sum() * x.shape[-1])
            raw = self.projection[m](masked_mean(x, length))
            aug = masked_mean(augmented, length)
            out[f"kl_{m}"] = consistency_kl(self.kl_classifier[m](raw), self.kl_classifier[m](aug))
            if raw.shape[0] >= 2:
                out[f"nt_xent_{m}"] = nt_xent(raw, aug, temperature)
            full = torch.zeros(rows.shape[0], raw.shape[1], dtype=raw.dtype, device=raw.device)
            raw_pooled[m] = (rows, full.index_put((rows.nonzero().flatten(),), raw))
        terms = []
        for a_index, a in enumerate(self.modalities):
            for b in self.modalities[a_index + 1:]:
                if a in raw_pooled and b in raw_pooled:
                    both = raw_pooled[a][0] & raw_pooled[b][0]
                    if int(both.sum()) >= 2:
                        terms.append(inter_modal_info_nce(raw_pooled[a][1][both], raw_pooled[b][1][both], temperature))
        if terms:
            out["info_nce"] = torch.stack(terms).mean()
        return out

    # ---- recovery -------------------------------------------------------------------------------

    def pseudo_logits(self, tokens: Tokens) -> Tensor:
        """DRKF's own prediction with every missing modality replaced by its learned missing token (the
        condition of the generators; labels are never read)."""
        return self.classify(self.fill(tokens, "token"))[0]

    def hidden_pseudo_logits(self, tokens: Tokens) -> Dict[str, Tensor]:
        """modality ``m`` -> :meth:`pseudo_logits` with ``m`` hidden in every utterance: the condition of
        ``m``'s generator as it is when ``m`` is really missing (where ``m`` is missing already, the same
        as :meth:`pseudo_logits`)."""
        out = {}
        for m in self.modalities:
            hidden = tokens.availability.clone()
            hidden[:, MODALITIES.index(m)] = False
            out[m] = self.pseudo_logits(Tokens(tokens.tokens, tokens.lengths, hidden))
        return out

    def context_logits(self, logits: Tensor, neighbour_logits: Tensor, layout: Optional[DialogueLayout]) -> Tensor:
        """``logits`` plus the context head's reading of the class probabilities of ``neighbour_logits``
        (``condition_context``; both detached): the context-aware pseudo logits. Neighbours are read as
        they are observed, in training and at recovery alike."""
        if not isinstance(layout, DialogueLayout):
            raise ValueError(f"DRKF: condition_context needs the utterances' dialogue layout (layout="
                             f"DialogueLayout.of(packed_batch), or predict_batch); got {type(layout).__name__}")
        context = dialogue_context(F.softmax(neighbour_logits.detach(), dim=1), layout, self.context_window)
        return logits.detach() + self.context_head(context)

    def generator_conditions(self, tokens: Tokens, layout: Optional[DialogueLayout] = None,
                             pseudo_logits: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """modality ``m`` -> the pseudo logits ``m``'s generator is conditioned on: :meth:`hidden_pseudo_logits`,
        made context-aware by :meth:`context_logits` (neighbours' :meth:`pseudo_logits`, computed unless
        given) with ``condition_context``."""
        own = self.hidden_pseudo_logits(tokens)
        if not self.condition_context:
            return own
        neighbours = self.pseudo_logits(tokens) if pseudo_logits is None else pseudo_logits
        return {m: self.context_logits(logits, neighbours, layout) for m, logits in own.items()}

    def recover(self, features: Mapping[str, Tensor], tokens: Tokens, pseudo_logits: Tensor, *,
                layout: Optional[DialogueLayout] = None, seed: Optional[int] = None,
                steps: Optional[int] = None) -> Tokens:
        """Observed tokens kept; missing latents sampled by DISC-Diffusion (``recovery="diffusion"``)."""
        given = {m: features[m] for m in self.modalities}
        condition = (self.generator_conditions(tokens, layout, pseudo_logits) if self.condition_context
                     else pseudo_logits.detach())
        latents = self.recovery.recover(given, tokens.availability, condition, seed=seed, steps=steps,
                                        samples=self.recovery_samples)
        return Tokens({m: latents[m].transpose(1, 2) for m in self.modalities}, tokens.lengths, tokens.availability)

    def complete(self, features: Mapping[str, Tensor], tokens: Tokens, *, layout: Optional[DialogueLayout] = None,
                 seed: Optional[int] = None, steps: Optional[int] = None) -> Tuple[Tokens, Optional[Tensor]]:
        """Tokens with every missing entry replaced by the model's recovery mode, and the pseudo logits
        (diffusion only)."""
        if self.recovery_mode != "diffusion":
            return self.fill(tokens), None
        pseudo = self.pseudo_logits(tokens)
        return self.recover(features, tokens, pseudo, layout=layout, seed=seed, steps=steps), pseudo

    # ---- prediction -----------------------------------------------------------------------------

    def forward(self, features: Mapping[str, Tensor], availability: Optional[Tensor] = None,
                lengths: Optional[Mapping[str, Tensor]] = None, *, layout: Optional[DialogueLayout] = None,
                seed: Optional[int] = None, steps: Optional[int] = None) -> Dict[str, object]:
        """Label-free prediction: ``{"logits": [N, classes], "cls": [N, hidden], "tokens": modality ->
        [N, T, W] (observed or recovered), "pseudo_logits": [N, classes] or None}`` (the token-filled
        prediction; with ``condition_context`` the generators' condition adds the context head to it).

        features: modality -> [N, D_m] (vectors) or [N, T_m, D_m] (sequences, with ``lengths``);
        availability: bool [N, 3] in MODALITIES order (None: all available); layout: where the utterances
        sit in their dialogues (needed with ``condition_context``)."""
        with self.layers.context():
            observed = self.observed_tokens(features, availability, lengths)
            tokens, pseudo = self.complete(features, observed, layout=layout, seed=seed, steps=steps)
            logits, cls = self.classify(tokens)
        return {"logits": logits, "cls": cls, "tokens": tokens.tokens, "pseudo_logits": pseudo}

    def predict_batch(self, batch, *, seed: Optional[int] = None, steps: Optional[int] = None) -> Dict[str, object]:
        """:meth:`forward` on a :class:`DialogueBatch` or :class:`PackedBatch` (utterances in packed order)."""
        packed = batch.packed() if isinstance(batch, DialogueBatch) else batch
        if not isinstance(packed, PackedBatch):
            raise ValueError(f"DRKF.predict_batch: expected a DialogueBatch or PackedBatch; got {type(batch).__name__}")
        return self(packed.features, packed.availability, layout=DialogueLayout.of(packed), seed=seed, steps=steps)

    # ---- release checkpoints --------------------------------------------------------------------

    def load_release_fusion(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the release's ``adapter_multimodel_fusion_dict`` (``MultimodalBertModel``): ``bert.*`` into
        the fusion encoder (vocabulary and pooler skipped), ``classifier`` and ``binary_classifier`` into
        the heads. Nothing is changed unless every part loads."""
        name = "DRKF.load_release_fusion"
        unknown = [k for k in state_dict if not k.startswith(("bert.", "classifier.", "binary_classifier."))]
        if unknown:
            raise ValueError(f"{name}: keys that are not part of MultimodalBertModel: {unknown[:5]}")
        heads = {}
        for head in ("classifier", "binary_classifier"):
            entries = {k[len(head) + 1:]: v for k, v in state_dict.items() if k.startswith(head + ".")}
            for key, ours in getattr(self, head).state_dict().items():
                theirs = entries.get(key)
                if not isinstance(theirs, Tensor) or theirs.shape != ours.shape:
                    got = tuple(theirs.shape) if isinstance(theirs, Tensor) else "missing"
                    raise ValueError(f"{name}: {head}.{key} must be {tuple(ours.shape)} (this model: "
                                     f"{self.num_classes} classes, hidden {self.fusion.hidden}); got {got}")
            heads[head] = entries
        parts = ("fusion", *heads)
        backup = {p: {k: v.detach().clone() for k, v in getattr(self, p).state_dict().items()} for p in parts}
        try:
            self.fusion.load_bert_state_dict(state_dict, prefix="bert.")
            for head, entries in heads.items():
                getattr(self, head).load_state_dict(entries, strict=True)
        except (RuntimeError, KeyError, ValueError) as error:
            for part in parts:
                getattr(self, part).load_state_dict(backup[part])
            raise ValueError(f"{name}: {error}") from error


def _shape(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


__all__ = ["DRKF", "Tokens", "ResidualAE", "ProjectionHead", "LearnableTemperature", "nt_xent",
           "inter_modal_info_nce", "consistency_kl", "ordered_pairs", "pair_targets", "masked_mean",
           "RELEASE_LOSS_WEIGHTS", "RECOVERY_MODES"]
