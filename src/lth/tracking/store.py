"""The MLflow store: where it is, one client per process, experiments by hash, reading runs back.

The store defaults to `sqlite:///<repo root>/mlflow.db` with artifacts in `<repo root>/mlartifacts`,
where the repo root is the real one even inside `dvc exp run` workspaces (.dvc/tmp/exps/...). MLflow
records artifact locations as absolute paths; a project that was moved or copied is detected when its
store is opened, and the recorded locations are moved with it (`relocate`). Set MLFLOW_TRACKING_URI to
share one server across clones. Logging failures never lose results: the DVC outputs are written first,
and `lth sync-mlflow` replays what MLflow lacks.

An experiment is found by its hash tag (`lth.hash`), never by its name: the name is for people
(`lth/<model>-<dataset> <non-default hyperparameters> (<hash prefix>)`) and may change with lth.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from lth.core.hparams import DEFAULTS, UNHASHED, ControlHparams, Hparams, flatten
from lth.pipeline.workspace import repo_root

T = TypeVar("T")

TAG_HASH = "lth.hash"  # experiment identity: MD5 of the canonical hyperparameters
TAG_ROUND_HASH = "lth.round_hash"  # identity of one trained network (experiment, round, trial, kind)
TAG_TRAJECTORY = "lth.trajectory"  # "true" on the parent run of an IMP trajectory (experiment x kind x trial)
TAG_PARENT = "mlflow.parentRunId"  # MLflow's nesting: the UI lists a round's run under its trajectory
TAG_NOTE = "mlflow.note.content"  # the description the UI shows (markdown)
# The MLflow 3 UI opens an experiment without this tag on its GenAI pages (overview, traces); these are
# model-training experiments: open on the runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ARTIFACTS = "mlartifacts"  # the default store's artifact root, next to mlflow.db
UI_URL = "http://127.0.0.1:5000"  # where `lth ui` serves a local store by default
UI_MODE = "workflowType=machine_learning"  # the MLflow 3 UI's model-training mode (its default is GenAI)
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}  # a user's own settings win
NAME_LIMIT = 250  # MLflow's experiment names hold 256 characters


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


def trajectory_params(hp: Hparams) -> dict[str, Any]:
    """The hyperparameters of the IMP trajectory (what its hash names), flat; controls and rounds left out."""
    flat = flatten(dataclasses.replace(hp, controls=ControlHparams()).to_dict())
    return {k: v for k, v in flat.items() if k not in UNHASHED and not k.startswith("controls.")}


def param_text(value: Any) -> str:
    """A hyperparameter as MLflow stores params (strings): lists as JSON."""
    return json.dumps(value) if isinstance(value, list) else str(value)


def experiment_name(hp: Hparams) -> str:
    """What a person recognises: network, dataset, the hyperparameters that differ from lth's defaults, and
    the hash prefix that keeps names unique (the hash tag, not the name, identifies the experiment)."""
    changed = " ".join(
        f"{k.rsplit('.', 1)[-1]}={param_text(v).replace(' ', '')}"
        for k, v in trajectory_params(hp).items()
        if k not in ("dataset.name", "model.name") and v != DEFAULTS[k]
    )
    head, tail = f"lth/{hp.model.name}-{hp.dataset.name}", f"({hp.hash[:8]})"
    room = NAME_LIMIT - len(head) - len(tail) - 2
    if len(changed) > room:
        changed = changed[: room - 3] + "..."
    return " ".join(part for part in (head, changed, tail) if part)


def experiment_note(hp: Hparams) -> str:
    """The experiment's description in the UI (markdown): what it holds and every hyperparameter."""
    rows = [
        f"| `{k}` | " + (f"**{param_text(v)}**" if v != DEFAULTS[k] else param_text(v)) + " |"
        for k, v in trajectory_params(hp).items()
    ]
    return "\n".join(
        [
            f"Lottery ticket experiment `{hp.hash}` ({hp.model.name} on {hp.dataset.name}), logged by lth.",
            "",
            "One parent run per IMP trajectory (kind x trial): its charts are the IMP curve, step = pruning round. "
            "Each round is a child run with its learning curve, mask (`mask.npz`) and final weights; the ticket's "
            "parent holds the rewind weights (`rewind.pt`) and the evaluate stage's report.",
            "",
            "| hyperparameter | value (bold: not lth's default) |",
            "|---|---|",
            *rows,
        ]
    )


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
        self._lock = FileLock(str(lock_path(self.uri)))

        # The client is given its store; never mlflow.set_tracking_uri, which also sets MLFLOW_TRACKING_URI in
        # os.environ, so that every later Tracker of the process (and its subprocesses) would use this store.
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            # Opening a new sqlite store creates and migrates its tables; parallel stages (`dvc queue start
            # -j 2`) would race to do it ("table ... already exists", "duplicate column"): one at a time.
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            try:
                with self.lock():
                    _relocate(self.uri)
                    self.client = retry(lambda: MlflowClient(self.uri))
            except Exception as e:  # a corrupt or foreign file, a read-only directory: sqlalchemy's many types
                raise failure(self.uri, e) from e
        else:
            self.client = MlflowClient(self.uri)

    def lock(self) -> FileLock:
        """Held while creating the store, an experiment or a trajectory's parent run: parallel stages of one
        machine (`lth run -j 2`, `dvc queue start -j 2`) find what the other made. Reentrant."""
        return self._lock

    def find_experiments(self, experiment_hash: str) -> list[Any]:
        """The experiments tagged with this hash, oldest first (one, unless a race on a server made two)."""
        found = retry(lambda: self.client.search_experiments(filter_string=f"tags.`{TAG_HASH}` = '{experiment_hash}'"))
        return sorted(found, key=lambda e: (e.creation_time or 0, e.experiment_id))

    def experiment_id(self, hp: Hparams) -> str:
        """The experiment of `hp`, found by its hash tag; created (named, described, tagged) the first time."""
        with self.lock():
            found = self.find_experiments(hp.hash)
            if not found:
                return self._create_experiment(hp)
            self._update_experiment(found[0], hp)
            return found[0].experiment_id

    def _create_experiment(self, hp: Hparams) -> str:
        name = experiment_name(hp)
        tags = {TAG_HASH: hp.hash, "lth.model": hp.model.name, "lth.dataset": hp.dataset.name, **EXPERIMENT_KIND}
        tags[TAG_NOTE] = experiment_note(hp)
        artifacts = (repo_root() / ARTIFACTS).as_uri() if self.uri.startswith("sqlite:") else None
        try:
            return retry(lambda: self.client.create_experiment(name, artifact_location=artifacts, tags=tags))
        except Exception as e:  # created on another machine in between (the lock is this machine's), or taken
            found = self.find_experiments(hp.hash)
            if found:
                return found[0].experiment_id
            raise TrackingError(
                f"MLflow at {self.uri} cannot create experiment '{name}' ({describe(e)}): if it was deleted, "
                "restore it in the MLflow UI or purge it with `mlflow gc`, then run `lth sync-mlflow`."
            ) from e

    def _update_experiment(self, exp: Any, hp: Hparams) -> None:
        """An experiment made by an older lth gets today's kind, description and name; a description or a
        name a person gave it is kept."""
        missing = {k: v for k, v in {**EXPERIMENT_KIND, TAG_NOTE: experiment_note(hp)}.items() if k not in exp.tags}
        for key, value in missing.items():
            retry(lambda key=key, value=value: self.client.set_experiment_tag(exp.experiment_id, key, value))
        if exp.name == f"lth/{hp.short_name}":  # lth's former name
            retry(lambda: self.client.rename_experiment(exp.experiment_id, experiment_name(hp)))

    def _search(self, experiment_hash: str, filter_string: str = "") -> list[Any]:
        """Every run (parents and children) of the experiments tagged with this hash."""
        ids = [e.experiment_id for e in self.find_experiments(experiment_hash)]
        if not ids:
            return []
        order = ["tags.`lth.kind`", "tags.`lth.round`"]
        return retry(lambda: self.client.search_runs(ids, filter_string, max_results=50000, order_by=order))

    def logged_round_hashes(self, hp: Hparams) -> set[str]:
        """Round hashes of the trained networks of `hp` that MLflow holds, finished."""
        runs = self._search(hp.hash, "attributes.status = 'FINISHED'")
        return {r.data.tags[TAG_ROUND_HASH] for r in runs if TAG_ROUND_HASH in r.data.tags}

    def unfinished_runs(self, hp: Hparams) -> dict[str, list[str]]:
        """round hash -> ids of the trained networks' runs that were never finished (logging broke off)."""
        out: dict[str, list[str]] = {}
        for r in self._search(hp.hash, "attributes.status != 'FINISHED'"):
            if TAG_ROUND_HASH in r.data.tags:
                out.setdefault(r.data.tags[TAG_ROUND_HASH], []).append(r.info.run_id)
        return out

    def find_runs(self, experiment_hash: str) -> list[Any]:
        """The runs of the trained networks (not the trajectories' parents) tagged with this experiment hash,
        in any experiment; a failing store raises TrackingError."""
        try:
            return [r for r in self._search(experiment_hash) if TAG_ROUND_HASH in r.data.tags]
        except Exception as e:  # MLflow's errors (server down, store locked or corrupt) have many types
            raise failure(self.uri, e) from e

    def find_trajectories(self, experiment_hash: str) -> list[Any]:
        """The parent runs of the experiment's IMP trajectories (one per kind and trial)."""
        return self._search(experiment_hash, f"tags.`{TAG_TRAJECTORY}` = 'true'")

    def find_hashes(self, prefix: str) -> set[str]:
        """The experiment hashes that start with `prefix` (hex digits); a failing store raises TrackingError."""
        try:
            found = self.client.search_experiments(filter_string=f"tags.`{TAG_HASH}` LIKE '{prefix}%'")
        except Exception as e:  # as in find_runs
            raise failure(self.uri, e) from e
        return {e.tags.get(TAG_HASH) for e in found}


def lock_path(uri: str) -> Path:
    """The lock file: next to a sqlite store, else (a server) next to where the project's store would be."""
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else repo_root() / "mlflow.db"
    return db.with_name(f".{db.name}.lock")


# Where MLflow records absolute artifact locations (MLflow 3 adds logged models).
LOCATIONS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"))


def relocate(uri: str) -> bool:
    """For the project's own store (mlflow.db at the repo root) of a project that was moved or copied: point
    the artifact locations it recorded (absolute paths of the old place) at this project's mlartifacts/.
    Opening a Tracker does it; `lth ui` calls it. Returns whether anything moved."""
    with FileLock(str(lock_path(uri))):
        return _relocate(uri)


def _relocate(uri: str) -> bool:
    """`relocate`, under the store's lock. MLflow has no API that changes artifact locations: they are
    rewritten in the database."""
    root = repo_root()
    db, here = root / "mlflow.db", (root / ARTIFACTS).as_uri()
    if uri != f"sqlite:///{db}" or not db.exists():
        return False
    with closing(sqlite3.connect(db, timeout=60)) as con, con:
        try:
            tables = {row[0] for row in con.execute("select name from sqlite_master where type = 'table'")}
            old = [
                row[0]
                for row in con.execute(
                    "select distinct artifact_location from experiments where artifact_location like ? "
                    "and artifact_location != ?",
                    (f"file://%/{ARTIFACTS}", here),
                )
            ]
        except sqlite3.DatabaseError:  # not a store (yet): MLflow creates it, or reports it
            return False
        for prefix in old:
            for table, column in (loc for loc in LOCATIONS if loc[0] in tables):
                con.execute(
                    f"update {table} set {column} = ? || substr({column}, ?) "
                    f"where {column} = ? or substr({column}, 1, ?) = ?",
                    (here, len(prefix) + 1, prefix, len(prefix) + 1, prefix + "/"),
                )
    return bool(old)


def experiment_url(hp: Hparams, uri: str | None = None) -> str | None:
    """The MLflow UI page of the experiment of `hp`, in the UI's model-training mode: on the tracking server,
    or for a local store the page `lth ui` serves (http://127.0.0.1:5000). None when MLflow is unavailable or
    has no such experiment."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None  # nothing logged yet (and do not create a store to find that out)
    try:
        found = Tracker(uri, check=True).find_experiments(hp.hash)
    except Exception:  # unreachable, locked, corrupt: MLflow's errors have many types
        return None
    base = uri.rstrip("/") if uri.startswith(("http:", "https:")) else UI_URL
    return f"{base}/#/experiments/{found[0].experiment_id}?{UI_MODE}" if found else None


def warn(message: str) -> None:
    print(f"lth: WARNING: {message}", file=sys.stderr, flush=True)
