"""A staged trainer shared by the imer_fast systems.

A run is a list of :class:`Stage` s (the systems' schedules: FedDISC's extractor → generator →
classifier, or Alternating Frozen Aggregation cycles). Each stage trains one parameter group with
the rest frozen, with AdamW + ReduceLROnPlateau on the validation loss (one optimiser per group, so a
group that comes back in a later cycle keeps its moments), gradient clipping, optional bf16 autocast
on CUDA, early stopping on a validation metric (the best weights of the stage are restored when it
ends), and after every epoch an atomic checkpoint (temporary file + rename) plus ``metrics.json``.
``resume=True`` continues from the checkpoint in ``out_dir``: finished stages are skipped and the
interrupted one continues with its optimiser, scheduler, early-stopping state and RNG.
"""
from __future__ import annotations

import copy
import math
import random
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import Corpus
from ..io import atomic_torch_save, atomic_write_json, load_torch_file

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


@dataclass
class Stage:
    """One phase of a schedule.

    name: unique in the schedule (``"classifier[2]"``); group: optimiser key (a group trained in
    several stages shares one optimiser); parameters: what this stage trains; train_step(batch,
    epoch) returns (loss or None to skip the batch, utterances counted); validate() returns metrics
    holding ``monitor``; train_modules: modules put in training mode (the rest run in eval mode, as
    frozen parts should); before(): called when the stage starts (not again on resume mid-stage if it
    already ran); batches(epoch): the training batches of an epoch.

    Several optimiser steps per batch (RoHyDR's discriminator / reconstructor / classifier sub-steps):
    give ``updates`` (optimiser group -> its parameters; their union is trainable, ``parameters``
    should be that union) and the trainer calls ``train_step(batch, epoch, update)``, where
    ``update(group, loss)`` zero-grads, backpropagates, clips and steps that group's optimiser
    (learning rate ``group_lr.get(group, config.lr)``; a tuple of groups: one backward, each group
    clipped and stepped by its own optimiser); train_step then returns (loss to log or None,
    utterances) and the trainer runs no backward itself.
    """
    name: str
    group: str
    epochs: int
    parameters: List[nn.Parameter]
    train_step: Callable[[object, int], Tuple[Optional[Tensor], int]]
    validate: Callable[[], Dict[str, float]]
    batches: Callable[[int], Iterable]
    train_modules: List[nn.Module] = field(default_factory=list)
    monitor: str = "loss"
    mode: str = "min"
    before: Optional[Callable[[], None]] = None
    updates: Optional[Dict[str, List[nn.Parameter]]] = None
    group_lr: Optional[Dict[str, float]] = None

    def optimiser_groups(self) -> Dict[str, List[nn.Parameter]]:
        return dict(self.updates) if self.updates is not None else {self.group: self.parameters}


@dataclass
class TrainerConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0          # 0 disables clipping
    clip_mode: str = "norm"         # "norm" or "value" (the FedDISC release clips by value)
    patience: int = 10              # early stopping: epochs without validation improvement
    lr_patience: int = 5
    lr_factor: float = 0.5
    amp: bool = False               # bf16 autocast (CUDA only)
    device: str = "cpu"
    seed: int = 0
    out_dir: Optional[str] = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse values that would fail (or train nothing) only once training runs: a federated run would
        otherwise drop every client round after round."""
        for name, positive in (("lr", True), ("weight_decay", False), ("grad_clip", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    value < 0 or (positive and value == 0):
                bound = "> 0" if positive else ">= 0" + (" (0 disables clipping)" if name == "grad_clip" else "")
                raise ValueError(f"Trainer: {name} must be a finite number {bound}; got {value!r}")
        if self.clip_mode not in ("norm", "value"):
            raise ValueError(f"Trainer: clip_mode must be 'norm' or 'value'; got {self.clip_mode!r}")
        for name, least in (("patience", 1), ("lr_patience", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Trainer: {name} must be an int >= {least} (epochs without validation "
                                 f"improvement); got {value!r}")
        if isinstance(self.lr_factor, bool) or not isinstance(self.lr_factor, (int, float)) or \
                not 0 < self.lr_factor < 1:
            raise ValueError(f"Trainer: lr_factor must be a number in (0, 1); got {self.lr_factor!r}")


class Trainer:
    def __init__(self, model: nn.Module, stages: List[Stage], config: TrainerConfig,
                 extra_state: Optional[Dict] = None, settings: Optional[Dict] = None):
        """``extra_state``: a dict of the caller's that is checkpointed and restored in place on resume.
        ``settings``: what defines the run (model config, data); a resume whose settings differ from the
        checkpoint's is refused, naming the differences, instead of mixing two runs."""
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"Trainer: stage names must be unique; got {names}")
        config.validate()  # again: a config's fields may have been set after it was built
        self.model, self.stages, self.config = model, stages, config
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.schedulers: Dict[str, torch.optim.lr_scheduler.ReduceLROnPlateau] = {}
        self.history: List[Dict] = []
        self.extra_state = extra_state if extra_state is not None else {}
        self.settings = _jsonable(settings) if settings is not None else None
        self.position = {"stage": 0, "epoch": 0, "best": None, "best_value": None, "bad_epochs": 0,
                         "started": False}

    # ---- optimisation state ---------------------------------------------------------------------

    def _optimizer(self, stage: Stage, group: str) -> torch.optim.Optimizer:
        if group not in self.optimizers:
            params = list(stage.optimiser_groups()[group])
            lr = (stage.group_lr or {}).get(group, self.config.lr)
            self.optimizers[group] = adamw(params, lr=lr, weight_decay=self.config.weight_decay)
            self.schedulers[group] = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizers[group], mode="min", factor=self.config.lr_factor, patience=self.config.lr_patience)
        return self.optimizers[group]

    def _step(self, stage: Stage, groups: Tuple[str, ...], loss: Tensor, epoch: int) -> None:
        """One backward of ``loss``, then each group's clipping and optimiser step (several groups: one
        loss trains them all, each with its own optimiser state, like one optimiser over their union)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Trainer: non-finite loss {loss.item()} in stage {stage.name!r} (group "
                                     f"{', '.join(groups)}), epoch {epoch + 1}; the checkpoint of the previous "
                                     f"epoch is kept")
        optimizers = [self._optimizer(stage, group) for group in groups]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group, optimizer in zip(groups, optimizers):
            if self.config.grad_clip > 0:
                params = [p for p in stage.optimiser_groups()[group] if p.grad is not None]
                if self.config.clip_mode == "norm":
                    torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                else:
                    torch.nn.utils.clip_grad_value_(params, self.config.grad_clip)
            optimizer.step()

    def _freeze_all_but(self, stage: Stage) -> None:
        trainable = {id(p) for params in stage.optimiser_groups().values() for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)

    def _set_modes(self, stage: Stage) -> None:
        self.model.eval()
        for module in stage.train_modules:
            module.train()

    # ---- checkpoints ----------------------------------------------------------------------------

    def _checkpoint(self) -> Dict:
        return {"model": self.model.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "position": self.position, "history": self.history, "extra": self.extra_state,
                "stages": [s.name for s in self.stages], "settings": self.settings,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        # dropout and sampling noise on a GPU draw from its own generators
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}}

    def _save(self) -> None:
        if self.out_dir is None:
            return
        atomic_torch_save(self.out_dir / CHECKPOINT, self._checkpoint())
        atomic_write_json(self.out_dir / METRICS, {"history": self.history, "extra": _jsonable(self.extra_state)})

    def _restore(self) -> None:
        path = self.out_dir / CHECKPOINT if self.out_dir else None
        if path is None or not path.exists():
            raise FileNotFoundError(f"Trainer: resume=True but there is no checkpoint at {path}")
        state = load_torch_file(path, self.config.device, "Trainer: cannot resume")
        if not isinstance(state, dict) or "position" not in state:
            raise ValueError(f"Trainer: cannot resume from {path}: it is not a trainer checkpoint (expected the "
                             f"dict train writes, with 'model', 'position', 'stages'; got {type(state).__name__})")
        if state.get("stages") != [s.name for s in self.stages]:
            raise ValueError(f"Trainer: the checkpoint at {path} was written by a different schedule "
                             f"{state.get('stages')}; this run's is {[s.name for s in self.stages]}")
        saved = state.get("settings")
        if self.settings is not None and saved is not None and saved != self.settings:
            old, new = _flat(saved), _flat(self.settings)
            changed = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                       for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
            raise ValueError(f"Trainer: cannot resume from {path}: the run was started with other settings "
                             f"({'; '.join(changed)}); resume with the same ones, or start a new run")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:  # another preset or feature width under the same schedule
            first = str(exc).strip().splitlines()
            raise ValueError(f"Trainer: the checkpoint at {path} does not fit this model (another preset, feature "
                             f"width or number of classes?): {' '.join(line.strip() for line in first[:3])}") from exc
        self.position, self.history = state["position"], state["history"]
        self.extra_state.update(state.get("extra", {}))
        for stage in self.stages:
            for group in stage.optimiser_groups():
                if group in state["optimizers"] and group not in self.optimizers:
                    self._optimizer(stage, group).load_state_dict(state["optimizers"][group])
                    self.schedulers[group].load_state_dict(state["schedulers"][group])
        rng = state["rng"]   # the generator states are CPU ByteTensors whatever map_location moved them to
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> List[Dict]:
        cfg = self.config
        if cfg.resume:
            self._restore()
        else:
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed)
            random.seed(cfg.seed)
        while self.position["stage"] < len(self.stages):
            stage = self.stages[self.position["stage"]]
            if not self.position["started"]:
                if stage.before is not None:
                    stage.before()
                self.position.update(epoch=0, best=None, best_value=None, bad_epochs=0, started=True)
            stop = (self.position["epoch"] >= stage.epochs or self.position["bad_epochs"] >= cfg.patience
                    or not stage.parameters)  # a resumed stage may already have stopped early
            while not stop:
                self._run_epoch(stage)
                stop = (self.position["epoch"] >= stage.epochs
                        or self.position["bad_epochs"] >= cfg.patience)
                self._save()
            if self.position["best"] is not None:
                self.model.load_state_dict(self.position["best"])
            self.position.update(stage=self.position["stage"] + 1, started=False, best=None)
            self._save()
        return self.history

    def _run_epoch(self, stage: Stage) -> None:
        cfg, epoch = self.config, self.position["epoch"]
        groups = list(stage.optimiser_groups())
        for group in groups:
            self._optimizer(stage, group)
        self._freeze_all_but(stage)
        self._set_modes(stage)
        start, total, count, skipped_batches, stepped = time.perf_counter(), 0.0, 0, 0, [False]
        amp = cfg.amp and str(cfg.device).startswith("cuda")
        trained_any = False
        bar = tqdm(stage.batches(epoch), desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
                   disable=not cfg.progress, leave=False)

        def update(group, loss: Tensor) -> None:
            asked = (group,) if isinstance(group, str) else tuple(group)
            unknown = [g for g in asked if g not in groups]
            if unknown or not asked:
                raise KeyError(f"Trainer: stage {stage.name!r} has no optimiser group "
                               f"{', '.join(map(repr, unknown)) if unknown else repr(group)}; it has {groups}")
            self._step(stage, asked, loss, epoch)
            stepped[0] = True

        for batch in bar:
            stepped[0] = False
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                if stage.updates is not None:
                    loss, n = stage.train_step(batch, epoch, update)
                else:
                    loss, n = stage.train_step(batch, epoch)
            if loss is None:  # skipped, unless an update stage stepped and only has no loss to log
                skipped_batches += 0 if stepped[0] else 1
                trained_any = trained_any or stepped[0]
                continue
            trained_any = True
            if stage.updates is None:
                self._step(stage, (stage.group,), loss, epoch)
            total, count = total + float(loss.detach()) * n, count + n
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        with torch.no_grad():
            self.model.eval()
            val = stage.validate()
        if stage.monitor not in val:
            raise KeyError(f"Trainer: stage {stage.name!r} monitors {stage.monitor!r} but validate() returned "
                           f"{sorted(val)}")
        value = float(val[stage.monitor] if stage.mode == "min" else -val[stage.monitor])
        plateau = float(val.get("loss", value))
        if math.isfinite(plateau):  # NaN: nothing was measured (e.g. no missing entry to recover), no plateau
            for group in groups:  # the schedulers minimise: the validation loss, else the monitor lower-is-better
                self.schedulers[group].step(plateau)
        self._select(value)
        self.position["epoch"] = epoch + 1
        if not trained_any:
            warnings.warn(f"Trainer: stage {stage.name!r} epoch {epoch + 1} trained nothing: all "
                          f"{skipped_batches} batches were skipped (no utterance had what the stage trains on; "
                          f"check the missing-modality protocol)", RuntimeWarning, stacklevel=2)
        entry = {"stage": stage.name, "epoch": epoch + 1, "train_loss": total / count if count else None,
                 "utterances": count, "skipped_batches": skipped_batches,
                 "lr": self.optimizers[groups[0]].param_groups[0]["lr"], "seconds": time.perf_counter() - start,
                 "valid": val}
        self.history.append(entry)
        if cfg.progress:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float))
            loss = "n/a" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
            print(f"{stage.name:>14} epoch {epoch + 1:3d}  loss {loss}  valid {shown}  "
                  f"({entry['seconds']:.1f}s)", flush=True)

    def _select(self, value: float) -> None:
        """Early stopping's bookkeeping for one epoch's monitored value (lower is better). A non-finite value
        never becomes the best: after a finite best it counts as a bad epoch; before one (nothing measured
        yet, e.g. a validation set without missing entries) it counts as neither, so the stage runs on."""
        best = self.position["best_value"]
        if best is not None and not math.isfinite(best):  # a NaN best resumed from an older checkpoint
            best = None
            self.position.update(best_value=None, best=None)
        if math.isfinite(value) and (best is None or value < best - 1e-6):
            self.position.update(best_value=value, bad_epochs=0, best=copy.deepcopy(self.model.state_dict()))
        elif math.isfinite(value) or best is not None:
            self.position["bad_epochs"] += 1


def variant_config(config: TrainerConfig, out_dir: Optional[Path], name: str, first: bool) -> TrainerConfig:
    """The trainer settings of one variant of a run (a system and its zero-fill baseline) written under
    ``out_dir / name``. With ``resume``, a later variant that has no checkpoint yet — the run stopped
    before it began — starts fresh; the first variant must have one."""
    variant_dir = out_dir / name if out_dir else None
    resume = config.resume and (first or (variant_dir is not None and (variant_dir / CHECKPOINT).exists()))
    return replace(config, out_dir=str(variant_dir) if variant_dir else None, resume=resume)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with its fused (one kernel per step over every tensor) implementation where torch has one
    for the parameters' device (CPU, CUDA): on CPU it halves the step of FedDISC's 49 M generator
    parameters against the default per-tensor loop (66 vs 131 ms on 2 cores); same update rule."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def with_validation(corpus: Corpus, fraction: float = 0.1, seed: int = 0) -> Corpus:
    """The corpus itself if it has a ``valid`` split; otherwise a copy whose ``valid`` split is a seeded
    ``fraction`` of the training dialogues (at least one), removed from ``train``."""
    if corpus.splits.get("valid"):
        return corpus
    train = list(corpus.splits.get("train", []))
    if len(train) < 2:
        raise ValueError(f"with_validation: corpus {corpus.name!r} needs at least 2 training dialogues to hold "
                         f"some out for validation; it has {len(train)}")
    k = max(1, int(math.ceil(fraction * len(train))))
    order = np.random.default_rng(seed).permutation(len(train))
    held = {train[i] for i in order[:k]}
    splits = dict(corpus.splits)
    splits["train"] = [i for i in train if i not in held]
    splits["valid"] = [i for i in train if i in held]
    return replace(corpus, splits=splits)


def _flat(settings: Dict, prefix: str = "") -> Dict:
    """Nested settings as {"trainer.seed": 0, ...}, so that a difference names its field."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    return repr(obj)


__all__ = ["Stage", "Trainer", "TrainerConfig", "adamw", "variant_config", "with_validation"]
