"""The robustness study, as in the paper's appendices: one IMP experiment over a grid of hyperparameters,
and at each grid point whether each claim holds.

A grid point is one DVC experiment of a sweep (`lth sweep run -S training.lr=6e-4,1.2e-3 -S ...`), found as
`lth sweep report` finds it (`lth.reporting.sweep`). Its claims are its own evaluate stage's:
results/plots/claims.csv at its commit (`statistics.write_claims_csv`), read back and never recomputed, so a
grid point says what that experiment's report says. The study keeps the rows at the key sparsities
(`aggregate.key_rounds`: the paper's 51, 21, 7 and 3.6% remaining) and at the sparsest round, and gives a
claim no verdict below MIN_TRIALS paired trials.
"""

from __future__ import annotations

import csv
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lth.reporting.aggregate import ACCURACY, BAND, LABELS, key_rounds
from lth.reporting.statistics import ALPHA, CLAIMS, TEST
from lth.reporting.sweep import (
    Experiment,
    SweepError,
    check_out,
    experiments,
    format_table,
    ordered,
    read_at,
    swept_keys,
    write_csv,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CLAIMS_FILE = "results/plots/claims.csv"
# A verdict needs this many paired trials: with two, the t-test has one degree of freedom and one lucky seed
# decides it (the paper ran five).
MIN_TRIALS = 3
HOLDS, FAILS, TOO_FEW = "holds", "does not hold", "too few trials"
MARKS = {HOLDS: ("\u2713", "tab:green"), FAILS: ("\u2717", "tab:red"), TOO_FEW: ("?", "0.45")}
SPARSEST = "sparsest"  # the sparsity label of the sparsest round when it is no key sparsity


@dataclass
class GridPoint:
    exp: Experiment
    claims: list[dict[str, Any]]  # its claims.csv rows at the tested sparsities, with `sparsity` and `verdict`


def read_claims(rev: str, repo: Path = Path(".")) -> list[dict[str, str]] | None:
    """The rows of the experiment's claims.csv at commit `rev` as written, or None when it has none."""
    text = read_at(CLAIMS_FILE, rev, repo)
    return None if text is None else list(csv.DictReader(text.splitlines()))


def tested_rounds(claims: list[dict[str, str]]) -> dict[int, str]:
    """Round -> its sparsity label: the rounds nearest the key sparsities ('51%', ...), and the sparsest."""
    percents = {int(r["round"]): float(r["percent_remaining"]) for r in claims}
    as_aggregate = {"ticket": {k: {"percent_remaining": p} for k, p in percents.items()}}  # what key_rounds reads
    found = {k: label for label, k in key_rounds(as_aggregate).items()}
    if percents:
        found.setdefault(min(percents, key=percents.__getitem__), SPARSEST)
    return dict(sorted(found.items()))


def verdict(row: dict[str, str]) -> str:
    """The study's verdict on one claims.csv row: its `holds`, or TOO_FEW below MIN_TRIALS pairs."""
    pairs = int(row["pairs"])
    if pairs < MIN_TRIALS:
        return f"{TOO_FEW} ({pairs} paired; needs {MIN_TRIALS})"
    return HOLDS if row["holds"] == "True" else FAILS


def grid_point(exp: Experiment, claims: list[dict[str, str]]) -> GridPoint:
    """The experiment with its claims at the tested rounds, in round and CLAIMS order."""
    rounds = tested_rounds(claims)
    order = {name: i for i, name in enumerate(CLAIMS)}
    kept = sorted(
        (r for r in claims if int(r["round"]) in rounds),
        key=lambda r: (int(r["round"]), order.get(r["claim"], len(order))),
    )
    return GridPoint(exp, [{"sparsity": rounds[int(r["round"])], **r, "verdict": verdict(r)} for r in kept])


def grid_points(exps: list[Experiment], repo: Path = Path(".")) -> tuple[list[GridPoint], list[str]]:
    """(grid points, names of the experiments without claims.csv: evaluated by an lth without claims)."""
    points, missing = [], []
    for e in exps:
        claims = read_claims(e.rev, repo)
        if claims is None:
            missing.append(e.name)
        else:
            points.append(grid_point(e, claims))
    return points, missing


def table(points: list[GridPoint], keys: list[str]) -> list[dict[str, Any]]:
    """One row per grid point, tested sparsity and claim: the point's swept values, then its claims.csv row."""
    return [
        {"experiment": p.exp.name, "rev": p.exp.rev[:7], **{k: p.exp.params.get(k) for k in keys}, **row}
        for p in points
        for row in p.claims
    ]


def counts(point: GridPoint) -> tuple[int, int, int]:
    """(claims that hold, claims with a verdict, claims with too few trials) at a grid point."""
    verdicts = [r["verdict"] for r in point.claims]
    held = verdicts.count(HOLDS)
    tested = held + verdicts.count(FAILS)
    return held, tested, len(verdicts) - tested


def summary(points: list[GridPoint], keys: list[str]) -> list[dict[str, Any]]:
    """One row per grid point: its swept values, trials, and claims held out of those tested."""
    out = []
    for p in points:
        held, tested, too_few = counts(p)
        trials = min((int(r["trials"]) for r in p.exp.rounds if r["kind"] == "ticket"), default=0)
        out.append(
            {
                "experiment": p.exp.name,
                **{k: p.exp.params.get(k) for k in keys},
                "trials": trials,
                "claims held": f"{held}/{tested}",
                TOO_FEW: too_few,
            }
        )
    return out


def layout(points: list[GridPoint], keys: list[str]) -> list[list[GridPoint]]:
    """Rows of panels: one row per value of the first swept key, its points ordered by the other keys."""
    by_exp = {id(p.exp): p for p in points}
    rows: dict[str, list[GridPoint]] = {}
    for e in ordered([p.exp for p in points], keys):
        rows.setdefault(repr(e.params.get(keys[0])) if keys else "", []).append(by_exp[id(e)])
    return list(rows.values())


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def mark_height(level: int) -> float:
    """Where the marks of the claim `level` (its place in CLAIMS) sit, as a fraction of the panel's height."""
    return 0.04 + 0.07 * level


def _marks(ax: Axes, claims: list[dict[str, Any]]) -> None:
    """Under the lines, a row of marks per claim: its verdict at each tested sparsity, and its number."""
    from matplotlib.transforms import blended_transform_factory

    low, high = ax.get_ylim()
    ax.set_yticks([t for t in ax.get_yticks() if low <= t <= high])  # no accuracy ticks beside the marks
    ax.set_ylim(low - 0.45 * (high - low), high)  # room for the marks
    at = blended_transform_factory(ax.transData, ax.transAxes)  # x: percent remaining; y: fraction of the panel
    for row in claims:
        symbol, colour = MARKS[row["verdict"] if row["verdict"] in MARKS else TOO_FEW]
        level = list(CLAIMS).index(row["claim"]) if row["claim"] in CLAIMS else len(CLAIMS)
        x = float(row["percent_remaining"])
        ax.text(x, mark_height(level), symbol, transform=at, color=colour, ha="center", va="bottom", fontsize=8)
    for level in range(len(CLAIMS)):
        ax.text(0.01, mark_height(level), str(level + 1), transform=ax.transAxes, color="0.5", va="bottom", fontsize=6)


def _panel(ax: Axes, point: GridPoint, keys: list[str]) -> None:
    """Accuracy at early stop against percent remaining for the ticket and each control (95% CI bands), and
    under the lines one mark per claim at each tested sparsity."""
    from lth.reporting.figures import band_line, percent_axis

    for kind in LABELS:
        rows = sorted((r for r in point.exp.rounds if r["kind"] == kind), key=lambda r: r["round"])
        values = [{"mean": r[ACCURACY], "ci_low": r[f"{ACCURACY}_low"], "ci_high": r[f"{ACCURACY}_high"]} for r in rows]
        if rows:
            band_line(ax, [r["percent_remaining"] for r in rows], values, kind, LABELS[kind], marker="o", ms=2)
    percent_axis(ax, [r["percent_remaining"] for r in point.exp.rounds if r["kind"] == "ticket"])
    _marks(ax, point.claims)
    held, tested, too_few = counts(point)
    values = ", ".join(f"{_short(k)}={point.exp.params.get(k)}" for k in keys) or point.exp.name
    verdicts = f"claims hold: {held}/{tested}" + (f" ({too_few} {TOO_FEW})" if too_few else "")
    ax.set_title(f"{values}\n{verdicts}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.tick_params(labelsize=7)
    ax.xaxis.label.set_size(7)


TOP = 0.7  # inches above the panels for the heading and the legend under it


def figure(points: list[GridPoint], keys: list[str]) -> Figure:
    """Small multiples: one panel per grid point (rows: the first swept key; columns: the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lth.reporting.figures import _heading

    grid = layout(points, keys)
    rows, cols = len(grid), max(len(r) for r in grid)
    size = (max(3.6 * cols + 0.6, 8), 3.2 * rows + TOP + 1.1)
    fig, axes = plt.subplots(rows, cols, figsize=size, dpi=110, squeeze=False)
    for r, row in enumerate(grid):
        for c in range(cols):
            if c < len(row):
                _panel(axes[r, c], row[c], keys)
            else:
                axes[r, c].set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy", fontsize=8)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    _heading(fig, "Robustness: test accuracy at early stop and the claims at each grid point", TOP, handles)
    return fig


def plot(points: list[GridPoint], keys: list[str], path: Path) -> Path:
    """The small multiples (`figure`) as PNG, with notes on what lines, bands and marks are."""
    from lth.reporting.figures import save_figure

    fig = figure(points, keys)
    order = "; ".join(f"{i + 1}. {name}" for i, name in enumerate(CLAIMS))
    notes = [
        f"Lines: mean over trials; shaded: {BAND}.",
        f"Marks at each tested sparsity, bottom to top: {order}.",
        f"\u2713 holds (p < {ALPHA}, {TEST}), \u2717 does not hold, ? too few trials (under {MIN_TRIALS} paired).",
    ]
    width = int(15 * fig.get_figwidth())  # characters of the notes' font that fit across the figure
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, [line for note in notes for line in textwrap.wrap(note, width)], TOP)


def outputs(out: Path) -> tuple[Path, Path]:
    """OUT_claims.csv and OUT_claims.png beside the sweep's OUT.csv and OUT.png."""
    stem = out.with_suffix("")
    return stem.with_name(f"{stem.name}_claims.csv"), stem.with_name(f"{stem.name}_claims.png")


def report(
    show: list[dict[str, Any]], out: Path, param: tuple[str, ...] = (), force: bool = False, repo: Path = Path(".")
) -> tuple[str, Path, Path, list[str]]:
    """Write OUT_claims.csv (one row per grid point, tested sparsity and claim) and OUT_claims.png (the small
    multiples); returns (printed summary, csv path, png path, experiments without claims.csv)."""
    exps, _ = experiments(show)
    points, missing = grid_points(exps, repo)
    if not points:
        raise SweepError(
            f"--claims: no experiment has {CLAIMS_FILE} ({', '.join(missing) or 'none'}: evaluated before lth "
            "wrote claims); run them again with this lth (the same `lth sweep run -S ...`), or leave out --claims."
        )
    keys = list(param) or swept_keys([p.exp for p in points])
    csv_path, png_path = outputs(out)
    check_out(csv_path, png_path, force)
    rows = table(points, keys)
    if not rows:
        raise SweepError("--claims: no claim tested yet (the experiments have no pruned round); run more rounds.")
    for path, write in (
        (csv_path, lambda: write_csv(rows, csv_path)),
        (png_path, lambda: plot(points, keys, png_path)),
    ):
        try:
            write()
        except OSError as e:
            raise SweepError(f"cannot write {path} ({e.strerror or e}); choose a writable --out.") from None
    return format_table(summary(points, keys)), csv_path, png_path, missing
