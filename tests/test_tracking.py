"""Tracking failures never lose results: the stages warn quickly and `lth sync-mlflow` replays what MLflow lacks.
A locked sqlite store is retried."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lth.core import config, pruning
from lth.core.data import identity
from lth.core.hparams import Hparams
from lth.core.registry import build_model
from lth.lottery import export
from lth.lottery.layout import trial_dir, write_outputs
from lth.tracking.store import (
    HTTP_DEFAULTS,
    TAG_HASH,
    TAG_PARENT,
    TAG_ROUND_HASH,
    Tracker,
    experiment_name,
    experiment_url,
)
from lth.tracking.writer import log_summary, log_trial
from tests.helpers import Project

XOR = {"dataset": {"name": "xor"}, "model": {"name": "xor"}, "training": {"lr": 0.01}}
T0 = 1_700_000_000_000  # a wall-clock start (epoch ms)


@pytest.fixture
def xor_project(make_project: Callable[..., Project], xor_params) -> Project:
    """An untrained XOR project of three rounds (0, 1, 2)."""
    return make_project(xor_params({"pruning.rounds": 2}))


def round_hashes_in(uri: str, hp: Hparams) -> list[str]:
    """Round hashes of the active runs of `hp`'s trained networks in the store (one entry per run), all
    finished (their trajectories' parent runs left out: one stays unfinished when logging broke off)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = client.search_experiments(filter_string=f"tags.`{TAG_HASH}` = '{hp.hash}'")
    runs = client.search_runs([e.experiment_id for e in exps], max_results=1000) if exps else []
    trained = [r for r in runs if TAG_ROUND_HASH in r.data.tags]
    assert all(r.info.status == "FINISHED" for r in trained), [r.info.status for r in trained]
    return sorted(r.data.tags[TAG_ROUND_HASH] for r in trained)


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

    run = next(r for r in Tracker(uri).find_runs(hp.hash) if r.data.tags["lth.round"] == "1")
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


def trained_outputs(
    hp: Hparams, runs: Path, kind: str = "ticket", round_index: int = 0, start_ms: int | None = None
) -> Path:
    """The outputs of one trial as a stage writes them (untrained weights, made-up numbers; rewind weights for
    ticket round 0); with `start_ms`, run.json records a 60 s training from then."""
    model = build_model(hp)
    mask = pruning.dense_mask(model.layer_kinds(), {n: p.shape for n, p in model.named_parameters()})
    metrics = {"round": round_index, "trial": 0, "kind": kind, "test_accuracy_final": 0.5, "hash": hp.hash}
    metrics |= {"test_accuracy_at_early_stop": 0.5 + round_index / 100, "percent_remaining": 100.0 * 0.8**round_index}
    metrics["mask_md5"] = pruning.mask_hash(mask)
    curve = [{"iteration": 0, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5, "test_accuracy": 0.5}]
    info = {"seconds": {"train": 1.0}}
    if start_ms is not None:
        info |= {"start_ms": start_ms, "end_ms": start_ms + 60_000, "git_commit": "0" * 40}
    out = trial_dir(runs, kind, round_index, 0)
    rewind = model.state_dict() if (kind, round_index) == ("ticket", 0) else None
    write_outputs(out, metrics, model.state_dict(), mask, curve, rewind, info)
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


# ----------------------------------------------------------------------- what a person browses


def test_rounds_nest_under_their_trajectory(tmp_path: Path) -> None:
    """One parent run per (kind, trial) spanning its rounds, each round a child over its training's span; the
    parent's charts are the IMP curve; round and trial are tags, not metrics; each round names its source and
    dataset; the experiment is named, described and opens on training runs; the report goes to the parents."""
    hp = config.from_dict(XOR)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for kind, k in (("ticket", 0), ("ticket", 1), ("reinit", 1), ("ticket", 2)):
        log_trial(tracker, hp, trained_outputs(hp, tmp_path / "runs", kind, k, T0 + 100_000 * k))
    runs, client = tracker.find_runs(hp.hash), tracker.client
    parents = {r.data.tags["lth.kind"]: r for r in tracker.find_trajectories(hp.hash)}
    assert sorted(parents) == ["reinit", "ticket"] and parents["ticket"].info.run_name == "ticket-trial0"
    ticket = parents["ticket"]
    nested = sorted(r.info.run_name for r in runs if r.data.tags[TAG_PARENT] == ticket.info.run_id)
    assert nested == ["ticket-round00-trial0", "ticket-round01-trial0", "ticket-round02-trial0"]
    digest = hashlib.md5(identity(hp.dataset).encode()).hexdigest()
    for r in runs:
        kind, k = r.data.tags["lth.kind"], int(r.data.tags["lth.round"])
        assert (r.info.start_time, r.info.end_time) == (T0 + 100_000 * k, T0 + 100_000 * k + 60_000)
        assert not {"round", "trial"} & set(r.data.metrics) and r.data.metrics["test_accuracy_final"] == 0.5
        assert r.data.tags["lth.dvc.stage"] == f"{kind}_round_{k:02d}"
        assert r.data.tags["mlflow.source.git.commit"] == "0" * 40
        assert r.data.tags["mlflow.source.name"] == "stages/train_round.py"
        [data] = r.inputs.dataset_inputs
        assert (data.dataset.name, data.dataset.digest) == ("xor", digest)
        assert json.loads(data.dataset.source) == {"uri": "data/prepared/xor.pt"}
    assert (ticket.info.start_time, ticket.info.end_time, ticket.info.status) == (T0, T0 + 260_000, "FINISHED")
    curve = client.get_metric_history(ticket.info.run_id, "test_accuracy_at_early_stop")
    assert [(m.step, m.value) for m in curve] == [(k, pytest.approx(0.5 + k / 100)) for k in (0, 1, 2)]
    assert [m.step for m in client.get_metric_history(parents["reinit"].info.run_id, "percent_remaining")] == [1]
    assert [a.path for a in client.list_artifacts(ticket.info.run_id)] == ["rewind.pt"]
    exp = client.get_experiment(ticket.info.experiment_id)
    assert exp.name == experiment_name(hp) == f"lth/xor-xor lr=0.01 ({hp.hash[:8]})"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "| `training.lr` | **0.01** |" in exp.tags["mlflow.note.content"]

    results = tmp_path / "results"
    for name in ("figures/accuracy.png", "report.html", "metrics.json"):
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_text(name)
    log_summary(hp, results, tracker.uri)
    for parent in parents.values():
        logged = client.download_artifacts(parent.info.run_id, "results", str(tmp_path / parent.info.run_id))
        assert sorted(str(f.relative_to(logged)) for f in Path(logged).rglob("*.*")) == [
            "figures/accuracy.png",
            "metrics.json",
            "report.html",
        ]


def test_a_round_that_started_earlier_remakes_the_parent(tmp_path: Path) -> None:
    """Rounds of parallel stages logged out of order: the parent starts with the earliest round, keeping every
    round and every point of its curve (the first parent is deleted)."""
    hp = config.from_dict(XOR)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for k in (2, 1):
        log_trial(tracker, hp, trained_outputs(hp, tmp_path / "runs", "reinit", k, T0 + 100_000 * k))
    [parent] = tracker.find_trajectories(hp.hash)
    assert (parent.info.start_time, parent.info.end_time) == (T0 + 100_000, T0 + 260_000)
    assert {r.data.tags[TAG_PARENT] for r in tracker.find_runs(hp.hash)} == {parent.info.run_id}
    curve = tracker.client.get_metric_history(parent.info.run_id, "test_accuracy_at_early_stop")
    assert sorted(m.step for m in curve) == [1, 2]
    assert parent.data.params["training.lr"] == "0.01" and "pruning.rounds" not in parent.data.params


def test_parallel_stages_of_one_trajectory_make_one_parent(tmp_path: Path) -> None:
    """Three rounds of one trajectory logged at once (as `lth run -j 3` would): one parent, every round in it."""
    hp = config.from_dict(XOR)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outputs = [trained_outputs(hp, tmp_path / "runs", "reinit", k, T0 + 1000 * k) for k in (1, 2, 3)]
    Tracker(uri).experiment_id(hp)  # the store and the experiment exist, as after ticket round 0
    errors: list[BaseException] = []

    def stage(directory: Path) -> None:
        try:
            log_trial(Tracker(uri), hp, directory)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=stage, args=(d,)) for d in outputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    tracker = Tracker(uri)
    [parent] = tracker.find_trajectories(hp.hash)
    assert parent.info.start_time == T0 + 1000
    assert sorted(r.data.tags[TAG_PARENT] for r in tracker.find_runs(hp.hash)) == [parent.info.run_id] * 3


def test_a_trial_logged_twice_is_one_run(tmp_path: Path) -> None:
    """A retried stage (a cluster's task that ran again) logs its network again: MLflow keeps one run of it."""
    hp = config.from_dict(XOR)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    outputs = trained_outputs(hp, tmp_path / "runs", "ticket", 0, T0)
    first = log_trial(tracker, hp, outputs)
    assert log_trial(tracker, hp, outputs) == first
    assert [r.info.run_id for r in tracker.find_runs(hp.hash)] == [first]
    [parent] = tracker.find_trajectories(hp.hash)
    assert [m.step for m in tracker.client.get_metric_history(parent.info.run_id, "percent_remaining")] == [0]


def test_a_run_whose_logging_broke_off_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed while logging (after the parent's curve point, before its run was finished) leaves a
    RUNNING run: logging the network again deletes it, logs one finished run and charts the round once."""
    hp = config.from_dict(XOR)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    outputs = trained_outputs(hp, tmp_path / "runs", "ticket", 0, T0)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the first call that finishes a run is where the process dies

    with monkeypatch.context() as m:
        m.setattr(tracker.client, "set_terminated", killed)
        with pytest.raises(KeyboardInterrupt):
            log_trial(tracker, hp, outputs)
    [crashed] = tracker.find_runs(hp.hash)
    assert crashed.info.status == "RUNNING"

    run_id = log_trial(tracker, hp, outputs)
    assert [(r.info.run_id, r.info.status) for r in tracker.find_runs(hp.hash)] == [(run_id, "FINISHED")]
    assert tracker.client.get_run(crashed.info.run_id).info.lifecycle_stage == "deleted"
    [parent] = tracker.find_trajectories(hp.hash)
    for key in ("percent_remaining", "test_accuracy_at_early_stop"):
        assert [m.step for m in tracker.client.get_metric_history(parent.info.run_id, key)] == [0]


def parsed(params: dict[str, str]) -> dict[str, Any]:
    """MLflow's params (flat strings) as a nested params document."""
    doc: dict[str, Any] = {}
    for key, text in params.items():
        try:
            value = json.loads(text)
        except ValueError:
            value = {"True": True, "False": False}.get(text, text)
        *sections, leaf = key.split(".")
        d = doc
        for section in sections:
            d = d.setdefault(section, {})
        d[leaf] = value
    return doc


def test_a_ticket_rebuilds_from_mlflow_alone(trained_project: Callable[..., Project], xor_params) -> None:
    """The ticket of round 1 from MLflow's records only (the round's params and mask, its parent's rewind
    weights) is the ticket `lth export` builds from the DVC outputs."""
    from mlflow.tracking import MlflowClient

    p = trained_project(xor_params())
    hp = config.load(p.root / "params.yaml")
    client = MlflowClient(p.tracking_uri)
    [run] = [r for r in Tracker(p.tracking_uri).find_runs(hp.hash) if r.info.run_name == "ticket-round01-trial0"]
    parent = run.data.tags[TAG_PARENT]
    model = build_model(config.from_dict(parsed(run.data.params)))
    model.load_state_dict(torch.load(client.download_artifacts(parent, "rewind.pt", str(p.root)), weights_only=True))
    mask = pruning.unpack(Path(client.download_artifacts(run.info.run_id, "mask.npz", str(p.root))).read_bytes())
    pruning.apply_mask(model, mask)
    on_disk = export.ticket(hp, 1, 0, p.root / "runs")
    assert run.data.tags["lth.model"] == on_disk["model"] == "xor"
    assert mask.keys() == on_disk["mask"].keys() and all(torch.equal(mask[k], on_disk["mask"][k]) for k in mask)
    state = model.state_dict()
    assert state.keys() == on_disk["state_dict"].keys()
    assert all(torch.equal(state[k], on_disk["state_dict"][k]) for k in state)


def test_a_copied_project_reads_its_own_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store records absolute artifact paths: a copy of the project (the original's artifacts gone) reads
    and writes its own."""
    hp = config.from_dict(XOR)
    first, copy = tmp_path / "first", tmp_path / "copy"
    (first / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(first)
    run_id = log_trial(Tracker(), hp, trained_outputs(hp, first / "runs", start_ms=T0))
    shutil.copytree(first, copy)
    shutil.rmtree(first / "mlartifacts")
    monkeypatch.chdir(copy)
    tracker = Tracker()
    weights = tracker.client.download_artifacts(run_id, "final.pt", str(tmp_path / "read"))
    assert Path(weights).read_bytes() == (trial_dir(copy / "runs", "ticket", 0, 0) / "final.pt").read_bytes()
    again = log_trial(tracker, hp, trained_outputs(hp, copy / "runs", "ticket", 1, T0 + 100_000))
    assert tracker.client.get_run(again).info.artifact_uri.startswith((copy / "mlartifacts").as_uri() + "/")
    assert not (first / "mlartifacts").exists()


def test_experiment_url(tmp_path: Path, free_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in HTTP_DEFAULTS.items():  # Tracker sets them for a server: keep this process unchanged
        monkeypatch.setenv(name, value)
    hp = config.from_dict(XOR)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert experiment_url(hp, uri) is None and not (tmp_path / "mlflow.db").exists()  # nothing logged yet
    experiment = Tracker(uri).experiment_id(hp)
    page = f"http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning"  # training runs
    assert experiment_url(hp, uri) == page  # what `lth ui` serves
    assert experiment_url(config.from_dict({**XOR, "trials": 2}), uri) is None  # another experiment
    assert experiment_url(hp, f"http://127.0.0.1:{free_port}") is None  # no server there


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
    """Trained networks (not trajectories) completely logged in the server's store."""
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute(
                "select count(*) from runs join tags on tags.run_uuid = runs.run_uuid "
                f"where status = 'FINISHED' and tags.key = '{TAG_ROUND_HASH}'"
            ).fetchone()[0]
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
        [parent] = Tracker(uri).find_trajectories(hp.hash)  # finished by the rounds that sync logged
        assert parent.info.status == "FINISHED"
    finally:
        stop_server(server)
