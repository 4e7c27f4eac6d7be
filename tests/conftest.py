"""Shared fixtures: a real DVC + git project in a temp dir, running the real stages in subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if "LTH_DATA_DIR" not in os.environ and SHARED_DATA.exists():
    os.environ["LTH_DATA_DIR"] = str(SHARED_DATA)

# A few hundred iterations and 2 rounds: the real pipeline at a small scale.
TINY = {
    "training.iterations": 300,
    "training.eval_every": 100,
    "training.test_every": 100,
    "pruning.rounds": 2,
}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """In-process training runs on one thread: on a shared 2-core machine, two threads fighting for the
    cores are several times slower, and bit-identity checks need a fixed thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def have_mnist() -> bool:
    root = Path(os.environ.get("LTH_DATA_DIR", "data/raw"))
    return (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists() or (
        root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    ).exists()


needs_mnist = pytest.mark.skipif(not have_mnist(), reason="no MNIST copy (set LTH_DATA_DIR)")


def set_params(path: Path, values: dict) -> None:
    doc = yaml.safe_load(path.read_text())
    for key, value in values.items():
        d = doc
        *parents, last = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def preset_params(name: str, **changes: object) -> dict:
    """The hyperparameters of presets/NAME.yaml as dotted keys (its runtime section left out), with
    `changes` (dotted keys, passed as a dict: preset_params("xor", **{"trials": 2}))."""
    from lth.core.hparams import flatten

    doc = yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())
    return {**flatten({k: v for k, v in doc.items() if k != "runtime"}), **changes}


class Project:
    """A copy of the project (stages, library, params) as its own git + DVC repo."""

    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ)
        self.env.update(
            {
                "PYTHONPATH": str(root / "src"),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}",
                "GIT_AUTHOR_NAME": "lth-test",
                "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "lth-test",
                "GIT_COMMITTER_EMAIL": "test@example.com",
                "CI": "true",
            }
        )
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def run(self, *cmd: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def lth(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "lth.cli", *args, **kw)

    def dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, **kw)

    def set_params(self, values: dict) -> None:
        set_params(self.root / "params.yaml", values)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def make_project(dest: Path, params: dict | None = None) -> Project:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    project = Project(dest)
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    project.dvc("config", "core.analytics", "false")
    shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")
    project.set_params({**TINY, **(params or {})})
    project.lth("pipeline")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "init")
    return project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return make_project(tmp_path / "project")
