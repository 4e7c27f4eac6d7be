"""The paper's figures as PNG: accuracy and early-stopping iteration against sparsity, learning curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lth.reporting.aggregate import LABELS

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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


def plot_figures(
    agg: dict[str, dict[int, dict[str, Any]]], curves: dict[int, list[dict[str, float]]], out: Path, title: str = ""
) -> list[Path]:
    """The paper's figures as PNG: accuracy and early-stop iteration against percent remaining
    (log x axis, reversed, error bars = min/max over trials) and learning curves of selected rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    specs = [
        (
            "accuracy.png",
            [("test_accuracy_at_early_stop", "at early stop", "-"), ("test_accuracy_final", "at end of training", ":")],
            "test accuracy",
        ),
        ("early_stop.png", [("early_stop_iteration", "", "-")], "early-stopping iteration"),
    ]
    ticket_pcts = [e["percent_remaining"] for e in agg.get("ticket", {}).values()]
    for name, metrics, ylabel in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for ci, (kind, kind_rounds) in enumerate(agg.items()):
            # Controls share round 0 (the dense network) with the ticket: their curves start at 100% too.
            rounds = (
                {0: agg["ticket"][0], **kind_rounds} if kind != "ticket" and 0 in agg.get("ticket", {}) else kind_rounds
            )
            ks = sorted(rounds)
            x = [rounds[k]["percent_remaining"] for k in ks]
            for metric, suffix, style in metrics:
                if kind != "ticket" and metric == "test_accuracy_final":
                    continue
                mean = [rounds[k][metric]["mean"] for k in ks]
                lo = [rounds[k][metric]["mean"] - rounds[k][metric]["min"] for k in ks]
                hi = [rounds[k][metric]["max"] - rounds[k][metric]["mean"] for k in ks]
                ax.errorbar(
                    x,
                    mean,
                    yerr=[lo, hi],
                    fmt="o" + style,
                    color=f"C{ci}",
                    markersize=3,
                    capsize=2,
                    label=f"{LABELS[kind]} {suffix}".strip(),
                )
        percent_axis(ax, ticket_pcts)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for k, rows in curves.items():
            pct = agg.get("ticket", {}).get(k, {}).get("percent_remaining", float("nan"))
            mean = [r["test_accuracy"] for r in rows]
            ax.errorbar(
                [r["iteration"] for r in rows],
                mean,
                fmt="-",
                capsize=2,
                linewidth=1.2,
                yerr=[
                    [m - r["test_accuracy_min"] for m, r in zip(mean, rows, strict=True)],
                    [r["test_accuracy_max"] - m for m, r in zip(mean, rows, strict=True)],
                ],
                errorevery=max(1, len(rows) // 12),
                label=f"round {k} ({pct:.3g}% remaining)",
            )
        ax.set_xlabel("training iteration")
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, title="winning ticket (error bars: min/max over trials)", title_fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "learning_curves.png")
        plt.close(fig)
        paths.append(out / "learning_curves.png")
    return paths
