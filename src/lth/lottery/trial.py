"""One trial: train one network of the experiment (a branch, a round, a trial) and write its outputs."""

from __future__ import annotations

import hashlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lth.core import pruning
from lth.core.checkpoint import Checkpointer, StopRequest
from lth.core.data import Data
from lth.core.environment import numeric_environment
from lth.core.evaluation import ProgressFn
from lth.core.hparams import Hparams
from lth.core.runtime import RuntimeSettings
from lth.core.training import TrainJob, train
from lth.lottery.branches import prepare_network, trial_seed
from lth.lottery.layout import trial_dir, write_outputs

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
        if settings.checkpoint_seconds is None:
            return None
        key = f"{self.round_hash}-code-{code_fingerprint()[:12]}"
        return Checkpointer(settings.checkpoint_dir / f"{self.round_hash}.pt", key, settings.checkpoint_seconds)


def run_trial(
    t: Trial, data: Data, settings: RuntimeSettings, progress: ProgressFn | None = None, stop: StopRequest | None = None
) -> dict[str, Any]:
    """Train the network of `t` (resuming from its checkpoint) and write its outputs under `t.runs`."""
    started = now_ms()
    model, mask, start = prepare_network(t.hp, t.runs, t.round_index, t.kind, t.trial)
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
        "environment": numeric_environment(settings.device, result.engine),
        "start_ms": started,  # wall clock (epoch ms): MLflow's run spans the training
        "end_ms": now_ms(),
        **({"git_commit": commit} if (commit := git_commit()) else {}),
    }
    write_outputs(t.out, metrics, result.state, mask, result.curve, result.rewind_state, run_info)
    if checkpointer is not None:
        checkpointer.remove()
    return metrics
