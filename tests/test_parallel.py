"""Trials of a round trained in parallel worker processes give exactly what training them one after another
gives, are logged to MLflow from every worker, and a failing worker is reported clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lth.core import hparams
from lth.core.data import prepare, prepared_path
from lth.lottery.round import run_round, trial_dir
from lth.pipeline import settings as runtime

from .conftest import needs_mnist

pytestmark = needs_mnist
TRIALS = {"training": {"iterations": 200, "eval_every": 100, "test_every": 100}, "trials": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(hparams.Hparams().dataset, prepared_path(out, hparams.Hparams().dataset))
    return out


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: runtime settings come from LTH_* only
    monkeypatch.setenv("LTH_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("LTH_THREADS", raising=False)
    monkeypatch.delenv("LTH_WORKERS", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_two_workers_give_the_same_outputs_as_one(tmp_path: Path, data_dir: Path) -> None:
    hp = hparams.from_dict(TRIALS)
    outputs = {}
    for workers in (1, 2):
        runs = tmp_path / f"runs_{workers}"
        metrics = run_round(
            hp, 0, "ticket", runs, data_dir, device=torch.device("cpu"), track=False, quiet=True, workers=workers
        )
        assert [m["trial"] for m in metrics] == [0, 1]
        outputs[workers] = runs
    for trial in range(2):
        one, two = trial_dir(outputs[1], "ticket", 0, trial), trial_dir(outputs[2], "ticket", 0, trial)
        for name in ("metrics.json", "curve.csv"):
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
        for name in ("final.pt", "mask.pt", "rewind.pt"):
            a, b = torch.load(one / name, weights_only=True), torch.load(two / name, weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The two trials are different networks (different seeds), so the comparison above is not vacuous.
    w0 = torch.load(trial_dir(outputs[2], "ticket", 0, 0) / "final.pt", weights_only=True)
    w1 = torch.load(trial_dir(outputs[2], "ticket", 0, 1) / "final.pt", weights_only=True)
    assert not torch.equal(w0["layers.0.weight"], w1["layers.0.weight"])


def test_workers_log_every_trial_to_mlflow(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    hp = hparams.from_dict({**TRIALS, "training": {**TRIALS["training"], "iterations": 100}})
    run_round(hp, 0, "ticket", tmp_path / "runs", data_dir, device=torch.device("cpu"), quiet=True, workers=2)
    from lth.tracking.store import TAG_ROUND_HASH, Tracker

    runs = Tracker().find_runs(hp.hash)
    assert sorted(r.data.tags[TAG_ROUND_HASH] for r in runs) == sorted(hp.round_hash(0, t, "ticket") for t in (0, 1))
    assert all(r.info.status == "FINISHED" for r in runs)
    logged = {int(r.data.tags["lth.trial"]): r.data.metrics["test_accuracy_at_early_stop"] for r in runs}
    for t in (0, 1):
        written = json.loads((trial_dir(tmp_path / "runs", "ticket", 0, t) / "metrics.json").read_text())
        assert logged[t] == written["test_accuracy_at_early_stop"]


def test_failing_worker_is_reported(tmp_path: Path, data_dir: Path) -> None:
    hp = hparams.from_dict(TRIALS)
    with pytest.raises(RuntimeError, match="trial worker .* failed"):  # round 1 without round 0's outputs
        run_round(
            hp, 1, "ticket", tmp_path / "runs", data_dir, device=torch.device("cpu"), track=False, quiet=True, workers=2
        )


def test_worker_and_thread_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert runtime.workers(1, cpu) == 1
    assert runtime.workers(5, cpu) == min(5, runtime.cpu_count())
    assert runtime.workers(5, torch.device("cuda")) == 1
    assert runtime.threads("lenet_300_100", 1) == 1
    assert runtime.threads("conv2", 1) == runtime.cpu_count()
    monkeypatch.setenv("LTH_WORKERS", "3")
    monkeypatch.setenv("LTH_THREADS", "2")
    assert runtime.workers(5, cpu) == 3 and runtime.workers(2, cpu) == 2
    assert runtime.threads("lenet_300_100", 3) == 2
    monkeypatch.delenv("LTH_WORKERS")
    (tmp_path / "params.yaml").write_text("runtime:\n  workers: 2\n")
    assert runtime.workers(5, cpu) == 2
    monkeypatch.setenv("LTH_THREADS", "many")
    with pytest.raises(SystemExit, match="LTH_THREADS='many' must be a whole number"):
        runtime.threads("conv2")
