"""Presets: complete, valid params files with the paper's hyperparameters; `lth preset` selects one
without losing local work; and a tiny end-to-end `dvc repro` with both controls and two trials."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lth.cli import main
from lth.core import config
from lth.core.hparams import flatten
from lth.core.registry import MODELS
from lth.pipeline import presets
from lth.pipeline import render as pipeline
from tests.helpers import ROOT, Project

PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
NAMES = [p.stem for p in PRESETS]


def doc(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_paper_experiments_have_presets() -> None:
    expected = {
        "lenet",
        "lenet_reinit",
        "lenet_oneshot",
        "xor",
        "conv2",
        "conv4",
        "conv6",
        "conv2_dropout",
        "conv4_dropout",
        "conv6_dropout",
        "resnet20",
        "resnet20_warmup",
        "resnet20_rewind",
        "vgg16",
        "vgg19",
        "vgg19_rewind",
    }
    assert expected <= set(NAMES)
    assert {doc(p)["model"]["name"] for p in PRESETS} == set(MODELS)  # every network is reachable


def test_default_params_are_the_lenet_preset() -> None:
    assert doc(ROOT / "params.yaml") == doc(ROOT / "presets" / "lenet.yaml")


@pytest.mark.parametrize("path", PRESETS, ids=NAMES)
def test_preset_is_complete_valid_and_renders(path: Path) -> None:
    assert set(flatten(doc(path))) == set(flatten(doc(ROOT / "params.yaml")))  # every key, runtime included
    hp = config.load(path)
    text = pipeline.render(hp)
    stages = yaml.safe_load(text)["stages"]
    n = hp.pruning.rounds
    assert len(stages) == 2 + (n + 1) + n * len(pipeline.control_kinds(hp))
    assert presets.description(path)
    assert presets.estimate_cpu_seconds(hp) > 0


# The paper's hyperparameters (Frankle & Carbin 2019, Figure 2 and appendices), as the brief tables them.
PAPER = {
    "lenet": {
        "training.optimizer": "adam",
        "training.lr": 1.2e-3,
        "training.iterations": 50000,
        "training.batch_size": 60,
        "pruning.fc_rate": 0.2,
        "pruning.output_rate": 0.1,
    },
    "conv2": {
        "training.lr": 2e-4,
        "training.iterations": 20000,
        "training.batch_size": 60,
        "pruning.conv_rate": 0.1,
        "pruning.fc_rate": 0.2,
        "pruning.output_rate": 0.1,
    },
    "conv4": {"training.lr": 3e-4, "training.iterations": 25000, "pruning.conv_rate": 0.1},
    "conv6": {"training.lr": 3e-4, "training.iterations": 30000, "pruning.conv_rate": 0.15},
    "conv2_dropout": {"model.dropout": 0.5, "training.lr": 3e-4, "training.iterations": 60000},
    "conv4_dropout": {"model.dropout": 0.5, "training.lr": 2e-4, "training.iterations": 75000},
    "conv6_dropout": {
        "model.dropout": 0.5,
        "training.lr": 2e-4,
        "training.iterations": 90000,
        "pruning.conv_rate": 0.15,
    },
    "resnet20": {
        "training.optimizer": "sgd",
        "training.momentum": 0.9,
        "training.lr": 0.1,
        "training.weight_decay": 1e-4,
        "training.lr_milestones": [20000, 25000],
        "training.iterations": 30000,
        "training.batch_size": 128,
        "training.warmup_iterations": 0,
        "pruning.strategy": "global",
        "pruning.conv_rate": 0.2,
        "pruning.fc_rate": 0.0,
        "pruning.output_rate": 0.0,
        "dataset.augment": True,
    },
    "resnet20_warmup": {"training.lr": 0.03, "training.warmup_iterations": 20000},
    "resnet20_rewind": {"training.lr": 0.1, "pruning.rewind_iteration": 500},
    "vgg19": {
        "training.optimizer": "sgd",
        "training.momentum": 0.9,
        "training.lr": 0.1,
        "training.weight_decay": 1e-4,
        "training.warmup_iterations": 10000,
        "training.iterations": 112000,
        "training.batch_size": 64,
        "training.lr_milestones": [80 * (45000 // 64), 120 * (45000 // 64)],
        "pruning.strategy": "global",
        "pruning.conv_rate": 0.2,
        "pruning.output_rate": 0.0,
        "dataset.augment": True,
    },
}


@pytest.mark.parametrize("name", list(PAPER))
def test_preset_has_the_paper_hyperparameters(name: str) -> None:
    flat = flatten(doc(ROOT / "presets" / f"{name}.yaml"))
    assert {k: flat[k] for k in PAPER[name]} == PAPER[name]
    if flat["dataset.name"] == "cifar10":
        assert flat["dataset.validation_size"] == 5000  # 45K / 5K / 10K


def test_controls_preset_and_estimates() -> None:
    base, reinit = config.load(ROOT / "presets" / "lenet.yaml"), config.load(ROOT / "presets" / "lenet_reinit.yaml")
    assert pipeline.control_kinds(reinit) == ["reinit", "random_pruning"]
    # 21 ticket networks, plus 20 of each control; each network is one stage, plus prepare and evaluate.
    stage = presets.STAGE_SECONDS
    per_network = (presets.estimate_cpu_seconds(base) - 23 * stage) / 21
    assert per_network > 0
    assert presets.estimate_cpu_seconds(reinit) == pytest.approx(61 * per_network + 63 * stage)


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lenet_params) -> Path:
    """A git work tree with the presets and a committed params.yaml of the user's own (no preset)."""
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(lenet_params(), sort_keys=False))
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_preset_command_selects_and_protects_local_work(repo: Path) -> None:
    runner = CliRunner()
    committed = (repo / "params.yaml").read_text()
    result = runner.invoke(main, ["preset", "xor"])
    assert result.exit_code == 0, result.output
    assert (repo / "params.yaml").read_text() == (repo / "presets" / "xor.yaml").read_text()
    assert "ticket_round_10" in (repo / "dvc.yaml").read_text()  # the xor preset's 10 rounds
    backups = list((repo / ".lth" / "params-backup").glob("*.yaml"))
    assert [b.read_text() for b in backups] == [committed]  # a params.yaml that is no preset is kept

    # An uncommitted edit that is no preset is refused, and nothing changes.
    edited = (repo / "params.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
    (repo / "params.yaml").write_text(edited)
    result = runner.invoke(main, ["preset", "lenet"])
    assert result.exit_code != 0
    assert "uncommitted changes in params.yaml" in result.output and "--force" in result.output
    assert (repo / "params.yaml").read_text() == edited

    result = runner.invoke(main, ["preset", "lenet", "--force"])
    assert result.exit_code == 0, result.output
    assert doc(repo / "params.yaml") == doc(repo / "presets" / "lenet.yaml")
    assert edited in [b.read_text() for b in (repo / ".lth" / "params-backup").glob("*.yaml")]

    # A preset's uncommitted results (dvc.lock) are in DVC's run-cache: switching says how to get them back.
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    result = runner.invoke(main, ["preset", "conv2"])
    assert result.exit_code == 0 and "restore them without retraining" in result.output
    assert runner.invoke(main, ["preset", "conv2"]).output.startswith("preset 'conv2' is already selected")

    # Uncommitted results of params that are no preset are refused.
    (repo / "params.yaml").write_text(committed)  # back to the committed params, which are no preset
    result = runner.invoke(main, ["preset", "lenet"])
    assert result.exit_code != 0 and "uncommitted changes in dvc.lock" in result.output

    result = runner.invoke(main, ["preset", "nope"])
    assert result.exit_code != 0 and "unknown preset 'nope'" in result.output and "xor" in result.output


def test_preset_list(repo: Path) -> None:
    result = CliRunner().invoke(main, ["preset", "--list"])
    assert result.exit_code == 0, result.output
    assert "estimate" in result.output
    for name in NAMES:
        line = next(x for x in result.output.splitlines() if x.strip().startswith(name + " "))
        assert presets.description(ROOT / "presets" / f"{name}.yaml") in line


@pytest.mark.slow  # over a minute on 2 cores: run with -m slow
def test_xor_end_to_end_with_controls_and_trials(make_project: Callable[..., Project], preset_params) -> None:
    """`dvc repro` of the xor preset, shortened, with both controls and two trials."""
    params = preset_params(
        "xor",
        {
            "training.iterations": 200,
            "training.eval_every": 50,
            "training.test_every": 50,
            "pruning.rounds": 1,
            "trials": 2,
            "controls.random_reinit": True,
            "controls.random_pruning": True,
            "runtime.threads": 1,
            "runtime.workers": 1,  # the trials one after the other: no worker processes to start per stage
        },
    )
    proj = make_project(params)
    proj.dvc("repro")
    metrics = json.loads((proj.root / "results" / "metrics.json").read_text())
    assert {"ticket", "reinit", "random_pruning"} <= set(metrics)
    assert set(metrics["reinit"]) == set(metrics["random_pruning"]) == {"round_01"}
    with open(proj.root / "results" / "plots" / "sparsity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["0", "1"]
    for kind in ("ticket", "reinit", "random_pruning"):
        for r in rows:
            lo, mean, hi = (float(r[f"{kind}_test_accuracy_final{s}"]) for s in ("_min", "", "_max"))
            assert lo <= mean <= hi
    # The two trials start from different seeds: their results differ, so min < max.
    for kind, row in (("ticket", rows[0]), ("ticket", rows[1]), ("reinit", rows[1]), ("random_pruning", rows[1])):
        assert any(
            float(row[f"{kind}_{m}_min"]) < float(row[f"{kind}_{m}_max"])
            for m in ("test_accuracy_at_early_stop", "test_accuracy_final")
        ), (kind, row)
    figures = sorted(p.name for p in (proj.root / "results" / "figures").glob("*.png"))
    assert {"accuracy.png", "early_stop.png"} <= set(figures)
    assert all((proj.root / "results" / "figures" / f).stat().st_size > 1000 for f in figures)
