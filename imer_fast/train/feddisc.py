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
from .report import rate_key
from .run import SystemRun, read_model_checkpoint, require_trainable_generators, run_settings
from .trainer import Stage, Trainer, TrainerConfig, variant_config, with_validation

SCHEDULES = ("release", "afa")
PRESETS = {
    # The release's sizes: 32 × 48 latents, 16.4 M-parameter U-Nets, 1,000 steps, DDIM-50, 4-layer MulT.
    "release": dict(latent_channels=32, latent_length=48, unet=None, timesteps=1000, sampling_steps=50,
                    mult=dict(num_heads=8, layers=4), dgn_hidden=100, prediction="eps", scaling="minmax"),
    # Small enough for two CPU cores in minutes (make demo, tests).
    "small": dict(latent_channels=16, latent_length=16,
                  unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                            num_heads=2),
                  timesteps=200, sampling_steps=10, mult=dict(num_heads=4, layers=2), dgn_hidden=64,
                  prediction="v", scaling="standard"),
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
    condition_observed: bool = False      # ours: the utterance's other modalities enter the condition
    prediction: Optional[str] = None      # "eps" | "v" (preset default otherwise)
    scaling: Optional[str] = None         # "minmax" | "standard" (preset default otherwise)
    recovery_samples: int = 1             # recovered latent = mean of this many samples
    generator_batch_size: int = 64        # utterances per generator-stage minibatch
    sampling_steps: Optional[int] = None   # recovery sampler steps (preset default otherwise)
    window_past: int = 6
    window_future: int = 6
    valid_fraction: float = 0.1
    eval_rates: Sequence[float] = DEFAULT_RATES
    eval_patterns: bool = True
    layers: str = "fused"
    warm_start_classifier: bool = True     # classifier starts from the trained pseudo-label MulT head
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        # Checked here rather than where they are first used: a federated run would otherwise fail (or,
        # on Flower, drop every client) only after rounds of training.
        if self.preset not in PRESETS:
            raise ValueError(f"FedDISC: preset must be one of {sorted(PRESETS)}; got {self.preset!r}")
        for name, least in (("batch_size", 1), ("generator_batch_size", 1), ("recovery_samples", 1),
                            ("afa_cycles", 1), ("extractor_epochs", 0), ("generator_epochs", 0),
                            ("classifier_epochs", 0), ("window_past", -1), ("window_future", -1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"FedDISC: {name} must be an int >= {least}; got {value!r}")
        timesteps = PRESETS[self.preset]["timesteps"]
        steps = self.sampling_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= timesteps):
            raise ValueError(f"FedDISC: sampling_steps must be an int in [1, {timesteps}] (the {self.preset} "
                             f"preset's diffusion steps); got {steps!r}")


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
    for name in ("sampling_steps", "prediction", "scaling"):
        if getattr(config, name) is not None:
            preset[name] = getattr(config, name)
    return FedDISC(feature_dims, num_classes, num_speakers=max(num_speakers, 1), temperature=config.temperature,
                   recovery=recovery, condition_speaker=config.condition_speaker,
                   condition_context=config.condition_context, condition_observed=config.condition_observed,
                   recovery_samples=config.recovery_samples, window_past=config.window_past,
                   window_future=config.window_future, layers=config.layers, **preset)


def _check_corpus(corpus: Corpus) -> None:
    for m in ("text", "audio", "video"):
        if m not in corpus.feature_dims:
            raise ValueError(f"FedDISC: the corpus {corpus.name!r} has no {m!r} features; FedDISC needs the "
                             f"features of every modality (a missing-modality protocol decides which are seen)")
    if not corpus.splits.get("train"):
        raise ValueError(f"FedDISC: the corpus {corpus.name!r} has no training dialogues")


@dataclass
class GeneratorBatch:
    """Utterances for the generator stage: their (masked) features, availability and frozen conditions."""
    features: Dict[str, Tensor]
    availability: Tensor
    logits: Tensor
    speakers: Tensor
    context: Tensor

    @property
    def num_utterances(self) -> int:
        return int(self.availability.shape[0])

    def select(self, rows: Tensor) -> "GeneratorBatch":
        return GeneratorBatch({m: x[rows] for m, x in self.features.items()}, self.availability[rows],
                              self.logits[rows], self.speakers[rows], self.context[rows])


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

    def generator_step(self, batch: "GeneratorBatch", epoch, generator: Optional[torch.Generator] = None):
        recovery = self.model.recovery
        loss, parts = recovery.loss(batch.features, batch.availability, batch.logits,
                                    speakers=batch.speakers if recovery.num_speakers else None,
                                    context=batch.context if recovery.context_dim else None, generator=generator)
        if not parts:
            return None, 0
        return loss, batch.num_utterances

    @torch.no_grad()
    def generator_batches(self, split: str, epoch: int = 0, shuffle: bool = True, seed: Optional[int] = None):
        """Utterance-level minibatches of ``config.generator_batch_size`` for the generator stage.

        The pseudo-labeller and projections are frozen while the generators train, so each epoch's
        conditions are computed once, over the dialogues (the DGN needs them), and the utterances are
        then drawn in shuffled minibatches: the denoisers get as many optimiser steps per epoch as
        the data has minibatches, instead of one per batch of whole dialogues (8 per epoch on the demo
        corpus, far too few for a diffusion model). Utterances with no modality are left out.
        """
        seed = self.config.trainer.seed if seed is None else seed
        features, availability, logits, speakers, context = {}, [], [], [], []
        for batch in self.loader(split, epoch, seed=seed):
            packed = batch.packed()
            pseudo = self.model.pseudo_labels(batch, packed)
            for m, x in packed.features.items():
                features.setdefault(m, []).append(x)
            availability.append(packed.availability)
            logits.append(pseudo.logits)
            speakers.append(packed.speakers)
            context.append(pseudo.context)
        if not availability:
            return
        availability = torch.cat(availability)
        rows = availability.any(dim=1).nonzero().flatten()
        if shuffle:
            order = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            rows = rows[order.to(rows.device)]
        data = GeneratorBatch({m: torch.cat(x) for m, x in features.items()}, availability, torch.cat(logits),
                              torch.cat(speakers), torch.cat(context))
        size = self.config.generator_batch_size
        for start in range(0, rows.numel(), size):
            yield data.select(rows[start:start + size])

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
        for batch in self.generator_batches("valid", shuffle=False, seed=self.config.trainer.seed + 1):
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

    def _in_context_batches(self, batches):
        def run(epoch):
            with self.model.layers.context():
                yield from batches(epoch)
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
                         ctx(self.validate_generator), self._in_context_batches(lambda epoch: self.generator_batches("train", epoch)),
                         train_modules=[model.recovery],
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
            out[rate_key(rate)] = self.evaluate(split, f"gcnet:{rate}")
        return out


def train_feddisc(corpus: Corpus, config: FedDISCConfig, baseline: bool = True) -> Dict:
    """Train FedDISC (and, with ``baseline``, the zero-fill model on the same schedule), evaluate both
    on the test split per pattern and missing rate, and write ``metrics.json`` / ``results.json`` /
    ``model.pt`` (atomically) under ``config.trainer.out_dir``."""
    _check_corpus(corpus)
    require_trainable_generators("FedDISC", config.missing, ("text", "audio", "video"), config.recovery)
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
        history = Trainer(model, run.stages(), trainer_cfg, extra_state=run.state,
                          settings=run_settings(_config_dict(config), corpus)).run()
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
