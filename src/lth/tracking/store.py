"""The MLflow store: where it is, one client per process, experiments by hash, reading runs back.

The store defaults to `sqlite:///<repo root>/mlflow.db` with artifacts in `<repo root>/mlartifacts`,
where the repo root is the real one even inside `dvc exp run` workspaces (.dvc/tmp/exps/...).
Set MLFLOW_TRACKING_URI to share one server across clones. Logging failures never lose results:
the DVC outputs are written first, and `lth sync-mlflow` replays what MLflow lacks.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lth.core.hparams import Hparams
from lth.pipeline.workspace import repo_root

T = TypeVar("T")

TAG_HASH = "lth.hash"  # experiment identity: MD5 of the canonical hyperparameters
TAG_ROUND_HASH = "lth.round_hash"  # identity of one trained network (experiment, round, trial, kind)
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}  # a user's own settings win


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or read; the message (one line) names the store and the fix."""


def describe(e: BaseException, limit: int = 300) -> str:
    """An exception on one line, shortened: MLflow's messages nest the whole HTTP error chain."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure(uri: str, e: BaseException) -> TrackingError:
    """The error of a failed MLflow call, naming the store and what to do."""
    if isinstance(e, TrackingError):
        return e
    fix = (
        "start the server, or point MLFLOW_TRACKING_URI at a running one (unset it to use the project's mlflow.db)"
        if uri.startswith(("http:", "https:"))
        else "check that no other process holds the store; if it is corrupt, move it aside and run `lth sync-mlflow` "
        "(it logs every trained network again from runs/)"
    )
    return TrackingError(f"MLflow at {uri} failed ({describe(e)}): {fix}.")


def probe(uri: str, timeout: float = 3.0) -> None:
    """For a tracking server, fail within seconds when nothing listens (MLflow's client retries first)."""
    parts = urllib.parse.urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "localhost", port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise TrackingError(
            f"MLflow at {uri} failed: the tracking server is unreachable ({describe(e)}): start it, or point "
            "MLFLOW_TRACKING_URI at a running one (unset it to use the project's mlflow.db)."
        ) from None


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def experiment_name(hp: Hparams) -> str:
    return f"lth/{hp.short_name}"


def retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """sqlite stores raise 'database is locked' under concurrent writers: back off and retry."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # mlflow wraps sqlite errors in several exception types
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
    return None


class Tracker:
    """One MLflow client per process (importing mlflow and opening the store is paid once)."""

    def __init__(self, uri: str | None = None, check: bool = False):
        """`check`: probe a tracking server first, raising TrackingError within seconds when it is down (for
        commands that need MLflow; the train stage's writer instead warns per trained network)."""
        self.uri = uri or tracking_uri()
        if self.uri.startswith(("http:", "https:")):
            # MLflow's defaults (7 retries, exponential backoff, 120 s timeout) hang a stage for minutes when
            # the server is down; fail within seconds instead (results are on disk; `lth sync-mlflow` replays).
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            if check:
                probe(self.uri)  # before importing mlflow (seconds): a server that is down is reported at once

        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        if self.uri.startswith("sqlite:///"):
            # Opening a new sqlite store creates and migrates its tables; parallel stages (`dvc queue start
            # -j 2`) would race to do it ("table ... already exists", "duplicate column"): one at a time.
            from filelock import FileLock

            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            try:
                with FileLock(str(db.with_name(f".{db.name}.lock"))):
                    self.client = retry(lambda: MlflowClient(self.uri))
            except Exception as e:  # a corrupt or foreign file, a read-only directory: sqlalchemy's many types
                raise failure(self.uri, e) from e
        else:
            self.client = MlflowClient(self.uri)

    def experiment_id(self, hp: Hparams) -> str:
        name = experiment_name(hp)
        exp = retry(lambda: self.client.get_experiment_by_name(name))
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:"):
            artifacts = (repo_root() / "mlartifacts").as_uri()
        try:
            return retry(
                lambda: self.client.create_experiment(
                    name, artifact_location=artifacts, tags={TAG_HASH: hp.hash, "lth.model": hp.model.name}
                )
            )
        except Exception:  # created by a concurrent process in between
            exp = retry(lambda: self.client.get_experiment_by_name(name))
            if exp is None:
                raise
            return exp.experiment_id

    def logged_round_hashes(self, hp: Hparams) -> set[str]:
        exp = self.client.get_experiment_by_name(experiment_name(hp))
        if exp is None:
            return set()
        runs = self.client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=50000)
        return {r.data.tags.get(TAG_ROUND_HASH) for r in runs}

    def find_runs(self, experiment_hash: str) -> list[Any]:
        """Every run (any experiment) tagged with this experiment hash; a failing store raises TrackingError."""
        try:
            exps = self.client.search_experiments(filter_string=f"tags.`{TAG_HASH}` = '{experiment_hash}'")
            if not exps:
                return []
            return self.client.search_runs(
                [e.experiment_id for e in exps], max_results=50000, order_by=["tags.`lth.kind`", "tags.`lth.round`"]
            )
        except Exception as e:  # MLflow's errors (server down, store locked or corrupt) have many types
            raise failure(self.uri, e) from e

    def find_hashes(self, prefix: str) -> set[str]:
        """The experiment hashes that start with `prefix` (hex digits); a failing store raises TrackingError."""
        try:
            found = self.client.search_experiments(filter_string=f"tags.`{TAG_HASH}` LIKE '{prefix}%'")
        except Exception as e:  # as in find_runs
            raise failure(self.uri, e) from e
        return {e.tags.get(TAG_HASH) for e in found}


def warn(message: str) -> None:
    print(f"lth: WARNING: {message}", file=sys.stderr, flush=True)
