"""Train and evaluate RoHyDR: the release's three-stage optimisation of every batch on the shared Trainer.

One :class:`~imer_fast.train.trainer.Stage` whose ``train_step`` performs, per batch, the release's
(``Siowllience/RoHyDR`` ``trains/mainNets/ROHYDR.py``) three optimisation stages, each stepping its own
AdamW optimiser group through the Trainer's ``update(group, loss)``:

1. ``recovery`` (generators, condition convs, refiners): ``(Σ_m L_gen,m + λ_g·L_rec) / (1 + λ_g)``,
   with L_gen the generators' denoising losses and L_rec the refiners' MSE to the ground-truth
   latents of the missing entries;
2. ``discriminator``: ``0.1·[BCE(D(F_gt), 1) + BCE(D(F_rec), 0)]``; then ``reconstructor``:
   ``λ_al·BCE(D(R(F_rec)), 1) + (1 − λ_al)·L1(F_gt, R(F_rec))`` — on the utterances that miss a modality;
3. ``fusion`` (MulT + head) and ``reconstructor``: ``(1 − λ_c)·ℓ(ŷ_gt, y) + λ_c·ℓ(ŷ_rec, y)``, ℓ = L1
   for regression, cross-entropy for classification; ŷ_rec = head(R(F_rec)) where a modality is missing.

Each stage changes only its groups' parameters (the release steps one optimiser over the whole model
in stages 1, 2-reconstructor and 3; stage 3 training R as well is the release's, and measured: over 7
seeds it lowered RoHyDR's test MAE at GCNet 0.5 from 0.732 to 0.702 on the evidence corpus). Missingness is the loader's, per utterance (the release drops the
same modalities for a whole batch); the ground truth of the missing entries is read in training only
(the release's training data are complete, with missingness simulated). Generators train on every
utterance that has some other modality available (the condition is built from the mask, as at test
time), not only on the masked-out entries. The missing entries are sampled once per batch, without
gradient through the sampler, and reused by the three stages; the release samples again in each,
and its DiT version (December 2025) backpropagates every stage's loss through its 50 DDIM steps into
the generators (its May 2025 ScoreNet version samples without gradient, as here). The zero-fill baseline (``recovery="zero"``) runs stage 3 only, with the same loss.

All-missing utterances (no modality) are excluded from every loss and counted in
``skipped_utterances``; they are still predicted at evaluation (from zero latents).
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

from ..data import MODALITIES, Corpus, classification_report, evaluate_patterns, regression_report
from ..io import atomic_torch_save, atomic_write_json
from ..models.rohydr import RECOVERY_MODULE_PREFIXES, RoHyDR
from .report import rate_key
from .run import SystemRun, read_model_checkpoint, require_trainable_generators, run_settings
from .trainer import Stage, Trainer, TrainerConfig, variant_config, with_validation

PRESETS = {
    # The release's MOSI model: 32 × 48 latents, DiT 64/6/16, 1,000 DDPM steps sampled by DDIM-50, RCAN 20 blocks.
    "release": dict(latent_channels=32, latent_length=48, dit=None, score=None, timesteps=1000, sampling_steps=50,
                    refiner_blocks=20, mult=None, prediction="eps", text_dropout=0.5),
    # Two CPU cores, seconds to a minute on synthetic MOSI at scale 0.3 with small features.
    "small": dict(latent_channels=16, latent_length=8, dit=dict(hidden_size=32, depth=2, num_heads=4),
                  score=dict(channels=(32, 32, 32, 32), embed_dim=64), timesteps=100, sampling_steps=5,
                  refiner_blocks=2, prediction="eps", mult=dict(num_heads=4, layers=1, mem_layers=1, attn_dropout=0.1,
                                              attn_dropout_a=0.1, attn_dropout_v=0.1, relu_dropout=0.1,
                                              res_dropout=0.1, embed_dropout=0.1, output_dropout=0.1),
                  text_dropout=0.0),
}
RUN_SETTINGS = ("text_dropout",)  # preset entries the run applies, not the model
# IMDer's ScoreNet reads 32-channel latents (its first level is as wide as the latent), so with the score
# generator the small preset keeps its short latent but widens it to 32 channels.
GENERATOR_PRESETS = {("small", "score"): dict(latent_channels=32)}
DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
GROUPS = ("recovery", "discriminator", "reconstructor", "fusion")


@dataclass
class RoHyDRConfig:
    preset: str = "release"
    generator: str = "dit"
    recovery: str = "diffusion"
    epochs: int = 20
    generator_epochs: int = 0              # ours: recovery alone (stage 1's loss) before the joint training
    batch_size: int = 8                    # dialogues per batch (MOSI: videos)
    missing: str = "gcnet:0.3"
    lambda_g: float = 1.0                  # release MOSI (config/config.json)
    lambda_al: float = 0.5
    lambda_c: float = 0.4
    sampling_steps: Optional[int] = None   # recovery sampler steps (preset default otherwise)
    prediction: Optional[str] = None       # DiT: "eps" | "v" (preset default otherwise)
    text_dropout: Optional[float] = None   # training dropout on text features (preset default otherwise)
    sampler_gradient: bool = False         # DiT: stages 1 and 3 train the generators through the sampler
    valid_fraction: float = 0.1
    eval_rates: Sequence[float] = DEFAULT_RATES
    eval_patterns: bool = True
    layers: str = "fused"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def text_dropout(config: RoHyDRConfig) -> float:
    """The training dropout on text features: ``config.text_dropout``, else the preset's (release 0.5)."""
    p = PRESETS.get(config.preset, {}).get("text_dropout", 0.0) if config.text_dropout is None else config.text_dropout
    if not 0.0 <= p < 1.0:
        raise ValueError(f"RoHyDR: text_dropout must lie in [0, 1); got {p}")
    return float(p)


def build_model(corpus: Corpus, config: RoHyDRConfig, recovery: Optional[str] = None) -> RoHyDR:
    return _model(corpus.feature_dims, corpus.task, corpus.num_classes, config, recovery or config.recovery)


def _model(feature_dims, task: str, num_classes: int, config: RoHyDRConfig, recovery: str) -> RoHyDR:
    if config.preset not in PRESETS:
        raise ValueError(f"RoHyDR: preset must be one of {sorted(PRESETS)}; got {config.preset!r}")
    preset = {k: v for k, v in PRESETS[config.preset].items() if k not in RUN_SETTINGS}
    preset.update(GENERATOR_PRESETS.get((config.preset, config.generator), {}))
    for name in ("sampling_steps", "prediction"):
        if getattr(config, name) is not None:
            preset[name] = getattr(config, name)
    return RoHyDR(feature_dims, task=task, num_classes=num_classes if task == "classification" else 1,
                  recovery=recovery, generator=config.generator, layers=config.layers, **preset)


def _check_corpus(corpus: Corpus) -> None:
    for m in MODALITIES:
        if m not in corpus.feature_dims:
            raise ValueError(f"RoHyDR: the corpus {corpus.name!r} has no {m!r} features; RoHyDR needs a width for "
                             f"every modality")
    if not corpus.splits.get("train"):
        raise ValueError(f"RoHyDR: the corpus {corpus.name!r} has no training dialogues")


class RoHyDRRun(SystemRun):
    """Stages, validation and evaluation of one RoHyDR model on one corpus."""

    def __init__(self, model: RoHyDR, corpus: Corpus, config: RoHyDRConfig):
        for name, value in (("lambda_al", config.lambda_al), ("lambda_c", config.lambda_c)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RoHyDR: {name} must lie in [0, 1]; got {value}")
        if config.lambda_g < 0:
            raise ValueError(f"RoHyDR: lambda_g must be >= 0; got {config.lambda_g}")
        self.text_dropout = text_dropout(config)
        if config.sampler_gradient and model.recovery_mode == "diffusion" and model.generator_kind != "dit":
            raise ValueError("RoHyDR: sampler_gradient needs generator='dit' (the release's ScoreNet version samples "
                             f"without gradient); got generator={model.generator_kind!r}")
        super().__init__(model, corpus, config)

    def task_loss(self, prediction: Tensor, labels: Tensor) -> Tensor:
        if self.model.task == "regression":
            return F.l1_loss(prediction, labels.to(prediction.dtype))
        return F.cross_entropy(prediction, labels.long())

    def _labels(self, packed) -> Tensor:
        y = packed.labels
        if self.model.task == "classification":
            classes = self.model.num_outputs
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
                raise ValueError(f"RoHyDR: labels must lie in [0, {classes}); got values from {int(y.min())} to "
                                 f"{int(y.max())} in dialogues {packed.dialogue_ids[:3]}")
        return y

    # ---- the three-stage step -------------------------------------------------------------------

    def _batch_latents(self, batch, training: bool = True
                       ) -> Optional[Tuple[Dict[str, Tensor], Dict[str, Tensor], Tensor, Tensor]]:
        """Ground-truth and observed latents, availability and labels of the utterances that have some
        modality (the others are counted in ``skipped_utterances`` when ``training``, which also applies
        ``text_dropout`` to the text features, as the release does before its frozen projection, so to the
        ground-truth and the observed branch alike); None when there is none."""
        packed = batch.packed()
        keep = packed.availability.any(dim=1)
        if training:
            self.skipped_utterances += int((~keep).sum())
        if not bool(keep.any()):
            return None
        avail = packed.availability[keep]
        y = self._labels(packed)[keep]
        features = {m: packed.ground_truth[m][keep] for m in MODALITIES}
        if training and self.text_dropout:
            features["text"] = F.dropout(features["text"], self.text_dropout)
        with torch.no_grad():
            truth = self.model.latents(features)
            observed = {m: truth[m] * avail[:, k].to(truth[m].dtype).view(-1, 1, 1) for k, m in enumerate(MODALITIES)}
        return truth, observed, avail, y

    def train_step(self, batch, epoch: int, update) -> Tuple[Optional[Tensor], int]:
        """One batch of the release's three optimisation stages (module doc); returns the stage-3 loss."""
        model, cfg = self.model, self.config
        latents = self._batch_latents(batch)
        if latents is None:
            return None, 0
        truth, observed, avail, y = latents
        incomplete = ~avail.all(dim=1)
        samples = None
        if model.recovery_mode == "diffusion":
            samples = self.recovery_stage(truth, observed, avail, epoch, update)
            if int(incomplete.sum()) >= 2:  # the BatchNorm layers of D and R need two rows
                self.adversarial_stage(truth, observed, avail, incomplete, samples, update)
        through_sampler = model.recovery_mode == "diffusion" and cfg.sampler_gradient
        # As the release (one optimiser over the whole model), the task loss also trains the reconstructor
        # R that ŷ_rec reads (otherwise the head alone must fit R's outputs) and, through the sampler, the
        # recovery modules.
        groups = ("fusion",)
        if model.recovery_mode == "diffusion" and bool(incomplete.any()):
            groups += ("reconstructor", "recovery") if through_sampler else ("reconstructor",)
        if through_sampler:
            # The release's DiT version samples again for stage 3 and its task loss reaches the refiners,
            # generators and condition convs through the sampler.
            recovered = model.recover(observed, avail, samples=model.draw(observed, avail, differentiable=True,
                                                                          seed=self.batch_seed(epoch)))
        else:
            with torch.no_grad():
                recovered = model.recover(observed, avail, samples=samples)
        # Stage 3: fusion + head on ground truth and on recovered latents (shared weights, one pass).
        rows = incomplete.nonzero().flatten()
        both = {m: torch.cat([truth[m], recovered[m][rows]]) for m in MODALITIES}
        fused = model.fuse(both)
        fused_gt, fused_rec = fused[:len(y)], fused[len(y):]
        pred_gt = model.head(fused_gt)
        pred_rec = pred_gt.index_copy(0, rows, self._predict_incomplete(fused_rec))
        loss = (1 - cfg.lambda_c) * self.task_loss(pred_gt, y) + cfg.lambda_c * self.task_loss(pred_rec, y)
        update(groups if len(groups) > 1 else groups[0], loss)
        return loss.detach(), len(y)

    def _predict_incomplete(self, fused_rec: Tensor) -> Tensor:
        model = self.model
        if model.recovery_mode == "zero" or len(fused_rec) != 1:
            return model.predict_fused(fused_rec, torch.ones(len(fused_rec), dtype=torch.bool, device=fused_rec.device))
        # A single row: the reconstructor's BatchNorm uses its running statistics (batch statistics need two).
        model.reconstruction.eval()
        try:
            return model.head(model.reconstruction(fused_rec))
        finally:
            model.reconstruction.train()

    def recovery_stage(self, truth, observed, avail, epoch: int, update) -> Dict[str, Tensor]:
        """Stage 1: generators on every conditionable row, refiners on the missing entries; returns the draws
        (detached: with ``sampler_gradient`` they were drawn with a graph that stage 1's backward consumed)."""
        loss, samples = self.recovery_loss(truth, observed, avail, epoch)
        update("recovery", loss)
        return {m: draw.detach() for m, draw in samples.items()}

    def recovery_loss(self, truth, observed, avail, epoch: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Stage 1's loss and the draws it refined."""
        model, cfg = self.model, self.config
        standardised = {m: model.standardise(m, observed[m]) for m in MODALITIES}
        targets = {m: model.standardise(m, truth[m]) for m in MODALITIES}
        gen_losses = []
        for m in MODALITIES:
            cond, has = model.condition(m, standardised, avail)
            if bool(has.any()):
                gen_losses.append(model.generator_loss(m, targets[m][has], cond[has]))
        samples = model.draw(observed, avail, seed=self.batch_seed(epoch), differentiable=cfg.sampler_gradient)
        rec_losses = [F.mse_loss(model.refiner(m)(samples[m]), targets[m][rows])
                      for m, rows in model.recoverable_rows(avail).items() if rows.numel()]
        rec = torch.stack(rec_losses).sum() if rec_losses else torch.zeros((), device=avail.device)
        return (torch.stack(gen_losses).sum() + cfg.lambda_g * rec) / (1 + cfg.lambda_g), samples

    def generator_step(self, batch, epoch: int) -> Tuple[Optional[Tensor], int]:
        """The warm-up stage (``generator_epochs``): stage 1's loss alone."""
        latents = self._batch_latents(batch)
        if latents is None:
            return None, 0
        truth, observed, avail, y = latents
        return self.recovery_loss(truth, observed, avail, epoch)[0], len(y)

    @torch.no_grad()
    def validate_generator(self) -> Dict[str, float]:
        """Mean squared error of the recovered (generated and refined) latents of the missing validation
        entries to their ground truth, on the training missing protocol with fixed seeds."""
        model = self.model
        total, count = 0.0, 0
        for batch in self.loader("valid", seed=self.config.trainer.seed + 1):
            latents = self._batch_latents(batch, training=False)
            if latents is None:
                continue
            truth, observed, avail, _ = latents
            recovered = model.recover(observed, avail, seed=1)
            for m, rows in model.recoverable_rows(avail).items():
                if rows.numel():
                    total += float((recovered[m][rows] - truth[m][rows]).pow(2).mean(dim=(1, 2)).sum())
                    count += int(rows.numel())
        return {"loss": total / count if count else float("nan")}

    def adversarial_stage(self, truth, observed, avail, incomplete, samples, update) -> None:
        """Stage 2: the discriminator, then the multimodal reconstructor, on the incomplete utterances."""
        model, cfg = self.model, self.config
        rows = incomplete.nonzero().flatten()
        with torch.no_grad():
            recovered = model.recover(observed, avail, samples=samples)
            fused = model.fuse({m: torch.cat([truth[m][rows], recovered[m][rows]]) for m in MODALITIES})
        fused_gt, fused_rec = fused[:len(rows)], fused[len(rows):]
        real, fake = torch.ones(len(rows), 1, device=fused.device), torch.zeros(len(rows), 1, device=fused.device)
        d_loss = 0.1 * (F.binary_cross_entropy(model.discriminator(fused_gt), real)
                        + F.binary_cross_entropy(model.discriminator(fused_rec), fake))
        update("discriminator", d_loss)
        rebuilt = model.reconstruction(fused_rec)
        g_loss = (cfg.lambda_al * F.binary_cross_entropy(model.discriminator(rebuilt), real)
                  + (1 - cfg.lambda_al) * F.l1_loss(rebuilt, fused_gt))
        update("reconstructor", g_loss)

    # ---- validation and the schedule --------------------------------------------------------------

    def validate(self) -> Dict[str, float]:
        preds, labels = self._predictions("valid", None, seed=1, data_seed=self.config.trainer.seed + 1)
        if not len(labels):
            return {"loss": float("nan")}
        loss = float(self.task_loss(torch.as_tensor(preds), torch.as_tensor(labels)))
        return {"loss": loss, **self._report(preds, labels)}

    def fit_scaling(self) -> None:
        if self.model.recovery_mode == "zero":
            return
        with torch.no_grad():
            self.model.fit_scaling((b.packed().features, b.packed().availability) for b in self.loader("train"))

    def stages(self) -> List[Stage]:
        model = self.model
        groups = model.parameter_groups()
        union = [p for params in groups.values() for p in params]

        def step(batch, epoch, update):
            with model.layers.context():
                return self.train_step(batch, epoch, update)

        def validate():
            with model.layers.context():
                return self.validate()

        stages = []
        if model.recovery_mode == "diffusion" and self.config.generator_epochs > 0:
            def warm_up(batch, epoch):
                with model.layers.context():
                    return self.generator_step(batch, epoch)

            def validate_warm_up():
                with model.layers.context():
                    return self.validate_generator()

            recovery_modules = [module for name, module in model.named_children()
                                if name.startswith(RECOVERY_MODULE_PREFIXES)]
            # Its own optimiser group: the joint stage's "recovery" optimiser and LR schedule start afresh
            # (a plateau schedule that saw latent MSEs would treat the joint stage's task losses as no progress).
            stages.append(Stage("generator", "warm_up", self.config.generator_epochs, groups["recovery"], warm_up,
                                validate_warm_up, self.train_batches, train_modules=recovery_modules,
                                before=self.fit_scaling))
        return stages + [Stage("rohydr", "fusion", self.config.epochs, union, step, validate, self.train_batches,
                               train_modules=[model], before=None if stages else self.fit_scaling, updates=groups)]

    # ---- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def _predictions(self, split: str, missing, seed: int, data_seed: Optional[int] = None):
        self.model.eval()
        preds, labels = [], []
        for batch in self.loader(split, missing=missing, seed=seed if data_seed is None else data_seed):
            out = self.model(batch, seed=seed)["prediction"]
            preds.append(out.float().cpu().numpy())
            labels.append(batch.packed().labels.cpu().numpy())
        if not preds:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(preds), np.concatenate(labels)

    def _report(self, preds: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
        if self.model.task == "regression":
            report = regression_report(preds, labels)
            return {k: float(report[k]) for k in ("Acc2_non0", "F1_non0", "Acc7", "MAE", "Corr")}
        report = classification_report(preds.argmax(-1), labels)
        return {k: float(report[k]) for k in ("WA", "UA", "F1_weighted")}

    def evaluate(self, split: str = "test", missing=None, seed: int = 7) -> Dict[str, float]:
        """regression_report metrics (Acc-2 non-0, F1, Acc-7, MAE, Corr) or classification_report metrics
        (WA, UA, weighted F1) on ``split`` under ``missing``; labels are read only to score."""
        preds, labels = self._predictions(split, missing, seed)
        return self._report(preds, labels)

    @torch.no_grad()
    def recovery_error(self, split: str = "test", missing=None, seed: int = 7) -> Dict[str, float]:
        """Mean squared error, in latent space, of the recovered latents of the missing entries against the
        projections of their held-back ground truth, next to mean imputation (the mean training latent of
        that modality, element by element)."""
        model = self.model
        model.eval()
        means = {}
        for m in MODALITIES:
            total, count = 0.0, 0
            for batch in self.loader("train", missing="none"):
                z = model.project(m, batch.packed().ground_truth[m])
                total, count = total + z.sum(0), count + z.shape[0]
            means[m] = total / max(count, 1)
        sums = {"recovered_mse": 0.0, "mean_imputation_mse": 0.0}
        entries = 0
        for batch in self.loader(split, missing=missing, seed=seed):
            packed = batch.packed()
            latents = model(packed, seed=seed)["latents"]
            some = packed.availability.any(dim=1)
            for k, m in enumerate(MODALITIES):
                gone = ~packed.availability[:, k] & some
                if not bool(gone.any()):
                    continue
                truth = model.project(m, packed.ground_truth[m][gone])
                sums["recovered_mse"] += float((latents[m][gone] - truth).pow(2).mean(dim=(1, 2)).sum())
                sums["mean_imputation_mse"] += float((means[m] - truth).pow(2).mean(dim=(1, 2)).sum())
                entries += int(gone.sum())
        return {k: v / max(entries, 1) for k, v in sums.items()} | {"entries": entries}

    def evaluate_all(self, split: str = "test") -> Dict[str, Dict[str, float]]:
        """Every fixed availability pattern and every missing rate of ``config.eval_rates`` (GCNet protocol)."""
        out: Dict[str, Dict[str, float]] = {}
        if self.config.eval_patterns:
            for name, protocol in evaluate_patterns():
                out[f"pattern:{name}"] = self.evaluate(split, protocol)
        for rate in self.config.eval_rates:
            out[rate_key(rate)] = self.evaluate(split, f"gcnet:{rate}")
        return out


def train_rohydr(corpus: Corpus, config: RoHyDRConfig, baseline: bool = True) -> Dict:
    """Train RoHyDR (and, with ``baseline``, the zero-fill model with the same fusion, head and loss),
    evaluate both on the test split per pattern and missing rate, and write ``metrics.json`` /
    ``results.json`` / ``model.pt`` (atomically) under ``config.trainer.out_dir``."""
    _check_corpus(corpus)
    require_trainable_generators("RoHyDR", config.missing, MODALITIES, config.recovery)
    corpus = with_validation(corpus, config.valid_fraction, config.trainer.seed)
    out_dir = Path(config.trainer.out_dir) if config.trainer.out_dir else None
    results: Dict = {"config": _config_dict(config), "corpus": corpus.name, "systems": {}}
    variants = [("rohydr", config.recovery)] + ([("zero_fill", "zero")] if baseline and config.recovery != "zero"
                                                 else [])
    for name, recovery in variants:
        trainer_cfg = variant_config(config.trainer, out_dir, name, first=name == variants[0][0])
        torch.manual_seed(trainer_cfg.seed)
        model = build_model(corpus, config, recovery).to(trainer_cfg.device)
        run = RoHyDRRun(model, corpus, config)
        start = time.perf_counter()
        history = Trainer(model, run.stages(), trainer_cfg, extra_state=run.state,
                          settings=run_settings(_config_dict(config), corpus)).run()
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        evaluation = run.evaluate_all("test")
        eval_seconds = time.perf_counter() - start
        results["systems"][name] = {"evaluation": evaluation, "train_seconds": seconds, "eval_seconds": eval_seconds,
                                    "skipped_all_missing_utterances": run.skipped_utterances, "history": history}
        if recovery == "diffusion":
            results["systems"][name]["recovery_error"] = run.recovery_error("test", config.missing)
        if out_dir:
            atomic_torch_save(out_dir / name / "model.pt",
                              {"model": "rohydr", "recovery": recovery, "state_dict": model.state_dict(),
                               "config": _config_dict(config), "feature_dims": dict(corpus.feature_dims),
                               "task": corpus.task, "num_classes": corpus.num_classes})
            atomic_write_json(out_dir / "results.json", results)
    return results


def load_rohydr(path, device: str = "cpu") -> Tuple[RoHyDR, RoHyDRConfig]:
    """A model saved by :func:`train_rohydr` (``.../model.pt``)."""
    state, fields, trainer = read_model_checkpoint(path, "rohydr", "RoHyDR", device)
    config = RoHyDRConfig(**fields, trainer=trainer)
    model = _model(state["feature_dims"], state["task"], state["num_classes"], config, state["recovery"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), config


def _config_dict(config: RoHyDRConfig) -> Dict:
    d = asdict(config)
    d["eval_rates"] = list(config.eval_rates)
    return d
