"""The trainable recovery-plus-classification systems behind ``imer-fast train/eval/recover``: how to
load a saved model of each, and how to evaluate it on a corpus."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..io import load_torch_file


@dataclass(frozen=True)
class System:
    name: str
    load: Callable        # (path, device) -> (model, config)
    run: Callable         # (model, corpus, config) -> a run with evaluate / evaluate_all
    check_corpus: Callable[..., None]   # (corpus, config): raises ValueError when the model cannot use it
    recovered: Callable   # (model, batch, seed) -> modality -> [N, ...] observed-or-recovered inputs, packed order


def _feddisc() -> System:
    from .feddisc import FedDISCRun, _check_corpus, load_feddisc
    return System("feddisc", load_feddisc, FedDISCRun, lambda corpus, config: _check_corpus(corpus),
                  lambda model, batch, seed: model(batch, seed=seed)["latents"])


def _rohydr() -> System:
    from .rohydr import RoHyDRRun, _check_corpus, load_rohydr
    return System("rohydr", load_rohydr, RoHyDRRun, lambda corpus, config: _check_corpus(corpus),
                  lambda model, batch, seed: model(batch, seed=seed)["latents"])


def _drkf() -> System:
    from .drkf import DRKFRun, _check, load_drkf
    return System("drkf", load_drkf, DRKFRun, _check,
                  lambda model, batch, seed: model.predict_batch(batch, seed=seed)["tokens"])


FACTORIES = {"feddisc": _feddisc, "rohydr": _rohydr, "drkf": _drkf}


def system(name: str) -> System:
    if name not in FACTORIES:
        raise ValueError(f"unknown system {name!r}; expected one of {sorted(FACTORIES)}")
    return FACTORIES[name]()


def checkpoint_system(path) -> str:
    """Which system wrote ``path`` (a ``model.pt`` of ``imer-fast train``)."""
    state = load_torch_file(path, "cpu", "pass the model.pt written by imer-fast train")
    if isinstance(state, dict) and "position" in state and "stages" in state:
        raise ValueError(f"{path} is the trainer's resume checkpoint; pass the model.pt written next to it")
    name = state.get("model") if isinstance(state, dict) else None
    if name == "dgn":
        raise ValueError(f"{path} is a Dialogue Graph Network written by imer-fast train --model dgn, which reports "
                         f"its test metrics in metrics.json; eval and recover read the recovery systems' model.pt "
                         f"({', '.join(sorted(FACTORIES))})")
    if not isinstance(name, str) or name not in FACTORIES:
        shown = repr(name) if name is None or isinstance(name, str) else f"a {type(name).__name__}"
        raise ValueError(f"{path} is not a checkpoint written by imer-fast train (its 'model' entry is {shown}; "
                         f"expected one of {sorted(FACTORIES)})")
    return name
