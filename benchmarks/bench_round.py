"""Phases of one round of the default experiment (LeNet-300-100, 50K iterations), measured, and the whole
experiment (20 rounds + random reinit) extrapolated from them.

    python benchmarks/bench_round.py [--iterations 50000] [--percent 51.2]

Runs the library's own round code in a temp directory: loading the prepared data, lth.imp.run_trial
(network set-up, training with the default evaluation, writing final.pt/mask.pt/metrics.json/curve.csv)
and MLflow logging into a fresh sqlite store. Training and evaluation come from the loop's own timers;
with --iterations below 50000 both are scaled to 50K (per-iteration costs are constant) and the output
says so. The extrapolation adds the per-stage process start-up of bench_overhead.py.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import CACHE, header, mnist

from lth import hparams, pruning
from lth.data import load_prepared, prepared_path
from lth.imp import run_trial, trial_dir

ROUNDS = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=50000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--startup", type=float, default=3.5, help="stage process start-up, s (bench_overhead.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header(f"one round, LeNet-300-100, {args.iterations} iterations, {args.threads} thread(s)", repeated=False)
    mnist()
    hp = hparams.from_dict({"training": {"iterations": args.iterations}})
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LTH_CHECKPOINT_DIR"] = str(Path(tmp) / "checkpoints")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        t0 = time.perf_counter()
        data = load_prepared(prepared_path(CACHE, hp.dataset), hp.dataset)
        load = time.perf_counter() - t0
        runs = Path(tmp) / "runs"
        t0 = time.perf_counter()
        metrics, result, mask = run_trial(hp, data, runs, 0, "ticket", 0, torch.device("cpu"))
        trial = time.perf_counter() - t0
        from lth.tracking import Tracker

        t0 = time.perf_counter()
        tracker = Tracker()
        tracker.experiment_id(hp)
        open_store = time.perf_counter() - t0
        t0 = time.perf_counter()
        tracker.log_round(hp, 0, "ticket", 0, metrics, result.curve, pruning.pack(mask),
                          trial_dir(runs, "ticket", 0, 0) / "final.pt", result.seconds)
        log = time.perf_counter() - t0
    train_s, eval_s = result.seconds["train"], result.seconds["eval"]
    setup_save = trial - train_s - eval_s
    scale = 50000 / args.iterations
    phases = {"stage process start-up (bench_overhead.py)": args.startup, "load prepared data": load,
              "train (50K iterations)": train_s * scale, "evaluate (val every 100, test every 1000)": eval_s * scale,
              "set up network + save outputs": setup_save, "open MLflow store": open_store,
              "log to MLflow (params, curve, mask, weights)": log}
    total = sum(phases.values())
    measured = "measured" if scale == 1 else f"measured over {args.iterations} iterations, scaled x{scale:g}"
    print(f"train: {args.iterations / train_s:.0f} it/s; test accuracy at early stop "
          f"{metrics['test_accuracy_at_early_stop']:.4f} (iteration {metrics['early_stop_iteration']})")
    print(f"{'phase of one round':<46}{'seconds':>9}{'share':>8}")
    for name, s in phases.items():
        print(f"{name:<46}{s:9.1f}{100 * s / total:7.1f}%")
    print(f"{'one round':<46}{total:9.1f}   (train and evaluate {measured})")
    stages = 2 * ROUNDS + 1
    print(f"EXTRAPOLATION, not measured: the default experiment with random reinit = {stages} such stages, which "
          f"dvc repro runs one after another: {stages * total / 3600:.2f} h (later rounds are pruned; lth's loop "
          "runs at the same speed at every sparsity, see bench_sparse.py)")


if __name__ == "__main__":
    main()
