"""The robustness study (`lth sweep report --claims`, lth.reporting.robustness): each grid point's claims as its
own evaluate stage wrote them, the verdicts, the small multiples, and the study's preset and README numbers."""

from __future__ import annotations

import csv
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lth.cli import main
from lth.core import config
from lth.pipeline import presets
from lth.reporting import aggregate, robustness, statistics
from lth.reporting.sweep import Experiment
from tests.helpers import ROOT, Project

KINDS = ("ticket", "reinit", "random_pruning")


def trial_rows(trials: int, rounds: int, rate: float, seed: int) -> list[dict[str, Any]]:
    """Rows shaped like aggregate.collect()'s (one per trained network): a ticket that keeps its accuracy and
    controls that lose 0.2 points a round, with noise."""
    rng = random.Random(seed)
    rows = []
    for kind in KINDS:
        for k in range(0 if kind == "ticket" else 1, rounds + 1):
            for t in range(trials):
                accuracy = 0.98 - (0 if kind == "ticket" else 0.002 * k) + rng.gauss(0, 0.002)
                rows.append(
                    {
                        "kind": kind,
                        "round": k,
                        "trial": t,
                        "percent_remaining": 100 * (1 - rate) ** k,
                        "test_accuracy_at_early_stop": accuracy,
                        "test_accuracy_final": accuracy - 0.001,
                        "early_stop_iteration": 5000 + (0 if kind == "ticket" else 200 * k) + rng.gauss(0, 100),
                        "val_loss_at_early_stop": 0.1,
                    }
                )
    return rows


def write_results(root: Path, rows: list[dict[str, Any]], claims: bool = True) -> None:
    """What the evaluate stage writes of `rows` (metrics.json, sparsity.csv and, unless not `claims`, claims.csv),
    by the same library functions."""
    agg = aggregate.aggregate(rows)
    (root / "results" / "plots").mkdir(parents=True, exist_ok=True)
    (root / "results" / "metrics.json").write_text(json.dumps(aggregate.metrics_document(agg)))
    aggregate.write_sparsity_csv(agg, root / "results" / "plots" / "sparsity.csv")
    if claims:
        statistics.write_claims_csv(statistics.claims(rows), root / "results" / "plots" / "claims.csv")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def grid_point(tmp: Path, name: str, params: dict[str, Any], trials: int, rate: float, seed: int) -> Any:
    rows = trial_rows(trials, 15, rate, seed)
    write_results(tmp / name, rows)
    plots = tmp / name / "results" / "plots"
    exp = Experiment(name, f"{seed:07d}abc", params, aggregate.read_sparsity_csv((plots / "sparsity.csv").read_text()))
    return robustness.grid_point(exp, read_csv(plots / "claims.csv"))


def test_the_grid_table_keeps_each_points_claims_at_the_key_sparsities(tmp_path: Path) -> None:
    keys = ["training.lr", "pruning.fc_rate"]
    points = [
        grid_point(tmp_path, f"e{i}", {"training.lr": lr, "pruning.fc_rate": rate}, 2 if i == 3 else 3, rate, i)
        for i, (lr, rate) in enumerate(((6e-4, 0.2), (6e-4, 0.4), (1.2e-3, 0.2), (1.2e-3, 0.4)))
    ]
    table = robustness.table(points, keys)
    for p in points:
        own = read_csv(tmp_path / p.exp.name / "results" / "plots" / "claims.csv")
        mine = [r for r in table if r["experiment"] == p.exp.name]
        # fc 20% per round: 51.2% at round 3 ... 3.5% at round 15; fc 40%: 60% at round 1, 21.6% at 3, 7.8% at 5,
        # and the sparsest round (15) is no key sparsity.
        rounds = {
            0.2: {3: "51%", 7: "21%", 12: "07%", 15: "03.6%"},
            0.4: {1: "51%", 3: "21%", 5: "07%", 15: "sparsest"},
        }
        assert {int(r["round"]): r["sparsity"] for r in mine} == rounds[p.exp.params["pruning.fc_rate"]]
        assert len(mine) == 4 * len(statistics.CLAIMS)
        for r in mine:  # the experiment's own row, as written
            (row,) = [o for o in own if (o["claim"], o["round"]) == (r["claim"], r["round"])]
            assert {k: r[k] for k in row} == row
            assert r["training.lr"] == p.exp.params["training.lr"]
            if int(row["pairs"]) >= robustness.MIN_TRIALS:
                assert r["verdict"] == {"True": "holds", "False": "does not hold"}[row["holds"]]
            else:  # 2 trials: the t-test gave a p-value, the study no verdict
                assert row["holds"] in ("True", "False") and r["verdict"].startswith("too few trials")

    summary = {s["experiment"]: s for s in robustness.summary(points, keys)}
    assert summary["e3"]["claims held"] == "0/0" and summary["e3"]["too few trials"] == 16
    held = sum(r["verdict"] == "holds" for r in table if r["experiment"] == "e0")
    assert summary["e0"] == {**summary["e0"], "trials": 3, "claims held": f"{held}/16", "too few trials": 0}

    fig = robustness.figure(points, keys)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(points) and len(fig.axes) == 4  # 2 x 2: rows lr, columns fc_rate
    titles = [ax.get_title() for ax in panels]
    assert titles[0].startswith("lr=0.0006, fc_rate=0.2") and titles[3].startswith("lr=0.0012, fc_rate=0.4")
    assert "claims hold: 0/0 (16 too few trials)" in titles[3]
    marks = [t.get_text() for t in panels[0].texts if t.get_text() in ("\u2713", "\u2717", "?")]
    assert len(marks) == 16 and marks.count("\u2713") == held


def test_claims_need_claims_csv_and_three_trials(
    make_project: Callable[..., Project], xor_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a real repo whose commit holds evaluate outputs: without claims.csv, one line says so; with two
    trials, every claim is 'too few trials'."""
    p = make_project(xor_params({"trials": 2, "controls.random_reinit": True, "controls.random_pruning": True}))
    monkeypatch.chdir(p.root)
    rows = trial_rows(2, 2, 0.45, 0)  # 55% remaining (the key sparsity 51%), then 30% (the sparsest)
    write_results(p.root, rows, claims=False)
    p.run("git", "add", "-A")
    p.run("git", "commit", "-qm", "results of an older evaluate")
    bad = CliRunner().invoke(main, ["sweep", "report", "--claims", "--out", "results/grid"])
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1, bad.output
    assert "no experiment has results/plots/claims.csv" in bad.stderr and isinstance(bad.exception, SystemExit), (
        bad.output
    )

    write_results(p.root, rows)
    p.run("git", "add", "-A")
    p.run("git", "commit", "-qm", "evaluated")
    result = CliRunner().invoke(main, ["sweep", "report", "--claims", "--out", "results/grid"])
    assert result.exit_code == 0, result.output
    assert re.search(r"\b2\s+0/0\s+8\n", result.stdout), result.stdout  # trials, claims held / tested, too few
    table = read_csv(p.root / "results" / "grid_claims.csv")
    assert len(table) == 2 * len(statistics.CLAIMS)
    assert {r["verdict"] for r in table} == {"too few trials (2 paired; needs 3)"}
    assert (p.root / "results" / "grid_claims.png").read_bytes()[:4] == b"\x89PNG"


# The robustness grid on tiny XOR experiments: 3 trials, both controls, one round.
TINY_GRID = {"trials": 3, "controls.random_reinit": True, "controls.random_pruning": True, "runtime.workers": 1}
LRS = ("0.01", "0.03")


def wait_for_queue(p: Project, seconds: float = 1200) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status = p.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(2)
    raise AssertionError(f"the queue did not finish in {seconds} s:\n{status}")


@pytest.mark.slow  # two queued experiments of 5 stages: minutes on 2 cores
def test_a_queued_grid_reports_each_points_claims(
    make_project: Callable[..., Project], xor_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = make_project(xor_params(TINY_GRID))
    p.dvc("exp", "run", "--queue", "-S", f"training.lr={','.join(LRS)}")  # DVC's grid: one experiment per value
    # DVC's worker keeps the command's output open while it runs: let it write nowhere, not into a pipe.
    start = [sys.executable, "-m", "dvc", "queue", "start", "--jobs", "1"]
    subprocess.run(start, cwd=p.root, env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    status = wait_for_queue(p)
    assert status.count("Success") == 2 and "Failed" not in status, status
    monkeypatch.chdir(p.root)  # the sweep reads each experiment's files through DVC, from the repo
    check_grid_report(p)


def check_grid_report(p: Project) -> None:
    """`lth sweep report --claims` in a project whose queue ran the experiments of LRS."""
    out = p.lth("sweep", "report", "--claims", "--out", "results/robustness").stdout
    table = read_csv(p.root / "results" / "robustness_claims.csv")
    assert sorted({r["training.lr"] for r in table}) == sorted(LRS)
    for name in {r["experiment"] for r in table}:
        mine = [r for r in table if r["experiment"] == name]
        shown = subprocess.run(
            ["git", "show", f"{mine[0]['rev']}:results/plots/claims.csv"], cwd=p.root, capture_output=True, text=True
        )
        own = list(csv.DictReader(shown.stdout.splitlines()))
        assert own and len(mine) == len(own)  # one round: the sparsest, every claim tested
        for r in mine:
            (row,) = [o for o in own if o["claim"] == r["claim"] and o["round"] == r["round"]]
            assert {k: r[k] for k in row} == row and r["sparsity"] == "sparsest"
            assert r["verdict"] == {"True": "holds", "False": "does not hold"}[row["holds"]]
        held = sum(r["verdict"] == "holds" for r in mine)
        assert re.search(rf"{re.escape(name)}\s+{mine[0]['training.lr']}\s+3\s+{held}/{len(mine)}\s+0\b", out), out
    assert (p.root / "results" / "robustness_claims.png").read_bytes()[:4] == b"\x89PNG"
    assert (p.root / "results" / "robustness.csv").is_file()  # the sweep's own table beside it

    from lth.reporting import sweep

    exps, _ = sweep.experiments(sweep.exp_show(p.root))
    points, missing = robustness.grid_points(exps, p.root)
    panels = [ax for ax in robustness.figure(points, ["training.lr"]).axes if ax.get_visible()]
    assert not missing and len(panels) == len(LRS)
    assert sorted(ax.get_title().splitlines()[0] for ax in panels) == [f"lr={float(lr)}" for lr in LRS]


def test_readme_gives_the_grids_estimate() -> None:
    """The README's robustness study says what `presets.estimate` says of its preset, per point and for the grid."""
    text = (ROOT / "README.md").read_text()
    section = " ".join(text[text.index("### Robustness study") :].split("\n## ")[0].split())  # lines joined
    grid = re.search(r"lth sweep run((?: -S [\w.]+=[\w.,-]+)+)", section)
    assert grid, section
    points = 1
    for values in re.findall(r"=([\w.,-]+)", grid.group(1)):
        points *= len(values.split(","))
    path = ROOT / "presets" / "lenet_robustness.yaml"
    each = presets.estimate_cpu_seconds(config.load(path))
    assert f"{presets.estimate(path)} per grid point" in section
    assert f"{points} points, {presets.format_duration(points * each)}" in section
