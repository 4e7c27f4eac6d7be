"""Aggregation of trained networks into DVC metrics and plot data (the evaluate stage's library).

results/metrics.json is a short summary that `dvc metrics show` and `dvc exp show` can print on one line:
the dense network's test accuracy, the best ticket's, and each kind at a few key sparsities. The per-round
table and the learning curves are plot data in results/plots/, in long format (one row per kind and round,
or per curve point), so that plots colour them by kind.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from lth.lottery.layout import KINDS, read_curve, trial_dir
from lth.reporting.statistics import mean_ci

SUMMARY_METRICS = (
    "test_accuracy_at_early_stop",
    "test_accuracy_final",
    "early_stop_iteration",
    "val_loss_at_early_stop",
)
ACCURACY = SUMMARY_METRICS[0]  # the paper's measure of a network: test accuracy at the early-stopping iteration
LABELS = {"ticket": "winning ticket (IMP)", "reinit": "random reinitialization", "random_pruning": "random pruning"}
DENSE_LABEL = "dense network"
DENSE_NOTE = "the dense network (the ticket's round 0)"  # what every control is at round 0
# The sparsities the paper's Figure 3 draws (LeNet's rounds 3, 7, 12, 15: 51.3, 21.1, 7.0, 3.6% remaining).
KEY_PERCENTS = (51, 21, 7, 3.6)
NEAR = 1.25  # a round stands for a key sparsity when its percent remaining is within this factor of it

Aggregate = dict[str, dict[int, dict[str, Any]]]  # kind -> round -> entry (see `aggregate`)
Instability = dict[int, dict[str, Any]]  # round -> entry (see `aggregate_instability`)


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


# ------------------------------------------------------------------------------------ over trials: the band

BAND = "the 95% confidence interval of the mean over trials (Student's t; none for one trial)"


def stats(values: list[float]) -> dict[str, float]:
    """Mean, its 95% confidence interval, min and max of one quantity over the trials."""
    mean, low, high = mean_ci(values)
    return {"mean": mean, "ci_low": low, "ci_high": high, "min": min(values), "max": max(values)}


def band(s: dict[str, float]) -> tuple[float, float]:
    """The band drawn around a mean (figures, plot data, the report): the one place that says what it spans
    (BAND)."""
    return s["ci_low"], s["ci_high"]


def aggregate(rows: list[dict[str, Any]]) -> Aggregate:
    """kind -> round -> {percent_remaining, trials, <metric>: stats over trials}."""
    out: Aggregate = {}
    for kind in KINDS:
        by_round: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            if r["kind"] == kind:
                by_round.setdefault(r["round"], []).append(r)
        if by_round:
            out[kind] = {
                k: {
                    "percent_remaining": trials[0]["percent_remaining"],
                    "trials": len(trials),
                    **{m: stats([float(t[m]) for t in trials]) for m in SUMMARY_METRICS},
                }
                for k, trials in sorted(by_round.items())
            }
    return out


def with_dense(agg: Aggregate, kind: str) -> dict[int, dict[str, Any]]:
    """The rounds of `kind`, a control's starting at the dense network: at round 0 every control is the
    ticket's round 0 (DENSE_NOTE), which tables and figures say."""
    rounds = agg.get(kind, {})
    if kind == "ticket" or 0 in rounds or 0 not in agg.get("ticket", {}):
        return rounds
    return {0: agg["ticket"][0], **rounds}


# ------------------------------------------------------------------------------------ the summary (metrics)


def best_round(agg: Aggregate) -> int | None:
    """The pruned round (1 or later) whose ticket has the highest mean test accuracy at early stop."""
    pruned = {k: e for k, e in agg.get("ticket", {}).items() if k > 0}
    return max(pruned, key=lambda k: pruned[k][ACCURACY]["mean"]) if pruned else None


def key_label(percent: float) -> str:
    """'51%', '07%', '03.6%': two digits before the point, since DVC sorts metrics by name."""
    return f"{'0' * (percent < 10)}{percent:g}%"


def key_rounds(agg: Aggregate) -> dict[str, int]:
    """'51%' -> the ticket round nearest 51% of weights remaining, for each of KEY_PERCENTS that some pruned
    round is within a factor NEAR of (a short experiment reaches only the first ones)."""
    rounds = {k: e["percent_remaining"] for k, e in agg.get("ticket", {}).items() if k > 0}
    found = {}
    for target in KEY_PERCENTS:
        distance = {k: abs(math.log(p / target)) for k, p in rounds.items() if p > 0}
        nearest = min(distance, key=distance.__getitem__, default=None)
        if nearest is not None and distance[nearest] <= math.log(NEAR):
            found[key_label(target)] = nearest
    return found


def metrics_document(agg: Aggregate, instability: Instability | None = None) -> dict[str, Any]:
    """results/metrics.json: test accuracy at early stop (mean over trials) of the dense network, of the best
    ticket (with its round and percent remaining), and of each kind at the key sparsities; and the error
    barrier (mean over trials) of each round of the instability analysis. The per-round numbers are plot data
    (`write_sparsity_csv`, `write_instability_csv`)."""
    ticket = agg.get("ticket", {})
    doc: dict[str, Any] = {}
    if 0 in ticket:
        doc["dense"] = round(ticket[0][ACCURACY]["mean"], 4)
    best = best_round(agg)
    if best is not None:
        doc["best"] = round(ticket[best][ACCURACY]["mean"], 4)
        doc["best_round"] = best
        doc["best_at%"] = float(f"{ticket[best]['percent_remaining']:.3g}")
    keys = key_rounds(agg)
    for kind, rounds in agg.items():
        at = {label: round(rounds[k][ACCURACY]["mean"], 4) for label, k in keys.items() if k in rounds}
        if at:
            doc[kind] = at
    if instability:
        doc["instability"] = {f"round_{k:02d}": round(e["error_barrier"]["mean"], 4) for k, e in instability.items()}
    return doc


# ------------------------------------------------------------------------------------------------ plot data


def _stat_columns(name: str) -> list[str]:
    return [name, f"{name}_low", f"{name}_high"]


def _stat_cells(s: dict[str, float]) -> list[str]:
    return [f"{v:.6g}" for v in (s["mean"], *band(s))]


SPARSITY_COLUMNS = ["kind", "label", "round", "percent_remaining", "trials", "note"] + [
    c for m in SUMMARY_METRICS for c in _stat_columns(m)
]


def write_sparsity_csv(agg: Aggregate, path: Path) -> None:
    """The per-round table, one row per kind and round: percent remaining, then for each metric the mean and
    the band (`band`: <metric>_low, <metric>_high). A control's round 0 is the dense network (its `note`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SPARSITY_COLUMNS)
        for kind in agg:
            for k, e in with_dense(agg, kind).items():
                note = DENSE_NOTE if kind != "ticket" and k not in agg[kind] else ""
                cells = [c for m in SUMMARY_METRICS for c in _stat_cells(e[m])]
                w.writerow([kind, LABELS[kind], k, f"{e['percent_remaining']:.6g}", e["trials"], note, *cells])


def read_sparsity_csv(text: str) -> list[dict[str, Any]]:
    """Rows of write_sparsity_csv's table, numbers as numbers (what `lth sweep` reads of each experiment)."""
    rows = []
    for r in csv.DictReader(text.splitlines()):
        numbers = {k: float(v) for k, v in r.items() if k not in ("kind", "label", "note") and v != ""}
        rows.append({**r, **numbers, "round": int(numbers["round"]), "trials": int(numbers["trials"])})
    return rows


# ---------------------------------------------------------------------------------------- learning curves


def mean_curve(trial_dirs: list[Path]) -> list[dict[str, Any]]:
    """Test accuracy against iteration, stats over the trials (iterations where every trial tested)."""
    per_trial = [
        {
            int(r["iteration"]): r["test_accuracy"]
            for r in read_curve(d / "curve.csv")
            if r["test_accuracy"] == r["test_accuracy"]
        }
        for d in trial_dirs
    ]
    common = sorted(set.intersection(*(set(t) for t in per_trial))) if per_trial else []
    return [{"iteration": it, "test_accuracy": stats([t[it] for t in per_trial])} for it in common]


def curve_rounds(agg: Aggregate) -> list[int]:
    """The pruned rounds whose learning curves are drawn: the key sparsities' and the sparsest."""
    pruned = [k for k in agg.get("ticket", {}) if k > 0]
    return sorted(set(key_rounds(agg).values()) | ({max(pruned)} if pruned else set()))


def learning_curves(runs: Path, agg: Aggregate) -> list[dict[str, Any]]:
    """One curve per panel and kind: each panel is a drawn round (`curve_rounds`; the dense network alone
    when nothing was pruned yet) with the dense network's curve, the ticket's and each control's."""

    def curve(kind: str, k: int) -> list[dict[str, Any]]:
        return mean_curve(sorted((Path(runs) / kind / f"round_{k:02d}").glob("trial_*")))

    ticket = agg.get("ticket", {})
    dense = curve("ticket", 0) if 0 in ticket else []
    out = []
    for k in curve_rounds(agg) or [0]:
        panel = f"{ticket[k]['percent_remaining']:.3g}% remaining (round {k})" if k in ticket else DENSE_LABEL
        if dense:
            out.append({"panel": panel, "kind": "dense", "label": DENSE_LABEL, "round": 0, "points": dense})
        for kind in agg if k > 0 else ():
            if k in agg[kind]:
                out.append({"panel": panel, "kind": kind, "label": LABELS[kind], "round": k, "points": curve(kind, k)})
    return out


def write_curves_csv(curves: list[dict[str, Any]], path: Path) -> None:
    """The learning curves in long format: one row per panel, kind and iteration (mean and band)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["panel", "kind", "label", "round", "iteration", *_stat_columns("test_accuracy")])
        for c in curves:
            for p in c["points"]:
                w.writerow(
                    [c["panel"], c["kind"], c["label"], c["round"], p["iteration"], *_stat_cells(p["test_accuracy"])]
                )


# ------------------------------------------------------------------------------ the instability analysis

INSTABILITY_METRICS = ("error_barrier", "error_a", "error_b")


def collect_instability(runs: Path, rounds: list[int], trials: int) -> list[dict[str, Any]]:
    """Each analysed trial's summary (instability.json) with its interpolation curve under `curve`, for the
    rounds and trials of the current params (absent ones are skipped)."""
    from lth.lottery.instability import INSTABILITY, SUMMARY_FILE, read_curve, read_summary

    found = []
    for k in sorted(rounds):
        for t in range(trials):
            directory = trial_dir(runs, INSTABILITY, k, t)
            if (directory / SUMMARY_FILE).exists():
                found.append({**read_summary(directory), "curve": read_curve(directory)})
    return found


def aggregate_instability(rows: list[dict[str, Any]]) -> Instability:
    """round -> {percent_remaining, trials, error_barrier / error_a / error_b: stats over trials, curve: the
    test error at each alpha, stats over trials}."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_round.setdefault(r["round"], []).append(r)
    out: Instability = {}
    for k, trials in sorted(by_round.items()):
        points = zip(*(t["curve"] for t in trials), strict=False)  # the same alphas in every trial
        out[k] = {
            "percent_remaining": trials[0]["percent_remaining"],
            "trials": len(trials),
            **{m: stats([float(t[m]) for t in trials]) for m in INSTABILITY_METRICS},
            "curve": [{"alpha": p[0]["alpha"], "test_error": stats([q["test_error"] for q in p])} for p in points],
        }
    return out


def instability_label(k: int, entry: dict[str, Any]) -> str:
    return f"round {k} ({entry['percent_remaining']:.3g}% remaining)"


def write_instability_csv(inst: Instability, path: Path) -> None:
    """One row per analysed round: percent remaining, trials, then the mean and band of the error barrier and
    of the two ends' test errors (as the per-round table, so that the same plot template draws it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "kind",
                "label",
                "round",
                "percent_remaining",
                "trials",
                *(c for m in INSTABILITY_METRICS for c in _stat_columns(m)),
            ]
        )
        for k, e in inst.items():
            cells = [c for m in INSTABILITY_METRICS for c in _stat_cells(e[m])]
            w.writerow(["ticket", LABELS["ticket"], k, f"{e['percent_remaining']:.6g}", e["trials"], *cells])


def write_interpolation_csv(inst: Instability, path: Path) -> None:
    """The interpolation curves in long format, one line per analysed round (its label) in one panel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["panel", "kind", "label", "round", "alpha", *_stat_columns("test_error")])
        for k, e in inst.items():
            for p in e["curve"]:
                w.writerow(
                    [
                        "linear path",
                        "ticket",
                        instability_label(k, e),
                        k,
                        f"{p['alpha']:.6g}",
                        *_stat_cells(p["test_error"]),
                    ]
                )
