"""The paper's figures as PNG: accuracy and early-stopping iteration against sparsity, learning curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lth.reporting.aggregate import LABELS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def percent_axis(ax: Axes, percents: list[float]) -> None:
    """Log x axis of percent remaining, reversed (sparser to the right), as in the paper; ticks at the rounds'
    own sparsities (at most ~10 of them) instead of 10^2, 9x10^1, ..."""
    from matplotlib.ticker import FixedLocator, NullLocator

    pcts = sorted(set(percents), reverse=True)
    ticks = pcts[:: max(1, math.ceil(len(pcts) / 10))]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:.3g}" for t in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("percent of weights remaining (log scale)")


Aggregate = dict[str, dict[int, dict[str, Any]]]
SPARSITY_FIGURES = [  # (file, [(metric, legend suffix, line style)], y label)
    (
        "accuracy.png",
        [("test_accuracy_at_early_stop", "at early stop", "-"), ("test_accuracy_final", "at end of training", ":")],
        "test accuracy",
    ),
    ("early_stop.png", [("early_stop_iteration", "", "-")], "early-stopping iteration"),
]


def _save(fig: Figure, ax: Axes, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _sparsity_figure(agg: Aggregate, metrics: list[tuple[str, str, str]], ylabel: str, title: str, path: Path) -> Path:
    """One metric family against percent remaining: a line per kind, error bars min/max over trials."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for ci, (kind, kind_rounds) in enumerate(agg.items()):
        # Controls share round 0 (the dense network) with the ticket: their curves start at 100% too.
        shared = kind != "ticket" and 0 in agg.get("ticket", {})
        rounds = {0: agg["ticket"][0], **kind_rounds} if shared else kind_rounds
        ks = sorted(rounds)
        for metric, suffix, style in metrics:
            if kind != "ticket" and metric == "test_accuracy_final":
                continue
            e = [rounds[k][metric] for k in ks]
            ax.errorbar(
                [rounds[k]["percent_remaining"] for k in ks],
                [m["mean"] for m in e],
                yerr=[[m["mean"] - m["min"] for m in e], [m["max"] - m["mean"] for m in e]],
                fmt="o" + style,
                color=f"C{ci}",
                markersize=3,
                capsize=2,
                label=f"{LABELS[kind]} {suffix}".strip(),
            )
    percent_axis(ax, [e["percent_remaining"] for e in agg.get("ticket", {}).values()])
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, ax, title, path)


def _curves_figure(agg: Aggregate, curves: dict[int, list[dict[str, float]]], title: str, path: Path) -> Path:
    """Test accuracy during training of the selected ticket rounds (error bars: min/max over trials)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for k, rows in curves.items():
        pct = agg.get("ticket", {}).get(k, {}).get("percent_remaining", float("nan"))
        mean = [r["test_accuracy"] for r in rows]
        low = [m - r["test_accuracy_min"] for m, r in zip(mean, rows, strict=True)]
        high = [r["test_accuracy_max"] - m for m, r in zip(mean, rows, strict=True)]
        ax.errorbar(
            [r["iteration"] for r in rows],
            mean,
            yerr=[low, high],
            fmt="-",
            capsize=2,
            linewidth=1.2,
            errorevery=max(1, len(rows) // 12),
            label=f"round {k} ({pct:.3g}% remaining)",
        )
    ax.set_xlabel("training iteration")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="winning ticket (error bars: min/max over trials)", title_fontsize=8)
    return _save(fig, ax, title, path)


def plot_figures(agg: Aggregate, curves: dict[int, list[dict[str, float]]], out: Path, title: str = "") -> list[Path]:
    """The paper's figures as PNG: accuracy and early-stop iteration against percent remaining
    (log x axis, reversed) and learning curves of selected rounds."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths = [_sparsity_figure(agg, metrics, ylabel, title, out / name) for name, metrics, ylabel in SPARSITY_FIGURES]
    if curves:
        paths.append(_curves_figure(agg, curves, title, out / "learning_curves.png"))
    return paths
