"""Parallel experiments: two queued `dvc exp run`s with different learning rates, run by two workers, each
keep separate, correct results in DVC and in the one MLflow store at the real repo root."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from lth.core import config
from lth.tracking.store import TAG_HASH, TAG_ROUND_HASH
from tests.helpers import Project

LRS = (0.01, 0.02)


def experiments(shown: Any) -> list[dict[str, Any]]:
    """Every experiment's `data` (params, metrics) in `dvc exp show --json` output, baseline excluded."""
    found = []

    def walk(node: Any, in_experiments: bool) -> None:
        if isinstance(node, dict):
            if in_experiments and isinstance(node.get("data"), dict) and "params" in node["data"]:
                found.append(node["data"])
            for key, value in node.items():
                walk(value, in_experiments or key == "experiments")
        elif isinstance(node, list):
            for value in node:
                walk(value, in_experiments)

    walk(shown, False)
    return found


@pytest.mark.slow
def test_queued_experiments_run_in_parallel_with_separate_results(
    make_project: Callable[..., Project], xor_params
) -> None:
    p = make_project(xor_params())  # 2 rounds (0, 1)
    for lr in LRS:
        p.dvc("exp", "run", "--queue", "-S", f"training.lr={lr}")
    p.dvc("queue", "start", "-j", "2")
    end = time.monotonic() + 900
    while time.monotonic() < end:
        status = p.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert "Success" in status and "Failed" not in status, status

    by_lr = {}
    for exp in experiments(json.loads(p.dvc("exp", "show", "--json").stdout)):
        params = exp["params"]["params.yaml"]["data"]
        if params["training"]["lr"] in LRS:
            by_lr[params["training"]["lr"]] = (params, exp["metrics"]["results/metrics.json"]["data"])
    assert set(by_lr) == set(LRS), by_lr
    assert by_lr[LRS[0]][1] != by_lr[LRS[1]][1]  # separate results

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{p.root / 'mlflow.db'}")  # the REAL repo root, not .dvc/tmp/exps/...
    assert not list((p.root / ".dvc" / "tmp").rglob("mlflow.db"))
    for lr, (params, _) in by_lr.items():
        hp = config.from_dict(params)
        exps = client.search_experiments(filter_string=f"tags.`{TAG_HASH}` = '{hp.hash}'")
        assert len(exps) == 1, lr
        runs = [r for r in client.search_runs([exps[0].experiment_id]) if TAG_ROUND_HASH in r.data.tags]
        assert all(r.data.tags[TAG_HASH] == hp.hash and r.info.status == "FINISHED" for r in runs)
        assert sorted(r.data.tags[TAG_ROUND_HASH] for r in runs) == sorted(
            hp.round_hash(k, 0, "ticket") for k in (0, 1)
        ), lr
        assert {r.data.params["training.lr"] for r in runs} == {str(lr)}
    for name in [
        line.split()[1]
        for line in p.dvc("queue", "status").stdout.splitlines()[1:]
        if line.strip() and not line.startswith("Worker")
    ][:2]:
        logs = p.dvc("queue", "logs", name, check=False).stdout
        assert "lth: ticket round 1" in logs, logs
        assert "database is locked" not in logs and "lth: WARNING" not in logs, logs
