"""Train and evaluate DRKF (arXiv 2508.01644) with missing-modality recovery, on the shared Trainer.

Stages (``recovery="diffusion"``; the ``token`` and ``zero`` models skip ``generator``):

- ``drkf``: the whole model but the generators, on the modalities each batch has — cross-entropy on
  ``[CLS]`` (missing tokens replaced by the learned missing token, or zeros for ``zero``), Emotion
  Discrimination on ordered pairs, and the ORL terms on the available entries, with the release's loss
  weights (``RELEASE_LOSS_WEIGHTS``, from its ``config/hyper_params_config.py``);
- ``generator``: DISC-Diffusion ε-MSE of each modality's generator on its present (frozen) projections,
  conditioned on DRKF's prediction with that modality hidden — what the generator will be given when
  the modality is really missing;
- ``finetune``: token maps, fusion encoder and heads on completed tokens (diffusion-recovered, learned
  token or zeros), projections frozen; a diffusion model also keeps its token-filled prediction (its
  pseudo-labeller) trained with an equal-weight cross-entropy, so the condition the generators learned
  stays what they are given.

Validation (a held-out slice of the training dialogues when the corpus has no ``valid`` split) drives
early stopping and the learning-rate schedule; the test split is only evaluated. Labels are read only as
targets and to score: prediction and recovery conditioning are label-free. All-missing utterances (none
of the model's modalities) are left out of every loss and counted; at evaluation they are still
predicted (from missing tokens / recovered latents).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Corpus, classification_report, pattern_name
from ..data.corpus import MODALITIES
from ..io import atomic_torch_save, atomic_write_json
from ..models.dialogue_context import DialogueLayout
from ..models.drkf import DRKF, RELEASE_LOSS_WEIGHTS, Tokens, ordered_pairs, pair_targets
from .report import rate_key
from .run import SystemRun, read_model_checkpoint, require_trainable_generators, run_settings
from .trainer import Stage, Trainer, TrainerConfig, variant_config, with_validation

PRESETS = {
    # The release's fusion BERT and augmentation; utterance vectors become 32 × 48 latents (FedDISC's).
    "release": dict(latent_channels=32, latent_length=48, hidden=1024, num_layers=6, heads=8, intermediate=4096,
                    max_positions=2800, ae_layers=(256, 128, 64), ae_blocks=5, unet=None, timesteps=1000,
                    sampling_steps=50, prediction="eps", scaling="minmax"),
    # Trains on two CPU cores in well under a minute on synthetic iemocap4 at scale 0.3.
    "small": dict(latent_channels=8, latent_length=4, hidden=32, num_layers=1, heads=2, intermediate=64,
                  max_positions=64, ae_layers=(16, 8), ae_blocks=2,
                  unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                            num_heads=2),
                  timesteps=100, sampling_steps=8, prediction="v", scaling="standard"),
}
DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class DRKFConfig:
    preset: str = "release"
    modalities: Sequence[str] = ("audio", "text")
    recovery: str = "diffusion"            # "diffusion", "token" or "zero"
    drkf_epochs: int = 20
    generator_epochs: int = 20
    finetune_epochs: int = 10
    batch_size: int = 8                    # dialogues per batch (their utterances are DRKF's samples)
    missing: str = "gcnet:0.3"             # training availability protocol
    max_pairs: Optional[int] = 64          # ordered pairs per batch for Emotion Discrimination (None: all)
    pseudo_temperature: float = 1.0
    dropout: float = 0.1
    loss_weights: Dict[str, float] = field(default_factory=lambda: dict(RELEASE_LOSS_WEIGHTS))
    sampling_steps: Optional[int] = None   # recovery sampler steps (preset default otherwise)
    recovery_samples: int = 1              # recovered latent = mean of this many diffusion samples
    condition_observed: bool = False       # generators also see the other observed modality
    condition_context: bool = False        # ... on context-aware pseudo logits (neighbours' predictions)
    context_window: int = 4                # turns either side that make the context
    prediction: Optional[str] = None       # "eps" | "v" (preset default otherwise)
    scaling: Optional[str] = None          # "minmax" | "standard" (preset default otherwise)
    valid_fraction: float = 0.1
    eval_rates: Sequence[float] = DEFAULT_RATES
    eval_patterns: bool = True
    layers: str = "fused"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def build_model(corpus: Corpus, config: DRKFConfig, recovery: Optional[str] = None) -> DRKF:
    return _model(corpus.feature_dims, corpus.num_classes, config, recovery or config.recovery)


def _model(feature_dims, num_classes: int, config: DRKFConfig, recovery: str) -> DRKF:
    if config.preset not in PRESETS:
        raise ValueError(f"DRKF: preset must be one of {sorted(PRESETS)}; got {config.preset!r}")
    preset = dict(PRESETS[config.preset])
    for name in ("sampling_steps", "prediction", "scaling"):
        if getattr(config, name) is not None:
            preset[name] = getattr(config, name)
    return DRKF(feature_dims, num_classes, modalities=tuple(config.modalities), recovery=recovery,
                pseudo_temperature=config.pseudo_temperature, recovery_samples=config.recovery_samples,
                condition_observed=config.condition_observed, condition_context=config.condition_context,
                context_window=config.context_window, dropout=config.dropout,
                attention_dropout=config.dropout, layers=config.layers, **preset)


def _check(corpus: Corpus, config: DRKFConfig) -> None:
    if corpus.task != "classification":
        raise ValueError(f"DRKF: the corpus {corpus.name!r} is a {corpus.task} corpus; DRKF classifies emotions "
                         f"(its pair head compares emotion classes)")
    for m in config.modalities:
        if m not in corpus.feature_dims:
            raise ValueError(f"DRKF: the corpus {corpus.name!r} has no {m!r} features; the model fuses "
                             f"{tuple(config.modalities)}")
    if not corpus.splits.get("train"):
        raise ValueError(f"DRKF: the corpus {corpus.name!r} has no training dialogues")
    unknown = set(config.loss_weights) - set(RELEASE_LOSS_WEIGHTS)
    if unknown:
        raise ValueError(f"DRKF: loss_weights has unknown terms {sorted(unknown)}; known {sorted(RELEASE_LOSS_WEIGHTS)}")


def _check_max_pairs(config: DRKFConfig) -> None:
    pairs = config.max_pairs
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1):
        raise ValueError(f"DRKF: max_pairs must be None (every ordered pair, as the release) or an int >= 1; got "
                         f"{pairs!r}")


class DRKFRun(SystemRun):
    """Stages, validation and evaluation of one DRKF model on one corpus."""

    def __init__(self, model: DRKF, corpus: Corpus, config: DRKFConfig):
        _check_max_pairs(config)
        super().__init__(model, corpus, config)
        self.weights = {**RELEASE_LOSS_WEIGHTS, **config.loss_weights}

    def _targets(self, packed, observed: Tokens) -> Tuple[Tensor, Tensor]:
        keep = torch.stack([self.model.present(observed, m) for m in self.model.modalities]).any(0)
        self.skipped_utterances += int((~keep).sum())
        y = packed.labels.long()
        classes = self.model.num_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ValueError(f"DRKF: labels must lie in [0, {classes}); got values from {int(y.min())} to "
                             f"{int(y.max())} in dialogues {packed.dialogue_ids[:3]}")
        return y, keep

    # ---- loss pieces ----------------------------------------------------------------------------

    def pair_loss(self, tokens: Tokens, y: Tensor, epoch: int) -> Optional[Tensor]:
        """Emotion Discrimination over ordered pairs (i ≠ j) whose first modality is present in i and some
        other modality present in j; at most ``max_pairs`` (a seeded uniform sample)."""
        model, n = self.model, y.shape[0]
        if n < 2:
            return None
        i, j = ordered_pairs(n, None)
        first_ok = model.present(tokens, model.modalities[0])
        rest_ok = torch.stack([model.present(tokens, m) for m in model.modalities[1:]]).any(0)
        ok = (first_ok[i] & rest_ok[j]).cpu()
        i, j = i[ok], j[ok]
        if not i.numel():
            return None
        if self.config.max_pairs is not None and i.numel() > self.config.max_pairs:
            gen = torch.Generator().manual_seed(self.batch_seed(epoch))
            pick = torch.randperm(i.numel(), generator=gen)[:self.config.max_pairs].sort().values
            i, j = i[pick], j[pick]
        i, j = i.to(y.device), j.to(y.device)
        return F.cross_entropy(model.pair_logits(tokens, i, j), pair_targets(y, i, j))

    def drkf_loss(self, packed, epoch: int) -> Tuple[Optional[Tensor], int, Dict[str, float]]:
        model, w = self.model, self.weights
        observed = model.observed_tokens(packed.features, packed.availability)
        y, keep = self._targets(packed, observed)
        if not bool(keep.any()):
            return None, 0, {}
        filled = model.fill(observed)
        logits = model.classify(filled)[0]  # every utterance: the context head reads the neighbours
        parts = {"ce": F.cross_entropy(logits[keep], y[keep])}
        if model.condition_context:
            context = model.context_logits(logits, logits, DialogueLayout.of(packed))
            parts["ce_context"] = F.cross_entropy(context[keep], y[keep])
        y = y[keep]
        pair = self.pair_loss(_rows(filled, keep), y, epoch)
        if pair is not None:
            parts["pair"] = pair
        parts.update(model.representation_losses(_rows(observed, keep)))
        total = sum(w[_term(name)] * value for name, value in parts.items())
        return total, int(keep.sum()), {k: float(v.detach()) for k, v in parts.items()}

    # ---- stage steps ----------------------------------------------------------------------------

    def drkf_step(self, batch, epoch):
        loss, n, _ = self.drkf_loss(batch.packed(), epoch)
        return loss, n

    def generator_step(self, batch, epoch, generator: Optional[torch.Generator] = None):
        packed = batch.packed()
        model = self.model
        observed = model.observed_tokens(packed.features, packed.availability)
        with torch.no_grad():
            pseudo = model.generator_conditions(observed, DialogueLayout.of(packed))  # as if m were missing
        loss, parts = model.recovery.loss({m: packed.features[m] for m in model.modalities}, packed.availability,
                                          pseudo, generator=generator)
        if not parts:
            return None, 0
        return loss, packed.num_utterances

    def finetune_step(self, batch, epoch):
        packed = batch.packed()
        model, w = self.model, self.weights
        observed = model.observed_tokens(packed.features, packed.availability)
        y, keep = self._targets(packed, observed)
        if not bool(keep.any()):
            return None, 0
        if model.recovery_mode == "diffusion":
            with torch.no_grad():
                completed, _ = model.complete(packed.features, observed, layout=DialogueLayout.of(packed),
                                              seed=self.batch_seed(epoch))
            completed = _rows(completed, keep)
        else:
            completed = model.fill(_rows(observed, keep))
        y = y[keep]
        loss = w["ce"] * F.cross_entropy(model.classify(completed)[0], y)
        pair = self.pair_loss(completed, y, epoch)
        if pair is not None:
            loss = loss + w["pair"] * pair
        if model.recovery_mode == "diffusion":
            pseudo = model.pseudo_logits(observed)
            loss = loss + w["ce"] * F.cross_entropy(pseudo[keep], y)
            if model.condition_context:
                context = model.context_logits(pseudo, pseudo, DialogueLayout.of(packed))
                loss = loss + w["ce"] * F.cross_entropy(context[keep], y)
        return loss, int(keep.sum())

    # ---- validation -----------------------------------------------------------------------------

    def validate_drkf(self) -> Dict[str, float]:
        return self._validate(lambda packed: self.model.classify(
            self.model.fill(self.model.observed_tokens(packed.features, packed.availability)))[0])

    def validate_finetune(self) -> Dict[str, float]:
        return self._validate(lambda packed: self.model.predict_batch(packed, seed=1)["logits"])

    def validate_generator(self) -> Dict[str, float]:
        gen = torch.Generator(device=self.device).manual_seed(12345)
        total, count = 0.0, 0
        for batch in self.loader("valid", seed=self.config.trainer.seed + 1):
            loss, n = self.generator_step(batch, 0, generator=gen)
            if loss is not None:
                total, count = total + float(loss) * n, count + n
        return {"loss": total / max(count, 1)}

    def _validate(self, predict) -> Dict[str, float]:
        preds, labels, total = [], [], 0.0
        for batch in self.loader("valid", seed=self.config.trainer.seed + 1):
            packed = batch.packed()
            logits = predict(packed)
            y = packed.labels.long()
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(y.cpu().numpy())
        if not preds:
            return {"loss": float("nan"), "WA": float("nan")}
        report = classification_report(np.concatenate(preds), np.concatenate(labels))
        return {"loss": total / max(sum(len(p) for p in preds), 1), "WA": float(report["WA"]),
                "UA": float(report["UA"])}

    # ---- the schedule ---------------------------------------------------------------------------

    def fit_scaling(self) -> None:
        with torch.no_grad():
            self.model.recovery.fit_scaling(({m: b.packed().features[m] for m in self.model.modalities},
                                             b.packed().availability) for b in self.loader("train"))

    def _in_context(self, fn):
        # The "reference" build forces every fused op to its eager _ref inside every step.
        def run(*args):
            with self.model.layers.context():
                return fn(*args)
        return run

    def stages(self) -> List[Stage]:
        cfg, model = self.config, self.model
        groups = model.parameter_groups()
        ctx = self._in_context
        out = [Stage("drkf", "drkf", cfg.drkf_epochs, groups["drkf"], ctx(self.drkf_step), ctx(self.validate_drkf),
                     self.train_batches, train_modules=[model])]
        if model.recovery_mode == "diffusion":
            out.append(Stage("generator", "recovery", cfg.generator_epochs, groups["recovery"],
                             ctx(self.generator_step), ctx(self.validate_generator), self.train_batches,
                             train_modules=[model.recovery], before=self.fit_scaling))
        fusion_modules = [model.token_in, model.fusion, model.classifier, model.binary_classifier]
        out.append(Stage("finetune", "fusion", cfg.finetune_epochs, groups["fusion"], ctx(self.finetune_step),
                         ctx(self.validate_finetune), self.train_batches, train_modules=fusion_modules))
        return out

    # ---- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str = "test", missing=None, seed: int = 7) -> Dict[str, float]:
        """WA, UA (mean per-class recall) and weighted F1 on ``split`` under ``missing`` (labels are read
        only to score)."""
        self.model.eval()
        preds, labels = [], []
        for batch in self.loader(split, missing=missing, seed=seed):
            packed = batch.packed()
            preds.append(self.model.predict_batch(packed, seed=seed)["logits"].argmax(-1).cpu().numpy())
            labels.append(packed.labels.long().cpu().numpy())
        report = classification_report(np.concatenate(preds), np.concatenate(labels))
        return {k: float(report[k]) for k in ("WA", "UA", "F1_weighted")}

    @torch.no_grad()
    def recovery_error(self, split: str = "test", missing=None, seed: int = 7) -> Dict[str, float]:
        """Mean squared error, in latent space, of the recovered latents of missing entries against the
        projections of their held-back ground-truth features, next to mean imputation (the mean training
        latent of that modality)."""
        model = self.model
        model.eval()
        means = {}
        for m in model.modalities:
            total, count = 0.0, 0
            for batch in self.loader("train", missing="none"):
                z = model.recovery.project(m, batch.packed().ground_truth[m])
                total, count = total + z.sum(0), count + z.shape[0]
            means[m] = total / max(count, 1)
        sums = {"recovered_mse": 0.0, "mean_imputation_mse": 0.0}
        entries = 0
        for batch in self.loader(split, missing=missing, seed=seed):
            packed = batch.packed()
            tokens = model.predict_batch(packed, seed=seed)["tokens"]
            for m in model.modalities:
                gone = ~packed.availability[:, MODALITIES.index(m)]
                if not bool(gone.any()):
                    continue
                truth = model.recovery.project(m, packed.ground_truth[m][gone])
                recovered = tokens[m][gone].transpose(1, 2)
                sums["recovered_mse"] += float((recovered - truth).pow(2).mean(dim=(1, 2)).sum())
                sums["mean_imputation_mse"] += float((means[m] - truth).pow(2).mean(dim=(1, 2)).sum())
                entries += int(gone.sum())
        return {k: v / max(entries, 1) for k, v in sums.items()} | {"entries": entries}

    def patterns(self) -> List[str]:
        """The availability patterns of the model's modalities (``"a"``, ``"t"``, ``"ta"`` for audio + text)."""
        out = []
        for k in range(1, len(self.model.modalities) + 1):
            for subset in itertools.combinations(self.model.modalities, k):
                out.append(pattern_name([m in subset for m in MODALITIES]))
        return out

    def evaluate_all(self, split: str = "test") -> Dict[str, Dict[str, float]]:
        """Every pattern of the model's modalities and every missing rate of ``config.eval_rates``."""
        out: Dict[str, Dict[str, float]] = {}
        if self.config.eval_patterns:
            for name in self.patterns():
                out[f"pattern:{name}"] = self.evaluate(split, f"fixed:{name}")
        for rate in self.config.eval_rates:
            out[rate_key(rate)] = self.evaluate(split, f"gcnet:{rate}")
        return out


def _term(name: str) -> str:
    """Loss-weight key of a loss part (``nt_xent_text`` -> ``nt_xent``)."""
    for key in RELEASE_LOSS_WEIGHTS:
        if name == key or name.startswith(key + "_"):
            return key
    raise KeyError(name)


def _rows(tokens: Tokens, rows: Tensor) -> Tokens:
    return Tokens({m: t[rows] for m, t in tokens.tokens.items()}, {m: n[rows] for m, n in tokens.lengths.items()},
                  tokens.availability[rows])


def train_drkf(corpus: Corpus, config: DRKFConfig, baseline: bool = True) -> Dict:
    """Train DRKF (and, with ``baseline``, the zero-fill model on the same schedule), evaluate both on the
    test split per pattern and missing rate, and write ``metrics.json`` / ``results.json`` / ``model.pt``
    (atomically) under ``config.trainer.out_dir``."""
    _check(corpus, config)
    require_trainable_generators("DRKF", config.missing, config.modalities, config.recovery)
    corpus = with_validation(corpus, config.valid_fraction, config.trainer.seed)
    out_dir = Path(config.trainer.out_dir) if config.trainer.out_dir else None
    results: Dict = {"config": _config_dict(config), "corpus": corpus.name, "systems": {}}
    variants = [("drkf", config.recovery)] + ([("zero_fill", "zero")] if baseline and config.recovery != "zero" else [])
    for name, recovery in variants:
        trainer_cfg = variant_config(config.trainer, out_dir, name, first=name == variants[0][0])
        torch.manual_seed(trainer_cfg.seed)
        model = build_model(corpus, config, recovery).to(trainer_cfg.device)
        run = DRKFRun(model, corpus, config)
        start = time.perf_counter()
        history = Trainer(model, run.stages(), trainer_cfg, extra_state=run.state,
                          settings=run_settings(_config_dict(config), corpus)).run()
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        evaluation = run.evaluate_all("test")
        results["systems"][name] = {"recovery": recovery, "evaluation": evaluation, "train_seconds": seconds,
                                    "eval_seconds": time.perf_counter() - start,
                                    "skipped_all_missing_utterances": run.skipped_utterances, "history": history}
        if recovery == "diffusion":
            results["systems"][name]["recovery_error"] = run.recovery_error("test", config.missing)
        if out_dir:
            atomic_torch_save(out_dir / name / "model.pt",
                              {"model": "drkf", "recovery": recovery, "state_dict": model.state_dict(),
                               "config": _config_dict(config), "feature_dims": corpus.feature_dims,
                               "num_classes": corpus.num_classes})
            atomic_write_json(out_dir / "results.json", results)
    return results


def load_drkf(path, device: str = "cpu") -> Tuple[DRKF, DRKFConfig]:
    """A model saved by :func:`train_drkf` (``.../model.pt``)."""
    state, fields, trainer = read_model_checkpoint(path, "drkf", "DRKF", device)
    config = DRKFConfig(**fields, trainer=trainer)
    model = _model(state["feature_dims"], state["num_classes"], config, state["recovery"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), config


def _config_dict(config: DRKFConfig) -> Dict:
    d = asdict(config)
    d["eval_rates"] = list(config.eval_rates)
    d["modalities"] = list(config.modalities)
    return d


__all__ = ["DRKFConfig", "DRKFRun", "PRESETS", "build_model", "train_drkf", "load_drkf"]
