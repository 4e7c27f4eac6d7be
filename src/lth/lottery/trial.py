"""One trial: train one network of the experiment (a branch, a round, a trial) and write its outputs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lth.core import distributed, pruning
from lth.core.checkpoint import Checkpointer, StopRequest, note
from lth.core.data import Data
from lth.core.environment import numeric_environment
from lth.core.evaluation import ProgressFn
from lth.core.hparams import Hparams
from lth.core.runtime import RuntimeSettings
from lth.core.training import TrainJob, train
from lth.lottery.branches import prepare_network, trial_seed
from lth.lottery.layout import read_metrics, trial_dir, write_outputs

PACKAGE = Path(__file__).resolve().parents[1]  # src/lth
# The library code a trial runs (package-relative): a change re-runs its DVC stage, and a checkpoint saved
# by other code is never resumed, so a fix to the loop cannot mix with results of the old one.
TRAIN_CODE = ("core", "lottery/branches.py", "lottery/layout.py", "lottery/round.py", "lottery/trial.py")


def code_fingerprint() -> str:
    """MD5 of TRAIN_CODE's Python files."""
    paths = [PACKAGE / name for name in TRAIN_CODE]
    files = sorted(f for p in paths for f in ([p] if p.suffix == ".py" else p.rglob("*.py")))
    digest = hashlib.md5()
    for path in files:
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def git_commit() -> str | None:
    """The commit checked out where the trial runs (a DVC experiment's workspace has its own), or None
    outside a git repository: recorded so that MLflow links the run to its code."""
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_checkpointer(settings: RuntimeSettings, identity: str, variant: str = "") -> Checkpointer | None:
    """The periodic checkpoint of the network named `identity` (None when checkpoints are off). Its key holds
    the code fingerprint and `variant` (e.g. a seed): a checkpoint of other code or another variant is never
    resumed."""
    if settings.checkpoint_seconds is None:
        return None
    key = f"{identity}{variant}-code-{code_fingerprint()[:12]}"
    return Checkpointer(settings.checkpoint_dir / f"{identity}.pt", key, settings.checkpoint_seconds)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Trial:
    """Which network: the experiment, the branch (`ticket` or a control), the round and the trial."""

    hp: Hparams
    kind: str
    round_index: int
    trial: int
    runs: Path

    @property
    def out(self) -> Path:
        return trial_dir(self.runs, self.kind, self.round_index, self.trial)

    @property
    def round_hash(self) -> str:
        return self.hp.round_hash(self.round_index, self.trial, self.kind)

    @property
    def label(self) -> str:
        return f"{self.kind} round {self.round_index}" + (f" trial {self.trial}" if self.hp.trials > 1 else "")

    def checkpointer(self, settings: RuntimeSettings) -> Checkpointer | None:
        return code_checkpointer(settings, self.round_hash)

    def finished_copy(self, settings: RuntimeSettings) -> Path:
        """Where a finished trial's outputs wait until its whole round is done: DVC deletes a stage's outputs
        before it runs the stage again, so without this copy an interrupted round would retrain them."""
        return settings.checkpoint_dir / f"{self.round_hash}-code-{code_fingerprint()[:12]}.done"


def keep_finished(t: Trial, settings: RuntimeSettings) -> None:
    """Copy the outputs of finished trial `t` beside the checkpoints (atomically: copy, then rename)."""
    if settings.checkpoint_seconds is None:
        return
    copy = t.finished_copy(settings)
    tmp = copy.with_name(copy.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(t.out, tmp)
        tmp.replace(copy)
    except OSError as e:
        note(f"WARNING: cannot keep a copy of {t.label} in {copy.parent} ({e}); an interruption would retrain it")


def restore_finished(t: Trial, settings: RuntimeSettings) -> dict[str, Any] | None:
    """The metrics of trial `t` when an earlier, interrupted run of its round finished it (its outputs put
    back in place), else None. The copy's name carries the code fingerprint, so other code never reuses it."""
    copy = t.finished_copy(settings)
    found = settings.checkpoint_seconds is not None and copy.is_dir()
    distributed.check_same(found, f"whether {copy} exists (the ranks must share the checkpoint directory)")
    if not found:
        return None
    if not distributed.is_writer():
        return read_metrics(copy)
    shutil.rmtree(t.out, ignore_errors=True)
    shutil.copytree(copy, t.out)
    note(f"{t.label} was finished by an interrupted run: its outputs are restored from {copy}")
    return read_metrics(t.out)


def forget_finished(trials: list[Trial], settings: RuntimeSettings) -> None:
    """The round is done: its trials' copies are no longer needed."""
    for t in trials:
        shutil.rmtree(t.finished_copy(settings), ignore_errors=True)


def run_trial(
    t: Trial, data: Data, settings: RuntimeSettings, progress: ProgressFn | None = None, stop: StopRequest | None = None
) -> dict[str, Any]:
    """Train the network of `t` (resuming from its checkpoint) and write its outputs under `t.runs`. Under
    distributed training every rank trains it, and rank 0 writes."""
    if (restored := restore_finished(t, settings)) is not None:
        return restored
    started = now_ms()
    model, mask, start = prepare_network(t.hp, t.runs, t.round_index, t.kind, t.trial)
    distributed.check_same(pruning.mask_hash(mask), f"the mask of {t.label} (its MD5)")
    model.to(settings.device)
    rewind_at = t.hp.pruning.rewind_iteration if (t.round_index == 0 and t.kind == "ticket") else None
    job = TrainJob(t.hp.training, trial_seed(t.hp, t.trial), mask, start, rewind_at, settings.sparse, t.label)
    checkpointer = t.checkpointer(settings)
    result = train(model, data, job, checkpointer, progress, stop)
    kept, total = pruning.density(mask)
    metrics = {
        "round": t.round_index,
        "trial": t.trial,
        "kind": t.kind,
        **result.metrics,
        "percent_remaining": 100.0 * kept / total,
        "weights_remaining": kept,
        "weights_total": total,
        "mask_md5": pruning.mask_hash(mask),
        "hash": t.hp.hash,
    }
    run_info = {
        "seconds": result.seconds,
        "environment": {**numeric_environment(settings.device, result.engine), **distributed.environment()},
        "start_ms": started,  # wall clock (epoch ms): MLflow's run spans the training
        "end_ms": now_ms(),
        **({"git_commit": commit} if (commit := git_commit()) else {}),
    }
    if distributed.is_writer():
        write_outputs(t.out, metrics, result.state, mask, result.curve, result.rewind_state, run_info)
        keep_finished(t, settings)
        if checkpointer is not None:
            checkpointer.remove()
    return metrics
