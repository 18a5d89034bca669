"""FedDISC (arXiv 2511.00344) as one recovery-plus-classification model.

Pieces (state-dict prefixes in brackets):

- projections of each modality's utterance vector to a ``C × L`` latent (32 × 48) [``recovery.proj_*``];
- the pseudo-labeller: the Dialogue Graph Network over the available (zero-filled) features — GCNet's
  ``GraphModel`` [``dgn.*``] — whose logits are added to a MulT head over the available latents
  [``pseudo.*``], as the release's ``pseudo`` model adds graph and cross-modal logits;
- DISC-Diffusion: one conditional U-Net per modality [``recovery.score_l_va`` …], conditioned on
  ``softmax(pseudo_logits / T)`` (+ optional speaker identity and DGN dialogue context);
- the classifier: the tri-modal MulT with missing / non-missing prompts [``classifier.*``].

``forward`` never reads labels: the condition is built from predicted labels only (the release mixes
ground-truth test labels into it). ``recovery="zero"`` gives the no-recovery baseline: missing latents
are zeros (plus the learned missing prompt) and no generator is built.

A release ``FedDISC_train_class`` checkpoint (its ``score_*``, ``proj_*``, MulT and prompt entries)
loads with :meth:`FedDISC.load_release_classifier`. Differences from the release are listed in
``docs/releases/feddisc.md`` §6 and in the README.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from ..data.batching import DialogueBatch, PackedBatch
from ..data.corpus import MODALITIES
from ..diffusion.disc import DISCDiffusion
from ..nn.dialogue_graph_network import GCNET_ORDER
from .layers import IMPLEMENTATIONS, layer_set
from .mult_classifier import MulTClassifier

RECOVERY_MODES = ("diffusion", "zero")
CLASSIFIER_PREFIXES = ("trans_", "proj1_3.", "proj2_3.", "out_layer_3.", "prompt")


@dataclass
class PseudoLabels:
    """The pseudo-labeller's output for N packed utterances."""
    logits: Tensor    # [N, classes]: DGN logits + MulT logits
    context: Tensor   # [N, H]: the DGN's hidden state (dialogue context)


def _encoder_depth(state: Mapping[str, Tensor], encoder: str) -> int:
    """How many layers ``encoder`` (e.g. ``trans_l_mem``) has in a state_dict."""
    prefix = f"{encoder}.layers."
    return len({key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)})


class FedDISC(nn.Module):
    """FedDISC recovery + classification (module doc).

    Args:
        feature_dims: modality -> utterance feature width (all three modalities).
        num_classes: emotion classes.
        num_speakers: speakers per dialogue (DGN speaker relations = num_speakers²).
        latent_channels, latent_length: latent per utterance (release 32 × 48).
        temperature: pseudo-label softmax temperature (release 0.2 IEMOCAP, 1.0 MOSI/MOSEI).
        recovery: "diffusion" (DISC-Diffusion) or "zero" (no-recovery baseline).
        condition_speaker, condition_context, condition_observed: add speaker identity / DGN context / the
            utterance's other observed modalities to the condition (see :class:`DISCDiffusion`).
        prediction, scaling: the generators' parameterisation ("eps" | "v") and latent scaling ("minmax" |
            "standard"); the release: "eps", "minmax".
        recovery_samples: a recovered latent is the mean of this many samples (release: 1).
        unet: keyword overrides of the U-Net denoisers (release defaults otherwise).
        timesteps, sampler, sampling_steps: diffusion process and recovery sampler (release: 1,000 steps,
            DDIM 50 "quad").
        mult: keyword overrides of both MulT heads (see :class:`MulTClassifier`).
        classifier_mult: further overrides of the classifier head alone (a release checkpoint of
            ``nlevels`` 2, MOSI's: ``mult=dict(num_heads=4, layers=2), classifier_mult=dict(mem_layers=3)``).
        dgn_hidden, dgn_graph_hidden, window_past, window_future, dgn_dropout: the Dialogue Graph
            Network (release: 100, 50, 6, 6, 0.5; LSTM base, no matching attention).
        layers: "fused" (imer_fast modules) or "reference" (the eager release twins, for benchmarks).
    """

    def __init__(self, feature_dims: Mapping[str, int], num_classes: int, *, num_speakers: int = 2,
                 latent_channels: int = 32, latent_length: int = 48, temperature: float = 0.2,
                 recovery: str = "diffusion", condition_speaker: bool = False, condition_context: bool = False,
                 condition_observed: bool = False, prediction: str = "eps", scaling: str = "minmax",
                 recovery_samples: int = 1,
                 unet: Optional[Mapping] = None, timesteps: int = 1000, sampler: str = "ddim",
                 sampling_steps: int = 50, mult: Optional[Mapping] = None,
                 classifier_mult: Optional[Mapping] = None, dgn_hidden: int = 100,
                 dgn_graph_hidden: Optional[int] = None, window_past: int = 6, window_future: int = 6,
                 dgn_dropout: float = 0.5, layers: str = "fused"):
        super().__init__()
        missing = [m for m in MODALITIES if m not in feature_dims]
        if missing:
            raise ValueError(f"FedDISC: feature_dims must give a width for every modality {MODALITIES}; missing "
                             f"{missing} (a modality absent from a corpus still needs a width; its entries are all "
                             f"missing)")
        if recovery not in RECOVERY_MODES:
            raise ValueError(f"FedDISC: recovery must be one of {RECOVERY_MODES}; got {recovery!r}")
        if layers not in IMPLEMENTATIONS:
            raise ValueError(f"FedDISC: layers must be one of {IMPLEMENTATIONS}; got {layers!r}")
        if not isinstance(recovery_samples, int) or recovery_samples < 1:
            raise ValueError(f"FedDISC: recovery_samples must be an int >= 1; got {recovery_samples!r}")
        if num_speakers < 1:
            raise ValueError(f"FedDISC: num_speakers must be >= 1; got {num_speakers}")
        self.layers = layer_set(layers)
        self.recovery_mode, self.num_classes, self.recovery_samples = recovery, num_classes, recovery_samples
        self.latent_shape = (latent_channels, latent_length)
        graph_hidden = dgn_graph_hidden if dgn_graph_hidden is not None else dgn_hidden // 2
        self.context_dim = 2 * dgn_hidden + graph_hidden
        self.dgn = self.layers.dialogue_graph(
            feature_dims["audio"], feature_dims["text"], feature_dims["video"], dgn_hidden, graph_hidden,
            num_speakers, window_past, window_future, num_classes, dropout=dgn_dropout, time_attn=False)
        mult_kwargs = dict(mult or {})
        mult_kwargs["transformer_cls"] = self.layers.transformer
        self.pseudo = MulTClassifier(latent_channels, latent_length, num_classes, **mult_kwargs)
        self.recovery = DISCDiffusion(
            feature_dims, num_classes, latent_channels=latent_channels, latent_length=latent_length,
            temperature=temperature, num_speakers=num_speakers if condition_speaker else 0,
            context_dim=self.context_dim if condition_context else 0, condition_observed=condition_observed,
            prediction=prediction, scaling=scaling, timesteps=timesteps, unet=unet,
            sampler=sampler, sampling_steps=sampling_steps, unet_cls=self.layers.unet,
            build_generators=recovery == "diffusion")
        self.classifier = MulTClassifier(latent_channels, latent_length, num_classes,
                                         **{**mult_kwargs, **dict(classifier_mult or {})})

    @property
    def feature_dims(self) -> Dict[str, int]:
        return dict(self.recovery.feature_dims)

    # ---- parameter groups (the stages train and freeze these) ------------------------------------

    def parameter_groups(self) -> Dict[str, list]:
        """``extractor`` (projections + pseudo-labeller), ``recovery`` (generators), ``classifier``."""
        projections = [p for n, p in self.recovery.named_parameters() if n.startswith("proj_")]
        generators = [p for n, p in self.recovery.named_parameters() if n.startswith("score_")]
        return {"extractor": projections + list(self.dgn.parameters()) + list(self.pseudo.parameters()),
                "recovery": generators, "classifier": list(self.classifier.parameters())}

    # ---- pieces ---------------------------------------------------------------------------------

    def observed_latents(self, packed: PackedBatch) -> Dict[str, Tensor]:
        """Projected latents [N, C, L], zeros where the modality is unavailable."""
        out = {}
        for k, m in enumerate(MODALITIES):
            z = self.recovery.project(m, packed.features[m])
            out[m] = z * packed.availability[:, k].to(z.dtype).view(-1, 1, 1)
        return out

    def pseudo_labels(self, batch: DialogueBatch, packed: PackedBatch,
                      latents: Optional[Dict[str, Tensor]] = None) -> PseudoLabels:
        """DGN logits over the dialogue + MulT logits over the available latents (no labels read)."""
        feats = torch.cat([batch.features[m] for m in GCNET_ORDER], dim=-1).transpose(0, 1)
        logits, _, hidden = self.dgn([feats], batch.speakers, batch.utterance_mask.to(feats.dtype),
                                     batch.lengths.tolist())
        steps = logits.shape[0]
        flat = packed.batch_index * steps + packed.position
        graph_logits = logits.transpose(0, 1).reshape(-1, logits.shape[-1])[flat]
        context = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])[flat]
        latents = self.observed_latents(packed) if latents is None else latents
        mult_logits = self.pseudo(latents, ~packed.availability)["M"]
        return PseudoLabels(graph_logits + mult_logits, context)

    def recover(self, packed: PackedBatch, pseudo: PseudoLabels, latents: Optional[Dict[str, Tensor]] = None, *,
                seed: Optional[int] = None, steps: Optional[int] = None) -> Dict[str, Tensor]:
        """Latents of every modality: observed where available; where missing, sampled by DISC-Diffusion
        (``recovery="diffusion"``) or zeros (``"zero"``)."""
        latents = self.observed_latents(packed) if latents is None else latents
        if self.recovery_mode == "zero":
            return latents
        speakers = packed.speakers if self.recovery.num_speakers else None
        context = pseudo.context.detach() if self.recovery.context_dim else None
        return self.recovery.recover(packed.features, packed.availability, pseudo.logits.detach(),
                                     speakers=speakers, context=context, seed=seed, steps=steps,
                                     samples=self.recovery_samples)

    def classify(self, latents: Mapping[str, Tensor], availability: Tensor) -> Tensor:
        return self.classifier(latents, ~availability)["M"]

    def forward(self, batch: DialogueBatch, *, seed: Optional[int] = None,
                steps: Optional[int] = None) -> Dict[str, Tensor]:
        """Label-free prediction for a batch: ``{"logits": [N, C], "pseudo_logits": [N, C], "latents":
        modality -> [N, C, L]}`` over the packed utterances (``batch.packed()`` order)."""
        with self.layers.context():
            packed = batch.packed()
            observed = self.observed_latents(packed)
            pseudo = self.pseudo_labels(batch, packed, observed)
            latents = self.recover(packed, pseudo, observed, seed=seed, steps=steps)
            return {"logits": self.classify(latents, packed.availability), "pseudo_logits": pseudo.logits,
                    "latents": latents}

    # ---- release checkpoints --------------------------------------------------------------------

    def load_release_classifier(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a release ``FedDISC_train_class`` state_dict: ``score_*`` / ``proj_*`` into the recovery
        module, the MulT encoders, head and prompts into the classifier. Its BERT (``text_model.*``) is
        ignored; any other key is an error."""
        recovery, classifier, unknown = {}, {}, []
        for key, value in state_dict.items():
            if key.startswith(("score_", "proj_")) and not key.startswith(("proj1_3.", "proj2_3.")):
                recovery[key] = value
            elif key.startswith(CLASSIFIER_PREFIXES):
                classifier[key] = value
            elif not key.startswith("text_model."):
                unknown.append(key)
        if unknown:
            raise ValueError(f"FedDISC.load_release_classifier: keys that are not part of FedDISC_train_class: "
                             f"{unknown[:5]}")
        depths = {name: _encoder_depth(source, "trans_l_mem") for name, source in
                  (("checkpoint", classifier), ("model", self.classifier.state_dict()))}
        if depths["checkpoint"] != depths["model"]:
            raise ValueError(f"FedDISC.load_release_classifier: the checkpoint's memory encoders have "
                             f"{depths['checkpoint']} layers, this model's {depths['model']} (the release gives them "
                             f"max(nlevels, 3)): build the model with classifier_mult=dict(mem_layers="
                             f"{depths['checkpoint']})")
        self.classifier.load_state_dict(classifier, strict=True)
        missing = self.recovery.load_release_generators(recovery)
        if missing:
            raise ValueError(f"FedDISC.load_release_classifier: the checkpoint lacks {missing[:5]}")
