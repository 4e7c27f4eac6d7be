"""Sharing results with collaborators: DVC outputs through a remote, MLflow runs through a server, or each
clone's own store brought up to date from the pulled outputs with `lth sync-mlflow`."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Project

TINY = {"pruning.rounds": 1, "training.iterations": 100, "training.eval_every": 50, "training.test_every": 50}


def digests(root: Path) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest()
        for d in ("runs", "results", "data/prepared")
        for f in sorted((root / d).rglob("*"))
        if f.is_file()
    }


def clone_through_remote(alice: Project, tmp_path: Path) -> Project:
    """Alice commits her results and pushes them to a directory remote; Bob clones her repo and pulls them."""
    alice.dvc("remote", "add", "-d", "shared", str(tmp_path / "remote"))
    alice.run("git", "add", "-A")
    alice.run("git", "commit", "-qm", "results")
    alice.dvc("push")
    bob = Project(tmp_path / "bob")
    subprocess.run(["git", "clone", "-q", str(alice.root), str(bob.root)], check=True, env=bob.env)
    bob.dvc("pull")
    return bob


@pytest.mark.slow  # LeNet on MNIST; the README's share_pull block checks the same on the shared XOR project
@pytest.mark.mnist
def test_collaborator_pulls_results_and_nothing_reruns(
    tmp_path: Path, make_project: Callable[..., Project], lenet_params
) -> None:
    alice = make_project(lenet_params(TINY), "alice")
    alice.lth("run")
    bob = clone_through_remote(alice, tmp_path)
    out = bob.dvc("repro")
    text = out.stdout + out.stderr
    assert "Running stage" not in text and "lth: ticket round" not in text, text
    assert text.count("didn't change, skipping") == 5  # prepare, two rounds, masks, evaluate
    assert digests(bob.root) == digests(alice.root) and digests(bob.root)
    assert not (bob.root / "mlflow.db").exists()  # no stage ran, so nothing was logged


@pytest.mark.slow
@pytest.mark.mnist
def test_pipeline_logs_to_a_shared_mlflow_server(
    tmp_path: Path, free_port: int, make_project: Callable[..., Project], lenet_params
) -> None:
    from mlflow.tracking import MlflowClient

    port = free_port
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5).read()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
        p = make_project(lenet_params(TINY))
        p.env["MLFLOW_TRACKING_URI"] = uri
        p.lth("run")
        client = MlflowClient(uri)
        runs = [
            r
            for e in client.search_experiments()
            if e.name.startswith("lth/")
            for r in client.search_runs([e.experiment_id])
            if "lth.round" in r.data.tags  # a trained network (not its trajectory's parent run)
        ]
        assert sorted(r.data.tags["lth.round"] for r in runs) == ["0", "1"]
        assert all(r.info.status == "FINISHED" for r in runs)
        assert not (p.root / "mlflow.db").exists()  # everything went to the server
        for r in runs:
            assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"mask.npz", "final.pt"}
            local = client.download_artifacts(r.info.run_id, "final.pt", str(tmp_path / r.info.run_id))
            trained = p.root / "runs" / "ticket" / f"round_{int(r.data.tags['lth.round']):02d}" / "trial_0"
            assert Path(local).read_bytes() == (trained / "final.pt").read_bytes()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def browsed(uri: str) -> dict[str, Any]:
    """What a person browsing the store sees, by experiment and run name: the parent's name (nesting), the
    run's span, its metrics (every point) and its artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = {}
    for exp in client.search_experiments(filter_string="tags.`lth.hash` != ''"):
        runs = client.search_runs([exp.experiment_id])
        names = {r.info.run_id: r.info.run_name for r in runs}
        for r in runs:
            out[f"{exp.name}: {r.info.run_name}"] = (
                names.get(r.data.tags.get("mlflow.parentRunId")),
                (r.info.start_time, r.info.end_time),
                {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)] for k in r.data.metrics},
                sorted(a.path for a in client.list_artifacts(r.info.run_id)),
            )
    return out


def test_a_collaborator_syncs_the_same_mlflow_runs_after_dvc_pull(
    tmp_path: Path, xor_with_reinit: Callable[[], Project]
) -> None:
    """A clone has its own store, empty after `dvc pull` (no stage runs); `lth sync-mlflow` logs the pulled
    outputs: the same experiment, trajectories, rounds (names, nesting, spans), metrics and artifacts as the
    store of the clone that computed them."""
    alice = xor_with_reinit()
    bob = clone_through_remote(alice, tmp_path)
    assert not (bob.root / "mlflow.db").exists()
    out = bob.lth("sync-mlflow").stdout
    assert "3 logged" in out and "to 2 trajectory run(s)" in out, out
    theirs = browsed(alice.tracking_uri)
    assert len(theirs) == 5 and browsed(bob.tracking_uri) == theirs  # 3 rounds, 2 trajectories
