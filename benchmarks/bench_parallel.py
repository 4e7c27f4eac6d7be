"""Aggregate training throughput of 2 independent runs in parallel vs one after another.

    python benchmarks/bench_parallel.py [--iterations 2000] [--repeats 3] [--threads 1]

Each run is a separate process training LeNet-300-100 (50% mask, evaluation off) for --iterations with
--threads threads, as a trial worker or a parallel DVC stage does. Three ways to get 2 runs done, interleaved:
  sequential   one after another, --threads threads each
  sequential-all-cores  one after another, each with every core (what one process alone would use)
  parallel     both at once, --threads threads each
The ratio is aggregate iterations/s in parallel over sequential (2.0 is perfect on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common import arg_parser, header, median

HERE = Path(__file__).resolve().parent
CHILD = """
import dataclasses, sys, torch
sys.path.insert(0, {here!r})
from common import mnist, pruned_lenet
from lth.core.hparams import Hparams
from lth.core.training import TrainJob, train
torch.set_num_threads({threads})
hp = Hparams(); data = mnist(hp)
thp = dataclasses.replace(hp.training, iterations={iterations}, eval_every={iterations}, test_every={iterations})
model, mask = pruned_lenet(hp, 50)
print("ready", flush=True)
sys.stdin.readline()
train(model, data, TrainJob(thp, 0, mask))
"""


def start(iterations: int, threads: int) -> subprocess.Popen:
    """A training process, started and waiting (imports and data loaded) until told to go."""
    code = CHILD.format(here=str(HERE), iterations=iterations, threads=threads)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def go(procs: list[subprocess.Popen]) -> float:
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit("a training process failed")
    return time.perf_counter() - t0


def main() -> None:
    ap = arg_parser(__doc__, iterations=2000, repeats=3)
    args = ap.parse_args()
    header(f"2 runs in parallel vs sequential, {args.threads} thread(s) each, {args.iterations} iterations each")
    cores = os.cpu_count() or 1
    seq, seq_all, par = [], [], []
    modes = ("seq", "all", "par")
    for r in range(args.repeats):
        for mode in modes if r % 2 == 0 else reversed(modes):
            if mode == "par":
                par.append(2 * args.iterations / go([start(args.iterations, args.threads) for _ in range(2)]))
            else:
                threads = args.threads if mode == "seq" else cores
                seconds = sum(go([start(args.iterations, threads)]) for _ in range(2))
                (seq if mode == "seq" else seq_all).append(2 * args.iterations / seconds)
        print(
            f"  repeat {r}: sequential {seq[-1]:.0f} it/s, sequential {cores} threads {seq_all[-1]:.0f} it/s, "
            f"parallel {par[-1]:.0f} it/s",
            flush=True,
        )
    s, a, p = median(seq), median(seq_all), median(par)
    print(f"aggregate it/s (medians): sequential {s:.0f}, sequential with {cores} threads {a:.0f}, parallel {p:.0f}")
    print(
        f"parallel / sequential = {p / s:.2f}x; parallel / sequential-{cores}-threads = {p / a:.2f}x "
        f"(process start-up and data loading excluded)"
    )


if __name__ == "__main__":
    main()
