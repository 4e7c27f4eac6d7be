"""How far 2 DDP ranks drift from one process, by iterations trained (the table in docs/distributed.md).

    python benchmarks/bench_ddp.py [--iterations 1 10 100 300]

For each N, ticket round 0 of the tests' tiny LeNet-300-100 (`LENET_TINY`: Adam, lr 1.2e-3, batch 60,
seed 0, one thread per process) is trained for N iterations by the stage script itself, once with
`runtime.processes_per_node: 2` (the stage re-launches under torchrun, gloo) and once in one process, each
in its own project directory. It prints the largest absolute weight difference, the share of weights that
are bit-equal, and both test accuracies. Both runs start from the same initialization and read the
batches in the same order, so every difference comes from the order of the float additions in the
gradient average. Needs MNIST (LTH_DATA_DIR).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' tiny params: the benchmark measures what the tests train

from lth.lottery.layout import read_metrics, read_run_info  # noqa: E402
from tests.conftest import LENET_TINY, copy_code, write_params  # noqa: E402
from tests.helpers import with_changes  # noqa: E402


def train(work: Path, data: Path, iterations: int, processes: int) -> Path:
    """Ticket round 0 for `iterations` iterations by `processes` processes, in `work`; its trial 0 folder."""
    work.mkdir()
    copy_code(work)
    (work / "data").symlink_to(data)
    changes = {"training.iterations": iterations, "training.eval_every": iterations, "training.test_every": iterations}
    params = with_changes(LENET_TINY, changes | {"runtime.threads": 1, "runtime.processes_per_node": processes})
    write_params(work / "params.yaml", params)
    cmd = [sys.executable, "stages/train_round.py", "--kind", "ticket", "--round", "0"]
    subprocess.run(cmd, cwd=work, check=True, capture_output=True, env=env(work))
    return work / "runs" / "ticket" / "round_00" / "trial_0"


def env(work: Path) -> dict[str, str]:
    return {**os.environ, "LTH_CHECKPOINT_DIR": str(work / "ckpt"), "MLFLOW_TRACKING_URI": f"sqlite:///{work}/m.db"}


def compare(ddp: Path, one: Path) -> tuple[float, float, float, float]:
    """(max abs weight difference, share of bit-equal weights, test accuracy of DDP, of one process)."""
    a, b = (torch.load(d / "final.pt", weights_only=True) for d in (ddp, one))
    weights = [k for k in a if a[k].is_floating_point()]
    gap = max(float((a[k] - b[k]).abs().max()) for k in weights)
    equal = sum(int((a[k] == b[k]).sum()) for k in weights) / sum(a[k].numel() for k in weights)
    return gap, equal, read_metrics(ddp)["test_accuracy_final"], read_metrics(one)["test_accuracy_final"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 10, 100, 300])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prep = tmp / "prep"
        prep.mkdir()
        copy_code(prep)
        write_params(prep / "params.yaml", LENET_TINY)
        subprocess.run([sys.executable, "stages/prepare.py"], cwd=prep, check=True, capture_output=True)
        print("| iterations | max abs weight difference | weights bit-equal | test accuracy, 2 ranks / 1 process |")
        print("|---|---|---|---|")
        for n in args.iterations:
            ddp = train(tmp / f"ddp{n}", prep / "data", n, processes=2)
            one = train(tmp / f"one{n}", prep / "data", n, processes=1)
            gap, equal, acc_ddp, acc_one = compare(ddp, one)
            print(f"| {n} | {gap:.2g} | {equal:.1%} | {acc_ddp:.4f} / {acc_one:.4f} |", flush=True)
        environment = read_run_info(one)["environment"]
        print(f"ATen CPU capability {environment['cpu_capability']}, torch {torch.__version__}, one thread per process")


if __name__ == "__main__":
    main()
