"""Statistics over trials: the mean with a 95% confidence interval, and the claims table.

A single trial cannot support a claim of a few tenths of a point: the dense LeNet's accuracy alone moves
by ~0.3 pp between CPUs. So every claim of the paper is tested on the differences between paired trials:
trial i of the ticket, of each control and of the dense network (round 0) share the seed of trial i (and
a control shares its ticket's mask or sparsity), so pairing removes the seed's share of the noise.

The test is Student's paired t-test, one-sided; with 3 to 5 trials a rank test (Wilcoxon) cannot reach
p < 0.05 at all. "At least as accurate as the dense network" is a non-inferiority test: the ticket may be
at most MARGIN below the dense network.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEVEL = 0.95  # confidence level of every interval
ALPHA = 0.05  # a claim holds when its one-sided p-value is below this
MARGIN = 0.005  # non-inferiority margin of "at least as accurate as dense": 0.5 percentage points
TEST = "paired one-sided t-test over trials (pairs share the trial seed)"
ACCURACY = "test_accuracy_at_early_stop"
SPEED = "early_stop_iteration"


def mean_ci(values: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and the Student-t confidence interval of the mean; the interval is the mean itself for one value."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def one_sided_p(differences: list[float], threshold: float = 0.0) -> float | None:
    """p-value of H1: mean(differences) > threshold (paired t-test); None for fewer than 2 pairs."""
    from scipy import stats

    if len(differences) < 2:
        return None
    shifted = [d - threshold for d in differences]
    if statistics.pstdev(shifted) == 0:  # identical differences: the t statistic is infinite or undefined
        return 0.0 if shifted[0] > 0 else 1.0
    return float(stats.ttest_1samp(shifted, 0.0, alternative="greater").pvalue)


@dataclass(frozen=True)
class Claim:
    """One claim at one round: the paired differences (better = positive) and what they show."""

    name: str
    round: int
    percent_remaining: float
    differences: list[float]
    threshold: float = 0.0  # H1: mean difference > threshold (-MARGIN for non-inferiority)

    @property
    def p(self) -> float | None:
        return one_sided_p(self.differences, self.threshold)

    @property
    def holds(self) -> bool | None:
        return None if self.p is None else self.p < ALPHA

    @property
    def effect_size(self) -> float | None:
        """Cohen's d_z: mean paired difference over its standard deviation."""
        if len(self.differences) < 2 or statistics.stdev(self.differences) == 0:
            return None
        return statistics.fmean(self.differences) / statistics.stdev(self.differences)

    def row(self) -> dict[str, Any]:
        mean, low, high = mean_ci(self.differences)
        return {
            "claim": self.name,
            "round": self.round,
            "percent_remaining": self.percent_remaining,
            "pairs": len(self.differences),
            "mean_difference": mean,
            "ci_low": low,
            "ci_high": high,
            "effect_size": self.effect_size,
            "p_value": self.p,
            "holds": self.holds,
        }


CLAIMS = {  # name -> (the kind compared with the ticket, metric, sign: +1 when higher is better, threshold)
    "ticket at least as accurate as dense": ("dense", ACCURACY, 1, -MARGIN),
    "ticket beats random reinitialization": ("reinit", ACCURACY, 1, 0.0),
    "ticket beats random pruning": ("random_pruning", ACCURACY, 1, 0.0),
    "ticket learns faster than reinitialization": ("reinit", SPEED, -1, 0.0),
}


def claims(rows: list[dict[str, Any]]) -> list[Claim]:
    """Every claim at every pruned round where both sides have trials; rows are collect()'s (one per trial)."""
    by_key = {(r["kind"], r["round"], r["trial"]): r for r in rows}
    tickets: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["round"], r["trial"])):
        if r["kind"] == "ticket" and r["round"] > 0:
            tickets.setdefault(r["round"], []).append(r)
    out = []
    for k, trials in tickets.items():
        for name, (other, metric, sign, threshold) in CLAIMS.items():
            pairs = [
                (t, by_key.get(("ticket", 0, t["trial"]) if other == "dense" else (other, k, t["trial"])))
                for t in trials
            ]
            differences = [sign * (float(a[metric]) - float(b[metric])) for a, b in pairs if b is not None]
            if differences:
                out.append(Claim(name, k, float(trials[0]["percent_remaining"]), differences, threshold))
    return out


def write_claims_csv(claims: list[Claim], path: Path) -> None:
    """The claims table as plot data (results/plots/claims.csv), one row per claim and round."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [c.row() for c in claims]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["claim"])
        writer.writeheader()
        writer.writerows(rows)
