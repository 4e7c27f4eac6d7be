"""Aggregation of trained networks into DVC metrics and plot data (the evaluate stage's library)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from lth.lottery.layout import KINDS, read_curve

SUMMARY_METRICS = (
    "test_accuracy_at_early_stop",
    "test_accuracy_final",
    "early_stop_iteration",
    "val_loss_at_early_stop",
)
LABELS = {"ticket": "winning ticket (IMP)", "reinit": "random reinitialization", "random_pruning": "random pruning"}


def collect(
    runs: Path, rounds: int | None = None, kinds: tuple[str, ...] = KINDS, trials: int | None = None
) -> list[dict[str, Any]]:
    """Every trial's metrics.json under runs/<kind>/round_<k>/trial_<t>/, limited to the rounds, kinds
    and trials of the current params (outputs of stages removed from dvc.yaml stay on disk)."""
    rows = []
    for f in sorted(Path(runs).glob("*/round_*/trial_*/metrics.json")):
        try:
            row = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: unreadable metrics ({e}); run `dvc repro` to restore it.") from None
        if not isinstance(row, dict) or not {"kind", "round", "trial"} <= set(row):
            raise ValueError(f"{f}: not the metrics of a trained network; run `dvc repro` to restore it.")
        if (
            row["kind"] in kinds
            and (rounds is None or row["round"] <= rounds)
            and (trials is None or row["trial"] < trials)
        ):
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
        doc[kind] = {
            f"round_{k:02d}": {
                "percent_remaining": round(e["percent_remaining"], 4),
                **{m: round(e[m]["mean"], 6) for m in SUMMARY_METRICS},
            }
            for k, e in rounds.items()
        }
    if "ticket" in agg:
        best_k = max(agg["ticket"], key=lambda k: agg["ticket"][k]["test_accuracy_at_early_stop"]["mean"])
        best = agg["ticket"][best_k]
        doc["best_ticket"] = {
            "round": best_k,
            "percent_remaining": round(best["percent_remaining"], 4),
            "test_accuracy_at_early_stop": round(best["test_accuracy_at_early_stop"]["mean"], 6),
        }
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


def mean_curve(trial_dirs: list[Path]) -> list[dict[str, float]]:
    """Test accuracy against iteration, mean/min/max over the trials (iterations where every trial tested)."""
    per_trial = [
        {
            int(r["iteration"]): r["test_accuracy"]
            for r in read_curve(d / "curve.csv")
            if r["test_accuracy"] == r["test_accuracy"]
        }
        for d in trial_dirs
    ]
    common = sorted(set.intersection(*(set(t) for t in per_trial))) if per_trial else []
    return [
        {
            "iteration": float(it),
            "test_accuracy": statistics.fmean(t[it] for t in per_trial),
            "test_accuracy_min": min(t[it] for t in per_trial),
            "test_accuracy_max": max(t[it] for t in per_trial),
        }
        for it in common
    ]


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
