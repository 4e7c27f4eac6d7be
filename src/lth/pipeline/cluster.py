"""IMP sweeps on a Ray cluster: one Ray task per experiment, each run the way DVC runs it, in its own workspace.

A task clones the project's git remote at the sweep's commit into a temporary directory of its node, writes
the experiment's overrides into params.yaml and renders dvc.yaml (`lth pipeline`), then runs the stages one
by one with `dvc repro --pull --single-item`: a stage whose run is in the shared DVC remote's run-cache is
restored instead of trained. After each stage that ran, its outputs and run-cache entry are pushed
(`dvc push --run-cache`), so a task that Ray retries after its worker died resumes from the last pushed
stage. The finished workspace is saved as a DVC experiment and pushed to the git remote (`dvc exp save`,
`dvc exp push`): the user's workspace sees it with `dvc exp pull` and `dvc exp show` (or `lth sweep report`), and
in MLflow, where the stages log as usual (pass MLFLOW_TRACKING_URI in `env`). docs/cluster.md.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("clone", "pull", "train", "push")  # where an experiment's seconds go (ExperimentResult.seconds)
DVC = (sys.executable, "-m", "dvc")
PROBE_SECONDS = 5.0
# What a task needs of the submitting shell to log where the user logs: passed in the tasks' environment (never in
# params, tags, artifacts or logs; MLflow's client reads the credentials from the environment at each request).
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Who the experiment commits are by, unless the task's environment names someone.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "lth sweep",
    "GIT_AUTHOR_EMAIL": "lth-sweep@localhost",
    "GIT_COMMITTER_NAME": "lth sweep",
    "GIT_COMMITTER_EMAIL": "lth-sweep@localhost",
}
# Each command of a task runs under two watchers (`python -c WATCH launch python -c WATCH guard CMD...`): when
# the Ray worker that started it dies (its node failed, or Ray ended it), the whole command goes with it, so no
# orphaned stage goes on training, logging to MLflow or pushing beside the retried task. The launcher is the
# worker's child, which Ray may SIGKILL as the worker exits (it spares grandchildren); it starts the guard in
# a process group of its own and exits when the worker is gone. The guard runs the command in its group and
# ends the whole group when its launcher is gone.
WATCH = """
import os, signal, subprocess, sys, time
role, cmd, parent = sys.argv[1], sys.argv[2:], os.getppid()
child = subprocess.Popen(cmd, start_new_session=role == "launch")
while child.poll() is None:
    if os.getppid() != parent:
        os.killpg(0, signal.SIGKILL) if role == "guard" else os._exit(1)
    time.sleep(0.2)
sys.exit(child.returncode)
"""


class ClusterError(RuntimeError):
    """The cluster cannot be reached, or an experiment's command failed; the message (one line) says which
    and what to do."""


@dataclass(frozen=True)
class Resources:
    """What each experiment's task asks Ray for, and how often Ray retries it after its worker died."""

    cpus: float = 1.0
    gpus: float = 0.0
    max_retries: int = 3


@dataclass
class ExperimentResult:
    """What a sweep returns for each experiment (a failed one: its overrides, name and error only)."""

    overrides: dict[str, str]  # key -> value, as given (-S key=value)
    name: str = ""  # the DVC experiment (`dvc exp pull <remote> <name>`, `dvc exp show`)
    hash: str = ""  # lth.core.hparams: the experiment's identity (MLflow's `lth.hash` tag)
    rounds: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ticket/round_00/trial_0" -> metrics.json
    seconds: dict[str, float] = field(default_factory=dict)  # by phase (PHASES), of the attempt that finished
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "restored" (run-cache, dvc.lock)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds of its `dvc repro --pull`
    host: str = ""  # where the finished attempt ran
    error: str | None = None  # one line when the experiment failed


# ------------------------------------------------------------------------------------------------- grids


def expand_grid(overrides: Sequence[str]) -> list[dict[str, str]]:
    """`-S` overrides with comma-separated choices as one experiment per combination, in DVC's own grid
    syntax (`dvc exp run --queue -S training.lr=1e-3,3e-4`, Hydra's grammar: lists in brackets stay one
    value): ["training.lr=1e-3,3e-4", "trials=2"] -> [{"training.lr": "0.001", "trials": "2"}, ...]."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    try:
        sweeps = get_hydra_sweeps({"params.yaml": list(overrides)}) if overrides else [{"params.yaml": []}]
    except (HydraException, InvalidArgumentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(
            f"-S {' -S '.join(overrides)}: not a sweep DVC can read ({first}); write -S key=value or "
            "-S key=v1,v2 (lists in brackets: -S training.lr_milestones=[100,200])"
        ) from None
    return [dict(o.split("=", 1) for o in sweep["params.yaml"]) for sweep in sweeps]


def check_grid(params: Path, experiments: Sequence[dict[str, str]]) -> list[str]:
    """Validate each experiment's overrides of the params file `params` (the sweep's commit's) before anything
    is submitted, and refuse two experiments of one hash (they differ only in pruning.rounds or runtime
    settings: side by side they would train and log the same rounds twice). Returns their hashes."""
    from lth.core import config

    hashes: dict[str, dict[str, str]] = {}
    for overrides in experiments:
        items = [f"{k}={v}" for k, v in overrides.items()]
        try:
            h = config.load(params, items).hash
        except config.HparamsError as e:
            raise ClusterError(f"-S {' -S '.join(items)}: {'; '.join(e.problems)}") from None
        if h in hashes:
            raise ClusterError(
                f"experiments {hashes[h]} and {overrides} are one experiment ({h[:8]}: pruning.rounds and runtime "
                "settings are not part of it): sweep over hyperparameters, and run the longest one for more rounds"
            )
        hashes[h] = overrides
    return list(hashes)


def experiment_name(overrides: dict[str, str]) -> str:
    """The DVC experiment name of a set of overrides: the same on every retry and every run of the sweep
    (saving again replaces it), distinct for distinct overrides."""
    text = json.dumps(sorted(overrides.items()))
    return f"lth-{hashlib.md5(text.encode()).hexdigest()[:10]}"


# ---------------------------------------------------------------------------------------- what is submitted


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def pushed_commit(git_remote: str, repo: Path = Path(".")) -> tuple[str, str]:
    """(URL of the git remote named `git_remote`, HEAD's commit) for a sweep of the workspace at `repo`: the
    tasks clone that commit from that remote, so the workspace must have no uncommitted changes and the commit
    must be pushed there (a remote branch contains it, as of the last push or fetch)."""
    url = git(repo, "remote", "get-url", git_remote).stdout.strip()
    if not url:
        raise ClusterError(
            f"no git remote '{git_remote}' in {repo.resolve()}: add one that every node can reach (`git remote add "
            f"{git_remote} URL`, then `git push {git_remote} HEAD`), or pass --git-remote NAME"
        )
    commit = git(repo, "rev-parse", "--verify", "HEAD").stdout.strip()
    changed = [line[3:] for line in git(repo, "status", "--porcelain", "--untracked-files=no").stdout.splitlines()]
    if not commit or changed:
        raise ClusterError(
            f"the workspace has uncommitted changes ({', '.join(changed[:3] or ['nothing committed yet'])}), and "
            f"the cluster runs what '{git_remote}' holds: commit them and `git push {git_remote} HEAD` (or stash them)"
        )
    branches = git(repo, "branch", "--remotes", "--contains", commit, "--format=%(refname:short)").stdout.split()
    if not any(b.startswith(f"{git_remote}/") for b in branches):
        raise ClusterError(
            f"commit {commit[:7]} is not pushed to '{git_remote}', where the cluster clones it from: "
            f"`git push {git_remote} HEAD` (or `git fetch {git_remote}` if it was pushed from elsewhere)"
        )
    local = not any(sep in url for sep in ("://", "@")) and (repo / url).exists()
    return (str((repo / url).resolve()) if local else url), commit


def tracking_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The MLflow settings of `environ` (the process's environment by default) that the tasks need."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in TRACKING_ENV if environ.get(k)}


# ----------------------------------------------------------------------------------------------- the cluster


def check_address(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail within `timeout` seconds, with one line, when nothing listens at the cluster's HOST:PORT
    (`ray.init` itself keeps retrying for a minute or more)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(
            f"--address {address!r}: expected HOST:PORT of a Ray cluster's head, as `ray start --head` prints it "
            "(e.g. 10.0.0.5:6379)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({e.strerror or e}): start one with `ray start --head --port "
            f"{port}` on {host}, or pass the address that `ray start --head` printed"
        ) from None


def connect(address: str) -> None:
    """Join the Ray cluster at `address` as its driver, quietly (the tasks' output stays in Ray's logs)."""
    import logging

    check_address(address)
    try:
        import ray
    except ImportError:
        raise ClusterError(
            "Ray is not installed here: pip install -e '.[cluster]' (the cluster's Ray version)"
        ) from None
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:  # Ray's connection errors have many types (ConnectionError, RuntimeError, ...)
        raise ClusterError(
            f"cannot join the Ray cluster at {address} ({' '.join(str(e).split())[:300]}): check that it is a "
            "Ray head's address and that this machine runs the cluster's Ray and Python versions"
        ) from None


def run_sweep(
    repo_url: str,
    commit: str,
    experiments: Sequence[dict[str, str]],
    address: str,
    resources: Resources = Resources(),
    env: dict[str, str] | None = None,
    dvc_remote: str | None = None,
    on_result: Callable[[ExperimentResult], None] | None = None,
) -> list[ExperimentResult]:
    """Run each experiment (its overrides of params.yaml) as one Ray task on the cluster at `address`, from
    `commit` of the git remote `repo_url` (a URL or path every node reaches, which takes the experiments'
    refs), with `env` added to the tasks' environment (MLFLOW_TRACKING_URI, credentials) and `dvc_remote`
    (a URL) instead of the project's default DVC remote. Returns the results in the order of
    `experiments`; `on_result` sees each as it finishes. A failed experiment has its `error`; only an
    unreachable cluster raises (ClusterError)."""
    connect(address)
    import ray

    try:
        check_resources(resources, address)
        task = ray.remote(run_experiment)
        refs = {
            task.options(
                num_cpus=resources.cpus,
                num_gpus=resources.gpus,
                max_retries=resources.max_retries,
                retry_exceptions=False,  # a failing command fails again: only a dead worker is retried
                name=f"lth {experiment_name(overrides)}",
            ).remote(repo_url, commit, overrides, env, dvc_remote): i
            for i, overrides in enumerate(experiments)
        }
        results: list[ExperimentResult | None] = [None] * len(experiments)
        pending = list(refs)
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            i = refs[ready]
            results[i] = _result(ready, experiments[i], resources)
            if on_result:
                on_result(results[i])
        return results
    finally:
        ray.shutdown()


def check_resources(resources: Resources, address: str) -> None:
    """Refuse a task that no live node of the cluster can hold (Ray would keep it pending for ever), before
    anything is submitted."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= resources.cpus and n.get("GPU", 0) >= resources.gpus for n in nodes):
        return
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    raise ClusterError(
        f"no node of the Ray cluster at {address} has {resources.cpus:g} CPUs and {resources.gpus:g} GPUs for a "
        f"task (the largest has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs): ask for less "
        "with --cpus-per-task and --gpus-per-task, or add such a node to the cluster"
    )


def _result(ref: Any, overrides: dict[str, str], resources: Resources) -> ExperimentResult:
    """A finished task's result, or its failure as one line."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        error = f"{type(e.cause).__name__}: {e.cause}" if e.cause else str(e).splitlines()[0]
    except ray.exceptions.RayError as e:  # the worker or its node died more than max_retries times
        error = f"{type(e).__name__} after {resources.max_retries} retries: {str(e).splitlines()[0]}"
    return ExperimentResult(dict(overrides), experiment_name(overrides), error=" ".join(error.split()))


# ------------------------------------------------------------------------------------------------ the task


class Workspace:
    """A task's clone of the project: its commands, watched (WATCH), timed by phase."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def run(self, phase: str, *cmd: str) -> str:
        """Run `cmd` in the clone (the clone's parent for git clone) and return its output; a failure raises
        ClusterError with the command and its telling line."""
        start = time.perf_counter()
        cwd = self.root if self.root.exists() else self.root.parent
        watched = [sys.executable, "-c", WATCH, "launch", sys.executable, "-c", WATCH, "guard", *cmd]
        proc = subprocess.run(watched, cwd=cwd, env=self.env, capture_output=True, text=True)
        self.seconds[phase] += time.perf_counter() - start
        if proc.returncode != 0:
            lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
            told = next((line for line in lines if line.startswith(("lth:", "ERROR:"))), lines[-1] if lines else "")
            raise ClusterError(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}): {told}")
        return proc.stdout + proc.stderr


def task_env(root: Path, env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a task's commands: the worker's, then `env`; the clone's library first on the path
    (the stages run the commit's code, as `dvc exp run` would), the worker's interpreter as `python`."""
    out = {**GIT_IDENTITY, **os.environ, **(env or {})}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(root / "src"), out.get("PYTHONPATH", "")) if p)
    out["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), out.get("PATH", "")))
    out.setdefault("DVC_NO_ANALYTICS", "1")
    return out


def run_experiment(
    repo_url: str,
    commit: str,
    overrides: dict[str, str],
    env: dict[str, str] | None = None,
    dvc_remote: str | None = None,
    workdir: str | None = None,
) -> ExperimentResult:
    """One experiment, as its Ray task runs it (it also runs without Ray): clone, render, run the stages one
    by one pushing each, save and push the DVC experiment. Its temporary clone (under `workdir`, else the
    system's temporary directory) is removed at the end."""
    result = ExperimentResult(dict(overrides), experiment_name(overrides), host=socket.gethostname())
    with tempfile.TemporaryDirectory(prefix="lth-sweep-", dir=workdir) as tmp:
        ws = Workspace(Path(tmp) / "repo", task_env(Path(tmp) / "repo", env))
        result.hash = prepare_clone(ws, repo_url, commit, overrides, dvc_remote)
        result.stages, result.stage_seconds = run_stages(ws)
        ws.run("push", *DVC, "exp", "save", "--force", "--name", result.name, *untracked(ws))
        ws.run("push", *DVC, "exp", "push", "--force", "origin", result.name)  # a sweep run again replaces it
        result.rounds = read_rounds(ws.root)
        result.seconds = {k: round(v, 3) for k, v in ws.seconds.items()}
    return result


def prepare_clone(ws: Workspace, repo_url: str, commit: str, overrides: dict[str, str], remote: str | None) -> str:
    """Clone `repo_url` at `commit`, point DVC at `remote` when given, write the overrides into params.yaml
    (validated, comments kept, as `lth run -S` does) and render dvc.yaml. Returns the experiment's hash."""
    from lth.core import config
    from lth.pipeline import presets

    ws.run("clone", "git", "clone", "--quiet", "--no-checkout", repo_url, str(ws.root))
    ws.run("clone", "git", "checkout", "--quiet", "--detach", commit)
    if remote:
        ws.run("clone", *DVC, "remote", "add", "--local", "--default", "--force", "lth-sweep", remote)
    start = time.perf_counter()
    items = [f"{k}={v}" for k, v in overrides.items()]
    try:
        presets.write_overrides(ws.root / "params.yaml", items)
        experiment_hash = config.load(ws.root / "params.yaml").hash
    except (config.HparamsError, ValueError, OSError) as e:
        raise ClusterError(f"-S {' -S '.join(items)}: {' '.join(str(e).split())}") from None
    ws.seconds["clone"] += time.perf_counter() - start
    ws.run("clone", sys.executable, "-m", "lth.cli", "pipeline")
    return experiment_hash


def run_stages(ws: Workspace) -> tuple[dict[str, str], dict[str, float]]:
    """Each stage of dvc.yaml in dependency order: restored from the DVC remote (its run-cache, or the
    outputs dvc.lock records) when it can be, else run and pushed with its run-cache entry at once.
    Returns how each stage was done ("ran" or "restored") and the seconds of its `dvc repro`."""
    from lth.pipeline.schedule import stage_graph

    done, seconds = {}, {}
    for stage in graphlib.TopologicalSorter(stage_graph(ws.root / "dvc.yaml")).static_order():
        start = time.perf_counter()
        out = ws.run("pull", *DVC, "repro", "--pull", "--single-item", stage)
        seconds[stage] = round(time.perf_counter() - start, 3)
        done[stage] = "ran" if f"Running stage '{stage}'" in out else "restored"
        if done[stage] == "ran":  # its time was training, not transfer
            ws.seconds["pull"] -= seconds[stage]
            ws.seconds["train"] += seconds[stage]
            ws.run("push", *DVC, "push", "--run-cache", stage)
    return done, seconds


def untracked(ws: Workspace) -> list[str]:
    """`--include-untracked` for the files git does not ignore that the stages wrote (the evaluate stage's
    metrics and figures, kept in git): `dvc exp save` leaves untracked files out otherwise."""
    files = ws.run("push", "git", "ls-files", "--others", "--exclude-standard").split()
    return [arg for f in files for arg in ("--include-untracked", f)]


def read_rounds(root: Path) -> dict[str, dict[str, Any]]:
    """Every trained network's metrics.json under runs/, by kind/round/trial."""
    from lth.pipeline.workspace import RUNS_DIR

    return {
        f.parent.relative_to(root / RUNS_DIR).as_posix(): json.loads(f.read_text())
        for f in sorted((root / RUNS_DIR).glob("*/round_*/trial_*/metrics.json"))
    }


def pull_experiments(names: Sequence[str], git_remote: str, repo: Path = Path(".")) -> str:
    """Bring the sweep's DVC experiments into the workspace at `repo` (`dvc exp pull`, git refs only: their
    metrics, params and per-round tables, what `dvc exp show` and `lth sweep report` read; `dvc pull` at an
    experiment fetches its networks). Returns DVC's output."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "pull", "--no-cache", git_remote, *names],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ClusterError(f"`dvc exp pull {git_remote}` failed in {Path(repo).resolve()}: {proc.stderr.strip()}")
    return proc.stdout
