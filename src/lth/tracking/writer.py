"""The one MLflow writer: a finished trial is logged from its DVC outputs, and only from them.

The train stage calls `log_trial` after writing a trial's outputs, and `lth sync-mlflow` calls it for
what MLflow lacks, so a run logged live and the same run replayed later are identical.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

from lth.core import pruning
from lth.core.hparams import Hparams, flatten
from lth.core.registry import build_model
from lth.lottery.layout import load_mask, read_curve, read_metrics, read_run_info
from lth.tracking.store import TAG_HASH, TAG_ROUND_HASH, Tracker, retry, warn


class MaskMismatch(ValueError):
    """mask.pt is not the mask that metrics.json records."""


def log_trial(tracker: Tracker, hp: Hparams, directory: Path) -> str:
    """Log the trained network in `directory` as one MLflow run: params, hash tags, summary metrics, wall
    time by phase, the learning curve, the packed mask and the final weights. Returns the run id."""
    from mlflow.entities import Metric, Param

    m = read_metrics(directory)
    mask = load_mask(build_model(hp), directory / "mask.pt")
    if pruning.mask_hash(mask) != m.get("mask_md5"):
        raise MaskMismatch(
            f"{directory / 'mask.pt'} does not match the mask_md5 in {directory / 'metrics.json'}; "
            "run `dvc repro` (it restores or re-runs the stage), then `lth sync-mlflow`."
        )
    kind, round_index, trial = m["kind"], m["round"], m["trial"]
    name = f"{kind}-round{round_index:02d}-trial{trial}"
    run_info = read_run_info(directory)
    tags = {
        TAG_HASH: hp.hash,
        TAG_ROUND_HASH: hp.round_hash(round_index, trial, kind),
        "lth.round": str(round_index),
        "lth.kind": kind,
        "lth.trial": str(trial),
        "mlflow.runName": name,
        **{f"lth.env.{k}": str(v) for k, v in run_info.get("environment", {}).items()},
    }
    client = tracker.client
    run_id = retry(lambda: client.create_run(tracker.experiment_id(hp), tags=tags, run_name=name)).info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in flatten(hp.to_dict()).items()]
    seconds = run_info.get("seconds", {})
    summary = {**m, **{f"seconds_{k}": v for k, v in seconds.items()}}
    items = [
        Metric(k, float(v), now, 0)
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))
    ]
    for row in read_curve(directory / "curve.csv"):
        items += [
            Metric(f"curve_{k}", v, now, int(row["iteration"]))
            for k, v in row.items()
            if k != "iteration" and not math.isnan(v)
        ]
    for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
        retry(lambda i=i: client.log_batch(run_id, params=params[i : i + 100]))
    for i in range(0, len(items), 1000):
        retry(lambda i=i: client.log_batch(run_id, metrics=items[i : i + 1000]))
    with tempfile.TemporaryDirectory() as tmp:
        packed = Path(tmp) / "mask.npz"
        packed.write_bytes(pruning.pack(mask))
        client.log_artifact(run_id, str(packed))
    client.log_artifact(run_id, str(directory / "final.pt"))
    retry(lambda: client.set_terminated(run_id, "FINISHED"))
    return run_id


def log_finished(hp: Hparams, directories: list[Path], uri: str | None = None) -> None:
    """What a train stage logs after writing its outputs. MLflow failing never fails the stage: the outputs
    are the record, and `lth sync-mlflow` replays what is missing."""
    try:
        tracker = Tracker(uri)
    except Exception as e:  # MLflow's errors (server down, store locked) have many types
        warn(
            f"MLflow is unavailable ({e}); results are in {', '.join(map(str, directories))}. "
            "Replay the logging later with `lth sync-mlflow`."
        )
        return
    for directory in directories:
        try:
            log_trial(tracker, hp, directory)
        except Exception as e:  # report any failure, never fail the stage
            warn(
                f"MLflow logging of {directory} failed ({type(e).__name__}: {e}); the results are safe there. "
                "Replay with `lth sync-mlflow`."
            )
