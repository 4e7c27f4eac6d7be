"""What portable numerics cost: LeNet-300-100 training speed with ATen, MKL and oneDNN capped at AVX2
(`runtime.numerics: portable`, the default) against the CPU's own best kernels (`native`).

    python benchmarks/bench_numerics.py [--iterations 1000] [--repeats 3]

Each measurement is a fresh process (the kernels are chosen when torch starts), the two modes interleaved;
medians of iterations per second of `lth.core.training.train` (evaluation excluded), one thread. On an
AVX2-only CPU both modes run the same ATen kernels, so what remains is MKL's conditional numerical
reproducibility (MKL_CBWR); on an AVX-512 CPU the ratio also prices the narrower vectors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from lth.pipeline.numerics import PORTABLE_ENV

CHILD = """
import sys, torch
sys.path.insert(0, {bench!r})
from common import mnist, pruned_lenet
from lth.core.hparams import Hparams
from lth.core.training import TrainJob, train
import dataclasses
torch.set_num_threads(1)
hp = Hparams()
thp = dataclasses.replace(hp.training, iterations={iterations}, eval_every={iterations}, test_every={iterations})
model, mask = pruned_lenet(hp, 100.0)
result = train(model, mnist(hp), TrainJob(thp, 0, mask))
print(torch.backends.cpu.get_cpu_capability(), {iterations} / result.seconds["train"])
"""


def measure(env: dict[str, str], iterations: int) -> tuple[str, float]:
    code = CHILD.format(bench=str(Path(__file__).parent), iterations=iterations)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    capability, speed = out.split()
    return capability, float(speed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    native = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    modes = {"native": native, "portable": {**native, **PORTABLE_ENV}}
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    capability = {}
    for _ in range(args.repeats):
        for mode, env in modes.items():
            capability[mode], speed = measure(env, args.iterations)
            speeds[mode].append(speed)
    for mode in modes:
        runs = ", ".join(f"{s:.0f}" for s in speeds[mode])
        print(f"{mode:<9} ATen {capability[mode]:<8} {statistics.median(speeds[mode]):7.0f} it/s (runs: {runs})")
    ratio = statistics.median(speeds["portable"]) / statistics.median(speeds["native"])
    print(f"portable / native: {ratio:.2f}x")


if __name__ == "__main__":
    main()
