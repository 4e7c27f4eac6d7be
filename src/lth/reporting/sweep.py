"""Aggregate a sweep run as DVC experiments (`dvc exp run --queue -S training.lr=...`, `dvc queue start`).

`dvc exp show --json` lists each experiment's commit, params.yaml and results/metrics.json (written by the
evaluate stage and committed in the experiment); the per-round table is its results/plots/sparsity.csv,
read at that commit. This module turns them into one table (CSV) and one figure: test accuracy at early stop
against percent of weights remaining, one curve per value of the swept hyperparameter(s), log x axis
reversed as in the paper.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lth.core.config import RUNTIME_SECTIONS
from lth.core.hparams import flatten
from lth.lottery.layout import KINDS
from lth.reporting.aggregate import read_sparsity_csv
from lth.reporting.figures import percent_axis, save_figure

METRICS_FILE = "results/metrics.json"
ROUNDS_FILE = "results/plots/sparsity.csv"  # the per-round table (aggregate.write_sparsity_csv)
COLUMNS = ("percent_remaining", "test_accuracy_at_early_stop", "early_stop_iteration", "test_accuracy_final")


class SweepError(RuntimeError):
    pass


@dataclass
class Experiment:
    name: str  # DVC experiment name (or the branch/commit of a baseline)
    rev: str
    params: dict[str, Any]  # flat hyperparameters (runtime settings left out)
    rounds: list[dict[str, Any]]  # rows of results/plots/sparsity.csv: one per kind and round


def exp_show(repo: Path = Path("."), all_commits: bool = False) -> list[dict[str, Any]]:
    """`dvc exp show --json` of the repo (DVC's own command, so the output is the documented one)."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["-A"] if all_commits else [])]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(
            f"`dvc exp show --json` failed in {Path(repo).resolve()}: {proc.stderr.strip()}\n"
            "Run `lth sweep report` from the project root (a git + DVC repo)."
        )
    return json.loads(proc.stdout or "[]")


def read_at(path: str, rev: str, repo: Path = Path(".")) -> str | None:
    """The text of the file `path` of the experiment at commit `rev` (git- or DVC-tracked), or None without it."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return dvc.api.read(path, repo=str(repo), rev=rev)
    except (DvcException, OSError, KeyError):
        return None


def read_rounds(rev: str, repo: Path = Path(".")) -> list[dict[str, Any]]:
    """The per-round table of the experiment at commit `rev`, or [] when it has none (its evaluate stage
    has not run, or wrote the older per-round metrics)."""
    try:
        return read_sparsity_csv(read_at(ROUNDS_FILE, rev, repo) or "")
    except (KeyError, ValueError):
        return []


def _experiment(entry: dict[str, Any], name: str, repo: Path = Path(".")) -> Experiment | None:
    data = entry.get("data") or {}
    doc = (data.get("metrics") or {}).get(METRICS_FILE, {}).get("data")
    params = (data.get("params") or {}).get("params.yaml", {}).get("data")
    rounds = read_rounds(entry["rev"], repo) if doc and params and entry.get("rev") else []
    if not rounds:
        return None
    flat = {k: v for k, v in flatten(params).items() if k.split(".")[0] not in RUNTIME_SECTIONS}
    return Experiment(name, entry["rev"], flat, rounds)


def experiments(show: list[dict[str, Any]], repo: Path = Path(".")) -> tuple[list[Experiment], list[str]]:
    """(experiments with results, names of those without: queued, failed or not evaluated), of `show`, the
    `dvc exp show` of the repo at `repo`, which holds their per-round tables. Baseline commits count as
    experiments; the workspace does not (it repeats the last experiment applied to it)."""
    found, skipped = [], []
    for baseline in show:
        if baseline.get("rev") == "workspace":
            continue
        entries = [(baseline, baseline.get("name") or baseline.get("rev", "")[:7])]
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                entries.append((rev, rev.get("name") or rev.get("rev", "")[:7]))
        for entry, name in entries:
            exp = _experiment(entry, name, repo)
            if exp is None:
                skipped.append(name)
            else:
                found.append(exp)
    return found, skipped


def swept_keys(exps: list[Experiment]) -> list[str]:
    """Hyperparameters that differ between experiments (pruning.rounds aside)."""
    keys = sorted({k for e in exps for k in e.params} - {"pruning.rounds"})
    return [k for k in keys if len({json.dumps(e.params.get(k)) for e in exps}) > 1]


def rows(exps: list[Experiment], keys: list[str], kind: str = "ticket") -> list[dict[str, Any]]:
    out = []
    for e in exps:
        for m in sorted((r for r in e.rounds if r["kind"] == kind), key=lambda r: r["round"]):
            out.append(
                {
                    "experiment": e.name,
                    "rev": e.rev[:7],
                    **{k: e.params.get(k) for k in keys},
                    "round": m["round"],
                    **{c: m.get(c) for c in COLUMNS},
                }
            )
    return out


def write_csv(table: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)


def format_table(table: list[dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = list(table[0])
    cells = [header] + [[fmt(r[h]) for h in header] for r in table]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def label(exp: Experiment, keys: list[str]) -> str:
    return ", ".join(f"{k}={exp.params.get(k)}" for k in keys) or exp.name


def ordered(exps: list[Experiment], keys: list[str]) -> list[Experiment]:
    """The experiments by their values of `keys` (numbers by value, then other values by their JSON)."""
    return sorted(
        exps,
        key=lambda e: [
            (0, v, "") if isinstance(v, (int, float)) else (1, 0, json.dumps(v))
            for v in (e.params.get(k) for k in keys)
        ],
    )


def plot(exps: list[Experiment], keys: list[str], path: Path, kind: str = "ticket") -> Path:
    """Test accuracy at early stop against percent remaining, one curve per experiment (value of `keys`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for e in ordered(exps, keys):
        rounds = sorted((r for r in e.rounds if r["kind"] == kind), key=lambda m: -m["percent_remaining"])
        ax.plot(
            [m["percent_remaining"] for m in rounds],
            [m["test_accuracy_at_early_stop"] for m in rounds],
            "o-",
            markersize=3,
            label=label(e, keys),
        )
    percent_axis(ax, [m["percent_remaining"] for e in exps for m in e.rounds if m["kind"] == kind])
    ax.set_ylabel("test accuracy at early stop")
    ax.set_title(f"Sweep over {', '.join(keys)}" if keys else "Experiments")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def sweep(
    show: list[dict[str, Any]], out: Path, param: tuple[str, ...] = (), kind: str = "ticket", force: bool = False
) -> tuple[str, Path, Path, list[str]]:
    """Write <out>.csv and <out>.png; returns (printed table, csv path, png path, skipped experiments). Files at
    those paths that are not an earlier sweep's are refused unless `force`."""
    exps, skipped = experiments(show)
    if not exps:
        raise SweepError(
            f"no experiment with {METRICS_FILE} and {ROUNDS_FILE}: run some first, e.g. "
            "`dvc exp run --queue -S training.lr=3e-4` then `dvc queue start` "
            f"(skipped: {', '.join(skipped) or 'none'})"
        )
    keys = list(param) or swept_keys(exps)
    unknown = [k for k in keys if all(k not in e.params for e in exps)]
    if unknown:
        raise SweepError(
            f"--param {', '.join(unknown)}: not a hyperparameter of these experiments "
            f"(swept here: {', '.join(swept_keys(exps)) or 'nothing'})"
        )
    table = rows(exps, keys, kind)
    if not table:
        raise SweepError(f"no '{kind}' results in the experiments' metrics (kinds: {', '.join(KINDS)})")
    if not out.name or out.name == "..":
        raise SweepError(f"--out {out}: give a path without extension, e.g. results/lr_sweep (OUT.csv and OUT.png)")
    csv_path, png_path = out.with_suffix(".csv"), out.with_suffix(".png")
    check_out(csv_path, png_path, force)
    for path, write in (
        (csv_path, lambda: write_csv(table, csv_path)),
        (png_path, lambda: plot(exps, keys, png_path, kind)),
    ):
        try:
            write()
        except OSError as e:
            raise SweepError(f"cannot write {path} ({e.strerror or e}); choose a writable --out.") from None
    return format_table(table) + instability_sweep(exps, keys, csv_path, force), csv_path, png_path, skipped


def is_sweep_table(path: Path) -> bool:
    """Whether `path` is a CSV written by `lth sweep report` (its header starts with the experiment and its rev)."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(15) == b"experiment,rev,"
    except OSError:
        return False


def check_out(csv_path: Path, png_path: Path, force: bool = False) -> None:
    """Refuse to replace files that are not an earlier sweep's (a table and its figure) unless `force`."""
    if force or not (csv_path.exists() or png_path.exists()) or is_sweep_table(csv_path):
        return
    if csv_path.exists():
        problem = f"{csv_path} exists and is not a table written by `lth sweep report`"
    else:
        problem = f"{png_path} exists, without the table {csv_path} that `lth sweep report` writes beside its figure"
    raise SweepError(f"{problem}; choose another --out, or pass --force to replace it.")


# ---------------------------------------------------------------------- the instability analysis, if it ran

INSTABILITY_FILE = "results/plots/instability.csv"  # per analysed round (aggregate.write_instability_csv)
BARRIER = ("error_barrier", "error_barrier_low", "error_barrier_high")


def instability_rows(exps: list[Experiment], keys: list[str], repo: Path = Path(".")) -> list[dict[str, Any]]:
    """One row per experiment and analysed round: the swept values, the round, its percent remaining and the
    error barrier (mean over trials and band); [] when no experiment ran the instability analysis."""
    out = []
    for e in ordered(exps, keys):
        if not e.params.get("instability.rounds"):  # not analysed: no file to read
            continue
        for r in csv.DictReader((read_at(INSTABILITY_FILE, e.rev, repo) or "").splitlines()):
            out.append(
                {
                    "experiment": e.name,
                    "rev": e.rev[:7],
                    **{k: e.params.get(k) for k in keys},
                    "round": int(r["round"]),
                    **{c: float(r[c]) for c in ("percent_remaining", *BARRIER)},
                }
            )
    return out


def plot_instability(table: list[dict[str, Any]], keys: list[str], path: Path) -> Path:
    """The error barrier against the swept hyperparameter, one line per analysed round with its band shaded:
    sweeping `pruning.rewind_iteration`, the instability against the rewind iteration (Frankle et al. 2020)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(dict.fromkeys(tuple(json.dumps(r[k]) for k in keys) for r in table))
    numeric = len(keys) == 1 and all(isinstance(r[keys[0]], (int, float)) for r in table)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, k in enumerate(sorted({r["round"] for r in table})):
        points = [r for r in table if r["round"] == k]
        xs = [r[keys[0]] if numeric else values.index(tuple(json.dumps(r[key]) for key in keys)) for r in points]
        low, mean, high = ([r[c] for r in points] for c in ("error_barrier_low", "error_barrier", "error_barrier_high"))
        ax.fill_between(xs, low, high, color=f"C{i}", alpha=0.18, linewidth=0)
        remaining = f"{points[0]['percent_remaining']:.3g}% remaining"
        ax.plot(xs, mean, "o-", color=f"C{i}", markersize=3, label=f"round {k} ({remaining})")
    if not numeric:
        ax.set_xticks(range(len(values)), [", ".join(v) for v in values], rotation=20, fontsize=7)
    ax.set_xlabel(", ".join(keys) or "experiment")
    ax.set_ylabel("error barrier (test error)")
    ax.set_title("Instability: the test-error barrier between two copies trained with other data orders", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def instability_sweep(exps: list[Experiment], keys: list[str], csv_path: Path, force: bool = False) -> str:
    """When experiments ran the instability analysis: <out>_instability.csv and .png beside the sweep's table
    (`csv_path`); returns what to print about them ("" when none did)."""
    table = instability_rows(exps, keys)
    if not table:
        return ""
    table_path = csv_path.with_name(f"{csv_path.stem}_instability.csv")
    png_path = table_path.with_suffix(".png")
    check_out(table_path, png_path, force)
    try:
        write_csv(table, table_path)
        plot_instability(table, keys, png_path)
    except OSError as e:
        raise SweepError(f"cannot write {table_path.parent} ({e.strerror or e}); choose a writable --out.") from None
    swept = ", ".join(keys) or "experiment"
    return f"\n\nerror barrier (instability) against {swept}:\n{format_table(table)}\nwrote {table_path} and {png_path}"
