"""1 vs 2 threads per process, per workload: LeNet-300-100 (batch 60, MNIST) and Conv-2 (batch 60, CIFAR-10
shaped random data), plus whether the thread count changes the trained weights' bits.

    python benchmarks/bench_threads.py [--iterations 300] [--repeats 5]

Interleaved repeats, medians. On a shared machine the 2-thread figures suffer most from other processes
(OpenMP threads wait for each other), which is the point: they are what a busy workstation gives.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from common import arg_parser, header, interleave, median, mnist, pruned_lenet

from lth.core.config import from_dict
from lth.core.evaluation import loss_fn
from lth.core.hparams import Hparams
from lth.core.training import TrainJob, train
from lth.lottery.branches import init_model


def conv_loop(threads: int, iterations: int, model_name: str = "conv2") -> float:
    torch.set_num_threads(threads)
    hp = from_dict({"dataset": {"name": "cifar10"}, "model": {"name": model_name}})
    model = init_model(hp, 0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 3, 32, 32, generator=g), torch.randint(0, 10, (600,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
    t0 = time.perf_counter()
    for it in range(iterations):
        s = (it % 10) * 60
        loss = loss_fn(model(x[s : s + 60]), y[s : s + 60])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return iterations / (time.perf_counter() - t0)


def main() -> None:
    ap = arg_parser(__doc__, iterations=300, repeats=5, threads=False)
    args = ap.parse_args()
    header("threads per process")
    hp = Hparams()
    data = mnist(hp)
    thp = dataclasses.replace(
        hp.training, iterations=args.iterations, eval_every=args.iterations, test_every=args.iterations
    )

    def lenet(threads: int) -> float:
        torch.set_num_threads(threads)
        model, mask = pruned_lenet(hp, 50)
        return args.iterations / train(model, data, TrainJob(thp, 0, mask)).seconds["train"]

    conv_iters = max(10, args.iterations // 10)
    res = interleave(
        {
            "lenet 1": lambda: lenet(1),
            "lenet 2": lambda: lenet(2),
            "conv2 1": lambda: conv_loop(1, conv_iters),
            "conv2 2": lambda: conv_loop(2, conv_iters),
        },
        args.repeats,
    )
    for workload in ("lenet", "conv2"):
        one, two = median(res[f"{workload} 1"]), median(res[f"{workload} 2"])
        print(
            f"{workload:<6} 1 thread {one:7.1f} it/s   2 threads {two:7.1f} it/s   2/1 = {two / one:.2f}x   "
            f"(repeats 1: {[round(v) for v in res[f'{workload} 1']]}, 2: {[round(v) for v in res[f'{workload} 2']]})"
        )

    states = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model, mask = pruned_lenet(hp, 50)
        states[threads] = train(model, data, TrainJob(dataclasses.replace(thp, iterations=200), 0, mask)).state
    same = all(torch.equal(states[1][k], states[2][k]) for k in states[1])
    print(f"LeNet weights after 200 iterations at 1 vs 2 threads: {'bit-identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
