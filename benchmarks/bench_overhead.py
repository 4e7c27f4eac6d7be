"""Fixed costs around training: a no-op `dvc repro` of a 20-round pipeline, and a stage process's start-up.

    python benchmarks/bench_overhead.py [--repeats 3] [--rounds 20]

Part 1 makes a temp git + DVC project (the real stages and library, `lth pipeline` with pruning.rounds=20
and both controls), fills every stage's outputs with files of the real sizes (data/prepared ~47 MB,
per trial final.pt, mask.pt, metrics.json, curve.csv, run.json), records them with `dvc commit`, and times
`dvc repro` when everything is cached (it must run nothing). Target: < 3 s.
Part 2 times the phases of a stage process before training starts, in a fresh interpreter each repeat:
python start, pinning the numerics (lth.pipeline.numerics) and `import torch`, the lth imports of
stages/train_round.py (and whether they pulled in mlflow), loading the prepared data, opening an existing
MLflow sqlite store (import mlflow + client + experiment) and the first optimizer step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import CACHE, header, median, mnist

ROOT = Path(__file__).resolve().parents[1]

SIZES = {"final.pt": 1_070_000, "mask.pt": 268_000, "metrics.json": 600, "curve.csv": 30_000, "run.json": 500}
CHILD = """
import time, sys
t0 = time.perf_counter()
from lth.pipeline import numerics
numerics.pin()  # as the stage does, before torch is imported
import torch
t1 = time.perf_counter()
from lth.core.data import load_prepared, prepared_path
from lth.core.hparams import Hparams
from lth.lottery.layout import KINDS
from lth.lottery.round import Round, run_round
from lth.pipeline import render, stage
from lth.pipeline.workspace import DATA_DIR, RUNS_DIR
from lth.tracking.writer import log_finished
t2 = time.perf_counter()
mlflow_imported = "mlflow" in sys.modules
hp = Hparams()
data = load_prepared(prepared_path({cache!r}, hp.dataset), hp.dataset)
t3 = time.perf_counter()
import os
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + {db!r}
from lth.tracking.store import Tracker
Tracker().experiment_id(hp)
t4 = time.perf_counter()
from lth.core.registry import build_model
from lth.core.training import make_optimizer
model = build_model(hp)
model(data.train.x[:60]).sum().backward()
make_optimizer(model, hp.training).step()  # torch.optim imports torch._dynamo on the first step
t5 = time.perf_counter()
print(t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, mlflow_imported)
"""


class Project:
    """A copy of this checkout (stages, library, params.yaml with `changes`) as its own git + DVC repo, with
    dvc.yaml rendered by `lth pipeline`; commands run in subprocesses with the copy's library."""

    def __init__(self, root: Path, changes: dict[str, object]):
        self.root = root
        self.env = {
            **os.environ,
            "PYTHONPATH": str(root / "src"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "GIT_AUTHOR_NAME": "lth-bench",
            "GIT_AUTHOR_EMAIL": "bench@example.com",
            "GIT_COMMITTER_NAME": "lth-bench",
            "GIT_COMMITTER_EMAIL": "bench@example.com",
            "CI": "true",
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)
        root.mkdir(parents=True)
        for name in ("stages", "src"):
            shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in (".dvcignore", ".gitignore"):
            shutil.copy(ROOT / name, root / name)
        doc = yaml.safe_load((ROOT / "params.yaml").read_text())
        for key, value in changes.items():
            section = doc
            *parents, last = key.split(".")
            for part in parents:
                section = section.setdefault(part, {})
            section[last] = value
        (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        self.run("git", "init", "-q")
        self.dvc("init", "-q")
        self.dvc("config", "core.analytics", "false")
        shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")
        self.run(sys.executable, "-m", "lth.cli", "pipeline")
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", "init")

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def dvc(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args)


def noop_repro(rounds: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = Project(
            Path(tmp) / "p", {"pruning.rounds": rounds, "controls.random_reinit": True, "controls.random_pruning": True}
        )
        root = project.root
        (root / "data" / "prepared").mkdir(parents=True)
        (root / "data" / "prepared" / "mnist.pt").write_bytes(os.urandom(47_000_000))
        stages = 0
        for kind in ("ticket", "reinit", "random_pruning"):
            for k in range(0 if kind == "ticket" else 1, rounds + 1):
                trial = root / "runs" / kind / f"round_{k:02d}" / "trial_0"
                trial.mkdir(parents=True)
                for name, size in SIZES.items():
                    (trial / name).write_bytes(os.urandom(size))
                if kind == "ticket" and k == 0:
                    (trial / "rewind.pt").write_bytes(os.urandom(SIZES["final.pt"]))
                stages += 1
        stages += 2  # prepare and evaluate
        _fake_outputs(root, "evaluate")
        t0 = time.perf_counter()
        project.dvc("commit", "-f")
        print(f"part 1: {stages} stages recorded with dvc commit ({time.perf_counter() - t0:.1f} s)")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = project.dvc("repro")
            times.append(time.perf_counter() - t0)
            assert "Running stage" not in out.stdout, f"dvc repro ran a stage:\n{out.stdout}"
        print(
            f"  no-op dvc repro: {median(times):.2f} s (median of {repeats}: {[round(t, 2) for t in times]}); "
            "target < 3 s"
        )
        t0 = time.perf_counter()
        project.dvc("repro", "ticket_round_01")
        print(f"  no-op dvc repro ticket_round_01 (one target): {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        project.dvc("status")
        print(f"  dvc status: {time.perf_counter() - t0:.2f} s")


def _fake_outputs(root: Path, stage: str) -> None:
    """Small files in place of a stage's outputs, metrics and plots (a directory gets one file inside)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    for entry in spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []):
        path = root / (entry if isinstance(entry, str) else next(iter(entry)))
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n" if path.suffix == ".json" else "x\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "figure.png").write_bytes(b"x")


def stage_startup(repeats: int) -> None:
    mnist()  # make sure the prepared data exists
    print("part 2: fixed cost of a stage process (fresh interpreter each repeat), seconds")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        code = CHILD.format(cache=str(CACHE), db=str(Path(tmp) / "mlflow.db"))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        print(f"  (first stage process, which creates the sqlite store: {time.perf_counter() - t0:.2f} s in all)")
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            _, *seconds, mlflow_imported = out.stdout.split()
            rows.append((_python_start(), *map(float, seconds)))
            if mlflow_imported == "True":
                print("  WARNING: importing the stage's lth modules imported mlflow")
    names = (
        "python start (python -c pass)",
        "pin numerics, import torch",
        "lth stage imports (no mlflow)",
        "load prepared MNIST",
        "open MLflow sqlite store",
        "first optimizer step (torch._dynamo)",
    )
    for i, name in enumerate(names):
        print(f"  {name:<38}{median([r[i] for r in rows]):6.2f}")
    print(f"  {'total before training':<38}{sum(median([r[i] for r in rows]) for i in range(len(names))):6.2f}")


def _python_start() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    header("pipeline overhead")
    noop_repro(args.rounds, args.repeats)
    stage_startup(args.repeats)


if __name__ == "__main__":
    main()
