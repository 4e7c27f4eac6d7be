"""Aggregation of rounds into metrics, plot data and figures (the evaluate stage's library)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from lth.imp import KINDS

SUMMARY_METRICS = ("test_accuracy_at_early_stop", "test_accuracy_final", "early_stop_iteration",
                   "val_loss_at_early_stop")
LABELS = {"ticket": "winning ticket (IMP)", "reinit": "random reinitialization", "random_pruning": "random pruning"}


def collect(runs: Path, rounds: int | None = None, kinds: tuple[str, ...] = KINDS,
            trials: int | None = None) -> list[dict[str, Any]]:
    """Every trial's metrics.json under runs/<kind>/round_<k>/trial_<t>/, limited to the rounds, kinds
    and trials of the current params (outputs of stages removed from dvc.yaml stay on disk)."""
    rows = []
    for f in sorted(Path(runs).glob("*/round_*/trial_*/metrics.json")):
        row = json.loads(f.read_text())
        if row["kind"] in kinds and (rounds is None or row["round"] <= rounds) and (
                trials is None or row["trial"] < trials):
            rows.append(row)
    return rows


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """kind -> round -> {percent_remaining, trials, <metric>: {mean, min, max}}."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for kind in KINDS:
        by_round: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            if r["kind"] == kind:
                by_round.setdefault(r["round"], []).append(r)
        if not by_round:
            continue
        out[kind] = {}
        for k, trials in sorted(by_round.items()):
            entry: dict[str, Any] = {"percent_remaining": trials[0]["percent_remaining"], "trials": len(trials)}
            for m in SUMMARY_METRICS:
                vals = [float(t[m]) for t in trials]
                entry[m] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
            out[kind][k] = entry
    return out


def metrics_document(agg: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """DVC metrics: per kind and round, the means (min/max stay in the plot data and figures)."""
    doc: dict[str, Any] = {}
    for kind, rounds in agg.items():
        doc[kind] = {f"round_{k:02d}": {"percent_remaining": round(e["percent_remaining"], 4),
                                        **{m: round(e[m]["mean"], 6) for m in SUMMARY_METRICS}}
                     for k, e in rounds.items()}
    if "ticket" in agg:
        best_k = max(agg["ticket"], key=lambda k: agg["ticket"][k]["test_accuracy_at_early_stop"]["mean"])
        best = agg["ticket"][best_k]
        doc["best_ticket"] = {"round": best_k, "percent_remaining": round(best["percent_remaining"], 4),
                              "test_accuracy_at_early_stop": round(best["test_accuracy_at_early_stop"]["mean"], 6)}
    return doc


def write_sparsity_csv(agg: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """One row per round: percent remaining, then mean/min/max of each metric for each kind."""
    rounds = sorted(agg.get("ticket", {}))
    header = ["round", "percent_remaining"]
    for kind in agg:
        for m in SUMMARY_METRICS[:3]:
            header += [f"{kind}_{m}", f"{kind}_{m}_min", f"{kind}_{m}_max"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for k in rounds:
            row: list[Any] = [k, f"{agg['ticket'][k]['percent_remaining']:.6g}"]
            for kind in agg:
                e = agg[kind].get(k) or (agg["ticket"][0] if k == 0 else None)  # controls equal the ticket at 0
                for m in SUMMARY_METRICS[:3]:
                    row += ["", "", ""] if e is None else [f"{e[m][s]:.6g}" for s in ("mean", "min", "max")]
            w.writerow(row)


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def mean_curve(trial_dirs: list[Path]) -> list[dict[str, float]]:
    """Test accuracy against iteration, mean/min/max over the trials (iterations where every trial tested)."""
    per_trial = [{int(r["iteration"]): r["test_accuracy"] for r in read_curve(d / "curve.csv")
                  if r["test_accuracy"] == r["test_accuracy"]} for d in trial_dirs]
    common = sorted(set.intersection(*(set(t) for t in per_trial))) if per_trial else []
    return [{"iteration": float(it), "test_accuracy": statistics.fmean(t[it] for t in per_trial),
             "test_accuracy_min": min(t[it] for t in per_trial), "test_accuracy_max": max(t[it] for t in per_trial)}
            for it in common]


def write_curves_csv(runs: Path, rounds: list[int], path: Path) -> dict[int, list[dict[str, float]]]:
    """Test accuracy against iteration for the selected ticket rounds (mean over trials), wide format."""
    curves = {k: mean_curve(sorted((Path(runs) / "ticket" / f"round_{k:02d}").glob("trial_*"))) for k in rounds}
    iterations = sorted({int(r["iteration"]) for c in curves.values() for r in c})
    lookup = {k: {int(r["iteration"]): r["test_accuracy"] for r in c} for k, c in curves.items()}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", *[f"round_{k:02d}" for k in rounds]])
        for it in iterations:
            w.writerow([it, *[f"{lookup[k][it]:.6g}" if it in lookup[k] else "" for k in rounds]])
    return curves


def percent_axis(ax, percents: list[float]) -> None:  # noqa: ANN001 (a matplotlib Axes)
    """Log x axis of percent remaining, reversed (sparser to the right), as in the paper; ticks at the rounds'
    own sparsities (at most ~10 of them) instead of 10^2, 9x10^1, ..."""
    from matplotlib.ticker import FixedLocator, NullLocator

    pcts = sorted(set(percents), reverse=True)
    ticks = pcts[::max(1, math.ceil(len(pcts) / 10))]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:.3g}" for t in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("percent of weights remaining (log scale)")


def plot_figures(agg: dict[str, dict[int, dict[str, Any]]], curves: dict[int, list[dict[str, float]]],
                 out: Path, title: str = "") -> list[Path]:
    """The paper's figures as PNG: accuracy and early-stop iteration against percent remaining
    (log x axis, reversed, error bars = min/max over trials) and learning curves of selected rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    specs = [("accuracy.png", [("test_accuracy_at_early_stop", "at early stop", "-"),
                               ("test_accuracy_final", "at end of training", ":")], "test accuracy"),
             ("early_stop.png", [("early_stop_iteration", "", "-")], "early-stopping iteration")]
    ticket_pcts = [e["percent_remaining"] for e in agg.get("ticket", {}).values()]
    for name, metrics, ylabel in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for ci, (kind, kind_rounds) in enumerate(agg.items()):
            # Controls share round 0 (the dense network) with the ticket: their curves start at 100% too.
            rounds = {0: agg["ticket"][0], **kind_rounds} if kind != "ticket" and 0 in agg.get("ticket", {}) \
                else kind_rounds
            ks = sorted(rounds)
            x = [rounds[k]["percent_remaining"] for k in ks]
            for metric, suffix, style in metrics:
                if kind != "ticket" and metric == "test_accuracy_final":
                    continue
                mean = [rounds[k][metric]["mean"] for k in ks]
                lo = [rounds[k][metric]["mean"] - rounds[k][metric]["min"] for k in ks]
                hi = [rounds[k][metric]["max"] - rounds[k][metric]["mean"] for k in ks]
                ax.errorbar(x, mean, yerr=[lo, hi], fmt="o" + style, color=f"C{ci}", markersize=3, capsize=2,
                            label=f"{LABELS[kind]} {suffix}".strip())
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
            ax.errorbar([r["iteration"] for r in rows], mean, fmt="-", capsize=2, linewidth=1.2,
                        yerr=[[m - r["test_accuracy_min"] for m, r in zip(mean, rows, strict=True)],
                              [r["test_accuracy_max"] - m for m, r in zip(mean, rows, strict=True)]],
                        errorevery=max(1, len(rows) // 12), label=f"round {k} ({pct:.3g}% remaining)")
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
