"""Share of a round's wall time spent evaluating, with the default settings, and evaluate()'s batch size.

    python benchmarks/bench_eval.py [--iterations 2000] [--repeats 3] [--threads 1]

Part 1 trains LeNet-300-100 (50% mask) with the defaults (validation on 5K every eval_every=100 iterations,
test on 10K every test_every=1000 and once on the best-validation snapshot) and prints eval / (train + eval)
from the loop's own timers. The share is the same for every 1000 iterations, so a 2000-iteration run gives
a full 50K-iteration round's share up to the one extra test of the best snapshot.
Part 2 times evaluate() on the validation set at several batch sizes, interleaved.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from common import arg_parser, header, interleave, median, mnist, pruned_lenet

from lth.core.evaluation import evaluate
from lth.core.hparams import Hparams
from lth.core.training import TrainJob, train


def main() -> None:
    ap = arg_parser(__doc__, iterations=2000, repeats=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header(f"evaluation cost, LeNet-300-100, {args.threads} thread(s)")
    hp = Hparams()
    data = mnist(hp)
    thp = dataclasses.replace(hp.training, iterations=args.iterations)
    print(
        f"part 1: {args.iterations} iterations, eval_every={thp.eval_every} (5K validation), "
        f"test_every={thp.test_every} (10K test)"
    )
    shares = []
    for r in range(args.repeats):
        model, mask = pruned_lenet(hp, 50)
        s = train(model, data, TrainJob(thp, 0, mask)).seconds
        shares.append(s["eval"] / (s["train"] + s["eval"]))
        print(f"  repeat {r}: train {s['train']:.2f} s, eval {s['eval']:.2f} s, eval share {100 * shares[-1]:.1f}%")
    print(f"eval share of wall time (median): {100 * median(shares):.1f}%  (target <= 25%)")

    print("part 2: evaluate() on the 5K validation set by batch size (ms, median)")
    model, _ = pruned_lenet(hp, 50)
    sizes = (500, 1000, 2000, 5000)
    timed = interleave(
        {bs: (lambda bs=bs: _time(lambda: evaluate(model, data.val, bs))) for bs in sizes}, args.repeats * 3
    )
    for bs in sizes:
        print(f"  batch {bs:>5}: {1000 * median(timed[bs]):6.1f} ms")


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
