"""A sweep on a local Ray cluster (head + 2 workers, one CPU each) against the same experiments one after another.

    python benchmarks/bench_cluster.py [--workers 2]

The 4 tiny XOR experiments of tests/test_cluster.py (2 learning rates x 2 seeds, 200 iterations, rounds 0-1):
  local    `lth run -S ...` one after another in the user's workspace (local DVC cache, no remote)
  cluster  lth.pipeline.cluster.run_sweep: one Ray task per experiment, each cloning the project's git remote,
           running its stages with `dvc repro --pull`, pushing each to a directory DVC remote, saving and
           pushing the DVC experiment
Both log to one MLflow server (sqlite, proxied artifacts). Then a fifth experiment alone on the cluster (no
other task beside it), and where its time goes: its phases (clone, pull, train, push) and one training stage
taken apart: DVC around it, and in its process the start-up, the MLflow writes and the training (run.json),
the process and each part timed on their own in the local workspace (medians of 3). Ray's node start-up is
reported apart (a real cluster is up before a sweep).
Last, how a task's DVC commands grow with the shared run-cache: `dvc repro --pull` copies every entry of the
remote's run-cache, and `dvc push --run-cache` every entry of the local one, so one restored stage and its
push are timed in a fresh clone against the sweep's remote, then with --entries synthetic entries added.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's project and cluster helpers: the benchmark runs what it tests

from lth.pipeline import cluster  # noqa: E402
from tests.conftest import XOR_TINY, create_project  # noqa: E402
from tests.helpers import Project  # noqa: E402
from tests.test_cluster import GRID, local_mlflow_server, local_ray_cluster, shared_project  # noqa: E402

ALONE = {"training.lr": "0.003", "training.seed": "0"}  # a fifth experiment, run with the cluster to itself
STAGE = "ticket_round_01"  # the stage taken apart
STAGE_IMPORTS = "from lth.pipeline import numerics; numerics.pin(); import stages.train_round"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def quietly(fn) -> None:
    """`fn()` without what MLflow prints about the runs it finished."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        fn()


def median_of(fn, repeats: int = 3) -> float:
    return statistics.median(timed(fn) for _ in range(repeats))


def run_locally(p: Project, experiments: list[dict[str, str]]) -> float:
    """Wall seconds of the experiments run one after another with `lth run -S`."""
    return sum(
        timed(lambda e=e: p.lth("run", *(a for k, v in e.items() for a in ("-S", f"{k}={v}")))) for e in experiments
    )


def fixed_costs(p: Project, uri: str) -> dict[str, float]:
    """In the local workspace (its last experiment's outputs): the stage process of STAGE run directly, without
    DVC; a stage process's start-up (python, torch, the stage's imports); a DVC command's fixed cost (`dvc
    status`); the MLflow writes of one trained network (the one writer, over HTTP); its training (run.json)."""
    from lth.core import config
    from lth.tracking.store import Tracker
    from lth.tracking.writer import log_trial

    hp = config.load(p.root / "params.yaml")
    tracker = Tracker(uri)
    trial = p.root / "runs" / "ticket" / "round_01" / "trial_0"
    costs = {
        "stage process": median_of(lambda: p.python("stages/train_round.py", "--kind", "ticket", "--round", "1")),
        "stage start-up": median_of(lambda: p.python("-c", STAGE_IMPORTS)),
        "dvc command": median_of(lambda: p.dvc("status")),
        "mlflow trial": median_of(lambda: quietly(lambda: log_trial(tracker, hp, trial))),
    }
    costs["training"] = sum(json.loads((trial / "run.json").read_text())["seconds"].values())
    return costs


def run_cache_growth(origin: Path, remote: Path, entries: int, tmp: Path) -> tuple[float, float]:
    """Seconds of `dvc repro --pull --single-item prepare` (restored from the run-cache) plus `dvc push
    --run-cache prepare` in a fresh clone: against `remote` as the sweep left it, then with `entries` more
    run-cache entries (copies of a real one under new keys, as other experiments' stages would leave)."""
    import hashlib
    import shutil

    def one(name: str) -> float:
        clone = Project(tmp / name)
        Project(tmp).run("git", "clone", "--quiet", str(origin), str(clone.root))
        start = time.perf_counter()
        clone.dvc("repro", "--pull", "--single-item", "prepare")
        clone.dvc("push", "--run-cache", "prepare")
        return time.perf_counter() - start

    before = one("growth-before")
    real = next(f for f in (remote / "runs").rglob("*") if f.is_file())
    for i in range(entries):
        key, value = (hashlib.sha256(f"{i}{part}".encode()).hexdigest() for part in ("key", "value"))
        (remote / "runs" / key[:2] / key).mkdir(parents=True, exist_ok=True)
        shutil.copy(real, remote / "runs" / key[:2] / key / value)
    return before, one("growth-after")


def report_sweep(results: list[cluster.ExperimentResult], local: float, wall: float) -> None:
    n = len(results)
    print(f"local, one after another: {local:.1f} s ({local / n:.1f} s per experiment)")
    print(f"cluster, {n} at once: {wall:.1f} s wall; speed-up {local / wall:.2f}x")
    mean = {k: statistics.mean(r.seconds[k] for r in results) for k in cluster.PHASES}
    print("  per experiment (mean): " + ", ".join(f"{k} {v:.1f} s" for k, v in mean.items()))


def report_alone(r: cluster.ExperimentResult, costs: dict[str, float]) -> None:
    """Where a lone experiment's time goes on the cluster: its phases, and its last training stage taken apart
    with the costs measured on their own."""
    ran = sum(s == "ran" for s in r.stages.values())
    print(
        f"one experiment alone on the cluster: {sum(r.seconds.values()):.1f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
        + f"; {ran} of {len(r.stages)} stages ran: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in r.stage_seconds.items())
    )
    stage = r.stage_seconds[STAGE]
    parts = {
        "DVC around the stage (start-up, run-cache pull, hashing, caching)": stage - costs["stage process"],
        "the stage process: start-up (python, torch, the stage's imports)": costs["stage start-up"],
        "  MLflow writes of its trained network": costs["mlflow trial"],
        "  training and evaluation (run.json)": costs["training"],
    }
    parts["  the rest of the process (MLflow import, data, outputs)"] = stage - sum(parts.values())
    print(f"  its stage {STAGE}: {stage:.1f} s, of which")
    for k, v in parts.items():
        print(f"    {v:5.1f} s  {100 * v / stage:3.0f}%  {k}")
    print(f"  a push after each stage that ran, then exp save and push: {r.seconds['push']:.1f} s in all")
    print("costs alone (medians of 3): " + ", ".join(f"{k} {v:.2f} s" for k, v in costs.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="worker nodes beside the head (one CPU each)")
    ap.add_argument("--entries", type=int, default=2000, help="synthetic run-cache entries for the growth test")
    args = ap.parse_args()
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; a single run: expect +-20%")
    experiments = cluster.expand_grid(GRID)
    with tempfile.TemporaryDirectory() as tmp, local_mlflow_server(Path(tmp)) as uri:
        p = create_project(Path(tmp) / "project", XOR_TINY)
        origin = shared_project(p, Path(tmp))
        commit = p.run("git", "rev-parse", "HEAD").stdout.strip()
        p.env["MLFLOW_TRACKING_URI"] = uri
        local = run_locally(p, experiments)
        start = time.perf_counter()
        with local_ray_cluster(args.workers) as ray_cluster:
            print(f"Ray: head + {args.workers} workers started in {time.perf_counter() - start:.1f} s")
            start = time.perf_counter()
            env = {"MLFLOW_TRACKING_URI": uri}
            results = cluster.run_sweep(str(origin), commit, experiments, ray_cluster.address, env=env)
            wall = time.perf_counter() - start
            (alone,) = cluster.run_sweep(str(origin), commit, [ALONE], ray_cluster.address, env=env)
        failed = [r.error for r in [*results, alone] if r.error]
        if failed:
            raise SystemExit(f"the sweep failed: {failed}")
        report_sweep(results, local, wall)
        report_alone(alone, fixed_costs(p, uri))
        remote = Path(tmp) / "dvc-remote"
        entries = sum(f.is_file() for f in (remote / "runs").rglob("*"))
        before, after = run_cache_growth(origin, remote, args.entries, Path(tmp))
        print(
            f"a restored stage + its push: {before:.1f} s with {entries} run-cache entries, {after:.1f} s with "
            f"{entries + args.entries}: {1000 * (after - before) / args.entries:.2f} ms per entry"
        )


if __name__ == "__main__":
    main()
