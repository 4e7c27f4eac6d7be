"""One round of the experiment: every trial of one branch at one IMP round, as its DVC stage runs it.

With several trials, worker processes train them in parallel, each with its share of the cores; every
trial's results are the same as when trained alone. Under distributed training (lth.core.distributed) the
group of processes trains the trials one after another, each trial by all of them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lth.core import distributed
from lth.core.checkpoint import StopRequest
from lth.core.data import load_prepared, prepared_path
from lth.core.environment import make_deterministic
from lth.core.hparams import Hparams
from lth.core.runtime import RuntimeSettings
from lth.lottery.layout import read_metrics
from lth.lottery.progress import RoundProgress
from lth.lottery.trial import Trial, forget_finished, run_trial


class TrialsFailed(RuntimeError):
    """A worker process failed; finished trials are kept."""


@dataclass(frozen=True)
class Round:
    """Which round: the experiment, the branch (`ticket` or a control), the round, and where its inputs
    (prepared data, earlier rounds) and outputs live."""

    hp: Hparams
    kind: str
    round_index: int
    runs: Path
    data_dir: Path

    def trial(self, trial: int) -> Trial:
        return Trial(self.hp, self.kind, self.round_index, trial, self.runs)


def run_round(job: Round, settings: RuntimeSettings, trials: list[int] | None = None) -> list[dict[str, Any]]:
    """Train every trial of one round (or only `trials`) and write their outputs. Ctrl-C or SIGTERM saves a
    checkpoint and raises `Stopped`; running the round again resumes it."""

    trials = list(range(job.hp.trials)) if trials is None else trials
    workers = settings.workers_for(len(trials))
    done = _run_in_workers(job, settings, trials, workers) if workers > 1 else _run_here(job, settings, trials)
    if distributed.is_writer():
        forget_finished([job.trial(t) for t in trials], settings)
    return done


def _run_here(job: Round, settings: RuntimeSettings, trials: list[int]) -> list[dict[str, Any]]:
    """Train `trials` one after another in this process."""
    import torch

    hp, kind, round_index = job.hp, job.kind, job.round_index
    torch.set_num_threads(settings.threads_for(hp.model.name, 1))
    if settings.deterministic:
        make_deterministic()
    data = load_prepared(prepared_path(job.data_dir, hp.dataset), hp.dataset).to(settings.device)
    done = []
    with StopRequest() as stop:
        for i, trial in enumerate(trials):
            t = job.trial(trial)
            start = time.perf_counter()
            with RoundProgress(
                t.label, hp.training.iterations, quiet=settings.quiet, round_index=round_index, rounds=hp.pruning.rounds
            ) as bar:
                metrics = run_trial(t, data, settings, bar.update, stop)
            if distributed.is_writer():
                _report(t, metrics, time.perf_counter() - start)
            done.append(metrics)
            if distributed.agree_stop(stop) and i + 1 < len(trials):  # the signal came after training ended
                stop.stop(f"{kind} round {round_index} interrupted after trial {trial}; run it again to resume")
    return done


def _report(t: Trial, metrics: dict[str, Any], seconds: float) -> None:
    print(
        f"lth: {t.label}: {metrics['percent_remaining']:.2f}% remaining, test accuracy "
        f"{metrics['test_accuracy_at_early_stop']:.4f} at early stop (iteration {metrics['early_stop_iteration']}), "
        f"{metrics['test_accuracy_final']:.4f} at the end [{seconds:.0f} s]",
        file=sys.stderr,
        flush=True,
    )


def _run_in_workers(job: Round, settings: RuntimeSettings, trials: list[int], workers: int) -> list[dict[str, Any]]:
    """Trials split round-robin over `workers` spawned processes, each a `run_round` of its share. Workers
    sit in their own process group, so a Ctrl-C reaches them once, forwarded from here: each saves its
    checkpoint and stops, and running the round again resumes every trial."""
    share = replace(settings, workers=1, threads=settings.threads_for(job.hp.model.name, workers))
    ctx = multiprocessing.get_context("spawn")  # fork after OpenMP has started can hang the child
    procs = [
        ctx.Process(
            target=_worker,
            name=f"lth-trials-{w}",
            args=(job, share, trials[w::workers]),
        )
        for w in range(workers)
    ]
    with StopRequest() as stop:
        for proc in procs:
            proc.start()
        forwarded = False
        while any(proc.is_alive() for proc in procs):
            if stop.signum is not None and not forwarded:
                for proc in procs:
                    if proc.is_alive():
                        os.kill(proc.pid, stop.signum)
                forwarded = True
            for proc in procs:
                proc.join(timeout=0.1)
        if stop.signum is not None:
            stop.stop(f"{job.kind} round {job.round_index} interrupted; run it again to resume every trial")
    failed = [f"{proc.name} (exit code {proc.exitcode})" for proc in procs if proc.exitcode != 0]
    if failed:
        raise TrialsFailed(
            f"{job.kind} round {job.round_index}: trial worker {', '.join(failed)} failed; its error is "
            "printed above. Finished trials are kept: fix the cause and run the round again."
        )
    return [read_metrics(job.trial(t).out) for t in trials]


def _worker(job: Round, settings: RuntimeSettings, trials: list[int]) -> None:
    os.setpgrp()  # terminal signals go to the parent, which forwards them once
    if sys.platform.startswith("linux"):  # if the parent dies, SIGTERM: checkpoint and stop, not an orphan
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    os.environ["CI"] = "1"  # progress as lines: several live bars on one terminal would overwrite each other
    from lth.core.checkpoint import Stopped

    try:
        run_round(job, settings, trials)
    except Stopped as e:
        print(f"lth: {e}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except (ValueError, OSError, RuntimeError) as e:  # bad inputs: one line, the parent reports the worker
        print(f"lth: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
