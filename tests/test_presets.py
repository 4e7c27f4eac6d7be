"""Presets: complete, valid params files with the paper's hyperparameters; `lth preset` selects one
without losing local work; and a tiny end-to-end `dvc repro` with both controls and two trials."""

from __future__ import annotations

import csv
import json
import os
import re
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
from lth.reporting import robustness
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
    assert len(stages) == 3 + (n + 1) + n * len(pipeline.control_kinds(hp)) + len(hp.instability.rounds)
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


# The robustness grid's base: the lenet experiment with 3 trials (trials are hashed; controls and rounds are not).
ROBUSTNESS_HASH = "56659f024e47699382f3ab51541b5bff"


def test_robustness_preset_is_lenet_with_three_trials_and_both_controls() -> None:
    lenet, grid = ROOT / "presets" / "lenet.yaml", ROOT / "presets" / "lenet_robustness.yaml"
    changed = {k for k, v in flatten(doc(grid)).items() if flatten(doc(lenet))[k] != v}
    assert changed == {"trials", "controls.random_reinit", "controls.random_pruning", "pruning.rounds"}
    hp = config.load(grid)
    assert hp.hash == ROBUSTNESS_HASH == config.load(lenet, ("trials=3",)).hash
    assert hp.trials >= robustness.MIN_TRIALS and pipeline.control_kinds(hp) == ["reinit", "random_pruning"]
    # 16 ticket networks, plus 15 of each control, 3 trials each; a stage per round and kind, plus two.
    base = config.load(lenet)
    per_network = (presets.estimate_cpu_seconds(base) - 23 * presets.STAGE_SECONDS) / 21
    assert presets.estimate_cpu_seconds(hp) == pytest.approx(3 * 46 * per_network + 48 * presets.STAGE_SECONDS)


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
        path = ROOT / "presets" / f"{name}.yaml"
        assert presets.description(path) in line and f" ~{presets.estimate(path)} " in line
    result = CliRunner().invoke(main, ["preset", "xor"])
    assert f"estimated CPU time {presets.estimate(ROOT / 'presets' / 'xor.yaml')})" in result.output


# A time written in words or numbers: presets say what they are, `presets.estimate` how long they take.
DURATION = re.compile(r"\b[0-9][0-9.,]*\s*(s|sec|min|h|d)\b|\b(seconds?|minutes?|hours?|days?|weeks?)\b", re.I)


@pytest.mark.parametrize("path", PRESETS, ids=NAMES)
def test_preset_comments_state_no_time(path: Path) -> None:
    comments = [line for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
    assert not [line for line in comments if DURATION.search(line)]


def readme_preset_times() -> dict[str, str]:
    """Preset name -> the README presets table's time ("`conv2`, `conv4`, `conv6` | ... | 1.3 d / 2.9 d / 4.3 d")."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| preset |") :].split("\n\n")[0].splitlines()
    assert table[0].rstrip().endswith("| est. CPU time |"), table[0]
    times = {}
    for row in table[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        times.update(zip(re.findall(r"`(\w+)`", cells[0]), cells[-1].split(" / "), strict=True))
    return times


def test_readme_preset_times_are_the_estimates() -> None:
    """The README's table gives the times of `lth preset --list`: one estimate, `presets.estimate_cpu_seconds`."""
    times = readme_preset_times()
    assert len(times) >= 16 and set(times) <= set(NAMES)
    assert times == {n: presets.estimate(ROOT / "presets" / f"{n}.yaml") for n in times}


def test_estimates_grow_with_the_work() -> None:
    """A short preset's estimate is mostly its stages' fixed cost; more rounds, trials or controls add work."""
    xor = config.load(ROOT / "presets" / "xor.yaml")
    stages = xor.pruning.rounds + 3
    assert stages * presets.STAGE_SECONDS < presets.estimate_cpu_seconds(xor) < 2 * stages * presets.STAGE_SECONDS
    assert presets.format_duration(presets.estimate_cpu_seconds(xor)).endswith(" s")  # seconds, not minutes
    more = config.load(ROOT / "presets" / "xor.yaml", ("trials=2", "controls.random_reinit=true"))
    assert presets.estimate_cpu_seconds(more) > presets.estimate_cpu_seconds(xor) + 10 * presets.STAGE_SECONDS


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
    assert {"dense", "best", "best_round", "best_at%"} <= set(metrics)
    with open(proj.root / "results" / "plots" / "sparsity.csv") as f:
        rows = list(csv.DictReader(f))
    kinds = ("ticket", "reinit", "random_pruning")
    assert [(r["kind"], r["round"]) for r in rows] == [(kind, k) for kind in kinds for k in ("0", "1")]
    for r in rows:
        lo, mean, hi = (float(r[f"test_accuracy_final{s}"]) for s in ("_low", "", "_high"))
        assert lo <= mean <= hi
    # The two trials start from different seeds: their results differ, so the band (min to max) is wide.
    for r in rows:
        assert any(
            float(r[f"{m}_low"]) < float(r[f"{m}_high"]) for m in ("test_accuracy_at_early_stop", "test_accuracy_final")
        ), r
    figures = sorted(p.name for p in (proj.root / "results" / "figures").glob("*.png"))
    assert {"accuracy.png", "early_stop.png"} <= set(figures)
    assert all((proj.root / "results" / "figures" / f).stat().st_size > 1000 for f in figures)
