"""The daily-workflow commands on a real tiny project: compare, export, report, ui."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import pytest
import torch
from click.testing import CliRunner

import lth
from lth.cli import main
from tests.helpers import Cells, Project


@pytest.fixture
def trained(trained_project: Callable[..., Project], lenet_params) -> Project:
    """`lth run` of LeNet, 2 rounds (0, 1) of 100 iterations, two trials, with random reinitialization."""
    small = {
        "pruning.rounds": 1,
        "training.iterations": 100,
        "training.eval_every": 50,
        "training.test_every": 50,
        "trials": 2,
        "controls.random_reinit": True,
    }
    return trained_project(lenet_params(small), ("lth.cli", "run"))


def metrics(p: Project, kind: str, round_index: int) -> list[dict]:
    return [
        json.loads(f.read_text())
        for f in sorted((p.root / "runs" / kind / f"round_{round_index:02d}").glob("trial_*/metrics.json"))
    ]


@pytest.mark.mnist
def test_evaluate_writes_html_report_with_key_table(trained: Project) -> None:
    page = (trained.root / "results" / "report.html").read_text()
    table = Cells("key-table")
    table.feed(page)
    assert [r[0] for r in table.rows if r] == ["0", "1"]
    row1 = next(r for r in table.rows if r and r[0] == "1")
    ticket, reinit = metrics(trained, "ticket", 1), metrics(trained, "reinit", 1)
    accs = [m["test_accuracy_at_early_stop"] for m in ticket]
    assert row1[1] == f"{ticket[0]['percent_remaining']:.2f}"
    # mean [min-max] over the two trials, for the ticket then the control
    assert row1[2].split() == [f"{sum(accs) / 2:.4f}", f"[{min(accs):.4f}–{max(accs):.4f}]"]
    assert row1[4].startswith(f"{sum(m['test_accuracy_at_early_stop'] for m in reinit) / 2:.4f}")
    assert ticket[0]["hash"] in page and "data:image/png;base64," in page
    # `lth report` writes the same page from the workspace
    out = trained.root / "again.html"
    trained.lth("report", "--out", str(out))
    assert out.read_text() == page


@pytest.mark.mnist
def test_compare_reads_workspace_then_mlflow(trained: Project) -> None:
    ticket1 = metrics(trained, "ticket", 1)
    h = ticket1[0]["hash"]
    other = trained.root / "other.yaml"
    shutil.copy(trained.root / "params.yaml", other)
    out = trained.lth("compare", "params.yaml", "-S", "training.lr=3e-4", "--no-mlflow").stdout
    assert f"hash {h}" in out and "training.lr=0.0003" in out and "no results for: training.lr=3e-4" in out
    # Without the workspace outputs, the same numbers come from MLflow (by hash prefix).
    shutil.rmtree(trained.root / "runs")
    out = trained.lth("compare", h[:8], "other.yaml").stdout
    assert "MLflow (6 networks)" in out  # 2 trials x (2 ticket rounds + 1 reinit round), per experiment
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("1 "))
    accs = [m["test_accuracy_at_early_stop"] for m in ticket1]
    assert line.count(f"{sum(accs) / 2:.4f} [{min(accs):.4f}-{max(accs):.4f}]") == 2
    bad = trained.lth("compare", "nonexistent.yaml", "params.yaml", check=False)
    assert bad.returncode != 0 and "neither an existing params file nor an experiment hash" in bad.stderr


@pytest.mark.mnist
def test_export_cli_loads_in_plain_pytorch(trained: Project) -> None:
    trained.lth("export", "--round", "1", "--trial", "1", "--out", "ticket.pt")
    doc = torch.load(trained.root / "ticket.pt", weights_only=True)
    rewind = torch.load(trained.root / "runs/ticket/round_00/trial_1/rewind.pt", weights_only=True)
    mask = torch.load(trained.root / "runs/ticket/round_01/trial_1/mask.pt", weights_only=True)
    assert doc["round"] == 1 and doc["model"] == "lenet_300_100"
    for name, w in rewind.items():
        expected = w * mask[name] if name in mask else w
        assert torch.equal(doc["state_dict"][name], expected)
    bad = trained.lth("export", "--round", "5", check=False)
    assert bad.returncode != 0 and "round 5 is not in this experiment" in bad.stderr


def test_ui_serves_the_project_store(project: Project, free_port: int) -> None:
    port = free_port
    proc = subprocess.Popen(
        [sys.executable, "-m", "lth.cli", "ui", "--port", str(port)],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, body = time.time() + 120, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    body = r.read().decode()
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(1)
        assert body is not None and "OK" in body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and "<html" in r.read().decode().lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert f"http://127.0.0.1:{port}" in proc.stdout.read()
    assert (project.root / "mlflow.db").exists()  # the store at the project root, not ./mlruns


@pytest.mark.parametrize("command", ["compare", "export", "ui", "report", "sweep"])
def test_help(command: str) -> None:
    out = CliRunner().invoke(main, [command, "--help"])
    assert out.exit_code == 0 and "Usage:" in out.output and len(out.output.splitlines()) > 6


def test_version() -> None:
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"lth, version {lth.__version__}"
