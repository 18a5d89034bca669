"""``imer-fast`` command line.

Commands:
  imer-fast train --model feddisc --data synthetic-iemocap6 --missing gcnet:0.3 [--out runs/feddisc] ...
  imer-fast train --model rohydr --data synthetic-mosi --missing gcnet:0.3 [--out runs/rohydr] ...
  imer-fast train --model drkf --data synthetic-iemocap4 --missing gcnet:0.3 [--out runs/drkf] ...
  imer-fast train --model dgn --data synthetic-iemocap6 --missing-rate 0.3 [--out runs/dgn] ...
  imer-fast eval --checkpoint runs/feddisc/feddisc/model.pt --data synthetic-iemocap6 [--missing fixed:ta]
  imer-fast recover --checkpoint runs/feddisc/feddisc/model.pt --data ... --out recovered.npz
  imer-fast synthesize --name iemocap6 --out data/iemocap6 [--formats gcnet,dialoguegcn,mmsa]
  imer-fast backends            # which backend each op picks on this machine, and why
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

MODELS = ("feddisc", "rohydr", "drkf", "dgn")


def int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (bad values are refused when the command line is read,
    before any work, with the flag's name)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {value}")
        return value

    return parse


def _feature_dirs(items: List[str]) -> Dict[str, str]:
    from .data import canonical_modality

    dirs = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--feature-dir: expected MODALITY=PATH (e.g. text=feats/deberta); got {item!r}")
        name, path = item.split("=", 1)
        try:
            modality = canonical_modality(name)
        except ValueError as err:
            raise SystemExit(f"--feature-dir {item}: {err}")
        if modality in dirs:
            raise SystemExit(f"--feature-dir: {modality} is given twice ({dirs[modality]!r} and {path!r})")
        dirs[modality] = path
    return dirs


# The data flags and the --data kinds that read them (with their defaults): another kind would ignore them.
_DATA_FLAGS = {"label_path": ("gcnet",), "feature_dir": ("gcnet",), "path": ("dialoguegcn", "mmsa"),
               "num_classes": ("gcnet", "dialoguegcn", "mmsa"), "scale": ("synthetic",),
               "feature_dim": ("synthetic",), "data_seed": ("synthetic",), "modality_noise": ("synthetic",)}


def _refuse_data_flags_the_kind_ignores(args, kind: str) -> None:
    ignored = ["--" + name.replace("_", "-") for name, kinds in _DATA_FLAGS.items()
               if kind not in kinds and getattr(args, name) != args.data_defaults[name]]
    if ignored:
        raise SystemExit(f"{', '.join(ignored)}: not used by --data {args.data}")


def load_corpus(args):
    """The corpus named by --data: synthetic-<name>, gcnet (with --label-path and --feature-dir),
    dialoguegcn (with --path to IEMOCAP_features.pkl) or mmsa (with --path to MMSA's aligned_50.pkl)."""
    from . import data

    kind = "synthetic" if args.data.startswith("synthetic-") else args.data
    if kind in ("synthetic", "gcnet", "dialoguegcn", "mmsa"):
        _refuse_data_flags_the_kind_ignores(args, kind)
    if args.data.startswith("synthetic-"):
        name = args.data[len("synthetic-"):]
        if name not in data.SYNTHETIC_NAMES:
            raise SystemExit(f"--data: unknown synthetic corpus {name!r}; choose from "
                             f"{', '.join('synthetic-' + n for n in data.SYNTHETIC_NAMES)}")
        dims = args.feature_dim if args.feature_dim else None
        try:
            return data.make_synthetic(name, seed=args.data_seed, scale=args.scale, feature_dims=dims,
                                       modality_noise=args.modality_noise)
        except ValueError as err:
            raise SystemExit(f"--data: {err}")
    if args.data == "gcnet":
        if not args.label_path or not args.feature_dir:
            raise SystemExit("--data gcnet needs --label-path and one --feature-dir MODALITY=PATH per modality")
        try:
            return data.read_gcnet(args.label_path, _feature_dirs(args.feature_dir), num_classes=args.num_classes)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"--data gcnet: {err}")
    if args.data == "dialoguegcn":
        if not args.path:
            raise SystemExit("--data dialoguegcn needs --path to IEMOCAP_features.pkl")
        try:
            return data.read_dialoguegcn(args.path, num_classes=args.num_classes)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"--data dialoguegcn: {err}")
    if args.data == "mmsa":
        if not args.path:
            raise SystemExit("--data mmsa needs --path to MMSA's aligned_50.pkl / unaligned_50.pkl (MOSI, MOSEI)")
        try:
            label_key = "regression_labels" if args.num_classes is None else "classification_labels"
            return data.read_mmsa(args.path, label_key=label_key).to_corpus(num_classes=args.num_classes)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"--data mmsa: {err}")
    raise SystemExit(f"--data: expected synthetic-<name>, gcnet, dialoguegcn or mmsa; got {args.data!r}")


def _add_data(p) -> None:
    added = [
        p.add_argument("--data", default="synthetic-iemocap6",
                       help="synthetic-{iemocap6,iemocap4,mosi,mosei} (bundled generator), gcnet, dialoguegcn or mmsa"),
        p.add_argument("--label-path", help="gcnet: the label pickle"),
        p.add_argument("--feature-dir", action="append", default=[],
                       help="gcnet: MODALITY=FOLDER of per-utterance .npy"),
        p.add_argument("--path", help="dialoguegcn: IEMOCAP_features.pkl; mmsa: aligned_50.pkl (or unaligned_50.pkl)"),
        p.add_argument("--num-classes", type=int_at_least(2), default=None,
                       help="gcnet / dialoguegcn: number of classes (default: inferred from the labels present); "
                            "mmsa: read the classification labels with this many classes (default: the regression "
                            "labels)"),
        p.add_argument("--scale", type=float, default=1.0, help="synthetic: fraction of the real corpus's dialogues"),
        p.add_argument("--feature-dim", type=int_at_least(1), default=None,
                       help="synthetic: one feature width for every modality (default: GCNet's 1024/512/1024)"),
        p.add_argument("--data-seed", type=int_at_least(0), default=0, help="synthetic: generator seed"),
        p.add_argument("--modality-noise", type=float, default=1.0,
                       help="synthetic: amplitude of each modality's private noise (1: the default corpus, where "
                            "modalities predict each other weakly; smaller: more redundant modalities)"),
    ]
    # what _refuse_data_flags_the_kind_ignores compares with
    p.set_defaults(data_defaults={a.dest: a.default for a in added})


def _add_train(sub):
    p = sub.add_parser("train", help="train a model and write metrics.json (+ model.pt) to --out",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="feddisc",
                   help="feddisc: FedDISC recovery + classification; rohydr: RoHyDR recovery + regression/"
                        "classification; drkf: DRKF (audio + text) with missing-modality recovery (each with its "
                        "zero-fill baseline); dgn: GCNet's Dialogue Graph Network alone")
    _add_data(p)
    p.add_argument("--missing", default=None,
                   help="missing-modality protocol: none, gcnet:RATE, imder:RATE or fixed:PATTERN (e.g. fixed:ta)")
    p.add_argument("--missing-rate", type=float, default=None, help="shorthand for --missing gcnet:RATE (default 0.3)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="dialogues per batch (default: feddisc 8, rohydr 8, drkf 4, dgn 16)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: feddisc 5e-4, rohydr 5e-4, drkf 1e-4, dgn 1e-3)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="default: feddisc, rohydr, drkf 0.01 (AdamW); dgn 1e-5")
    p.add_argument("--window-past", type=int_at_least(-1), default=None,
                   help="feddisc, dgn: dialogue-graph past window, -1: the whole dialogue (default: feddisc 6, dgn 2)")
    p.add_argument("--window-future", type=int_at_least(-1), default=None,
                   help="feddisc, dgn: future window (default: feddisc 6, dgn 2)")
    p.add_argument("--no-pattern-eval", action="store_true", help="skip the per-availability-pattern evaluation")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the weights, the missing-modality masks, the batch order and the samplers")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds an earlier one (default: refused)")
    p.add_argument("--epochs", type=int_at_least(0), default=20,
                   help="dgn, rohydr: training epochs; drkf: epochs of its main stage")
    c = p.add_argument_group("recovery systems (feddisc, rohydr, drkf)")
    c.add_argument("--preset", choices=("release", "small"), default="release",
                   help="model sizes: release (the papers' sizes: 32x48 latents, release U-Nets / DiT, 1000 diffusion "
                        "steps, DDIM-50) or small (minutes on a CPU)")
    c.add_argument("--recovery", choices=("diffusion", "token", "zero"), default="diffusion",
                   help="diffusion: the system's diffusion recovery; token (drkf only): a learned missing token; "
                        "zero: the no-recovery baseline only")
    c.add_argument("--no-baseline", action="store_true", help="do not also train the zero-fill baseline")
    c.add_argument("--sampling-steps", type=int_at_least(1), default=None, help="recovery DDIM steps (preset default)")
    c.add_argument("--recovery-samples", type=int_at_least(1), default=1,
                   help="feddisc, drkf: recovered latent = mean of this many samples")
    c.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    c.add_argument("--clip-mode", choices=("norm", "value"), default="norm", help="FedDISC release: value")
    c.add_argument("--patience", type=int_at_least(1), default=10,
                   help="early stopping: epochs (>= 1) without validation improvement before a stage ends")
    c.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    c.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    c.add_argument("--eval-rates", default="0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7",
                   help="missing rates evaluated after training (comma-separated)")
    c.add_argument("--layers", choices=("fused", "reference"), default="fused",
                   help="fused: imer_fast modules; reference: the eager release twins (benchmark baseline)")
    f = p.add_argument_group("feddisc")
    f.add_argument("--schedule", choices=("release", "afa"), default="release",
                   help="release: extractor -> generator -> classifier; afa: extractor, then --afa-cycles cycles "
                        "alternating generator (classifier frozen) and classifier (recovery frozen) stages")
    f.add_argument("--extractor-epochs", type=int_at_least(0), default=20,
                   help="projections + DGN/MulT pseudo-labeller")
    f.add_argument("--generator-epochs", type=int_at_least(0), default=None,
                   help="feddisc: DISC-Diffusion generators (per AFA cycle; default 20); drkf: its generators "
                        "(default 20); rohydr (ours): recovery alone before the joint training (default 0, as the "
                        "release)")
    f.add_argument("--classifier-epochs", type=int_at_least(0), default=20,
                   help="MulT classifier + prompts (per AFA cycle)")
    f.add_argument("--afa-cycles", type=int_at_least(1), default=2, help="--schedule afa: generator/classifier cycles")
    add_feddisc_model_args(f)
    r = p.add_argument_group("rohydr")
    r.add_argument("--generator", choices=("dit", "score"), default="dit",
                   help="dit: diffusion transformer (DDPM-trained, DDIM-sampled on the same steps); score: IMDer's "
                        "VE-SDE ScoreNet with Euler-Maruyama sampling")
    r.add_argument("--lambda-g", type=float, default=1.0, help="stage 1 weight of the refiner reconstruction loss")
    r.add_argument("--lambda-al", type=float, default=0.5, help="stage 2 adversarial vs L1 reconstructor weight")
    r.add_argument("--lambda-c", type=float, default=0.4, help="stage 3 weight of the loss on recovered inputs")
    r.add_argument("--text-dropout", type=float, default=None,
                   help="training dropout on the text features before the projection (default: the preset's; "
                        "release 0.5, small 0)")
    r.add_argument("--sampler-gradient", action="store_true",
                   help="dit: stages 1 and 3 train the generators through the DDIM sampler, as the release's DiT "
                        "version (default: no gradient through the sampler)")
    k = p.add_argument_group("drkf")
    k.add_argument("--modalities", default="audio,text", help="fused modalities (release: audio,text)")
    k.add_argument("--finetune-epochs", type=int_at_least(0), default=10, help="fine-tuning on recovered tokens")
    k.add_argument("--max-pairs", type=_max_pairs, default=64,
                   help="ordered pairs sampled per batch for the discrimination head (an int >= 1, or 'all' for "
                        "every pair, as the release)")
    d = p.add_argument_group("dgn")
    d.add_argument("--hidden", type=int_at_least(2), default=100, help="GCNet hidden size (graph hidden = hidden // 2)")
    d.add_argument("--dropout", type=float, default=0.2, help="GCNet dropout")
    d.add_argument("--no-time-attn", action="store_true", help="disable the matching attention")
    d.add_argument("--recon-weight", type=float, default=1.0, help="weight of the reconstruction loss (0: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(train_defaults=vars(p.parse_args([])))  # what _refuse_flags_the_model_ignores compares with


def add_feddisc_model_args(group) -> None:
    """FedDISC's model and generator flags, shared by ``train --model feddisc`` and ``federated``."""
    group.add_argument("--temperature", type=float, default=0.2, help="pseudo-label softmax temperature (release: "
                                                                       "0.2 IEMOCAP, 1.0 MOSI/MOSEI)")
    group.add_argument("--condition-speaker", action="store_true", help="add speaker identity to the condition")
    group.add_argument("--condition-context", action="store_true",
                       help="add dialogue context to the generators' condition (feddisc: the DGN's hidden state; "
                            "drkf, ours: the neighbouring utterances' label-free predictions)")
    group.add_argument("--condition-observed", action="store_true",
                       help="ours (feddisc, drkf): add the utterance's other observed modalities (scaled latents "
                            "+ availability) to the generators' condition")
    group.add_argument("--prediction", choices=("eps", "v"), default=None,
                       help="feddisc, drkf, rohydr (dit): what the generators predict (release: eps; preset "
                            "default: eps, except v for the feddisc and drkf small presets)")
    group.add_argument("--scaling", choices=("minmax", "standard"), default=None,
                       help="feddisc, drkf: latent scaling of the generators (release: minmax; preset default: "
                            "release minmax, small standard)")
    group.add_argument("--generator-batch-size", type=int_at_least(1), default=64,
                       help="utterances per generator-stage minibatch")
    group.add_argument("--cold-classifier", action="store_true",
                       help="train the classifier from scratch (default: start from the pseudo-label MulT head)")


def feddisc_model_kwargs(args) -> dict:
    """The FedDISCConfig fields set by :func:`add_feddisc_model_args` (+ ``--recovery-samples``)."""
    return dict(temperature=args.temperature, condition_speaker=args.condition_speaker,
                condition_context=args.condition_context, condition_observed=args.condition_observed,
                prediction=args.prediction, scaling=args.scaling, recovery_samples=args.recovery_samples,
                generator_batch_size=args.generator_batch_size, warm_start_classifier=not args.cold_classifier)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _missing(args) -> str:
    from .data import make_protocol

    missing_rate = getattr(args, "missing_rate", None)  # eval has --missing only
    if args.missing is not None and missing_rate is not None:
        raise SystemExit(f"--missing {args.missing} and --missing-rate {missing_rate}: give one (--missing-rate R "
                         f"is short for --missing gcnet:R)")
    rate = 0.3 if missing_rate is None else missing_rate
    missing = args.missing if args.missing is not None else f"gcnet:{rate}"
    try:
        make_protocol(missing)
    except ValueError as err:
        raise SystemExit(f"--missing: {err}")
    return missing


def _pick(value, default):
    return default if value is None else value


def cmd_train(args) -> int:
    args.device = _device(args.device)
    missing = _missing(args)
    if args.recovery == "token" and args.model != "drkf":
        raise SystemExit("--recovery token: only DRKF has a learned missing token")
    _refuse_flags_the_model_ignores(args)
    corpus = load_corpus(args)
    args.out = args.out or f"runs/{args.model}"
    prepare_out(args)
    print(f"training {args.model} on {corpus.name} ({len(corpus.split('train'))} train / "
          f"{len(corpus.split('test'))} test dialogues), missing={missing}", flush=True)
    if args.model == "feddisc":
        return _train_feddisc(args, corpus, missing)
    if args.model == "rohydr":
        return _train_rohydr(args, corpus, missing)
    if args.model == "drkf":
        return _train_drkf(args, corpus, missing)
    from .train import DGNConfig, train_dgn

    config = DGNConfig(
        epochs=args.epochs, batch_size=_pick(args.batch_size, 16), lr=_pick(args.lr, 1e-3),
        weight_decay=_pick(args.weight_decay, 1e-5), hidden=args.hidden, window_past=_pick(args.window_past, 2),
        window_future=_pick(args.window_future, 2), dropout=args.dropout, time_attn=not args.no_time_attn,
        recon_weight=args.recon_weight, missing=missing, seed=args.seed, device=args.device, out_dir=args.out,
        progress=not args.quiet, eval_patterns=not args.no_pattern_eval,
    )
    try:
        result = train_dgn(corpus, config)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"imer-fast train: {err}")
    t = result["test"]
    print(f"\ntest ({missing}): WA {t['WA']:.4f}  UA {t['UA']:.4f}  WF1 {t['F1_weighted']:.4f}")
    if "patterns" in result:
        print("per availability pattern (t=text, a=audio, v=video):")
        for name, m in result["patterns"].items():
            print(f"  {name:>4}: WA {m['WA']:.4f}  UA {m['UA']:.4f}  WF1 {m['F1_weighted']:.4f}")
    print(f"metrics written to {args.out}/metrics.json")
    return 0


# Train flags that only some models read (every other train flag is read by all four). A value other
# than the default given to a model that does not read it would be silently ignored, so it is refused.
_MODEL_FLAGS = {
    "epochs": ("rohydr", "drkf", "dgn"),
    **dict.fromkeys(("window_past", "window_future"), ("feddisc", "dgn")),
    **dict.fromkeys(("preset", "recovery", "no_baseline", "sampling_steps", "grad_clip", "clip_mode", "patience", "amp",
                     "resume", "eval_rates", "layers", "generator_epochs", "prediction"),
                    ("feddisc", "rohydr", "drkf")),
    **dict.fromkeys(("recovery_samples", "condition_context", "condition_observed", "scaling"), ("feddisc", "drkf")),
    **dict.fromkeys(("schedule", "extractor_epochs", "classifier_epochs", "afa_cycles", "temperature",
                     "condition_speaker", "generator_batch_size", "cold_classifier"), ("feddisc",)),
    **dict.fromkeys(("generator", "lambda_g", "lambda_al", "lambda_c", "text_dropout", "sampler_gradient"),
                    ("rohydr",)),
    **dict.fromkeys(("modalities", "finetune_epochs", "max_pairs"), ("drkf",)),
    **dict.fromkeys(("hidden", "dropout", "no_time_attn", "recon_weight"), ("dgn",)),
}


def _refuse_flags_the_model_ignores(args) -> None:
    ignored = [name for name, models in _MODEL_FLAGS.items()
               if args.model not in models and getattr(args, name) != args.train_defaults[name]]
    if ignored:
        uses = "; ".join(f"--{name.replace('_', '-')} is for {', '.join(_MODEL_FLAGS[name])}" for name in ignored)
        raise SystemExit(f"{', '.join('--' + n.replace('_', '-') for n in ignored)}: not used by --model "
                         f"{args.model} ({uses})")


_RUN_FILES = ("checkpoint.pt", "model.pt", "metrics.json", "results.json", "results.png")


def prepare_out(args) -> None:
    """Check ``--out`` before any work. An earlier run there is refused, continued (``--resume``) or, with
    ``--overwrite``, cleared: its run files are deleted (nothing else in the folder), so that neither a
    later ``--resume`` nor a reader of the folder can mix the earlier run's stages into the new one."""
    from pathlib import Path

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise SystemExit("--resume and --overwrite: choose one (continue the run in --out, or replace it)")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {args.out}: expected a folder; a file of that name exists")
    found = sorted(p for name in _RUN_FILES for p in out.glob(f"**/{name}")) if out.is_dir() else []
    if args.resume or not found:
        return
    if not args.overwrite:
        raise SystemExit(f"--out {args.out}: holds an earlier run ({found[0]}); pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")
    for path in found:
        path.unlink()


def _writable_file(flag: str, path: str) -> None:
    """Refuse an output file path that cannot be written, before the work whose result it holds."""
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise SystemExit(f"{flag} {path}: expected a file path; that is a folder")
    if target.parent.exists() and not target.parent.is_dir():
        raise SystemExit(f"{flag} {path}: its parent {target.parent} is a file, not a folder")


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise SystemExit(f"--device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {text}: this torch build sees no CUDA device; use --device cpu")
    return text


def _max_pairs(text: str):
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'all'; got {text!r}")
    return value


def _eval_rates(text: str):
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise SystemExit(f"--eval-rates: expected comma-separated numbers such as 0.0,0.3,0.7; got {text!r}")
    bad = [r for r in rates if not 0.0 <= r <= 0.7]
    if bad:
        raise SystemExit(f"--eval-rates: GCNet missing rates lie in [0, 0.7]; got {bad}")
    return rates


def _trainer_config(args, lr: float, weight_decay: float):
    from .train.trainer import TrainerConfig

    return TrainerConfig(lr=_pick(args.lr, lr), weight_decay=_pick(args.weight_decay, weight_decay),
                         grad_clip=args.grad_clip, clip_mode=args.clip_mode, patience=args.patience, amp=args.amp,
                         device=args.device, seed=args.seed, out_dir=args.out, resume=args.resume,
                         progress=not args.quiet)


def _config_or_exit(build):
    """A training configuration, or the exit message of the value it refuses (before any work)."""
    try:
        return build()
    except ValueError as err:
        raise SystemExit(f"imer-fast train: {err}")


def _train_feddisc(args, corpus, missing) -> int:
    from .train.feddisc import FedDISCConfig, train_feddisc

    config = _config_or_exit(lambda: FedDISCConfig(
        preset=args.preset, schedule=args.schedule, extractor_epochs=args.extractor_epochs,
        generator_epochs=_pick(args.generator_epochs, 20), classifier_epochs=args.classifier_epochs,
        afa_cycles=args.afa_cycles, batch_size=_pick(args.batch_size, 8), missing=missing,
        recovery=args.recovery, sampling_steps=args.sampling_steps, window_past=_pick(args.window_past, 6),
        window_future=_pick(args.window_future, 6), eval_rates=_eval_rates(args.eval_rates),
        eval_patterns=not args.no_pattern_eval, layers=args.layers,
        trainer=_trainer_config(args, 5e-4, 0.01), **feddisc_model_kwargs(args)))
    return _train_and_report(args, corpus, "FedDISC",
                             lambda: train_feddisc(corpus, config, baseline=not args.no_baseline))


def _train_rohydr(args, corpus, missing) -> int:
    from .train.rohydr import RoHyDRConfig, train_rohydr

    config = _config_or_exit(lambda: RoHyDRConfig(
        preset=args.preset, generator=args.generator, recovery=args.recovery, epochs=args.epochs,
        generator_epochs=_pick(args.generator_epochs, 0),
        batch_size=_pick(args.batch_size, 8), missing=missing, lambda_g=args.lambda_g,
        lambda_al=args.lambda_al, lambda_c=args.lambda_c, sampling_steps=args.sampling_steps,
        prediction=args.prediction, text_dropout=args.text_dropout,
        sampler_gradient=args.sampler_gradient,
        eval_rates=_eval_rates(args.eval_rates), eval_patterns=not args.no_pattern_eval,
        layers=args.layers, trainer=_trainer_config(args, 5e-4, 0.01)))
    return _train_and_report(args, corpus, "RoHyDR",
                             lambda: train_rohydr(corpus, config, baseline=not args.no_baseline))


def _train_drkf(args, corpus, missing) -> int:
    from .data import canonical_modality
    from .train.drkf import DRKFConfig, train_drkf

    try:
        modalities = tuple(canonical_modality(m) for m in args.modalities.split(",") if m.strip())
    except ValueError as err:
        raise SystemExit(f"--modalities: {err}")
    config = _config_or_exit(lambda: DRKFConfig(
        preset=args.preset, modalities=modalities, recovery=args.recovery, drkf_epochs=args.epochs,
        generator_epochs=_pick(args.generator_epochs, 20), finetune_epochs=args.finetune_epochs,
        batch_size=_pick(args.batch_size, 4), missing=missing, max_pairs=args.max_pairs,
        sampling_steps=args.sampling_steps, recovery_samples=args.recovery_samples,
        condition_observed=args.condition_observed, condition_context=args.condition_context,
        prediction=args.prediction, scaling=args.scaling, eval_rates=_eval_rates(args.eval_rates),
        eval_patterns=not args.no_pattern_eval,
        layers=args.layers, trainer=_trainer_config(args, 1e-4, 0.01)))
    return _train_and_report(args, corpus, "DRKF", lambda: train_drkf(corpus, config, baseline=not args.no_baseline))


def _train_and_report(args, corpus, title: str, train) -> int:
    from .train.report import default_metrics, plot_results, results_table, short

    try:
        result = train()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # FloatingPointError: a non-finite loss
        raise SystemExit(f"imer-fast train: {err}")
    systems = {name: r["evaluation"] for name, r in result["systems"].items()}
    shown = " and ".join(short(m) for m in default_metrics(systems))
    print(f"\ntest split, {shown} per availability pattern (t text, a audio, v video) and missing rate:")
    print(results_table(systems))
    for name, r in result["systems"].items():
        print(f"{name}: trained in {r['train_seconds']:.0f}s, evaluated in {r['eval_seconds']:.0f}s; "
              f"{r['skipped_all_missing_utterances']} all-missing utterances left out of the losses")
        if "recovery_error" in r:
            e = r["recovery_error"]
            print(f"{name}: latent MSE of the {e['entries']} recovered test entries {e['recovered_mse']:.4f} "
                  f"(mean imputation {e['mean_imputation_mse']:.4f})")
    plot = plot_results(systems, f"{args.out}/results.png", title=f"{title} on {corpus.name}")
    print(f"results written to {args.out}/results.json" + (f" and {plot}" if plot else
                                                            " (install matplotlib for results.png)"))
    return 0


def _load_checkpoint(args):
    from .train.systems import checkpoint_system, system

    try:
        found = system(checkpoint_system(args.checkpoint))
        return (found,) + tuple(found.load(args.checkpoint, args.device))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise SystemExit(f"--checkpoint: {err}")


def _corpus_for(args, found, model, config):
    """The --data corpus, refused unless the checkpoint's model can read it (widths, task, classes, split)."""
    corpus = load_corpus(args)
    try:
        found.check_corpus(corpus, config)
    except ValueError as err:
        raise SystemExit(f"--data: {err}")
    if any(corpus.feature_dims.get(m) != width for m, width in model.feature_dims.items()):
        raise SystemExit(f"--data: feature widths {dict(corpus.feature_dims)} do not match the checkpoint's "
                         f"{dict(model.feature_dims)}")
    task = getattr(model, "task", "classification")
    if corpus.task != task:
        raise SystemExit(f"--data: {corpus.name!r} is a {corpus.task} corpus; the checkpoint's model does {task}")
    classes = getattr(model, "num_classes", getattr(model, "num_outputs", None))
    if task == "classification" and classes is not None and corpus.num_classes > classes:
        raise SystemExit(f"--data: the labels of {corpus.name!r} lie in [0, {corpus.num_classes}); the checkpoint "
                         f"has {classes} classes")
    if args.split not in ("train", "valid", "test") or not corpus.split(args.split):
        raise SystemExit(f"--split: {corpus.name!r} has no dialogues in split {args.split!r}; its splits: "
                         f"{ {k: len(v) for k, v in corpus.splits.items()} }")
    return corpus


def cmd_eval(args) -> int:
    from .train.report import short

    args.device = _device(args.device)
    if args.out:
        _writable_file("--out", args.out)
    found, model, config = _load_checkpoint(args)
    corpus = _corpus_for(args, found, model, config)
    config.trainer.device, config.batch_size = args.device, _pick(args.batch_size, config.batch_size)
    run = found.run(model, corpus, config)
    if args.missing is None:
        config.eval_rates = _eval_rates(args.eval_rates)
        config.eval_patterns = True  # whatever the training run chose: eval reports every pattern
        result = run.evaluate_all(args.split)
    else:
        result = {args.missing: run.evaluate(args.split, _missing(args))}
    for name, m in result.items():
        print(f"{name:>13}: " + "  ".join(f"{short(k)} {v:.4f}" for k, v in m.items()))
    if args.out:
        from .io import atomic_write_json

        atomic_write_json(args.out, result)
        print(f"written to {args.out}")
    return 0


def cmd_recover(args) -> int:
    import numpy as np
    import torch

    from .data import make_loader
    from .io import atomic_write

    args.device = _device(args.device)
    missing = _missing(args)
    _writable_file("--out", args.out)
    found, model, config = _load_checkpoint(args)
    corpus = _corpus_for(args, found, model, config)
    ids, positions, availability, recovered = [], [], [], {}
    with torch.no_grad():
        for batch in make_loader(corpus, args.split, _pick(args.batch_size, config.batch_size), missing=missing,
                                 seed=args.seed):
            batch = batch.to(args.device)
            packed = batch.packed()
            for m, x in found.recovered(model, batch, args.seed).items():
                recovered.setdefault(m, []).append(x.cpu().numpy())
            availability.append(packed.availability.cpu().numpy())
            ids += [packed.dialogue_ids[b] for b in packed.batch_index.tolist()]
            positions.append(packed.position.cpu().numpy())
    arrays = {f"latent_{m}": np.concatenate(v) for m, v in recovered.items()}
    arrays.update(dialogue_id=np.array(ids), position=np.concatenate(positions),
                  availability=np.concatenate(availability))
    atomic_write(args.out, lambda f: np.savez(f, **arrays), binary=True)
    n = len(ids)
    print(f"wrote {found.name} inputs of {n} utterances ({int((~arrays['availability']).sum())} missing entries, "
          f"recovered where the model recovers) to {args.out}")
    return 0


def cmd_synthesize(args) -> int:
    from .data import write_synthetic

    formats = tuple(f for f in args.formats.split(",") if f)
    try:
        paths = write_synthetic(args.name, args.out, seed=args.seed, formats=formats, scale=args.scale)
    except ValueError as err:
        raise SystemExit(f"imer-fast synthesize: {err}")
    print(json.dumps(paths, indent=2, default=str))
    return 0


def backend_probes(device) -> Dict[str, tuple]:
    """Small float32 arguments of every op's selection function (``backends.explain(op, *args)``)."""
    import torch

    x = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
    return {"attention": (x(1, 1, 1, 8),), "build_dialogue_graph": (torch.zeros(1, dtype=torch.long, device=device),),
            "counter_normal": (torch.zeros((), dtype=torch.int64, device=device),),
            "group_norm_film_silu": (x(1, 4, 4), 2), "mult_layer": (x(1, 1, 8), 2),
            "relational_csr": (torch.zeros(2, 0, dtype=torch.long, device=device),), "rgcn_conv": (x(1, 1),),
            "sampler_step": (x(1, 4),), "stable_layer_norm": (x(1, 4),), "timestep_embedding": (x(1), x(4)),
            "winograd_conv1d": (x(1, 4, 8),)}


def cmd_backends(args) -> int:
    import torch

    from . import backends, ops  # noqa: F401

    probes = backend_probes(torch.device(_device(args.device)))
    for op in backends.registered_ops():
        print(backends.explain(op, *probes[op]))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="imer-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    from .federated.cli import add_federated_parser, run_federated
    add_federated_parser(sub)
    e = sub.add_parser("eval", help="evaluate a trained FedDISC / RoHyDR / DRKF checkpoint per pattern / missing rate",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, help="model.pt written by imer-fast train --model feddisc|rohydr|drkf")
    _add_data(e)
    e.add_argument("--split", default="test", help="train, valid or test")
    e.add_argument("--missing", default=None, help="one protocol (default: every pattern and --eval-rates)")
    e.add_argument("--eval-rates", default="0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7",
                   help="GCNet missing rates evaluated when --missing is not given (comma-separated)")
    e.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="dialogues per batch (default: the training run's, which FedDISC's recovery noise depends on)")
    e.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device")
    e.add_argument("--out", default=None, help="write the metrics as JSON here")
    r = sub.add_parser("recover", help="write recovered latents of a dataset (observed where present, generated "
                                       "where missing) to an .npz", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--checkpoint", required=True, help="model.pt written by imer-fast train --model feddisc|rohydr|drkf")
    _add_data(r)
    r.add_argument("--split", default="test", help="train, valid or test")
    r.add_argument("--missing", default=None, help="protocol deciding what is missing (e.g. fixed:ta)")
    r.add_argument("--missing-rate", type=float, default=None, help="shorthand for --missing gcnet:RATE (default 0.3)")
    r.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="dialogues per batch (default: the training run's)")
    r.add_argument("--seed", type=int_at_least(0), default=0, help="mask and sampler seed")
    r.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device")
    r.add_argument("--out", required=True, help="output .npz: latent_<modality> (feddisc/rohydr: latents [N, C, L]; drkf: "
                                                "tokens [N, T, W]), dialogue_id, position, availability [N, 3]")
    s = sub.add_parser("synthesize", help="write a synthetic corpus in the GCNet, DialogueGCN and MMSA formats",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--name", default="iemocap6", help="iemocap6, iemocap4, mosi or mosei")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--formats", default="gcnet,dialoguegcn,mmsa", help="comma-separated formats to write")
    s.add_argument("--seed", type=int_at_least(0), default=0, help="generator seed")
    s.add_argument("--scale", type=float, default=1.0, help="fraction of the real corpus's dialogues")
    b = sub.add_parser("backends", help="show which backend each op selects (for float32 inputs) and why")
    b.add_argument("--device", default="cpu", help="torch device whose backends to show")
    args = parser.parse_args(argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "recover": cmd_recover, "synthesize": cmd_synthesize,
                "backends": cmd_backends}
    commands["federated"] = run_federated
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
