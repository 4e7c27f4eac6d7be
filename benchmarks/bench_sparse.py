"""Does training cost fall with sparsity? lth's two training paths, by percent of weights remaining.

    python benchmarks/bench_sparse.py [--iterations 300] [--repeats 3] [--threads 1]

dense   lth.core.training.train with TrainJob(sparse="off"): dense matmuls, gradients multiplied by the
        mask, fused Adam on full tensors
sparse  lth.core.training.train with TrainJob(sparse="on") (lth.core.sparse): each weight matrix held as CSR,
        its parameter only the vector of kept values; forward torch.sparse.mm, weight gradient
        torch.sparse.sampled_addmm (SDDMM: only at kept positions), input gradient torch.sparse.mm with the
        transposed CSR
Both train LeNet-300-100 on the same batches from the same magnitude-pruned start (evaluation excluded:
the loop's own timer). The weights after --check iterations are compared (max abs difference). runtime.sparse
= auto switches to sparse below lth.core.sparse.SPARSE_BELOW of the weights remaining.
"""

from __future__ import annotations

import dataclasses

import torch
from common import arg_parser, header, interleave, median, mnist, pruned_lenet

from lth.core.hparams import Hparams
from lth.core.sparse import SPARSE_BELOW
from lth.core.training import TrainJob, train

PERCENTS = (100.0, 50.0, 20.0, 10.0, 5.0, 1.2)


def main() -> None:
    ap = arg_parser(__doc__, iterations=300, repeats=3)
    ap.add_argument("--check", type=int, default=50, help="iterations of the equivalence check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header(f"sparse kernels vs dense-masked, LeNet-300-100 batch 60, {args.threads} thread(s)")
    hp = Hparams()
    data = mnist(hp)

    def run(percent: float, iterations: int, sparse: str) -> tuple[float, dict]:
        thp = dataclasses.replace(hp.training, iterations=iterations, eval_every=iterations, test_every=iterations)
        model, mask = pruned_lenet(hp, percent)
        result = train(model, data, TrainJob(thp, 0, mask, sparse=sparse))
        return iterations / result.seconds["train"], result.state

    variants = {}
    for p in PERCENTS:
        variants[f"dense {p}"] = lambda p=p: run(p, args.iterations, "off")[0]
        variants[f"sparse {p}"] = lambda p=p: run(p, args.iterations, "on")[0]
    res = interleave(variants, args.repeats)
    print(f"{'% remaining':>12}{'dense it/s':>12}{'sparse it/s':>13}{'sparse/dense':>14}{'max |dw|':>11}   auto picks")
    for p in PERCENTS:
        dense_state, sparse_state = run(p, args.check, "off")[1], run(p, args.check, "on")[1]
        diff = max(float((dense_state[k] - sparse_state[k]).abs().max()) for k in dense_state)
        d, s = median(res[f"dense {p}"]), median(res[f"sparse {p}"])
        auto = "sparse" if p / 100 <= SPARSE_BELOW else "dense"
        print(f"{p:12.1f}{d:12.0f}{s:13.0f}{s / d:13.2f}x{diff:11.1e}   {auto}")


if __name__ == "__main__":
    main()
