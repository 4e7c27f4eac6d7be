"""Trials of a round trained in parallel worker processes give exactly what training them one after another
gives, every trial is logged to MLflow from its outputs, and a failing worker is reported clearly. The runtime
settings that choose workers and threads: params' runtime section, overridden by LTH_* variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lth.core import config, runtime
from lth.core.runtime import RuntimeSettings
from lth.lottery.round import Round, TrialsFailed, run_round
from lth.tracking.writer import log_finished

CPU = torch.device("cpu")


@pytest.fixture
def hp(lenet_params) -> config.Hparams:
    """Two trials of LeNet, 200 iterations (no pruning at round 0)."""
    return config.from_dict(lenet_params({"training.iterations": 200, "trials": 2}))


def settings(tmp_path: Path, workers: int) -> RuntimeSettings:
    return RuntimeSettings(CPU, workers=workers, quiet=True, checkpoint_dir=tmp_path / "checkpoints")


@pytest.fixture(autouse=True)
def restore_threads() -> None:
    threads = torch.get_num_threads()  # run_round sets the thread count of this process
    yield
    torch.set_num_threads(threads)


@pytest.mark.mnist
def test_two_workers_give_the_same_outputs_as_one(tmp_path: Path, mnist_dir: Path, hp: config.Hparams) -> None:
    outputs = {}
    for workers in (1, 2):
        runs = tmp_path / f"runs_{workers}"
        metrics = run_round(Round(hp, "ticket", 0, runs, mnist_dir), settings(tmp_path, workers))
        assert [m["trial"] for m in metrics] == [0, 1]
        outputs[workers] = Round(hp, "ticket", 0, runs, mnist_dir)
    for trial in range(2):
        one, two = outputs[1].trial(trial).out, outputs[2].trial(trial).out
        for name in ("metrics.json", "curve.csv"):
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
        for name in ("final.pt", "mask.pt", "rewind.pt"):
            a, b = torch.load(one / name, weights_only=True), torch.load(two / name, weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The two trials are different networks (different seeds), so the comparison above is not vacuous.
    w0 = torch.load(outputs[2].trial(0).out / "final.pt", weights_only=True)
    w1 = torch.load(outputs[2].trial(1).out / "final.pt", weights_only=True)
    assert not torch.equal(w0["layers.0.weight"], w1["layers.0.weight"])


@pytest.mark.mnist
def test_every_trial_is_logged_from_its_outputs(
    tmp_path: Path, mnist_dir: Path, hp: config.Hparams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_round only writes outputs (in worker processes or not); the train stage then logs every trial from
    them with `log_finished`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # a round that logged by itself would log here
    hp = config.from_dict({**hp.to_dict(), "training": {**hp.to_dict()["training"], "iterations": 100}})
    job = Round(hp, "ticket", 0, tmp_path / "runs", mnist_dir)
    metrics = run_round(job, settings(tmp_path, 1))
    assert not (tmp_path / "mlflow.db").exists()
    log_finished(hp, [job.trial(m["trial"]).out for m in metrics], uri)
    from lth.tracking.store import TAG_ROUND_HASH, Tracker

    runs = Tracker(uri).find_runs(hp.hash)
    assert sorted(r.data.tags[TAG_ROUND_HASH] for r in runs) == sorted(hp.round_hash(0, t, "ticket") for t in (0, 1))
    assert all(r.info.status == "FINISHED" for r in runs)
    logged = {int(r.data.tags["lth.trial"]): r.data.metrics["test_accuracy_at_early_stop"] for r in runs}
    for t in (0, 1):
        written = json.loads((job.trial(t).out / "metrics.json").read_text())
        assert logged[t] == written["test_accuracy_at_early_stop"]


@pytest.mark.mnist
def test_failing_worker_is_reported(tmp_path: Path, mnist_dir: Path, hp: config.Hparams) -> None:
    with pytest.raises(TrialsFailed, match="trial worker .* failed"):  # round 1 without round 0's outputs
        run_round(Round(hp, "ticket", 1, tmp_path / "runs", mnist_dir), settings(tmp_path, 2))


def test_worker_and_thread_settings(tmp_path: Path) -> None:
    def resolve(section: dict | None = None, **env: str) -> RuntimeSettings:
        return runtime.resolve(section or {}, tmp_path, env)

    auto = resolve()
    assert auto.workers_for(1) == 1
    assert auto.workers_for(5) == min(5, runtime.cpu_count())
    assert RuntimeSettings(torch.device("cuda")).workers_for(5) == 1
    assert auto.threads_for("lenet_300_100", 1) == 1
    assert auto.threads_for("conv2", 1) == runtime.cpu_count()
    assert auto.threads_for("conv2", 2) == max(1, runtime.cpu_count() // 2)  # the cores shared by the workers
    set_by_env = resolve(LTH_WORKERS="3", LTH_THREADS="2")
    assert set_by_env.workers_for(5) == 3 and set_by_env.workers_for(2) == 2
    assert set_by_env.threads_for("lenet_300_100", 3) == 2
    assert resolve({"workers": 2}).workers_for(5) == 2
    assert resolve({"workers": 2}, LTH_WORKERS="1").workers_for(5) == 1  # the environment wins
    with pytest.raises(runtime.SettingsError, match="LTH_THREADS='many' must be a whole number"):
        resolve(LTH_THREADS="many")
    with pytest.raises(runtime.SettingsError, match="runtime.workers=-1 must be a whole number"):
        resolve({"workers": -1})


@pytest.mark.mnist
def test_a_round_interrupted_after_a_trial_restores_that_trial_instead_of_retraining_it(
    tmp_path: Path, mnist_dir: Path, hp: config.Hparams, capfd: pytest.CaptureFixture[str]
) -> None:
    """DVC deletes a stage's outputs before running it again: the finished trial comes back from its copy."""
    from lth.core.data import load_prepared, prepared_path
    from lth.lottery.trial import run_trial

    job, s = Round(hp, "ticket", 0, tmp_path / "runs", mnist_dir), settings(tmp_path, 1)
    data = load_prepared(prepared_path(mnist_dir, hp.dataset), hp.dataset)
    first = run_trial(job.trial(0), data, s)  # trial 0 finished, then the stage was killed during trial 1
    weights = (job.trial(0).out / "final.pt").read_bytes()
    (tmp_path / "runs").rename(tmp_path / "deleted_by_dvc")
    capfd.readouterr()
    metrics = run_round(job, s)
    err = capfd.readouterr().err
    assert "ticket round 0 trial 0 was finished by an interrupted run: its outputs are restored" in err
    assert "trial 1 was finished" not in err
    assert metrics[0] == first and [m["trial"] for m in metrics] == [0, 1]
    assert (job.trial(0).out / "final.pt").read_bytes() == weights
    assert not list(s.checkpoint_dir.glob("*.done")), "a finished round deletes the copies"
