"""A sweep on this machine: one queued DVC experiment per point of the grid, run by DVC's own queue.

Each experiment is `dvc exp run --queue -n NAME -S key=value ...`, named as on a Ray cluster
(`cluster.experiment_name`: a digest of its overrides), so a sweep run again finds its experiments:
one that is queued or running is waited for, one that finished (or failed) at this commit is removed
and queued again (unchanged stages come back from DVC's run-cache). `dvc queue start` runs them in
temporary workspaces; `dvc exp show --json` says how each is doing. `lth sweep report` aggregates them.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lth.pipeline.cluster import DVC, experiment_name

POLL_SECONDS = 10.0  # between two `dvc exp show` (each costs a second or two of CPU)
PENDING = ("queued", "running")
FINISHED = ("success", "failed", "removed")  # removed: no longer listed (`dvc queue remove`, `dvc exp remove`)


class QueueError(RuntimeError):
    """A DVC command of the sweep failed, or the grid does not fit the pipeline; the message (one line) says
    which and what to do."""


@dataclass(frozen=True)
class Entry:
    """One experiment of the queue as `dvc exp show` lists it."""

    name: str
    state: str  # queued, running, success, failed (DVC's), or removed
    task: str = ""  # what `dvc queue logs` takes


def dvc(repo: Path, *args: str) -> str:
    """Run a DVC command in `repo` and return its output; its failure raises QueueError with DVC's last line.
    The output goes through a file: `dvc queue start` leaves workers behind that would hold a pipe open."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run([*DVC, *args], cwd=repo, stdout=out, stderr=err, text=True).returncode
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        lines = [line.strip() for line in (stderr + stdout).splitlines() if line.strip()]
        raise QueueError(f"`dvc {' '.join(args)}` failed in {repo.resolve()}: {lines[-1] if lines else 'no output'}")
    return stdout


def check_stages(params: Path, experiments: Sequence[dict[str, str]], dvc_yaml: Path) -> None:
    """A queued experiment runs the workspace's dvc.yaml, which DVC does not re-render: refuse overrides that
    change the stages (pruning.rounds, controls.*), and a dvc.yaml that does not match params.yaml."""
    from lth.core import config
    from lth.pipeline import render

    try:
        render.check_current(config.load(params), dvc_yaml)
    except render.StaleDvcYaml as e:
        raise QueueError(str(e)) from None
    for overrides in experiments:
        items = [f"{k}={v}" for k, v in overrides.items()]
        try:
            render.check_current(config.load(params, items), dvc_yaml)
        except render.StaleDvcYaml:
            raise QueueError(
                f"-S {' -S '.join(items)} changes the pipeline's stages, which a queued `dvc exp run` does not "
                "re-render: set pruning.rounds and controls.* in params.yaml and run `lth pipeline` first, or "
                "run the sweep with --executor ray (each experiment renders its own)"
            ) from None


def entries(repo: Path = Path(".")) -> dict[str, Entry]:
    """The named experiments of the workspace's commit, queued, running or done, by name (of two of one
    name, the one still to finish)."""
    found: dict[str, Entry] = {}
    for baseline in json.loads(dvc(repo, "exp", "show", "--json") or "[]"):
        for group in baseline.get("experiments") or []:
            entry = _entry(group)
            if entry and (entry.name not in found or entry.state in PENDING):
                found[entry.name] = entry
    return found


def _entry(group: dict[str, Any]) -> Entry | None:
    """An experiment of `dvc exp show --json` (a group of revisions and its executor): an experiment without an
    executor is one that finished and was collected."""
    revs = group.get("revs") or [{}]
    name = group.get("name") or revs[0].get("name")
    if not name:
        return None
    executor = group.get("executor") or {}
    task = (executor.get("local") or {}).get("task_id") or revs[0].get("rev", "")
    return Entry(name, executor.get("state") or "success", task[:7])


def submit(experiments: Sequence[dict[str, str]], repo: Path = Path(".")) -> dict[str, str]:
    """Queue each experiment that is not queued or running already, replacing one of its name that finished
    at this commit. Returns name -> "queued" (now), "replaced" (queued again) or "pending" (already)."""
    current = entries(repo)
    names = [experiment_name(overrides) for overrides in experiments]
    done = [n for n in names if n in current and current[n].state not in PENDING]
    if done:
        dvc(repo, "exp", "remove", *done)
    what = {}
    for name, overrides in zip(names, experiments, strict=True):
        if name in current and current[name].state in PENDING:
            what[name] = "pending"
            continue
        sets = [arg for k, v in overrides.items() for arg in ("-S", f"{k}={v}")]
        dvc(repo, "exp", "run", "--queue", "--quiet", "--name", name, *sets)
        what[name] = "replaced" if name in done else "queued"
    return what


def start(jobs: int = 1, repo: Path = Path(".")) -> None:
    """Start DVC's queue workers (they run in the background and stop once the queue is empty)."""
    dvc(repo, "queue", "start", "--jobs", str(jobs))


def follow(
    names: Sequence[str],
    on_change: Callable[[Entry], None],
    repo: Path = Path("."),
    poll: float = POLL_SECONDS,
) -> dict[str, Entry]:
    """Wait until every experiment of `names` has finished, telling `on_change` each new state. Returns the
    final entries. `dvc exp show` fails now and then while a worker sets up or removes a temporary workspace:
    only a failure three times in a row counts."""
    seen: dict[str, Entry] = {}
    failures = 0
    while True:
        try:
            current, failures = entries(repo), 0
        except QueueError:
            failures += 1
            if failures == 3:
                raise
            time.sleep(poll)
            continue
        for name in names:
            entry = current.get(name, Entry(name, "removed"))
            if name not in seen or seen[name].state != entry.state:
                on_change(entry)
            seen[name] = entry
        if all(e.state in FINISHED for e in seen.values()):
            return seen
        time.sleep(poll)
