"""MLflow logging of trained rounds.

The store defaults to `sqlite:///<repo root>/mlflow.db` with artifacts in `<repo root>/mlartifacts`,
where the repo root is the real one even inside `dvc exp run` workspaces (.dvc/tmp/exps/...).
Set MLFLOW_TRACKING_URI to share one server across clones. Logging failures never lose results:
the DVC outputs are written first, and `lth sync-mlflow` replays what MLflow lacks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lth.hparams import Hparams, flatten

TAG_HASH = "lth.hash"  # experiment identity: MD5 of the canonical hyperparameters
TAG_ROUND_HASH = "lth.round_hash"  # identity of one trained network (experiment, round, trial, kind)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}  # a user's own settings win


def repo_root(start: Path | None = None) -> Path:
    """The project root; inside a DVC experiment workspace (.dvc/tmp/exps/...), the original one."""
    start = (start or Path.cwd()).resolve()
    parts = start.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for p in (start, *start.parents):
        if (p / ".dvc").is_dir() or (p / "dvc.yaml").exists():
            return p
    return start


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def experiment_name(hp: Hparams) -> str:
    return f"lth/{hp.short_name}"


def _retry(fn, attempts: int = 8):  # noqa: ANN001, ANN202
    """sqlite stores raise 'database is locked' under concurrent writers: back off and retry."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # mlflow wraps sqlite errors in several exception types
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** i)
    return None


class Tracker:
    """One MLflow client per process (importing mlflow and opening the store is paid once)."""

    def __init__(self, uri: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        if self.uri.startswith(("http:", "https:")):
            # MLflow's defaults (7 retries, exponential backoff, 120 s timeout) hang a stage for minutes when
            # the server is down; fail within seconds instead (results are on disk; `lth sync-mlflow` replays).
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        mlflow.set_tracking_uri(self.uri)
        if self.uri.startswith("sqlite:///"):
            # Opening a new sqlite store creates and migrates its tables; parallel stages (`dvc queue start
            # -j 2`) would race to do it ("table ... already exists", "duplicate column"): one at a time.
            from filelock import FileLock

            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(db.with_name(f".{db.name}.lock"))):
                self.client = _retry(lambda: MlflowClient(self.uri))
        else:
            self.client = MlflowClient(self.uri)

    def experiment_id(self, hp: Hparams) -> str:
        name = experiment_name(hp)
        exp = _retry(lambda: self.client.get_experiment_by_name(name))
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:"):
            artifacts = (repo_root() / "mlartifacts").as_uri()
        try:
            return _retry(lambda: self.client.create_experiment(
                name, artifact_location=artifacts, tags={TAG_HASH: hp.hash, "lth.model": hp.model.name}))
        except Exception:  # created by a concurrent process in between
            exp = _retry(lambda: self.client.get_experiment_by_name(name))
            if exp is None:
                raise
            return exp.experiment_id

    def logged_round_hashes(self, hp: Hparams) -> set[str]:
        exp = self.client.get_experiment_by_name(experiment_name(hp))
        if exp is None:
            return set()
        runs = self.client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=50000)
        return {r.data.tags.get(TAG_ROUND_HASH) for r in runs}

    def log_round(self, hp: Hparams, round_index: int, kind: str, trial: int, metrics: dict[str, float],
                  curve: list[dict[str, float]], mask_bytes: bytes, weights_path: Path,
                  seconds: dict[str, float] | None = None) -> str:
        """Log one trained network as one run: params, hash tags, summary metrics, learning curve,
        packed mask and final weights. Returns the run id."""
        from mlflow.entities import Metric, Param

        exp_id = self.experiment_id(hp)
        tags = {TAG_HASH: hp.hash, TAG_ROUND_HASH: hp.round_hash(round_index, trial, kind),
                "lth.round": str(round_index), "lth.kind": kind, "lth.trial": str(trial),
                "mlflow.runName": f"{kind}-round{round_index:02d}-trial{trial}"}
        run = _retry(lambda: self.client.create_run(exp_id, tags=tags, run_name=tags["mlflow.runName"]))
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                  for k, v in flatten(hp.to_dict()).items()]
        summary = {**metrics, "round": round_index, **{f"seconds_{k}": v for k, v in (seconds or {}).items()}}
        items = [Metric(k, float(v), now, 0) for k, v in summary.items()
                 if isinstance(v, (int, float)) and not math.isnan(float(v))]
        for row in curve:
            step = int(row["iteration"])
            items += [Metric(f"curve_{k}", float(v), now, step) for k, v in row.items()
                      if k != "iteration" and not math.isnan(float(v))]
        _retry(lambda: self.client.log_batch(run_id, params=params[:100]))
        for i in range(100, len(params), 100):
            _retry(lambda i=i: self.client.log_batch(run_id, params=params[i:i + 100]))
        for i in range(0, len(items), 1000):  # MLflow's batch limit is 1000 metrics
            _retry(lambda i=i: self.client.log_batch(run_id, metrics=items[i:i + 1000]))
        with tempfile.TemporaryDirectory() as tmp:
            mask_file = Path(tmp) / "mask.npz"
            mask_file.write_bytes(mask_bytes)
            self.client.log_artifact(run_id, str(mask_file))
        self.client.log_artifact(run_id, str(weights_path))
        _retry(lambda: self.client.set_terminated(run_id, "FINISHED"))
        return run_id

    def find_runs(self, experiment_hash: str) -> list[Any]:
        """Every run (any experiment) tagged with this experiment hash."""
        exps = self.client.search_experiments(filter_string=f"tags.`{TAG_HASH}` = '{experiment_hash}'")
        if not exps:
            return []
        return self.client.search_runs([e.experiment_id for e in exps], max_results=50000,
                                       order_by=["tags.`lth.kind`", "tags.`lth.round`"])


def warn(message: str) -> None:
    print(f"lth: WARNING: {message}", file=sys.stderr, flush=True)
