"""The daily-workflow commands on a real tiny project: compare, export, report (`lth ui` is in test_browser);
and `-S KEY=VALUE`, one override of the params in every command that takes it (`lth run -S` writes it into
params.yaml)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import lth
from lth.cli import main
from lth.core import config
from lth.pipeline import render
from lth.reporting.statistics import mean_ci
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
    # mean [95% confidence interval] over the two trials, for the ticket then the control
    mean, low, high = mean_ci(accs)
    assert row1[2].split() == [f"{mean:.4f}", f"[{low:.4f},", f"{high:.4f}]"]
    assert row1[4].startswith(f"{sum(m['test_accuracy_at_early_stop'] for m in reinit) / 2:.4f}")
    assert ticket[0]["hash"] in page and "data:image/png;base64," in page
    # `lth report` writes the same page from the workspace (but for the minute it was written)
    out = trained.root / "again.html"
    trained.lth("report", "--out", str(out))
    undated = re.compile(r'<span id="date">[^<]*</span>')
    assert undated.sub("", out.read_text()) == undated.sub("", page)


@pytest.mark.mnist
def test_compare_reads_workspace_then_mlflow(trained: Project) -> None:
    ticket1 = metrics(trained, "ticket", 1)
    h = ticket1[0]["hash"]
    other = trained.root / "other.yaml"
    shutil.copy(trained.root / "params.yaml", other)
    out = trained.lth("compare", "params.yaml", "training.lr=3e-4", "--no-mlflow").stdout
    assert f"hash {h}" in out and "training.lr=0.0003" in out and "no results for: training.lr=3e-4" in out
    # Without the workspace outputs, the same numbers come from MLflow (by hash prefix).
    shutil.rmtree(trained.root / "runs")
    out = trained.lth("compare", h[:8], "other.yaml").stdout
    assert "MLflow (6 networks)" in out  # 2 trials x (2 ticket rounds + 1 reinit round), per experiment
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("1 "))
    accs = [m["test_accuracy_at_early_stop"] for m in ticket1]
    assert line.count(f"{sum(accs) / 2:.4f} [{min(accs):.4f}-{max(accs):.4f}]") == 2
    bad = trained.lth("compare", "nonexistent.yaml", "params.yaml", check=False)
    assert bad.returncode != 0 and "'nonexistent.yaml' is no experiment: give a params file" in bad.stderr


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


@pytest.mark.parametrize("command", ["run", "locate", "compare", "export", "ui", "report", "verify", "sweep report"])
def test_help(command: str) -> None:
    out = CliRunner().invoke(main, [*command.split(), "--help"])
    assert out.exit_code == 0 and "Usage:" in out.output and len(out.output.splitlines()) > 6


def test_version() -> None:
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"lth, version {lth.__version__}"


# ------------------------------------------------------------------------------------------- -S KEY=VALUE


@pytest.fixture
def params_dir(tmp_path: Path, xor_params, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding only the tiny XOR params.yaml (and presets/, which `lth compare` names), as cwd."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(xor_params(), sort_keys=False))
    shutil.copytree(lth_root() / "presets", tmp_path / "presets")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def lth_root() -> Path:
    return Path(lth.__file__).resolve().parents[2]


def invoke(*args: str) -> str:
    out = CliRunner().invoke(main, list(args))
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    return out.output


def test_set_is_one_option_in_every_command_that_reads_params() -> None:
    """`-S KEY=VALUE` is the same option (one override, repeatable) wherever it appears."""
    options = {
        name: next(p for p in command.params if "-S" in p.opts)
        for name, command in main.commands.items()
        if any("-S" in p.opts for p in command.params)
    }
    assert set(options) == {"run", "locate", "compare", "export", "report", "verify", "sync-mlflow"}
    assert len({(o.name, o.help, o.multiple, o.metavar) for o in options.values()}) == 1


def test_set_is_one_override_of_the_params_in_locate_and_compare(params_dir: Path) -> None:
    overrides = ("training.lr=0.02", "trials=2")
    hp = config.load("params.yaml", overrides)
    assert hp.hash != config.load("params.yaml").hash
    sets = [a for o in overrides for a in ("-S", o)]
    assert f"hash (MD5 of canonical hyperparameters): {hp.hash}" in invoke("locate", "--no-mlflow", *sets)
    # `lth compare`: each argument one experiment, -S changes every one read from params.
    out = invoke(
        "compare",
        "training.lr=0.03",
        "training.lr=0.03,training.lr_milestones=[100,150]",
        "xor",
        "params.yaml",
        "-S",
        "training.seed=1",
        "--no-mlflow",
    )
    expected = [
        config.load("params.yaml", ("training.seed=1", "training.lr=0.03")),
        config.load("params.yaml", ("training.seed=1", "training.lr=0.03", "training.lr_milestones=[100,150]")),
        config.load("presets/xor.yaml", ("training.seed=1",)),
        config.load("params.yaml", ("training.seed=1",)),
    ]
    legend = [line for line in out.splitlines() if re.match(r"^[A-D] = ", line)]
    assert [line.split("hash ")[1].split()[0] for line in legend] == [e.hash for e in expected], out
    assert legend[2].startswith("C = xor ") and legend[3].startswith("D = params.yaml ")
    assert "Error: give two or more experiments" in invoke("compare", "training.lr=0.03")


def test_set_selects_the_experiment_of_report_verify_and_export(
    trained_project: Callable[..., Project], xor_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    proj = trained_project(xor_params())
    monkeypatch.chdir(proj.root)
    other = config.load("params.yaml", ("training.lr=0.02",))
    # The workspace holds the outputs of params.yaml: with -S, another experiment's are asked for.
    assert f"no trained rounds of experiment {other.short_name}" in invoke("report", "-S", "training.lr=0.02")
    assert f"params.yaml gives {other.hash}" in invoke("verify", "-S", "training.lr=0.02")
    assert f"not {other.short_name}" in invoke("export", "-S", "training.lr=0.02")
    # A runtime override keeps the experiment: verify re-trains with it.
    assert "PASS" in invoke("verify", "-S", "runtime.checkpoint_seconds=0")


def test_run_set_writes_the_override_into_params_keeping_comments(
    make_project: Callable[..., Project], xor_params
) -> None:
    proj = make_project(xor_params())
    proj.dvc("repro", "prepare")
    path = proj.root / "params.yaml"
    text = "# my experiment\n" + path.read_text().replace("  seed: 0\n", "  seed: 0  # the paper's\n")
    path.write_text(text)
    done = proj.lth("run", "-S", "training.lr=6e-4", "-S", "pruning.rounds=2", "prepare")  # dvc repro prepare
    assert path.read_text() == text.replace("  lr: 0.0012\n", "  lr: 0.0006\n").replace(
        "  rounds: 1\n", "  rounds: 2\n"
    ), path.read_text()
    assert "training.lr: 0.0012 -> 0.0006; pruning.rounds: 1 -> 2" in done.stderr
    assert (proj.root / "dvc.yaml").read_text() == render.render(config.load(path))  # re-rendered: 3 rounds
    assert "Stage 'prepare' didn't change, skipping" in done.stdout  # then dvc repro ran
    bad = proj.lth("run", "-S", "training.lr=-1", check=False)
    assert bad.returncode == 1 and "training.lr: must be positive, got -1" in bad.stderr
    assert "Traceback" not in bad.stderr and path.read_text().count("lr: 0.0006") == 1  # nothing written
