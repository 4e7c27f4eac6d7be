"""Replay MLflow logging from the DVC outputs (`lth sync-mlflow`).

Rounds write their DVC outputs first and only warn when MLflow fails, so the outputs on disk are the
record. Syncing finds every completed trained network of the current hyperparameters under runs/
(metrics.json + final.pt + mask.pt) whose round hash MLflow lacks, and logs it as the stage would have.
Running it again logs nothing: it is idempotent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lth import pruning
from lth.hparams import Hparams
from lth.imp import load_mask
from lth.registry import build_model
from lth.report import read_curve
from lth.tracking import TAG_ROUND_HASH, Tracker, experiment_name, warn

OUTPUT_FILES = ("metrics.json", "final.pt", "mask.pt", "curve.csv")


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


def _unfinished_runs(tracker: Tracker, hp: Hparams) -> dict[str, list[str]]:
    """round hash -> ids of runs that were never finished (the server went away while logging)."""
    exp = tracker.client.get_experiment_by_name(experiment_name(hp))
    if exp is None:
        return {}
    out: dict[str, list[str]] = {}
    for r in tracker.client.search_runs([exp.experiment_id], "attributes.status != 'FINISHED'", max_results=50000):
        out.setdefault(r.data.tags.get(TAG_ROUND_HASH, ""), []).append(r.info.run_id)
    return out


def sync(hp: Hparams, runs: Path, tracker: Tracker | None = None, echo=print) -> list[str]:  # noqa: ANN001
    """Log every completed trained network of `hp` that MLflow lacks; returns the labels logged."""
    tracker = tracker or Tracker()
    trained, other = completed(runs, hp)
    if other:
        echo(f"lth: skipping {other} trained network(s) under {runs} made with other hyperparameters "
             "(sync them with their params: -S key=value or --params)")
    logged = tracker.logged_round_hashes(hp)
    unfinished = _unfinished_runs(tracker, hp)
    model = build_model(hp)
    done = []
    for t in trained:
        m = t.metrics
        round_hash = hp.round_hash(m["round"], m["trial"], m["kind"])
        if round_hash in logged:
            continue
        mask = load_mask(model, t.path / "mask.pt")
        if pruning.mask_hash(mask) != m["mask_md5"]:
            warn(f"{t.path / 'mask.pt'} does not match the mask_md5 in {t.path / 'metrics.json'}; not logged. "
                 "Run `dvc repro` (it restores or re-runs the stage), then sync again.")
            continue
        for run_id in unfinished.get(round_hash, []):  # half-logged runs would count twice
            tracker.client.delete_run(run_id)
        tracker.log_round(hp, m["round"], m["kind"], m["trial"], m, read_curve(t.path / "curve.csv"),
                          pruning.pack(mask), t.path / "final.pt")
        done.append(t.label)
        echo(f"lth: logged {t.label} ({t.path})")
    echo(f"lth: {len(trained)} trained network(s) of {hp.short_name} on disk, {len(trained) - len(done)} were "
         f"already in MLflow, {len(done)} logged to {tracker.uri}")
    return done
