"""Tracking failures never lose results: the stages warn quickly and `lth sync-mlflow` replays what MLflow lacks.
A locked sqlite store is retried."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from lth.core import config, pruning
from lth.core.hparams import Hparams
from lth.core.registry import build_model
from lth.lottery.layout import trial_dir, write_outputs
from lth.tracking.store import TAG_HASH, TAG_ROUND_HASH, Tracker
from lth.tracking.writer import log_trial
from tests.helpers import Project


@pytest.fixture
def xor_project(make_project: Callable[..., Project], xor_params) -> Project:
    """An untrained XOR project of three rounds (0, 1, 2)."""
    return make_project(xor_params({"pruning.rounds": 2}))


def round_hashes_in(uri: str, hp: Hparams) -> list[str]:
    """Round hashes of the active, finished runs of `hp` in the store (one entry per run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = client.search_experiments(filter_string=f"tags.`{TAG_HASH}` = '{hp.hash}'")
    runs = client.search_runs([e.experiment_id for e in exps], max_results=1000) if exps else []
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    return sorted(r.data.tags[TAG_ROUND_HASH] for r in runs)


def expected_hashes(hp: Hparams) -> list[str]:
    return sorted(hp.round_hash(k, 0, "ticket") for k in range(hp.pruning.rounds + 1))


@pytest.mark.slow  # over a minute on 2 cores: run with -m slow
def test_unreachable_server_warns_quickly_and_sync_replays_idempotently(
    xor_project: Project, free_port: int, tmp_path: Path
) -> None:
    p = xor_project
    p.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port}"  # nothing listens there
    for args in (("stages/prepare.py",), ("stages/train_round.py", "--round", "0")):
        t0 = time.perf_counter()
        r = p.python(*args)
        seconds = time.perf_counter() - t0
    assert "WARNING: MLflow logging of runs/ticket/round_00/trial_0 failed" in r.stderr
    assert "lth sync-mlflow" in r.stderr
    assert seconds < 120, f"a stage with MLflow down took {seconds:.0f} s: HTTP retries are not bounded"
    p.python("stages/train_round.py", "--round", "1")

    hp = config.load(p.root / "params.yaml")
    p.env["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = p.lth("sync-mlflow").stdout
    assert "logged ticket round 0 trial 0" in out and "logged ticket round 1 trial 0" in out
    assert "2 trained network(s)" in out and "2 logged" in out
    assert round_hashes_in(uri, hp) == sorted(hp.round_hash(k, 0, "ticket") for k in (0, 1))
    again = p.lth("sync-mlflow").stdout
    assert "2 were already in MLflow, 0 logged" in again
    assert len(round_hashes_in(uri, hp)) == 2

    from mlflow.tracking import MlflowClient

    run = next(
        r
        for r in MlflowClient(uri).search_runs(
            [MlflowClient(uri).get_experiment_by_name(f"lth/{hp.short_name}").experiment_id]
        )
        if r.data.tags["lth.round"] == "1"
    )
    recorded = json.loads((p.root / "runs/ticket/round_01/trial_0/metrics.json").read_text())
    assert run.data.metrics["test_accuracy_at_early_stop"] == recorded["test_accuracy_at_early_stop"]
    assert run.data.params["training.iterations"] == "200"
    assert {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)} == {"mask.npz", "final.pt"}
    curve = MlflowClient(uri).get_metric_history(run.info.run_id, "curve_val_accuracy")
    assert [m.step for m in curve] == [0, 50, 100, 150, 200]


def test_sync_with_the_server_down_fails_clearly(tmp_path: Path, free_port: int) -> None:
    (tmp_path / "params.yaml").write_text("trials: 1\n")
    p = Project(tmp_path)  # sync only needs params.yaml (and runs/, empty here)
    p.env["MLFLOW_TRACKING_URI"] = url = f"http://127.0.0.1:{free_port}"
    r = p.lth("sync-mlflow", check=False)
    assert r.returncode != 0 and f"MLflow at {url} failed" in r.stderr and "run it again" in r.stderr


def trained_outputs(hp: Hparams, runs: Path) -> Path:
    """The outputs of ticket round 0, trial 0, as a stage writes them (untrained weights, made-up numbers)."""
    model = build_model(hp)
    mask = pruning.dense_mask(model.layer_kinds(), {n: p.shape for n, p in model.named_parameters()})
    metrics = {"round": 0, "trial": 0, "kind": "ticket", "test_accuracy_final": 0.5, "hash": hp.hash}
    metrics["mask_md5"] = pruning.mask_hash(mask)
    curve = [{"iteration": 0, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5, "test_accuracy": 0.5}]
    out = trial_dir(runs, "ticket", 0, 0)
    write_outputs(out, metrics, model.state_dict(), mask, curve, None, {"seconds": {"train": 1.0}})
    return out


def test_locked_sqlite_store_is_retried(tmp_path: Path) -> None:
    hp = config.from_dict({"dataset": {"name": "xor"}, "model": {"name": "xor"}})
    outputs = trained_outputs(hp, tmp_path / "runs")
    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}")
    tracker.experiment_id(hp)  # creates the tables
    locked = threading.Event()

    def hold_lock(seconds: float) -> None:
        con = sqlite3.connect(db, timeout=30)
        con.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        con.rollback()
        con.close()

    holder = threading.Thread(target=hold_lock, args=(7.0,))  # longer than sqlite's 5 s busy timeout
    holder.start()
    locked.wait()
    t0 = time.perf_counter()
    try:
        run_id = log_trial(tracker, hp, outputs)
    finally:
        holder.join()
    assert time.perf_counter() - t0 > 5  # it did meet the lock, and got through it
    assert round_hashes_in(f"sqlite:///{db}", hp) == [hp.round_hash(0, 0, "ticket")]
    logged = tracker.client.get_run(run_id).data.metrics
    assert logged["test_accuracy_final"] == 0.5 and logged["seconds_train"] == 1.0


# ------------------------------------------------------------------- a real server that goes away


def start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'srv.db'}",
            "--default-artifact-root",
            (tmp_path / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    end = time.monotonic() + 180
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise AssertionError("mlflow server did not start within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finished_runs(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_server_stopped_mid_run_then_sync_logs_every_round_exactly_once(
    tmp_path: Path, free_port: int, xor_project: Project
) -> None:
    port = free_port
    server = start_server(tmp_path, port)
    p = xor_project
    p.env["MLFLOW_TRACKING_URI"] = uri = f"http://127.0.0.1:{port}"
    hp = config.load(p.root / "params.yaml")
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=p.root,
        env=p.env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        while finished_runs(tmp_path / "srv.db") < 1:
            assert repro.poll() is None, repro.stdout.read()
            time.sleep(0.1)
    finally:
        stop_server(server)  # round 0 is logged; the server goes away mid-run
    out, _ = repro.communicate(timeout=600)
    assert repro.returncode == 0, out
    assert "WARNING: MLflow logging of runs/ticket/round_02/trial_0 failed" in out, out

    server = start_server(tmp_path, port)
    try:
        before = round_hashes_in(uri, hp)
        assert hp.round_hash(0, 0, "ticket") in before and len(before) < 3
        out = p.lth("sync-mlflow").stdout
        assert f"{len(before)} were already in MLflow, {3 - len(before)} logged" in out
        assert round_hashes_in(uri, hp) == expected_hashes(hp)
        assert "3 were already in MLflow, 0 logged" in p.lth("sync-mlflow").stdout
        assert round_hashes_in(uri, hp) == expected_hashes(hp)
    finally:
        stop_server(server)
