"""A whole experiment, end to end, measured: wall time and where it went.

    python benchmarks/bench_experiment.py [--preset lenet] [--reinit] [--jobs 0] [-S KEY=VALUE ...] [--keep DIR]

Clones this repository's committed HEAD into a temp directory (as a user's fresh clone), selects the
preset, applies the overrides, runs `lth run -j JOBS` there with a fresh MLflow store and prints:
the wall time; per stage, when it started and finished; and the breakdown of the machine's core-time
(wall x jobs) into training, evaluation (both from the loop's own timers, logged to MLflow as
seconds_train / seconds_eval) and everything else (process start-up, DVC, data loading, MLflow, and
cores left idle where the DAG has nothing to run beside the ticket chain).
The default experiment of docs/performance.md: `--preset lenet --reinit` (20 rounds of 50K iterations
plus random reinitialization, 41 trained networks).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lenet")
    ap.add_argument("--reinit", action="store_true", help="switch on controls.random_reinit")
    ap.add_argument("--jobs", "-j", type=int, default=0, help="lth run -j (0 = auto)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="lth-bench-experiment-"))
    project = work / "project"
    env = {
        **os.environ,
        "PYTHONPATH": str(project / "src"),
        "CI": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }

    def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=project, env=env, check=True, text=True, **kw)

    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    lth = [sys.executable, "-m", "lth.cli"]
    run(*lth, "preset", args.preset, "--force", capture_output=True)
    sets = [*args.overrides, *(["controls.random_reinit=true"] if args.reinit else [])]
    if sets:
        import yaml

        from lth.core.config import parse_override

        doc = yaml.safe_load((project / "params.yaml").read_text())
        for key, value in map(parse_override, sets):
            section = doc
            *parents, last = key.split(".")
            for p in parents:
                section = section.setdefault(p, {})
            section[last] = value
        (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    print(
        f"# whole experiment: preset {args.preset} {' '.join(sets)}, lth run -j {args.jobs or 'auto'}, in {project}",
        flush=True,
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*lth, "run", "-j", str(args.jobs)],
        cwd=project,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = []
    for line in proc.stdout:
        log.append((time.perf_counter() - t0, line.rstrip()))
        if line.startswith("lth: ") and any(w in line for w in ("started", "finished", "stages to run", "failed")):
            print(f"{time.perf_counter() - t0:8.1f} s  {line.rstrip()}", flush=True)
    wall = time.perf_counter() - t0
    if proc.wait() != 0:
        print("\n".join(line for _, line in log[-40:]))
        raise SystemExit(f"lth run failed ({proc.returncode})")
    jobs = (
        max(int(m) for _, line in log for m in re.findall(r"up to (\d+) at a time", line))
        if any("at a time" in line for _, line in log)
        else 1
    )

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True)
    train, evaluate = runs["metrics.seconds_train"].sum(), runs["metrics.seconds_eval"].sum()
    core = wall * jobs
    other = core - train - evaluate
    print(f"\nwall time: {wall:.0f} s = {wall / 60:.1f} min ({len(runs)} trained networks, {jobs} job(s) at a time)")
    print(f"{'core-time (wall x jobs)':<58}{core:9.0f} s {'':>7}")
    for name, s in (
        ("training (loop timers, all networks)", train),
        ("evaluation (val every 100, test every 1000 + best snapshot)", evaluate),
        ("everything else (start-up, DVC, data, MLflow, idle cores)", other),
    ):
        print(f"{name:<58}{s:9.0f} s {100 * s / core:6.1f}%")
    print(f"evaluation / (training + evaluation): {100 * evaluate / (train + evaluate):.1f}%")
    iterations = runs["params.training.iterations"].astype(int).sum()
    print(
        f"per network: training {train / len(runs):.1f} s, evaluation {evaluate / len(runs):.1f} s; "
        f"training speed {iterations / train:.0f} it/s per process"
    )


if __name__ == "__main__":
    main()
