"""Replay MLflow logging from the DVC outputs (`lth sync-mlflow`).

Rounds write their DVC outputs first and only warn when MLflow fails, so the outputs on disk are the
record. Syncing finds every completed trained network of the current hyperparameters under runs/
(metrics.json + final.pt + mask.pt) whose round hash MLflow lacks, and logs it as the stage would have,
nested under its trajectory's parent; then the evaluate stage's results/ (when they are this
experiment's) as the parents' artifacts. Running it again logs nothing: it is idempotent. It is also how
a collaborator's store catches up after `dvc pull`: the same runs, from the same outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lth.core.hparams import Hparams
from lth.lottery.layout import OUTPUT_FILES
from lth.pipeline.workspace import RESULTS_DIR
from lth.tracking.store import Tracker, warn
from lth.tracking.writer import MaskMismatch, log_missing_instability, log_results, log_trial


@dataclass
class Trained:
    """One completed trained network on disk."""

    path: Path
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.metrics['kind']} round {self.metrics['round']} trial {self.metrics['trial']}"


def completed(runs: Path, hp: Hparams) -> tuple[list[Trained], int]:
    """Trained networks of `hp` under `runs` with every output file, and how many belong to other params."""
    found, other = [], 0
    for f in sorted(Path(runs).glob("*/round_*/trial_*/metrics.json")):
        if not all((f.parent / name).exists() for name in OUTPUT_FILES):
            continue  # an interrupted stage: DVC re-runs it, and the stage logs it then
        metrics = json.loads(f.read_text())
        if metrics.get("hash") != hp.hash:
            other += 1
            continue
        found.append(Trained(f.parent, metrics))
    return found, other


def sync(hp: Hparams, runs: Path, tracker: Tracker | None = None, echo: Callable[[str], None] = print) -> list[str]:
    """Log every completed trained network of `hp` that MLflow lacks; returns the labels logged."""
    tracker = tracker or Tracker()
    trained, other = completed(runs, hp)
    if other:
        echo(
            f"lth: skipping {other} trained network(s) under {runs} made with other hyperparameters "
            "(sync them with their params: -S key=value or --params)"
        )
    logged = tracker.logged_round_hashes(hp)
    unfinished = tracker.unfinished_runs(hp)
    done, skipped = [], []
    for t in trained:
        m = t.metrics
        round_hash = hp.round_hash(m["round"], m["trial"], m["kind"])
        if round_hash in logged:
            continue
        for run_id in unfinished.get(round_hash, []):  # half-logged runs would count twice
            tracker.client.delete_run(run_id)
        try:
            log_trial(tracker, hp, t.path)
        except MaskMismatch as e:
            warn(f"{e} Not logged.")
            skipped.append(t.label)
            continue
        done.append(t.label)
        echo(f"lth: logged {t.label} ({t.path})")
    for directory in log_missing_instability(tracker, hp, runs):  # the instability stages' runs
        echo(f"lth: logged the instability analysis in {directory}")
    already = len(trained) - len(done) - len(skipped)
    echo(
        f"lth: {len(trained)} trained network(s) of {hp.short_name} on disk, {already} were already in MLflow, "
        f"{len(done)} logged to {tracker.uri}" + (f", {len(skipped)} skipped (see above)" if skipped else "")
    )
    sync_results(tracker, hp, Path(runs).parent / RESULTS_DIR, bool(done), echo)
    if skipped:
        raise SyncIncomplete(f"{len(skipped)} trained network(s) not logged: {', '.join(skipped)}")
    return done


def sync_results(tracker: Tracker, hp: Hparams, results: Path, logged: bool, echo: Callable[[str], None]) -> None:
    """Log results/ to the trajectories' parents when runs were just logged or a parent lacks them, and only
    when they are this experiment's (its report names the hash)."""
    report = results / "report.html"
    if not report.exists() or hp.hash not in report.read_text(errors="replace"):
        return
    parents = tracker.find_trajectories(hp.hash)
    if logged or any(not tracker.client.list_artifacts(p.info.run_id, "results") for p in parents):
        count = log_results(tracker, hp, results)
        echo(f"lth: logged {results}/ (report, figures, metrics) to {count} trajectory run(s)")


class SyncIncomplete(RuntimeError):
    """Some trained networks could not be logged (their outputs disagree); the others were."""
