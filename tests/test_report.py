"""Figures and the HTML report from round outputs on disk (small generated files, no training)."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest

from lth.core.config import from_dict
from lth.core.hparams import Hparams
from lth.lottery.progress import RoundProgress
from lth.reporting import aggregate, figures
from lth.reporting import html as html_report
from tests.helpers import Cells

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
    curves = aggregate.write_curves_csv(runs, [0, 2], tmp_path / "curves.csv")
    figures.plot_figures(agg, curves, tmp_path / "figures", title="exp")
    return agg, tmp_path


def test_learning_curves_average_trials_with_min_max(results: tuple[dict, Path]) -> None:
    _, tmp = results
    rows = list(csv.DictReader(open(tmp / "curves.csv")))
    assert [r["iteration"] for r in rows] == ["0", "50", "100"]
    # round 2, iteration 100: trials 0.94 and 0.98 + 0.1 -> mean 1.01
    assert float(rows[2]["round_02"]) == pytest.approx((0.94 + 0.98 + 0.1) / 2)
    for name in ("accuracy.png", "early_stop.png", "learning_curves.png"):
        assert (tmp / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_report_tables_figures_and_hash(results: tuple[dict, Path]) -> None:
    agg, tmp = results
    hp = from_dict({"training": {"lr": 0.0007}, "pruning": {"rounds": 2}, "controls": {"random_reinit": True}})
    page = html_report.write(hp, agg, tmp / "figures", tmp / "report.html").read_text()
    table = Cells("key-table")
    table.feed(page)
    rows = [r for r in table.rows if r]
    assert [r[:2] for r in rows] == [["0", "100.00"], ["1", "51.30"], ["2", "21.10"]]
    # round 2 ticket: accuracies 0.94 and 0.98, early stop 80 and 60; reinit 0.84 and 0.88
    assert re.sub(r"\s+", " ", rows[2][2]) == "0.9600 [0.9400–0.9800]"
    assert re.sub(r"\s+", " ", rows[2][3]) == "70 [60–80]"
    assert rows[2][4].startswith("0.8600")
    assert rows[0][4] == rows[0][2]  # controls at round 0 are the dense network
    params = Cells("hparams")
    params.feed(page)
    assert ["training.lr", "0.0007"] in params.rows
    assert hp.hash in page and hp.canonical().replace('"', "&quot;") in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(i) for i in images] == [(tmp / "figures" / n).read_bytes() for n, _ in html_report.FIGURES]


def test_html_report_names_missing_figures(results: tuple[dict, Path], tmp_path: Path) -> None:
    agg, _ = results
    page = html_report.render(Hparams(), agg, tmp_path / "nothing")
    assert "accuracy.png is missing" in page and "data:image/png" not in page


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
