"""`lth sweep` over real DVC experiments of a tiny project."""

from __future__ import annotations

import csv
from collections.abc import Callable

import pytest

from tests.helpers import Project

TINY = {"pruning.rounds": 1, "training.iterations": 100, "training.eval_every": 50, "training.test_every": 50}


@pytest.mark.slow
@pytest.mark.mnist
def test_sweep_over_learning_rate_experiments(make_project: Callable[..., Project], lenet_params) -> None:
    p = make_project(lenet_params(TINY))
    for lr in ("0.002", "0.0005"):
        p.dvc("exp", "run", "-S", f"training.lr={lr}")
    out = p.lth("sweep", "report", "--out", "results/lr_sweep").stdout
    assert "training.lr" in out  # found as the swept key without --param
    rows = list(csv.DictReader(open(p.root / "results" / "lr_sweep.csv")))
    assert sorted({r["training.lr"] for r in rows}) == ["0.0005", "0.002"]
    assert sorted((r["training.lr"], r["round"]) for r in rows) == [
        ("0.0005", "0"),
        ("0.0005", "1"),
        ("0.002", "0"),
        ("0.002", "1"),
    ]
    assert (p.root / "results" / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"
    # The same numbers reached MLflow (of the original repo, even from DVC's experiment workspaces).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(p.tracking_uri)
    for r in rows:
        exps = [e for e in client.search_experiments() if e.name.startswith("lth/")]
        runs = [
            run
            for e in exps
            for run in client.search_runs([e.experiment_id])
            if run.data.params["training.lr"] == r["training.lr"] and run.data.tags.get("lth.round") == r["round"]
        ]
        assert len(runs) == 1
        assert float(r["test_accuracy_at_early_stop"]) == pytest.approx(
            runs[0].data.metrics["test_accuracy_at_early_stop"], abs=1e-6
        )
    bad = p.lth("sweep", "report", "--param", "training.lrr", check=False)
    assert bad.returncode != 0 and "not a hyperparameter of these experiments" in bad.stderr
