"""Result tables and plots of a recovery model against its no-recovery (zero-fill) baseline."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..io import atomic_write

PATTERN_ORDER = ("t", "a", "v", "ta", "tv", "av", "tav")


def rate_key(rate: float) -> str:
    """The evaluation key of a GCNet missing rate: ``rate:0.3`` (one decimal, as the rates of the papers),
    ``rate:0.25`` when a rate needs more (``%g``: six significant digits, so rates closer than that, such
    as 0.3 and 0.1 + 0.2, share a key)."""
    return f"rate:{rate:.1f}" if round(rate, 1) == rate else f"rate:{rate:g}"


def default_metrics(systems: Dict[str, Dict[str, Dict[str, float]]]) -> Tuple[str, ...]:
    """WA and weighted F1 for classification results; MAE and Acc-2 (non-0) for regression (MOSI/MOSEI)."""
    regression = any("MAE" in m for evaluation in systems.values() for m in evaluation.values())
    return ("MAE", "Acc2_non0") if regression else ("WA", "F1_weighted")


def results_table(systems: Dict[str, Dict[str, Dict[str, float]]], metrics: Optional[Sequence[str]] = None) -> str:
    """Plain-text table: one row per evaluation condition (``pattern:ta``, ``rate:0.3``), one column per
    (system, metric). ``systems``: system name -> condition -> metrics."""
    metrics = default_metrics(systems) if metrics is None else metrics
    names = list(systems)
    conditions: List[str] = []
    for evaluation in systems.values():
        conditions += [c for c in evaluation if c not in conditions]
    header = f"{'condition':<13}" + "".join(f"{n + ' ' + short(m):>18}" for n in names for m in metrics)
    lines = [header, "-" * len(header)]
    for c in conditions:
        cells = "".join(f"{systems[n][c][m]:>18.4f}" if c in systems[n] else f"{'-':>18}"
                        for n in names for m in metrics)
        lines.append(f"{c:<13}{cells}")
    return "\n".join(lines)


def short(metric: str) -> str:
    return {"F1_weighted": "WF1", "Acc2_non0": "Acc2"}.get(metric, metric)


def plot_results(systems: Dict[str, Dict[str, Dict[str, float]]], path, metric: Optional[str] = None,
                 title: Optional[str] = None) -> Optional[Path]:
    """PNG with two panels: ``metric`` (default: the first of :func:`default_metrics`) per fixed
    availability pattern (bars) and against the missing rate (lines), one series per system. Returns
    the path, or None when matplotlib is not installed."""
    metric = default_metrics(systems)[0] if metric is None else metric
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(systems), 1)
    for k, (name, evaluation) in enumerate(systems.items()):
        patterns = [p for p in PATTERN_ORDER if f"pattern:{p}" in evaluation]
        left.bar([i + k * width for i in range(len(patterns))], [evaluation[f"pattern:{p}"][metric] for p in patterns],
                 width=width, label=name)
        left.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(patterns))], patterns)
        rates = sorted(float(c.split(":")[1]) for c in evaluation if c.startswith("rate:"))
        right.plot(rates, [evaluation[rate_key(r)][metric] for r in rates], marker="o", label=name)
    left.set_xlabel("available modalities (t text, a audio, v video)")
    right.set_xlabel("missing rate (GCNet protocol)")
    for ax in (left, right):
        ax.set_ylabel(short(metric))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)
    return out
