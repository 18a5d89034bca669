"""``imer-fast federated``: the in-process federated FedDISC simulation (:mod:`.simulation`).

  imer-fast federated --data synthetic-iemocap6 --clients tv,ta,av --rounds 5 --local-epochs 1 \\
      --schedule afa --out runs/fed [--local-only] [--resume]

:func:`add_federated_parser` adds the sub-command to an ``argparse`` sub-parser set and
:func:`run_federated` runs it. The data flags and the model / local-training flags have the names and
defaults of ``imer-fast train --model feddisc`` (the shared helpers come from :mod:`imer_fast.cli`).
"""
from __future__ import annotations

import argparse
from typing import Optional, Tuple

from .aggregation import ON_INVALID
from .simulation import DEFAULT_CLIENTS, SCHEDULES

__all__ = ["add_federated_parser", "run_federated"]


def add_federated_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``federated`` command to ``subparsers`` (``parser.add_subparsers()``'s result); returns
    its parser. Dispatch to :func:`run_federated`."""
    from ..cli import _add_data, _cuda, add_feddisc_model_args, int_at_least

    p = subparsers.add_parser(
        "federated", help="simulate federated FedDISC in one process: clients with fixed modality availability "
                          "train on disjoint shards, the server aggregates each round",
        description="Simulate federated FedDISC in one process. Each client permanently holds the modalities of its "
                    "availability pattern and trains on its own disjoint shard of the training dialogues; every round "
                    "it trains the schedule's module group from the broadcast global state, and the server averages "
                    "each group over the clients entitled to it (a modality's generator over the clients holding "
                    "that modality). The global state is checkpointed after every round (--resume continues); at "
                    "the end the global model (or, with --local-only, every client's own model) is evaluated on the "
                    "test split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data(p)
    f = p.add_argument_group("federation")
    f.add_argument("--clients", default=",".join(DEFAULT_CLIENTS),
                   help="one availability pattern per client, comma-separated (t text, a audio, v video; l is "
                        "accepted for text); the release: tv,ta,av")
    f.add_argument("--schedule", choices=SCHEDULES, default="afa",
                   help="afa: extractor rounds, then --cycles cycles of recovery rounds (classifier frozen) and "
                        "classifier rounds (recovery frozen); sequential: one pass extractor -> recovery -> classifier")
    f.add_argument("--rounds", type=int_at_least(0), default=5,
                   help="rounds of every phase (per AFA cycle for recovery and classifier), unless set below")
    f.add_argument("--extractor-rounds", type=int_at_least(0), default=None,
                   help="rounds training the projections + DGN/MulT pseudo-labeller; unset: --rounds")
    f.add_argument("--recovery-rounds", type=int_at_least(0), default=None,
                   help="rounds training the DISC-Diffusion generators, per AFA cycle; unset: --rounds")
    f.add_argument("--classifier-rounds", type=int_at_least(0), default=None,
                   help="rounds training the MulT classifier + prompts, per AFA cycle; unset: --rounds")
    f.add_argument("--cycles", type=int_at_least(0), default=2, help="AFA cycles (ignored by --schedule sequential)")
    f.add_argument("--local-epochs", type=int_at_least(1), default=1, help="epochs each client trains per round")
    f.add_argument("--local-only", action="store_true",
                   help="no federation: every client trains the same schedule alone on its shard (the reference "
                        "for 'federated vs each client alone'); each client's model is evaluated")
    f.add_argument("--weighted", action="store_true",
                   help="weight the averages by the clients' training utterances (the release averages unweighted)")
    f.add_argument("--min-replies", type=int_at_least(1), default=1,
                   help="a module group with fewer contributing clients in a round keeps its previous global values")
    f.add_argument("--on-invalid", choices=ON_INVALID, default="raise",
                   help="a client reply with a wrong key, shape, dtype or a NaN/inf: raise stops the run, drop leaves "
                        "the client out of that round")
    t = p.add_argument_group("model and local training (as imer-fast train --model feddisc)")
    t.add_argument("--preset", choices=("release", "small"), default="release",
                   help="model sizes: release (32x48 latents, release U-Nets, 1000 diffusion steps, DDIM-50) or "
                        "small (minutes on a CPU)")
    t.add_argument("--batch-size", type=int_at_least(1), default=8, help="dialogues per batch")
    t.add_argument("--lr", type=float, default=5e-4, help="learning rate of the clients' AdamW")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    t.add_argument("--window-past", type=int_at_least(-1), default=6,
                   help="dialogue-graph past window; -1: the whole dialogue")
    t.add_argument("--window-future", type=int_at_least(-1), default=6, help="dialogue-graph future window")
    t.add_argument("--sampling-steps", type=int_at_least(1), default=None,
                   help="recovery DDIM steps; unset: the preset's")
    t.add_argument("--grad-clip", type=float, default=1.0, help="gradient clipping threshold; 0 disables")
    t.add_argument("--clip-mode", choices=("norm", "value"), default="norm",
                   help="clip the gradient norm or each value (the FedDISC release: value)")
    t.add_argument("--patience", type=int_at_least(1), default=10,
                   help="early stopping within a client's round: epochs without validation improvement")
    t.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    t.add_argument("--layers", choices=("fused", "reference"), default="fused",
                   help="fused: imer_fast modules; reference: the eager release twins")
    t.add_argument("--recovery-samples", type=int_at_least(1), default=1,
                   help="recovered latent = mean of this many samples")
    add_feddisc_model_args(t)
    o = p.add_argument_group("run")
    o.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the shards, the initial model and every client's training")
    o.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device the clients train on")
    o.add_argument("--out", default="runs/federated",
                   help="output folder: checkpoint.pt and metrics.json (every round), results.json, "
                        "<model>/model.pt (readable by imer-fast eval / recover)")
    o.add_argument("--resume", action="store_true", help="continue after the last finished round in --out")
    o.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds an earlier one (default: refused)")
    o.add_argument("--eval-patterns", default="all",
                   help="availability patterns evaluated on the test split, comma-separated (all: the seven; none)")
    o.add_argument("--no-pattern-eval", action="store_true", help="skip the per-pattern evaluation")
    o.add_argument("--eval-rates", default="",
                   help="GCNet missing rates also evaluated after training (comma-separated, e.g. 0.0,0.3,0.7)")
    o.add_argument("--no-recovery-error", action="store_true",
                   help="skip the latent MSE of the recovered test entries under each client's pattern")
    o.add_argument("--quiet", action="store_true", help="no per-round lines")
    return p


def _patterns(text: str, flag: str) -> Optional[Tuple[str, ...]]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if flag == "--eval-patterns" and items == ("all",):
        return None
    if flag == "--eval-patterns" and items in ((), ("none",)):
        return ()
    if not items:
        raise SystemExit(f"{flag}: expected comma-separated availability patterns such as tv,ta,av; got {text!r}")
    return items


def _config(args):
    from ..cli import _device, _eval_rates, _pick, _trainer_config, feddisc_model_kwargs
    from ..train.feddisc import FedDISCConfig
    from .simulation import FederatedConfig

    args.device = _device(args.device)
    rounds = args.rounds
    try:
        trainer = _trainer_config(args, 5e-4, 0.01)
        feddisc = FedDISCConfig(preset=args.preset, batch_size=args.batch_size, sampling_steps=args.sampling_steps,
                                window_past=args.window_past, window_future=args.window_future, layers=args.layers,
                                trainer=trainer, **feddisc_model_kwargs(args))
        return FederatedConfig(
            clients=_patterns(args.clients, "--clients"), schedule=args.schedule,
            extractor_rounds=_pick(args.extractor_rounds, rounds), recovery_rounds=_pick(args.recovery_rounds, rounds),
            classifier_rounds=_pick(args.classifier_rounds, rounds), cycles=args.cycles,
            local_epochs=args.local_epochs, federate=not args.local_only, weighted=args.weighted,
            min_replies=args.min_replies, on_invalid=args.on_invalid, seed=args.seed,
            eval_patterns=() if args.no_pattern_eval else _patterns(args.eval_patterns, "--eval-patterns"),
            eval_rates=_eval_rates(args.eval_rates), recovery_error=not args.no_recovery_error, out_dir=args.out,
            resume=args.resume, progress=not args.quiet, feddisc=feddisc)
    except ValueError as err:
        raise SystemExit(f"imer-fast federated: {err}")


def run_federated(args) -> int:
    """Run the ``federated`` command parsed by :func:`add_federated_parser`'s parser."""
    from ..cli import load_corpus, prepare_out
    from ..train.report import plot_results, results_table
    from .rounds import NoUsableRepliesError
    from .simulation import make_schedule, run_simulation

    config = _config(args)
    corpus = load_corpus(args)
    prepare_out(args)
    mode = "local only" if args.local_only else "federated"
    print(f"{mode} FedDISC on {corpus.name}: clients {', '.join(config.clients)}, {config.schedule} schedule of "
          f"{make_schedule(config).total_rounds} rounds x {config.local_epochs} local epoch(s); "
          f"{len(corpus.split('train'))} train / {len(corpus.split('test'))} test dialogues", flush=True)
    try:
        result = run_simulation(corpus, config)
    except (ValueError, FileNotFoundError, NoUsableRepliesError) as err:
        raise SystemExit(f"imer-fast federated: {err}")
    clients = result["clients"]
    for cid, c in clients.items():
        print(f"{cid}: {c['train_dialogues']} train / {c['valid_dialogues']} valid dialogues, "
              f"{c['train_utterances']} train utterances")
    names = {name: ("federated" if name == "global" else f"local {clients[name]['pattern']}")
             for name in result["models"]}
    systems = {names[name]: r["evaluation"] for name, r in result["models"].items() if r["evaluation"]}
    if systems:
        print("\ntest split per availability pattern (t text, a audio, v video) / missing rate:")
        print(results_table(systems))
    for name, r in result["models"].items():
        for protocol, e in r.get("recovery_error", {}).items():
            print(f"{names[name]} under {protocol}: latent MSE of the {e['entries']} recovered test entries "
                  f"{e['recovered_mse']:.4f} (mean imputation {e['mean_imputation_mse']:.4f})")
    print(f"trained in {result['train_seconds']:.0f}s, evaluated in {result['eval_seconds']:.0f}s")
    plot = plot_results(systems, f"{args.out}/results.png", title=f"{mode} FedDISC on {corpus.name}") \
        if systems else None
    print(f"results written to {args.out}/results.json" + (f" and {plot}" if plot else "")
          + f"; per-round metrics in {args.out}/metrics.json")
    return 0
