"""Shared fixtures. Every test that needs a project gets its own, built by a factory from the FIXED test params
defined here (never from the workspace's params.yaml): a real git + DVC repo in a temp dir whose stages run
in subprocesses, with the library copied in.

The params: `LENET_TINY` (LeNet-300-100 on MNIST, 300 iterations, rounds 0-2) and `XOR_TINY` (the 2-4-1 XOR
network, 200 iterations, rounds 0-1), complete documents, with changes by dotted key through the `lenet_params`
and `xor_params` fixtures. Tests marked `mnist` are skipped without an MNIST copy (set LTH_DATA_DIR)."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import shutil
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lth.core import pruning
from lth.core.data import Data, load_prepared, prepare, prepared_path
from lth.core.hparams import DatasetHparams, Hparams
from lth.lottery.branches import init_model
from tests.helpers import ROOT, Project, with_changes

SHARED_DATA = ROOT.parent / "shared" / "data"
if "LTH_DATA_DIR" not in os.environ and SHARED_DATA.exists():
    os.environ["LTH_DATA_DIR"] = str(SHARED_DATA)


def _import_cli_keeping_the_environment() -> None:
    """Importing lth.cli pins the numeric kernels of its process in os.environ (lth.pipeline.numerics.pin:
    LTH_NUMERICS, ATEN_CPU_CAPABILITY, ...), for the `lth` command. Tests import it in-process (click's
    CliRunner); imported once here with the environment restored, it changes nothing that the stage and
    `lth` processes the tests start would inherit: they pin themselves, from their own params."""
    saved = dict(os.environ)
    importlib.import_module("lth.cli")
    os.environ.clear()
    os.environ.update(saved)


_import_cli_keeping_the_environment()

RUNTIME = {"device": "auto", "threads": 0, "workers": 0, "checkpoint_seconds": 60, "sparse": "auto"}

# LeNet-300-100 on MNIST with the paper's hyperparameters, but 300 iterations and 2 pruning rounds: the real
# pipeline at a small scale.
LENET_TINY: dict[str, Any] = {
    "dataset": {"name": "mnist", "validation_size": 5000, "split_seed": 0, "augment": False},
    "model": {"name": "lenet_300_100", "dropout": 0.0, "hidden": 4},
    "training": {
        "optimizer": "adam",
        "lr": 0.0012,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "batch_size": 60,
        "iterations": 300,
        "warmup_iterations": 0,
        "lr_milestones": [],
        "lr_gamma": 0.1,
        "eval_every": 100,
        "test_every": 100,
        "seed": 0,
    },
    "pruning": {
        "strategy": "layerwise",
        "schedule": "iterative",
        "conv_rate": 0.1,
        "fc_rate": 0.2,
        "output_rate": 0.1,
        "exclude": [],
        "rewind_iteration": 0,
        "rounds": 2,
    },
    "controls": {"random_reinit": False, "random_pruning": False},
    "trials": 1,
    "runtime": RUNTIME,
}

# The 2-4-1 XOR network on generated points: seconds per stage, no dataset needed. One thread (a fully
# connected network trains fastest on one, and bit-identity checks need a fixed count).
XOR_TINY: dict[str, Any] = with_changes(
    LENET_TINY,
    {
        "dataset.name": "xor",
        "dataset.validation_size": 1000,
        "model.name": "xor",
        "training.iterations": 200,
        "training.eval_every": 50,
        "training.test_every": 100,
        "pruning.rounds": 1,
        "runtime.threads": 1,
    },
)

ParamsFn = Callable[..., dict[str, Any]]


def have_mnist() -> bool:
    root = Path(os.environ.get("LTH_DATA_DIR", "data/raw"))
    return (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists() or (
        root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    ).exists()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mnist: needs an MNIST copy (LTH_DATA_DIR); skipped without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if have_mnist():
        return
    skip = pytest.mark.skip(reason="no MNIST copy (set LTH_DATA_DIR)")
    for item in items:
        if "mnist" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """In-process training runs on one thread: on a shared 2-core machine, two threads fighting for the
    cores are several times slower, and bit-identity checks need a fixed thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ params


@pytest.fixture
def lenet_params() -> ParamsFn:
    """LENET_TINY with changes by dotted key: lenet_params({"pruning.rounds": 1})."""
    return lambda changes=None: with_changes(LENET_TINY, changes)


@pytest.fixture
def xor_params() -> ParamsFn:
    """XOR_TINY with changes by dotted key: xor_params({"training.iterations": 400})."""
    return lambda changes=None: with_changes(XOR_TINY, changes)


@pytest.fixture
def preset_params() -> ParamsFn:
    """presets/NAME.yaml (a complete params document, runtime section included) with changes by dotted key."""

    def make(name: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
        return with_changes(yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text()), changes)

    return make


# ---------------------------------------------------------------------------------------------- projects


def copy_code(dest: Path) -> None:
    """The stage scripts and the library, as a project checkout has them."""
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))


def write_params(path: Path, params: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def create_project(dest: Path, params: dict[str, Any]) -> Project:
    """A git + DVC repo at `dest` with the stages, the library, `params` as params.yaml and the rendered
    dvc.yaml, all committed."""
    dest.mkdir(parents=True)
    copy_code(dest)
    for name in (".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    write_params(dest / "params.yaml", params)
    project = Project(dest)
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    project.dvc("config", "core.analytics", "false")
    shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")
    project.lth("pipeline")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "init")
    return project


def copy_project(source: Path, dest: Path, output: str = "") -> Project:
    """An independent copy of a project: its git repo, DVC cache and run-cache, outputs and MLflow store,
    with the store's artifact locations moved into the copy."""
    shutil.copytree(source, dest, symlinks=True)
    db = dest / "mlflow.db"
    if db.exists():
        old, new = str(source), str(dest)
        with sqlite3.connect(db) as con:
            for (table,) in con.execute("select name from sqlite_master where type = 'table'").fetchall():
                for column in con.execute(f"pragma table_info('{table}')").fetchall():
                    name, kind = column[1], column[2].upper()
                    if "CHAR" in kind or "TEXT" in kind:
                        con.execute(
                            f'update "{table}" set "{name}" = replace("{name}", ?, ?) where instr("{name}", ?) > 0',
                            (old, new, old),
                        )
    return Project(dest, output)


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Project]:
    """Factory: make_project(params) is a new committed git + DVC project (params: a complete document,
    e.g. from the lenet_params or xor_params fixture). Each call makes another one under this test's tmp_path."""
    counter = itertools.count()

    def make(params: dict[str, Any], name: str | None = None) -> Project:
        return create_project(tmp_path / (name or f"project{next(counter)}"), params)

    return make


@pytest.fixture
def project(make_project: Callable[..., Project], lenet_params: ParamsFn) -> Project:
    """A fresh untrained LeNet project (LENET_TINY)."""
    return make_project(lenet_params())


TrainedProjects = Callable[..., Project]
Training = tuple[dict[str, Any], tuple[str, ...]]  # (params, command)


@pytest.fixture(scope="session")
def trained_projects(tmp_path_factory: pytest.TempPathFactory) -> TrainedProjects:
    """Projects trained once per session, by (params, command), optionally in a copy of a project trained
    before (`after`: its (params, command)); only ever copied, never handed out."""
    made: dict[str, Project] = {}

    def get(params: dict[str, Any], command: tuple[str, ...], after: Training | None = None) -> Project:
        key = json.dumps([params, command, after], sort_keys=True)
        if key not in made:
            dest = tmp_path_factory.mktemp("trained") / "project"
            if after is None:
                project = create_project(dest, params)
            else:
                project = copy_project(get(*after).root, dest)
                write_params(dest / "params.yaml", params)
            done = project.python("-m", *command)
            project.output = done.stdout + done.stderr
            made[key] = project
        return made[key]

    return get


@pytest.fixture
def trained_project(trained_projects: TrainedProjects, tmp_path: Path) -> Callable[..., Project]:
    """Factory: trained_project(params, command=("dvc", "repro"), after=None) is this test's own copy of a
    project with `params` after `python -m <command>` ran in it (its output in `.output`); with `after`
    (params, command), in a copy of that trained project. The training runs once per session for each
    (params, command, after); every test gets an independent copy, which it may change freely."""
    counter = itertools.count()

    def make(params: dict[str, Any], command: tuple[str, ...] = ("dvc", "repro"), after: Training | None = None):
        trained = trained_projects(params, command, after)
        return copy_project(trained.root, tmp_path / f"trained{next(counter)}", trained.output)

    return make


@pytest.fixture
def xor_with_reinit(trained_project: Callable[..., Project], xor_params: ParamsFn) -> Callable[[], Project]:
    """Factory: a copy of XOR rounds 0-1 with the random-reinitialization control, trained the way a user adds
    a control: the plain XOR project (`dvc repro`, shared), then `controls.random_reinit: true` and
    `lth run -j 1`, which trains only the control's round (its output in `.output`)."""
    return lambda: trained_project(
        xor_params({"controls.random_reinit": True}), ("lth.cli", "run", "-j", "1"), (xor_params(), ("dvc", "repro"))
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Callable[..., Project]:
    """Factory: workdir(params) is a directory with the stage scripts, the library and params.yaml but no
    git or DVC (the stages run directly), its checkpoints in ./ckpt."""
    counter = itertools.count()

    def make(params: dict[str, Any], name: str | None = None) -> Project:
        dest = tmp_path / (name or f"work{next(counter)}")
        dest.mkdir(parents=True)
        copy_code(dest)
        write_params(dest / "params.yaml", params)
        project = Project(dest)
        project.env["LTH_CHECKPOINT_DIR"] = str(dest / "ckpt")
        return project

    return make


# ------------------------------------------------------------------------------------------ data, networks


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory (DATA_DIR layout) with MNIST prepared by the default split (55K/5K/10K)."""
    if not have_mnist():
        pytest.skip("no MNIST copy (set LTH_DATA_DIR)")
    out = tmp_path_factory.mktemp("prepared")
    prepare(DatasetHparams(), prepared_path(out, DatasetHparams()))
    return out


@pytest.fixture(scope="session")
def mnist_data(mnist_dir: Path) -> Data:
    """MNIST as normalized tensors, loaded once."""
    return load_prepared(prepared_path(mnist_dir, DatasetHparams()), DatasetHparams())


@pytest.fixture
def pruned_network() -> Callable[..., tuple[torch.nn.Module, pruning.Mask]]:
    """Factory: pruned_network(percent=50.0, seed=0) is LeNet-300-100 at its initialization (default
    hyperparameters), magnitude-pruned to `percent` remaining in every layer, with its mask."""

    def make(percent: float = 50.0, seed: int = 0) -> tuple[torch.nn.Module, pruning.Mask]:
        model = init_model(Hparams(), seed)
        params = dict(model.named_parameters())
        kinds = model.layer_kinds()
        mask = pruning.dense_mask(kinds, {n: params[n].shape for n in kinds})
        for n in kinds:
            mask.update(pruning.keep_top({n: params[n].abs()}, mask, [n], round(params[n].numel() * percent / 100)))
        pruning.apply_mask(model, mask)
        return model, mask

    return make


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
