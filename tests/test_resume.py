"""Interrupted runs resume: SIGKILL, SIGTERM and Ctrl-C partway through a round, then the same command again
gives outputs identical to an uninterrupted run, without re-running finished rounds."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lth.core import config
from lth.core.checkpoint import Checkpointer
from lth.core.hparams import Hparams
from lth.core.runtime import RuntimeSettings
from lth.lottery.layout import trial_dir
from lth.lottery.trial import Trial
from tests.helpers import Project


def assert_same_outputs(a: Path, b: Path) -> None:
    for name in ("metrics.json", "curve.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("final.pt", "mask.pt"):
        ta, tb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def wait_for(path: Path, proc: subprocess.Popen, newer_than: float = 0.0, timeout: float = 300) -> None:
    """Poll until `path` exists (modified after `newer_than`); fail if the process ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.stat().st_mtime > newer_than:
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended ({proc.returncode}) before {path} was written:\n{out}")
        time.sleep(0.01)
    raise AssertionError(f"{path} not written within {timeout} s")


# ------------------------------------------------------------------------- SIGTERM and Ctrl-C (fast, XOR)


@pytest.fixture
def xor_workdir(workdir: Callable[..., Project], xor_params) -> Callable[[str], Project]:
    """Factory: the stage scripts and library with a 400-iteration XOR params.yaml that checkpoints at every
    evaluation (no git/DVC needed to run a stage)."""
    params = xor_params({"training.iterations": 400, "training.eval_every": 10, "runtime.checkpoint_seconds": 0})
    return lambda name: workdir(params, name)


def checkpointer(p: Project, hp: Hparams, round_index: int) -> Checkpointer:
    """The checkpoint the stage of ticket round `round_index` (trial 0) writes in project `p`."""
    settings = RuntimeSettings(torch.device("cpu"), checkpoint_dir=p.root / "ckpt")
    return Trial(hp, "ticket", round_index, 0, p.root / "runs").checkpointer(settings)


def stage(p: Project, *args: str) -> subprocess.Popen:
    """Start a stage script in `p`, its output and errors in one pipe."""
    return subprocess.Popen(
        [sys.executable, *args], cwd=p.root, env=p.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.slow  # over a minute on 2 cores: run with -m slow
def test_sigint_and_sigterm_save_a_checkpoint_and_the_round_resumes_bit_identical(
    xor_workdir: Callable[[str], Project],
) -> None:
    a = xor_workdir("a")
    for args in (("stages/prepare.py",), ("stages/train_round.py", "--round", "0")):
        rc, out = finish(stage(a, *args))
        assert rc == 0, out
    b = xor_workdir("b")  # the uninterrupted reference, from the same round 0
    shutil.copytree(a.root / "data", b.root / "data")
    shutil.copytree(a.root / "runs", b.root / "runs")
    hp = config.load(a.root / "params.yaml")
    ckpt = checkpointer(a, hp, 1).path
    assert ckpt == a.root / "ckpt" / f"{hp.round_hash(1, 0, 'ticket')}.pt"

    # Ctrl-C: the round saves a checkpoint at the next iteration and exits.
    proc = stage(a, "stages/train_round.py", "--round", "1")
    wait_for(ckpt, proc)
    proc.send_signal(signal.SIGINT)
    rc, out = finish(proc)
    assert rc == 128 + signal.SIGINT, out
    first = torch.load(ckpt, weights_only=True)
    assert f"ticket round 1 interrupted (signal {int(signal.SIGINT)}) at iteration {first['iteration']}" in out
    assert 0 < first["iteration"] < 400 and first["key"] == checkpointer(a, hp, 1).key
    assert "Traceback" not in out
    assert not (trial_dir(a.root / "runs", "ticket", 1, 0) / "metrics.json").exists()

    # Resume, then SIGTERM once it has made progress (a newer periodic checkpoint).
    mtime = ckpt.stat().st_mtime
    proc = stage(a, "stages/train_round.py", "--round", "1")
    wait_for(ckpt, proc, newer_than=mtime)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 128 + signal.SIGTERM, out
    assert f"resuming ticket round 1 from iteration {first['iteration']} " in out
    second = torch.load(ckpt, weights_only=True)
    assert second["iteration"] > first["iteration"]
    assert f"interrupted (signal {int(signal.SIGTERM)}) at iteration {second['iteration']}" in out

    rc, out = finish(stage(a, "stages/train_round.py", "--round", "1"))
    assert rc == 0, out
    assert f"resuming ticket round 1 from iteration {second['iteration']} " in out
    assert not ckpt.exists(), "a finished round deletes its checkpoint"

    rc, out = finish(stage(b, "stages/train_round.py", "--round", "1"))
    assert rc == 0 and "resuming" not in out, out
    assert_same_outputs(trial_dir(a.root / "runs", "ticket", 1, 0), trial_dir(b.root / "runs", "ticket", 1, 0))


@pytest.mark.parametrize("saved_by", ["other hyperparameters", "other code"])
def test_checkpoint_of_other_hyperparameters_or_code_is_never_used(
    xor_workdir: Callable[[str], Project], saved_by: str
) -> None:
    """A checkpoint saved under another round hash (copied or renamed into place), or by another version of
    the training code, is ignored with a message."""
    a = xor_workdir("a")
    rc, out = finish(stage(a, "stages/prepare.py"))
    assert rc == 0, out
    hp = config.load(a.root / "params.yaml")
    ckpt = checkpointer(a, hp, 0).path
    proc = stage(a, "stages/train_round.py", "--round", "0")
    wait_for(ckpt, proc)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 128 + signal.SIGTERM
    state = torch.load(ckpt, weights_only=True)
    assert state["key"] == checkpointer(a, hp, 0).key
    # Same file name, but saved by a run with another learning rate, or by an older training loop.
    other = config.load(a.root / "params.yaml", ["training.lr=0.5"])
    foreign = (
        checkpointer(a, other, 0).key
        if saved_by == "other hyperparameters"
        else f"{hp.round_hash(0, 0, 'ticket')}-code-000000000000"
    )
    assert foreign != state["key"]
    state["key"] = foreign
    torch.save(state, ckpt)
    rc, out = finish(stage(a, "stages/train_round.py", "--round", "0"))
    assert rc == 0, out
    assert "ignoring checkpoint" in out and foreign in out
    assert "resuming" not in out


# --------------------------------------------------------------------- SIGKILL of `dvc repro` (MNIST)


@pytest.mark.slow
@pytest.mark.mnist
def test_killed_dvc_repro_resumes_the_round_and_matches_an_uninterrupted_run(
    make_project: Callable[..., Project], lenet_params
) -> None:
    tiny = lenet_params(
        {
            "pruning.rounds": 1,
            "training.iterations": 400,
            "training.eval_every": 20,
            "training.test_every": 100,
            "runtime.threads": 1,
            "runtime.checkpoint_seconds": 0,
        }
    )
    p = make_project(tiny, "killed")
    hp = config.load(p.root / "params.yaml")
    ckpt = p.root / ".lth" / "checkpoints" / f"{hp.round_hash(1, 0, 'ticket')}.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=p.root,
        env=p.env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(ckpt, proc, timeout=600)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage it runs: nothing gets to clean up
    proc.communicate()
    killed_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 0 < killed_at < 400
    round0 = trial_dir(p.root / "runs", "ticket", 0, 0)
    assert not (trial_dir(p.root / "runs", "ticket", 1, 0) / "metrics.json").exists()
    round0_mtime = (round0 / "final.pt").stat().st_mtime_ns

    r = p.dvc("repro")
    out = r.stdout + r.stderr
    assert "Running stage 'ticket_round_00'" not in out and "Running stage 'prepare'" not in out, out
    assert re.search(rf"resuming ticket round 1 from iteration {killed_at} ", out), out
    assert (round0 / "final.pt").stat().st_mtime_ns == round0_mtime
    assert not ckpt.exists()

    ref = make_project(tiny, "uninterrupted")
    ref.dvc("repro")
    for k in (0, 1):
        assert_same_outputs(trial_dir(p.root / "runs", "ticket", k, 0), trial_dir(ref.root / "runs", "ticket", k, 0))
    # The run-cache still works for finished stages: nothing left to do.
    assert "Running stage" not in p.dvc("repro").stdout
