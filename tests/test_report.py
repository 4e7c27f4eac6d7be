"""Figures and the HTML report from round outputs on disk (small generated files, no training)."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lth.core.config import from_dict
from lth.core.hparams import Hparams
from lth.lottery.progress import RoundProgress
from lth.pipeline import render
from lth.reporting import aggregate, figures
from lth.reporting import html as html_report
from lth.reporting.statistics import mean_ci
from tests.helpers import Cells, Project

PCT = {0: 100.0, 1: 51.3, 2: 21.1}


def write_round(runs: Path, kind: str, k: int, trial: int, acc: float, stop: int) -> None:
    d = runs / kind / f"round_{k:02d}" / f"trial_{trial}"
    d.mkdir(parents=True)
    m = {
        "kind": kind,
        "round": k,
        "trial": trial,
        "percent_remaining": PCT[k],
        "test_accuracy_at_early_stop": acc,
        "test_accuracy_final": acc - 0.01,
        "early_stop_iteration": stop,
        "val_loss_at_early_stop": 0.1,
        "hash": "h",
    }
    (d / "metrics.json").write_text(json.dumps(m))
    with open(d / "curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "train_loss", "val_loss", "val_accuracy", "test_accuracy"])
        for it in (0, 50, 100):
            w.writerow([it, 1, 1, 0.5, acc * it / 100 + 0.1 * trial])
        w.writerow([150, 1, 1, 0.5, ""])  # validation-only row: not a test point


@pytest.fixture
def results(tmp_path: Path) -> tuple[dict, Path]:
    runs = tmp_path / "runs"
    for k in PCT:
        for t, (acc, stop) in enumerate([(0.90 + 0.02 * k, 100 - 10 * k), (0.94 + 0.02 * k, 80 - 10 * k)]):
            write_round(runs, "ticket", k, t, acc, stop)
            if k:
                write_round(runs, "reinit", k, t, acc - 0.1, 50)
    agg = aggregate.aggregate(aggregate.collect(runs))
    curves = aggregate.learning_curves(runs, agg)
    aggregate.write_curves_csv(curves, tmp_path / "plots" / "curves.csv")
    aggregate.write_sparsity_csv(agg, tmp_path / "plots" / "sparsity.csv")
    figures.plot_figures(agg, curves, tmp_path / "figures", title="exp")
    return agg, tmp_path


def test_learning_curves_of_key_sparsities_against_controls(results: tuple[dict, Path]) -> None:
    _, tmp = results
    rows = list(csv.DictReader(open(tmp / "plots" / "curves.csv")))
    # A panel per drawn round (51.3% and 21.1%: the key sparsities 51% and 21%), each with the dense network,
    # the ticket and the control; test points only (iteration 150 is validation only).
    panels = {(r["panel"], r["kind"], r["round"]): [] for r in rows}
    for r in rows:
        panels[r["panel"], r["kind"], r["round"]].append(r)
    assert list(panels) == [
        (f"{pct}% remaining (round {k})", kind, round_index)
        for pct, k in (("51.3", 1), ("21.1", 2))
        for kind, round_index in (("dense", "0"), ("ticket", str(k)), ("reinit", str(k)))
    ]
    assert all([r["iteration"] for r in points] == ["0", "50", "100"] for points in panels.values())
    # round 2, iteration 100: trials 0.94 and 0.98 + 0.1 -> mean 1.01, band: the 95% CI of that mean
    ticket = panels["21.1% remaining (round 2)", "ticket", "2"][2]
    assert float(ticket["test_accuracy"]) == pytest.approx((0.94 + 0.98 + 0.1) / 2)
    _, low, high = mean_ci([0.94, 1.08])
    band = (float(ticket["test_accuracy_low"]), float(ticket["test_accuracy_high"]))
    assert band == pytest.approx((low, high), abs=1e-5)
    assert low < 0.94 and high > 1.08  # two trials: the interval is wider than their range
    assert ticket["label"] == aggregate.LABELS["ticket"]
    for name in ("accuracy.png", "early_stop.png", "learning_curves.png"):
        assert (tmp / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_round_table_has_a_row_per_kind_and_round(results: tuple[dict, Path]) -> None:
    _, tmp = results
    rows = aggregate.read_sparsity_csv((tmp / "plots" / "sparsity.csv").read_text())
    assert [(r["kind"], r["round"]) for r in rows] == [("ticket", k) for k in (0, 1, 2)] + [
        ("reinit", k) for k in (0, 1, 2)
    ]
    ticket2, reinit0, reinit2 = rows[2], rows[3], rows[5]
    assert (ticket2["percent_remaining"], ticket2["trials"]) == (21.1, 2)
    # early stop at 80 and 60: mean 70, band the 95% CI
    stop = [ticket2[f"early_stop_iteration{s}"] for s in ("", "_low", "_high")]
    assert stop == pytest.approx(mean_ci([80, 60]), abs=1e-3)
    assert reinit2["test_accuracy_at_early_stop"] == pytest.approx(0.86)
    # A control's round 0 is the dense network, and says so
    assert reinit0["note"] == aggregate.DENSE_NOTE and not rows[0]["note"]
    assert {k: v for k, v in reinit0.items() if k not in ("kind", "label", "note")} == {
        k: v for k, v in rows[0].items() if k not in ("kind", "label", "note")
    }


def test_metrics_summary_dense_best_and_key_sparsities(results: tuple[dict, Path]) -> None:
    agg, _ = results
    # ticket: 0.92 dense (0.90, 0.94), 0.94 at 51.3% and 0.96 at 21.1% remaining; reinit 0.1 lower
    assert aggregate.metrics_document(agg) == {
        "dense": 0.92,
        "best": 0.96,
        "best_round": 2,
        "best_at%": 21.1,
        "ticket": {"51%": 0.94, "21%": 0.96},
        "reinit": {"51%": 0.84, "21%": 0.86},
    }


def lenet_rows(rounds: int = 20, kinds: tuple[str, ...] = ("ticket",)) -> list[dict]:
    """Synthetic metrics of one trial per round of LeNet-300-100 (fc 20%, output 10% per round): the ticket
    at its best in round 7, the controls below it."""
    pct = [100 * (265_200 * 0.8**k + 1_000 * 0.9**k) / 266_200 for k in range(rounds + 1)]
    return [
        {
            "kind": kind,
            "round": k,
            "trial": 0,
            "percent_remaining": pct[k],
            "test_accuracy_at_early_stop": 0.9861 - 0.0001 * (k - 7) ** 2 - 0.0123 * (kind != "ticket"),
            "test_accuracy_final": 0.9801,
            "early_stop_iteration": 11_300,
            "val_loss_at_early_stop": 0.0612,
        }
        for kind in kinds
        for k in range(0 if kind == "ticket" else 1, rounds + 1)
    ]


def test_key_rounds_are_the_papers_sparsities_when_reached() -> None:
    agg = aggregate.aggregate(lenet_rows(20))
    # LeNet's rounds 3, 7, 12, 15: 51.3, 21.1, 7.0, 3.6% remaining (the paper's Figure 3)
    assert aggregate.key_rounds(agg) == {"51%": 3, "21%": 7, "07%": 12, "03.6%": 15}
    assert aggregate.curve_rounds(agg) == [3, 7, 12, 15, 20]
    # Five rounds reach 33%: only 51% is near a round; round 2 (64%) is too far from it
    assert aggregate.key_rounds(aggregate.aggregate(lenet_rows(5))) == {"51%": 3}
    assert aggregate.key_rounds(aggregate.aggregate(lenet_rows(2))) == {}


def dvc_metrics_show(tmp_path: Path, doc: dict) -> list[str]:
    """`dvc metrics show` of `doc` as results/metrics.json of a real DVC repo with the default dvc.yaml."""
    repo = Project(tmp_path / "repo")
    repo.root.mkdir()
    repo.dvc("init", "--no-scm", "-q")
    render.write(Hparams(), repo.root / "dvc.yaml")
    (repo.root / "results").mkdir()
    (repo.root / "results" / "metrics.json").write_text(json.dumps(doc, indent=2))
    return repo.dvc("metrics", "show").stdout.splitlines()


def test_dvc_metrics_show_fits_120_columns(tmp_path: Path) -> None:
    """The default experiment: 20 rounds and the dense network."""
    doc = aggregate.metrics_document(aggregate.aggregate(lenet_rows(20)))
    lines = dvc_metrics_show(tmp_path, doc)
    assert len(lines) == 2 and max(map(len, lines)) <= 120, "\n".join(lines)
    header, values = (line.split() for line in lines)
    # sorted by name (hence the 07% and 03.6%); accuracy 0.9861 - 0.0001 (k - 7)^2 in round k
    assert header == [
        "Path",
        "best",
        "best_at%",
        "best_round",
        "dense",
        *[f"ticket.{p}" for p in ("03.6%", "07%", "21%", "51%")],
    ]
    cells = dict(zip(header, values, strict=True))
    assert (cells["best_round"], cells["best_at%"]) == ("7", "21.1")
    expected = {"best": 0.9861, "dense": 0.9812, "ticket.03.6%": 0.9797, "ticket.07%": 0.9836, "ticket.51%": 0.9845}
    assert {k: float(cells[k]) for k in expected} == pytest.approx(expected)


def test_html_report_tables_figures_and_hash(results: tuple[dict, Path]) -> None:
    agg, tmp = results
    hp = from_dict({"training": {"lr": 0.0007}, "pruning": {"rounds": 2}, "controls": {"random_reinit": True}})
    url = "http://127.0.0.1:5000/#/experiments/7"
    before = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    page = html_report.write(hp, agg, tmp / "figures", tmp / "report.html", url).read_text()
    table = Cells("key-table")
    table.feed(page)
    rows = [r for r in table.rows if r]
    assert [r[:2] for r in rows] == [["0", "100.00"], ["1", "51.30"], ["2", "21.10"]]
    # round 2 ticket: accuracies 0.94 and 0.98, early stop 80 and 60; reinit 0.84 and 0.88
    accuracy, stop = mean_ci([0.94, 0.98]), mean_ci([80, 60])
    assert re.sub(r"\s+", " ", rows[2][2]) == "{:.4f} [{:.4f}, {:.4f}]".format(*accuracy)
    assert re.sub(r"\s+", " ", rows[2][3]) == "{:.0f} [{:.0f}, {:.0f}]".format(*stop)
    assert rows[2][4].startswith("0.8600")
    assert rows[0][4] == rows[0][2] + " †"  # controls at round 0 are the dense network, marked and noted
    assert f"† At round 0 every control is {aggregate.DENSE_NOTE}." in html.unescape(page)
    # when, from what and where: date, git commit, hash, MLflow
    written = datetime.strptime(re.search(r'<span id="date">([^<]+)</span>', page)[1], "%Y-%m-%d %H:%M UTC")
    assert before <= written.replace(tzinfo=timezone.utc) <= datetime.now(timezone.utc)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert f'<code id="commit">{head[:12]}</code>' in page
    assert f'<a id="mlflow" href="{url}">' in page
    assert "lenet_300_100 on mnist, 1 trial" in page  # the experiment described, as in the figures' titles
    params = Cells("hparams")
    params.feed(page)
    assert ["training.lr", "0.0007"] in params.rows
    assert hp.hash in page and hp.canonical().replace('"', "&quot;") in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    drawn = [tmp / "figures" / n for n, _ in html_report.FIGURES if n != "masks.png"]  # the stage draws masks.png
    assert [base64.b64decode(i) for i in images] == [f.read_bytes() for f in drawn]
    assert "masks.png is missing: run the masks stage" in page


def test_html_report_names_missing_figures(results: tuple[dict, Path], tmp_path: Path) -> None:
    agg, _ = results
    page = html_report.render(Hparams(), agg, tmp_path / "nothing")
    assert "accuracy.png is missing" in page and "data:image/png" not in page
    assert "no MLflow experiment of this hash was found" in page  # no URL given


def test_learning_curves_zoom_past_the_start_of_training() -> None:
    def curve(values: list[float]) -> dict:
        points = [
            {"iteration": 100 * i, "test_accuracy": {"mean": v, "ci_low": v - 0.001, "ci_high": v + 0.001}}
            for i, v in enumerate(values)
        ]
        return {"panel": "p", "kind": "ticket", "label": "t", "round": 1, "points": points}

    # 11 points: the first (iteration 0) is before 10% of training and lies far below the rest
    low, high = figures.zoom([curve([0.1, *[0.95 + 0.003 * i for i in range(10)]])])
    assert 0.94 < low < 0.949 and 0.978 < high < 0.99
    assert figures.zoom([curve([0.97, 0.96, 0.975])]) is None  # nothing below: the whole curve is drawn
    assert figures.zoom([curve([0.1, 0.3, 0.5, 0.6])]) is None  # still rising: zooming would hide little


def test_figure_titles_name_the_experiment_not_its_hash() -> None:
    hp = from_dict(
        {"model": {"name": "conv2"}, "dataset": {"name": "cifar10"}, "training": {"optimizer": "sgd"}, "trials": 5}
    )
    assert figures.describe(hp).splitlines() == [
        "conv2 on cifar10, 5 trials",
        f"sgd lr {hp.training.lr:g} momentum {hp.training.momentum:g}, batch 60, 50,000 iterations",
        "layerwise iterative pruning conv 10%, fc 20%, output 10% per round, reset to initialization",
    ]
    assert hp.hash[:8] not in figures.describe(hp)


def test_progress_lines_say_which_round_of_how_many(capsys: pytest.CaptureFixture) -> None:
    with RoundProgress("ticket round 3 trial 1", 10, round_index=3, rounds=20) as bar:
        bar.update(10, {"val_loss": 0.25, "val_accuracy": 0.9})
    assert "ticket round 3 of 20 trial 1: iteration 10/10" in capsys.readouterr().err


def test_time_left_extrapolates_from_training_not_set_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    now = [100.0]
    monkeypatch.setattr("lth.lottery.progress.time.perf_counter", lambda: now[0])
    with RoundProgress("ticket round 1", 1000) as bar:
        now[0] = 110.0  # 10 s of set-up before the first evaluation
        bar.update(0, {"val_loss": 1.0, "val_accuracy": 0.1})
        now[0] = 112.0  # then 100 iterations in 2 s: 900 left take 18 s
        bar.update(100, {"val_loss": 0.5, "val_accuracy": 0.8})
    assert "iteration 100/1000, val loss 0.5000, val accuracy 0.8000, 12 s elapsed, ~18 s left" in (
        capsys.readouterr().err
    )
