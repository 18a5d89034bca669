"""FedDISC's tri-modal MulT classifier on 32 × 48 utterance latents, with missing / non-missing prompts.

State-dict names follow the release's ``FedDISC_train_class`` (``trans_l_with_a`` … ``trans_v_mem``,
``proj1_3``, ``proj2_3``, ``out_layer_3``, ``promptl_m`` … ``promptv_nm``), so its classifier entries
load unchanged. The MulT encoders run over the latent's ``latent_length`` steps with the utterances as
the batch (``[L, N, C]``), exactly as the release does.

Prompts: the release adds a learned "missing" prompt to a modality whose latent was generated and a
"non-missing" prompt to one that was observed, chosen per client. Here the choice is per utterance and
modality, from the availability mask, so any missing pattern (and mixed batches) work.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.corpus import MODALITIES
from ..nn._checks import require_ints
from ..nn.cross_modal_transformer import CrossModalTransformer

SHORT = {"text": "l", "audio": "a", "video": "v"}  # the release's stream letters


class MulTClassifier(nn.Module):
    """Cross-modal transformer classifier over three latents ``[N, C, L]``.

    Args:
        latent_channels, latent_length: latent shape (release 32 × 48); the cross encoders have width
            ``latent_channels`` and the memory encoders ``2 · latent_channels``.
        num_classes: output width (release: 6 for IEMOCAP-6; 1 for regression).
        num_heads, layers: MulT settings: the cross-modal encoders' depth is the release's ``nlevels``
            (IEMOCAP 4 with 8 heads; MOSI 2 with 4 heads).
        mem_layers: the memory encoders' depth (None: ``layers``). The release's classifier gives them
            ``max(nlevels, 3)`` layers and its pseudo-labeller ``max(nlevels, 2)``: equal to ``layers``
            for IEMOCAP's 4, not for MOSI's 2 (3 in a ``FedDISC_train_class`` checkpoint).
        attn_dropout, attn_dropout_a, attn_dropout_v: attention dropout by the release's type rule
            (queries-then-keys ``la``/``va`` use ``_a``, ``lv``/``av`` use ``_v``, the rest ``attn_dropout``).
        relu_dropout, res_dropout, embed_dropout, output_dropout: as the release (0, 0, 0.2, 0.5).
        attn_mask: MulT's future mask over the latent steps (release True).
        transformer_cls: the encoder class (``CrossModalTransformer``; the eager release twin for benchmarks).
    """

    def __init__(self, latent_channels: int = 32, latent_length: int = 48, num_classes: int = 6, *,
                 num_heads: int = 8, layers: int = 4, mem_layers: Optional[int] = None,
                 attn_dropout: float = 0.2, attn_dropout_a: float = 0.5,
                 attn_dropout_v: float = 0.2, relu_dropout: float = 0.0, res_dropout: float = 0.0,
                 embed_dropout: float = 0.2, output_dropout: float = 0.5, attn_mask: bool = True,
                 transformer_cls: Type[nn.Module] = CrossModalTransformer):
        super().__init__()
        require_ints("MulTClassifier", 1, latent_channels=latent_channels, latent_length=latent_length,
                     num_classes=num_classes, num_heads=num_heads, layers=layers)
        if latent_channels % num_heads:
            raise ValueError(f"MulTClassifier: latent_channels ({latent_channels}) must be divisible by num_heads "
                             f"({num_heads})")
        self.latent_shape = (latent_channels, latent_length)
        self.num_classes, self.output_dropout = num_classes, output_dropout
        for s in ("l", "a", "v"):
            self.register_parameter(f"prompt{s}_m", nn.Parameter(torch.zeros(latent_channels, latent_length)))
        for s in ("l", "a", "v"):
            self.register_parameter(f"prompt{s}_nm", nn.Parameter(torch.zeros(latent_channels, latent_length)))
        dropout_by_keys = {"l": attn_dropout, "a": attn_dropout_a, "v": attn_dropout_v}

        def encoder(width: int, p: float, depth: int) -> nn.Module:
            return transformer_cls(embed_dim=width, num_heads=num_heads, layers=depth, attn_dropout=p,
                                   relu_dropout=relu_dropout, res_dropout=res_dropout, embed_dropout=embed_dropout,
                                   attn_mask=attn_mask)

        for q, k in (("l", "a"), ("l", "v"), ("a", "l"), ("a", "v"), ("v", "l"), ("v", "a")):
            # The release picks an encoder's attention dropout by its key modality.
            self.add_module(f"trans_{q}_with_{k}", encoder(latent_channels, dropout_by_keys[k], layers))
        for s in ("l", "a", "v"):
            self.add_module(f"trans_{s}_mem", encoder(2 * latent_channels, attn_dropout,
                                                      layers if mem_layers is None else mem_layers))
        fused = 6 * latent_channels
        self.proj1_3 = nn.Linear(fused, fused)
        self.proj2_3 = nn.Linear(fused, fused)
        self.out_layer_3 = nn.Linear(fused, num_classes)

    def prompted(self, latents: Mapping[str, Tensor], generated: Optional[Tensor]) -> Dict[str, Tensor]:
        """Latents plus the missing prompt where ``generated`` [N, 3] (MODALITIES order) is True and the
        non-missing prompt elsewhere (``generated=None``: every entry observed)."""
        out = {}
        for k, m in enumerate(MODALITIES):
            z = latents[m]
            nm = getattr(self, f"prompt{SHORT[m]}_nm")
            if generated is None:
                out[m] = z + nm
            else:
                mp = getattr(self, f"prompt{SHORT[m]}_m")
                out[m] = z + torch.where(generated[:, k].view(-1, 1, 1), mp, nm)
        return out

    def forward(self, latents: Mapping[str, Tensor], generated: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """latents: modality -> [N, C, L]; generated: bool [N, 3], True where the latent is not an
        observation (recovered or zero-filled). Returns ``{"M": logits [N, classes], "Feature_t",
        "Feature_a", "Feature_v": [N, 2C]}`` (the release's keys)."""
        self._check(latents, generated)
        z = self.prompted(latents, generated)
        seq = {SHORT[m]: z[m].permute(2, 0, 1) for m in MODALITIES}  # [L, N, C]
        last = {}
        for s, (k1, k2) in (("l", ("a", "v")), ("a", ("l", "v")), ("v", ("l", "a"))):
            h1 = getattr(self, f"trans_{s}_with_{k1}")(seq[s], seq[k1], seq[k1])
            h2 = getattr(self, f"trans_{s}_with_{k2}")(seq[s], seq[k2], seq[k2])
            last[s] = getattr(self, f"trans_{s}_mem")(torch.cat([h1, h2], dim=2))[-1]
        h = torch.cat([last["l"], last["a"], last["v"]], dim=1)
        hidden = F.dropout(F.relu(self.proj1_3(h)), p=self.output_dropout, training=self.training)
        logits = self.out_layer_3(self.proj2_3(hidden) + h)
        return {"M": logits, "Feature_t": last["l"], "Feature_a": last["a"], "Feature_v": last["v"]}

    def _check(self, latents: Mapping[str, Tensor], generated: Optional[Tensor]) -> None:
        n = None
        for m in MODALITIES:
            z = latents.get(m) if isinstance(latents, Mapping) else None
            if not isinstance(z, Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != self.latent_shape:
                got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                raise ValueError(f"MulTClassifier: latents[{m!r}] must be [N, {self.latent_shape[0]}, "
                                 f"{self.latent_shape[1]}]; got {got}")
            if n is not None and z.shape[0] != n:
                raise ValueError(f"MulTClassifier: every latent must have the same N; got {z.shape[0]} for {m!r}, "
                                 f"expected {n}")
            n = z.shape[0]
        if generated is not None and (generated.dtype != torch.bool or tuple(generated.shape) != (n, len(MODALITIES))):
            raise ValueError(f"MulTClassifier: generated must be a bool tensor [{n}, {len(MODALITIES)}]; got "
                             f"{tuple(generated.shape)} {generated.dtype}")
