"""``imer-fast`` command line.

Commands:
  imer-fast train --model dgn --data synthetic-iemocap6 --missing-rate 0.3 [--out runs/dgn] ...
  imer-fast synthesize --name iemocap6 --out data/iemocap6 [--formats gcnet,dialoguegcn,mmsa]
  imer-fast backends            # which backend each op picks on this machine, and why
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

MODELS = ("dgn",)  # FedDISC, RoHyDR and DRKF arrive with the full systems


def _feature_dirs(items: List[str]) -> Dict[str, str]:
    dirs = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--feature-dir: expected MODALITY=PATH (e.g. text=feats/deberta); got {item!r}")
        modality, path = item.split("=", 1)
        dirs[modality] = path
    return dirs


def load_corpus(args):
    """The corpus named by --data: synthetic-<name>, gcnet (with --label-path and --feature-dir) or
    dialoguegcn (with --path)."""
    from . import data

    if args.data.startswith("synthetic-"):
        name = args.data[len("synthetic-"):]
        if name not in data.SYNTHETIC_NAMES:
            raise SystemExit(f"--data: unknown synthetic corpus {name!r}; choose from "
                             f"{', '.join('synthetic-' + n for n in data.SYNTHETIC_NAMES)}")
        dims = args.feature_dim if args.feature_dim else None
        return data.make_synthetic(name, seed=args.data_seed, scale=args.scale, feature_dims=dims)
    if args.data == "gcnet":
        if not args.label_path or not args.feature_dir:
            raise SystemExit("--data gcnet needs --label-path and one --feature-dir MODALITY=PATH per modality")
        return data.read_gcnet(args.label_path, _feature_dirs(args.feature_dir))
    if args.data == "dialoguegcn":
        if not args.path:
            raise SystemExit("--data dialoguegcn needs --path to IEMOCAP_features.pkl")
        return data.read_dialoguegcn(args.path)
    raise SystemExit(f"--data: expected synthetic-<name>, gcnet or dialoguegcn; got {args.data!r}")


def _add_train(sub):
    p = sub.add_parser("train", help="train a model and write metrics.json (+ model.pt) to --out",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="dgn", help="model to train (dgn: GCNet's Dialogue Graph Network)")
    p.add_argument("--data", default="synthetic-iemocap6",
                   help="synthetic-{iemocap6,iemocap4,mosi,mosei} (bundled generator), gcnet or dialoguegcn")
    p.add_argument("--label-path", help="gcnet: the label pickle")
    p.add_argument("--feature-dir", action="append", default=[], help="gcnet: MODALITY=FOLDER of per-utterance .npy")
    p.add_argument("--path", help="dialoguegcn: IEMOCAP_features.pkl")
    p.add_argument("--scale", type=float, default=1.0, help="synthetic: fraction of the real corpus's dialogues")
    p.add_argument("--feature-dim", type=int, default=None,
                   help="synthetic: one feature width for every modality (default: GCNet's 1024/512/1024)")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    p.add_argument("--missing", default=None,
                   help="missing-modality protocol: none, gcnet:RATE, imder:RATE or fixed:PATTERN (e.g. fixed:ta)")
    p.add_argument("--missing-rate", type=float, default=0.3, help="shorthand for --missing gcnet:RATE")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--hidden", type=int, default=100, help="GCNet hidden size (graph hidden = hidden // 2)")
    p.add_argument("--window-past", type=int, default=2)
    p.add_argument("--window-future", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--no-time-attn", action="store_true", help="disable the matching attention")
    p.add_argument("--recon-weight", type=float, default=1.0, help="weight of the reconstruction loss (0: off)")
    p.add_argument("--no-pattern-eval", action="store_true", help="skip the per-availability-pattern evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", default="runs/dgn", help="output folder for metrics.json and model.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_train(args) -> int:
    from .data import make_protocol
    from .train import DGNConfig, train_dgn

    missing = args.missing if args.missing is not None else f"gcnet:{args.missing_rate}"
    try:
        make_protocol(missing)
    except ValueError as err:
        raise SystemExit(f"--missing: {err}")
    corpus = load_corpus(args)
    config = DGNConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, hidden=args.hidden,
        window_past=args.window_past, window_future=args.window_future, dropout=args.dropout,
        time_attn=not args.no_time_attn, recon_weight=args.recon_weight, missing=missing, seed=args.seed,
        device=args.device, out_dir=args.out, progress=not args.quiet, eval_patterns=not args.no_pattern_eval,
    )
    print(f"training {args.model} on {corpus.name} ({len(corpus.split('train'))} train / "
          f"{len(corpus.split('test'))} test dialogues), missing={missing}", flush=True)
    result = train_dgn(corpus, config)
    t = result["test"]
    print(f"\ntest ({missing}): WA {t['WA']:.4f}  UA {t['UA']:.4f}  WF1 {t['F1_weighted']:.4f}")
    if "patterns" in result:
        print("per availability pattern (t=text, a=audio, v=video):")
        for name, m in result["patterns"].items():
            print(f"  {name:>4}: WA {m['WA']:.4f}  UA {m['UA']:.4f}  WF1 {m['F1_weighted']:.4f}")
    if args.out:
        print(f"metrics written to {args.out}/metrics.json")
    return 0


def cmd_synthesize(args) -> int:
    from .data import write_synthetic

    formats = tuple(f for f in args.formats.split(",") if f)
    paths = write_synthetic(args.name, args.out, seed=args.seed, formats=formats, scale=args.scale)
    print(json.dumps(paths, indent=2, default=str))
    return 0


def cmd_backends(args) -> int:
    import torch

    from . import backends, ops  # noqa: F401

    device = torch.device(args.device)
    x = torch.zeros(1, 1, device=device)
    lengths = torch.zeros(1, dtype=torch.long, device=device)
    for op, probe in (("build_dialogue_graph", lengths), ("relational_csr", torch.zeros(2, 0, dtype=torch.long,
                                                                                         device=device)),
                      ("rgcn_conv", x)):
        print(backends.explain(op, probe))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="imer-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    s = sub.add_parser("synthesize", help="write a synthetic corpus in the GCNet, DialogueGCN and MMSA formats")
    s.add_argument("--name", default="iemocap6")
    s.add_argument("--out", required=True)
    s.add_argument("--formats", default="gcnet,dialoguegcn,mmsa")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=1.0)
    b = sub.add_parser("backends", help="show which backend each op selects and why")
    b.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    return {"train": cmd_train, "synthesize": cmd_synthesize, "backends": cmd_backends}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
