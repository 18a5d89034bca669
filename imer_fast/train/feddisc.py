"""Train and evaluate FedDISC in one process (step E federates the same stages).

Schedules:

- ``release``: the release's stage order — ``extractor`` (projections + Dialogue Graph Network + MulT
  pseudo-labeller, cross-entropy), then ``generator`` (DISC-Diffusion ε-MSE on the present
  modalities, conditioned on the frozen pseudo-labeller's predictions), then ``classifier`` (MulT +
  prompts on observed and recovered latents, recovery frozen).
- ``afa``: Alternating Frozen Aggregation as the paper describes it — after the extractor stage,
  ``afa_cycles`` cycles that alternately train the recovery modules (classifier frozen) and the
  classifier (recovery frozen). The release's code has no such cycle (``docs/releases/feddisc.md``
  §3), so the cycle lengths are ours to choose: ``generator_epochs`` and ``classifier_epochs`` per
  cycle.

Differences from the release, by design: no label ever enters a condition (its classifier stage mixes
ground-truth labels into the condition, at test time too); generators train on the modalities each
batch actually has; validation (a held-out slice of the training dialogues when the corpus has no
``valid`` split) drives early stopping and the learning-rate schedule — never the test split;
gradient clipping by norm unless ``clip_mode="value"``.

All-missing utterances (no modality at all) are excluded from every loss and counted; they are still
predicted at evaluation (from the dialogue context and generated latents).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Corpus, classification_report, evaluate_patterns
from ..io import atomic_torch_save, atomic_write_json
from ..models import FedDISC
from .run import SystemRun, read_model_checkpoint
from .trainer import Stage, Trainer, TrainerConfig, variant_config, with_validation

SCHEDULES = ("release", "afa")
PRESETS = {
    # The release's sizes: 32 × 48 latents, 16.4 M-parameter U-Nets, 1,000 steps, DDIM-50, 4-layer MulT.
    "release": dict(latent_channels=32, latent_length=48, unet=None, timesteps=1000, sampling_steps=50,
                    mult=dict(num_heads=8, layers=4), dgn_hidden=100),
    # Small enough for two CPU cores in minutes (make demo, tests).
    "small": dict(latent_channels=16, latent_length=16,
                  unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                            num_heads=2),
                  timesteps=200, sampling_steps=10, mult=dict(num_heads=4, layers=2), dgn_hidden=64),
}
DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class FedDISCConfig:
    preset: str = "release"
    schedule: str = "release"
    extractor_epochs: int = 20
    generator_epochs: int = 20
    classifier_epochs: int = 20
    afa_cycles: int = 2
    batch_size: int = 8
    missing: str = "gcnet:0.3"
    recovery: str = "diffusion"
    temperature: float = 0.2
    condition_speaker: bool = False
    condition_context: bool = False
    sampling_steps: Optional[int] = None   # recovery sampler steps (preset default otherwise)
    window_past: int = 6
    window_future: int = 6
    valid_fraction: float = 0.1
    eval_rates: Sequence[float] = DEFAULT_RATES
    eval_patterns: bool = True
    layers: str = "fused"
    warm_start_classifier: bool = True     # classifier starts from the trained pseudo-label MulT head
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def task_labels(corpus: Corpus, labels: Tensor) -> Tensor:
    """Class targets: the labels of a classification corpus; for a regression corpus the release's
    3 classes (negative < 0, neutral = 0, positive > 0)."""
    if corpus.task == "classification":
        return labels.long()
    return (torch.sign(labels) + 1).long()


def num_task_classes(corpus: Corpus) -> int:
    return corpus.num_classes if corpus.task == "classification" else 3


def build_model(corpus: Corpus, config: FedDISCConfig, recovery: Optional[str] = None) -> FedDISC:
    return _model(corpus.feature_dims, num_task_classes(corpus), corpus.num_speakers, config,
                  recovery or config.recovery)


def _model(feature_dims, num_classes: int, num_speakers: int, config: FedDISCConfig, recovery: str) -> FedDISC:
    if config.preset not in PRESETS:
        raise ValueError(f"FedDISC: preset must be one of {sorted(PRESETS)}; got {config.preset!r}")
    preset = dict(PRESETS[config.preset])
    if config.sampling_steps is not None:
        preset["sampling_steps"] = config.sampling_steps
    return FedDISC(feature_dims, num_classes, num_speakers=max(num_speakers, 1), temperature=config.temperature,
                   recovery=recovery, condition_speaker=config.condition_speaker,
                   condition_context=config.condition_context, window_past=config.window_past,
                   window_future=config.window_future, layers=config.layers, **preset)


def _check_corpus(corpus: Corpus) -> None:
    for m in ("text", "audio", "video"):
        if m not in corpus.feature_dims:
            raise ValueError(f"FedDISC: the corpus {corpus.name!r} has no {m!r} features; FedDISC needs a width "
                             f"for every modality (give zero features and an availability of False instead)")
    if not corpus.splits.get("train"):
        raise ValueError(f"FedDISC: the corpus {corpus.name!r} has no training dialogues")


class FedDISCRun(SystemRun):
    """Stages, validation and evaluation of one FedDISC model on one corpus."""

    def _targets(self, packed) -> Tuple[Tensor, Tensor]:
        keep = packed.availability.any(dim=1)
        self.skipped_utterances += int((~keep).sum())
        y = task_labels(self.corpus, packed.labels)
        classes = self.model.num_classes
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ValueError(f"FedDISC: labels must lie in [0, {classes}); got values from {int(y.min())} to "
                             f"{int(y.max())} in dialogues {packed.dialogue_ids[:3]}")
        return y[keep], keep

    # ---- stage steps ----------------------------------------------------------------------------

    def extractor_step(self, batch, epoch):
        packed = batch.packed()
        y, keep = self._targets(packed)
        if not bool(keep.any()):
            return None, 0
        logits = self.model.pseudo_labels(batch, packed).logits
        return F.cross_entropy(logits[keep], y), int(keep.sum())

    def generator_step(self, batch, epoch, generator: Optional[torch.Generator] = None):
        packed = batch.packed()
        with torch.no_grad():
            pseudo = self.model.pseudo_labels(batch, packed)
        recovery = self.model.recovery
        loss, parts = recovery.loss(packed.features, packed.availability, pseudo.logits,
                                    speakers=packed.speakers if recovery.num_speakers else None,
                                    context=pseudo.context if recovery.context_dim else None, generator=generator)
        if not parts:
            return None, 0
        return loss, packed.num_utterances

    def classifier_step(self, batch, epoch):
        packed = batch.packed()
        y, keep = self._targets(packed)
        if not bool(keep.any()):
            return None, 0
        with torch.no_grad():
            observed = self.model.observed_latents(packed)
            pseudo = self.model.pseudo_labels(batch, packed, observed)
            latents = self.model.recover(packed, pseudo, observed, seed=self.batch_seed(epoch))
        logits = self.model.classify(latents, packed.availability)
        return F.cross_entropy(logits[keep], y), int(keep.sum())

    # ---- validation -----------------------------------------------------------------------------

    def validate_extractor(self) -> Dict[str, float]:
        return self._validate(lambda batch, packed: self.model.pseudo_labels(batch, packed).logits)

    def validate_classifier(self) -> Dict[str, float]:
        return self._validate(lambda batch, packed: self.model(batch, seed=1)["logits"])

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
            logits = predict(batch, packed)
            y = task_labels(self.corpus, packed.labels)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(y.cpu().numpy())
        if not preds:
            return {"loss": float("nan"), "WA": float("nan")}
        report = classification_report(np.concatenate(preds), np.concatenate(labels))
        return {"loss": total / max(sum(len(p) for p in preds), 1), "WA": float(report["WA"]),
                "F1_weighted": float(report["F1_weighted"])}

    # ---- the schedule ---------------------------------------------------------------------------

    def fit_scaling(self) -> None:
        with torch.no_grad():
            self.model.recovery.fit_scaling((b.packed().features, b.packed().availability)
                                            for b in self.loader("train"))

    def warm_start_classifier(self) -> None:
        """Start the classifier from the pseudo-label MulT head trained in the extractor stage (same
        architecture; it already classifies from available latents with the missing prompt). The
        release trains its classifier from scratch for 100 rounds; this shortens that on both FedDISC
        and the zero-fill baseline alike."""
        self.model.classifier.load_state_dict(self.model.pseudo.state_dict())

    def _in_context(self, fn):
        # The eager-twin build ("reference" layers) also forces every fused op to its _ref.
        def run(*args):
            with self.model.layers.context():
                return fn(*args)
        return run

    def stages(self) -> List[Stage]:
        cfg, model = self.config, self.model
        groups = model.parameter_groups()
        ctx = self._in_context
        extractor = Stage("extractor", "extractor", cfg.extractor_epochs, groups["extractor"], ctx(self.extractor_step),
                          ctx(self.validate_extractor), self.train_batches,
                          train_modules=[model.dgn, model.pseudo, model.recovery], before=None)

        def generator(name):
            return Stage(name, "recovery", cfg.generator_epochs, groups["recovery"], ctx(self.generator_step),
                         ctx(self.validate_generator), self.train_batches, train_modules=[model.recovery],
                         before=self.fit_scaling)

        def classifier(name):
            first = name in ("classifier", "classifier[1]")
            before = self.warm_start_classifier if first and cfg.warm_start_classifier else None
            return Stage(name, "classifier", cfg.classifier_epochs, groups["classifier"], ctx(self.classifier_step),
                         ctx(self.validate_classifier), self.train_batches, train_modules=[model.classifier],
                         before=before)

        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"FedDISC: schedule must be one of {SCHEDULES}; got {cfg.schedule!r}")
        with_generators = model.recovery_mode == "diffusion"
        if cfg.schedule == "release":
            return [extractor] + ([generator("generator")] if with_generators else []) + [classifier("classifier")]
        stages = [extractor]
        for c in range(1, cfg.afa_cycles + 1):
            if with_generators:
                stages.append(generator(f"generator[{c}]"))
            stages.append(classifier(f"classifier[{c}]"))
        return stages

    # ---- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str = "test", missing=None, seed: int = 7) -> Dict[str, float]:
        """WA / UA / weighted F1 on ``split`` under ``missing`` (labels are read only to score)."""
        self.model.eval()
        preds, labels = [], []
        for batch in self.loader(split, missing=missing, seed=seed):
            logits = self.model(batch, seed=seed)["logits"]
            preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(task_labels(self.corpus, batch.packed().labels).cpu().numpy())
        report = classification_report(np.concatenate(preds), np.concatenate(labels))
        return {k: float(report[k]) for k in ("WA", "UA", "F1_weighted")}

    @torch.no_grad()
    def recovery_error(self, split: str = "test", missing=None, seed: int = 7) -> Dict[str, float]:
        """Mean squared error, in latent space, of the recovered latents of the missing entries against
        the projections of their held-back ground-truth features, next to mean imputation (the mean
        training latent of that modality) — for ``recovery="diffusion"`` models."""
        self.model.eval()
        means = {}
        for m in ("text", "audio", "video"):
            k = ("text", "audio", "video").index(m)
            total, count = 0.0, 0
            for batch in self.loader("train", missing="none"):
                packed = batch.packed()
                z = self.model.recovery.project(m, packed.ground_truth[m])
                total, count = total + z.sum(0), count + z.shape[0]
            means[m] = total / max(count, 1)
        sums = {"recovered_mse": 0.0, "mean_imputation_mse": 0.0}
        entries = 0
        for batch in self.loader(split, missing=missing, seed=seed):
            packed = batch.packed()
            latents = self.model(batch, seed=seed)["latents"]
            for k, m in enumerate(("text", "audio", "video")):
                gone = ~packed.availability[:, k]
                if not bool(gone.any()):
                    continue
                truth = self.model.recovery.project(m, packed.ground_truth[m][gone])
                sums["recovered_mse"] += float((latents[m][gone] - truth).pow(2).mean(dim=(1, 2)).sum())
                sums["mean_imputation_mse"] += float((means[m] - truth).pow(2).mean(dim=(1, 2)).sum())
                entries += int(gone.sum())
        return {k: v / max(entries, 1) for k, v in sums.items()} | {"entries": entries}

    def evaluate_all(self, split: str = "test") -> Dict[str, Dict[str, float]]:
        """Every fixed availability pattern and every missing rate of ``config.eval_rates``."""
        out: Dict[str, Dict[str, float]] = {}
        if self.config.eval_patterns:
            for name, protocol in evaluate_patterns():
                out[f"pattern:{name}"] = self.evaluate(split, protocol)
        for rate in self.config.eval_rates:
            out[f"rate:{rate:.1f}"] = self.evaluate(split, f"gcnet:{rate}")
        return out


def train_feddisc(corpus: Corpus, config: FedDISCConfig, baseline: bool = True) -> Dict:
    """Train FedDISC (and, with ``baseline``, the zero-fill model on the same schedule), evaluate both
    on the test split per pattern and missing rate, and write ``metrics.json`` / ``results.json`` /
    ``model.pt`` (atomically) under ``config.trainer.out_dir``."""
    _check_corpus(corpus)
    corpus = with_validation(corpus, config.valid_fraction, config.trainer.seed)
    out_dir = Path(config.trainer.out_dir) if config.trainer.out_dir else None
    results: Dict = {"config": _config_dict(config), "corpus": corpus.name, "systems": {}}
    variants = [("feddisc", config.recovery)] + ([("zero_fill", "zero")] if baseline and config.recovery != "zero"
                                                  else [])
    for name, recovery in variants:
        trainer_cfg = variant_config(config.trainer, out_dir, name, first=name == variants[0][0])
        torch.manual_seed(trainer_cfg.seed)
        model = build_model(corpus, config, recovery).to(trainer_cfg.device)
        run = FedDISCRun(model, corpus, config)
        start = time.perf_counter()
        history = Trainer(model, run.stages(), trainer_cfg).run()
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        evaluation = run.evaluate_all("test")
        eval_seconds = time.perf_counter() - start
        results["systems"][name] = {"evaluation": evaluation, "train_seconds": seconds, "eval_seconds": eval_seconds,
                                    "skipped_all_missing_utterances": run.skipped_utterances,
                                    "history": history}
        if recovery == "diffusion":
            results["systems"][name]["recovery_error"] = run.recovery_error("test", config.missing)
        if out_dir:
            atomic_torch_save(out_dir / name / "model.pt",
                              {"model": "feddisc", "recovery": recovery, "state_dict": model.state_dict(),
                               "config": _config_dict(config), "feature_dims": corpus.feature_dims,
                               "num_classes": num_task_classes(corpus), "num_speakers": corpus.num_speakers})
            atomic_write_json(out_dir / "results.json", results)
    return results


def load_feddisc(path, device: str = "cpu") -> Tuple[FedDISC, FedDISCConfig]:
    """A model saved by :func:`train_feddisc` (``.../model.pt``)."""
    state, fields, trainer = read_model_checkpoint(path, "feddisc", "FedDISC", device)
    config = FedDISCConfig(**fields, trainer=trainer)
    model = _model(state["feature_dims"], state["num_classes"], state["num_speakers"], config, state["recovery"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), config


def _config_dict(config: FedDISCConfig) -> Dict:
    d = asdict(config)
    d["eval_rates"] = list(config.eval_rates)
    return d
