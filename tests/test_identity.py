"""One identity per result: the committed dvc.yaml is what params.yaml renders, the stage structure is checked
before any training, controls are branches of the ticket's experiment, and MLflow has one writer."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lth.core import config
from lth.pipeline import render
from tests.helpers import ROOT, Project


def test_committed_dvc_yaml_is_what_params_yaml_renders() -> None:
    """A fresh clone's plain `dvc repro` runs the committed dvc.yaml: it must be current."""
    rendered = render.render(config.load(ROOT / "params.yaml"))
    assert (ROOT / "dvc.yaml").read_text() == rendered, "dvc.yaml is stale: run `lth pipeline` and commit it"


def test_structure_mismatch_stops_before_any_training(make_project: Callable[..., Project], xor_params) -> None:
    """Rounds changed in params.yaml without re-rendering: the first train stage refuses within seconds."""
    p = make_project(xor_params())
    p.set_params({"pruning.rounds": 3})
    r = p.dvc("repro", check=False)
    assert r.returncode != 0
    assert "does not match params.yaml (pruning.rounds=3" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (p.root / "runs").exists()


def _artifacts(client: Any, run_id: str, path: str | None = None) -> dict[str, str]:
    """MD5 of every artifact of the run, by path (folders walked)."""
    out = {}
    for a in client.list_artifacts(run_id, path):
        if a.is_dir:
            out.update(_artifacts(client, run_id, a.path))
        else:
            out[a.path] = hashlib.md5(Path(client.download_artifacts(run_id, a.path)).read_bytes()).hexdigest()
    return out


def _runs(uri: str) -> dict[str, dict[str, Any]]:
    """Every run of the store as comparable content, by experiment and run name: the experiment (name, tags),
    the parent's name (nesting), start and end, params, metrics (step, value and time of each point), tags,
    dataset inputs and artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = {}
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id])
        names = {r.info.run_id: r.info.run_name for r in runs}
        for run in runs:
            out[f"{exp.name}: {run.info.run_name}"] = {
                "experiment": (exp.name, exp.tags),
                "parent": names.get(run.data.tags.get("mlflow.parentRunId")),
                "span": (run.info.status, run.info.start_time, run.info.end_time),
                "params": run.data.params,
                "metrics": {
                    k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, k)]
                    for k in run.data.metrics
                },
                "tags": {k: v for k, v in run.data.tags.items() if k != "mlflow.parentRunId"},
                "inputs": [d.to_dictionary() for d in run.inputs.dataset_inputs],
                "artifacts": _artifacts(client, run.info.run_id),
            }
    return out


def test_live_and_replayed_runs_are_identical(xor_with_reinit: Callable[[], Project]) -> None:
    """The runs the stages logged while training (the ticket's, then the control's in a later `lth run`) equal
    the runs `lth sync-mlflow` replays from the DVC outputs."""
    p, replay = xor_with_reinit(), xor_with_reinit()  # two copies of one trained project
    live = _runs(p.tracking_uri)
    rounds = {k: r for k, r in live.items() if "lth.round" in r["tags"]}
    assert len(rounds) == 3  # ticket rounds 0-1 and the reinit control of round 1
    assert sorted(r["parent"] for r in rounds.values()) == ["reinit-trial0", "ticket-trial0", "ticket-trial0"]
    assert len(live) == 5  # and the parents of the two trajectories
    assert {r["tags"]["lth.env.numerics"] for r in rounds.values()} == {"portable"}
    assert all("seconds_train" in r["metrics"] and len(r["inputs"]) == 1 for r in rounds.values())
    parents = [r for k, r in live.items() if k not in rounds]
    assert all(r["span"][1] < r["span"][2] and "results/report.html" in r["artifacts"] for r in parents)
    (replay.root / "mlflow.db").unlink()  # the copy's MLflow store is lost; its DVC outputs are kept
    shutil.rmtree(replay.root / "mlartifacts")
    replay.lth("sync-mlflow")
    replayed = _runs(replay.tracking_uri)
    assert replayed.keys() == live.keys()
    for key, run in live.items():
        for part in run:
            assert replayed[key][part] == run[part], f"{key}: {part} differs"


def test_switching_on_a_control_keeps_the_ticket(
    trained_project: Callable[..., Project], xor_params, xor_with_reinit: Callable[[], Project]
) -> None:
    """Controls are branches: the ticket's hash, stages and MLflow experiment stay; only the control trains."""
    before, p = trained_project(xor_params()), xor_with_reinit()  # the second: the first + random_reinit, `lth run`
    assert "Running stage 'reinit_round_01'" in p.output
    assert "Running stage 'ticket_round" not in p.output
    hashes = [q.lth("locate", "--no-mlflow").stdout.splitlines()[0] for q in (before, p)]
    assert hashes[0] == hashes[1]
    located = p.lth("locate").stdout
    assert "ticket-round01-trial0" in located and "reinit-round01-trial0" in located


@pytest.mark.parametrize("kind, round_index, ok", [("ticket", 1, True), ("ticket", 2, False), ("reinit", 1, False)])
def test_check_stage(kind: str, round_index: int, ok: bool, tmp_path: Path) -> None:
    """A stage outside the experiment params.yaml describes is refused before it trains."""
    hp = config.from_dict({"dataset": {"name": "xor"}, "model": {"name": "xor"}, "pruning": {"rounds": 1}})
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(render.render(hp))
    if ok:
        render.check_stage(hp, kind, round_index, dvc_yaml)
    else:
        with pytest.raises(render.StaleDvcYaml, match="lth pipeline"):
            render.check_stage(hp, kind, round_index, dvc_yaml)


@pytest.mark.slow  # over a minute on 2 cores: run with -m slow
def test_params_edited_during_a_run_are_never_recorded(make_project: Callable[..., Project], xor_params) -> None:
    """The reproduction of issue 11: training.lr changes while `lth run` trains round 0. The stage fails with
    one clear line; dvc.lock, the run-cache and MLflow never claim outputs of other params; a new run
    trains the new params and they verify."""
    p = make_project(xor_params({"training.iterations": 6000, "training.eval_every": 500, "training.test_every": 3000}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lth.cli", "run", "-j", "1"],
        cwd=p.root,
        env=p.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "ticket round 0 of 1: iteration 500/" in line:  # round 0 is training with lr 0.0012
            p.set_params({"training.lr": 0.002})
    out = "".join(lines)
    assert proc.wait() != 0, out
    assert "params.yaml changed while this stage ran" in out and "Traceback" not in out
    lock = yaml.safe_load((p.root / "dvc.lock").read_text()) if (p.root / "dvc.lock").exists() else {}
    assert "ticket_round_00" not in (lock or {}).get("stages", {})
    assert not (p.root / "mlflow.db").exists() or not _runs(p.tracking_uri)
    p.lth("run", "-j", "1")
    assert "PASS" in p.lth("verify", "--round", "1").stdout
    assert all(r["params"]["training.lr"] == "0.002" for r in _runs(p.tracking_uri).values())
