"""lth's training loop against a bare PyTorch loop of the same model and batch size, in one run.

    python benchmarks/bench_train_loop.py [--iterations 1000] [--repeats 5] [--threads 1] [--percent 50]

Variants, interleaved and repeated (medians reported):
  lth      lth.core.training.train on LeNet-300-100 with a magnitude-pruned mask (--percent remaining), evaluation
           time excluded (its own timer; eval_every = iterations so it runs only at the start and the end)
  bare     the plainest loop a researcher writes: index a batch, forward, backward, torch.optim.Adam step
  bare+fused  the same with Adam(fused=True), the optimizer lth uses: isolates the cost of masking
The theoretical limit is the FLOP count of one iteration at the measured matmul peak of this run.
"""

from __future__ import annotations

import dataclasses

import torch
from common import LENET_FLOP, arg_parser, bare_loop, header, interleave, matmul_peak, median, mnist, pruned_lenet

from lth.core.hparams import Hparams
from lth.core.training import TrainJob, train


def main() -> None:
    ap = arg_parser(__doc__, iterations=1000, repeats=5)
    ap.add_argument("--percent", type=float, default=50.0, help="percent of weights remaining in lth's run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header(f"training loop, LeNet-300-100, batch 60, {args.threads} thread(s), {args.iterations} iterations")
    hp = Hparams()
    data = mnist(hp)
    thp = dataclasses.replace(
        hp.training, iterations=args.iterations, eval_every=args.iterations, test_every=args.iterations
    )

    def lth_loop() -> float:
        model, mask = pruned_lenet(hp, args.percent)
        result = train(model, data, TrainJob(thp, 0, mask))
        return args.iterations / result.seconds["train"]

    def bare(fused: bool) -> float:
        model, _ = pruned_lenet(hp, 100)
        return bare_loop(model, data, hp.training, args.iterations, fused=fused)

    res = interleave(
        {
            "lth": lth_loop,
            "bare": lambda: bare(False),
            "bare+fused": lambda: bare(True),
            "peak": lambda: matmul_peak(args.threads),
        },
        args.repeats,
    )
    peak = median(res["peak"])
    limit = peak * 1e9 / (LENET_FLOP * hp.training.batch_size)
    lth, b, bf = median(res["lth"]), median(res["bare"]), median(res["bare+fused"])
    print(f"{'variant':<38}{'it/s':>8}{'ms/it':>8}   repeats (it/s)")
    for name, label in (
        ("lth", f"lth.core.training.train ({args.percent:g}% mask)"),
        ("bare", "bare loop (Adam)"),
        ("bare+fused", "bare loop (Adam fused)"),
    ):
        v = median(res[name])
        print(f"{label:<38}{v:8.0f}{1000 / v:8.2f}   {[round(x) for x in res[name]]}")
    print(
        f"{'FLOP limit at matmul peak':<38}{limit:8.0f}{1000 / limit:8.2f}   "
        f"({LENET_FLOP * hp.training.batch_size / 1e6:.1f} MFLOP/it at {peak:.0f} GFLOP/s)"
    )
    print(f"ratio lth / bare loop (Adam):        {lth / b:.2f}x")
    print(f"ratio lth / bare loop (Adam fused):  {lth / bf:.2f}x  (the cost of masking gradients)")
    print(f"lth at {100 * lth / limit:.0f}% of the FLOP limit; bare loop at {100 * b / limit:.0f}%")


if __name__ == "__main__":
    main()
