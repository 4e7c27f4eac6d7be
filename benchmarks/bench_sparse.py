"""Does training cost fall with sparsity? Dense-masked (lth's loop) vs a sparse-kernel loop, by percent remaining.

    python benchmarks/bench_sparse.py [--iterations 300] [--repeats 3] [--threads 1]

dense-masked  lth.training.train: dense matmuls, gradients multiplied by the mask, fused Adam on full tensors
sparse        the most favourable sparse formulation: every weight matrix is held as CSR, its trainable
              parameter is only the vector of kept values (no masking at all); forward torch.sparse.mm,
              weight gradient torch.sparse.sampled_addmm (SDDMM: only at kept positions), input gradient
              torch.sparse.mm with the transposed CSR; fused Adam on the values vectors.
Both train LeNet-300-100 on the same batches from the same magnitude-pruned start; the sparse loop's
weights after --check iterations are compared with the dense-masked loop's (max abs difference).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import torch
from common import header, interleave, median, mnist, pruned_lenet

from lth.data import Data
from lth.hparams import Hparams
from lth.training import epoch_order, loss_fn, train

PERCENTS = (100.0, 50.0, 20.0, 5.0, 1.2)


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, bias, x, layer):  # noqa: ANN001, ANN205
        ctx.layer = layer
        ctx.save_for_backward(values, x)
        w = torch.sparse_csr_tensor(layer.crow, layer.col, values, layer.shape)
        return torch.sparse.mm(w, x.t()).t() + bias

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        values, x = ctx.saved_tensors
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[2]:
            wt = torch.sparse_csr_tensor(layer.crow_t, layer.col_t, values[layer.perm_t], layer.shape[::-1])
            grad_x = torch.sparse.mm(wt, grad_y.t()).t()
        pattern = torch.sparse_csr_tensor(layer.crow, layer.col, torch.zeros_like(values), layer.shape)
        grad_values = torch.sparse.sampled_addmm(pattern, grad_y.t().contiguous(), x, beta=0.0).values()
        return grad_values, grad_y.sum(0), grad_x, None


class SparseLinear(torch.nn.Module):
    """A pruned Linear layer whose parameter is the vector of its kept weights (row-major CSR order)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        csr = (weight * mask).to_sparse_csr() if mask.all() else _csr(weight, mask)
        self.shape = tuple(weight.shape)
        self.crow, self.col = csr.crow_indices(), csr.col_indices()
        self.values = torch.nn.Parameter(csr.values().clone())
        self.bias = torch.nn.Parameter(bias.detach().clone())
        # The transpose's structure and where each of its values sits in `values`.
        index = torch.sparse_csr_tensor(self.crow, self.col, torch.arange(len(self.col), dtype=torch.float64),
                                        self.shape)
        t = index.to_dense().t().contiguous()
        t_mask = mask.t().contiguous()
        t_csr = _csr(t, t_mask)
        self.crow_t, self.col_t = t_csr.crow_indices(), t_csr.col_indices()
        self.perm_t = t_csr.values().long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseLinearFn.apply(self.values, self.bias, x, self)

    def dense_weight(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, self.values.detach(), self.shape).to_dense()


def _csr(dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CSR of `dense` at the positions where `mask` is True (kept zeros stay explicit entries)."""
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=mask.shape[0]), 0)
    return torch.sparse_csr_tensor(crow, cols, dense.detach()[rows, cols].clone(), tuple(mask.shape))


class SparseMLP(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, mask: dict[str, torch.Tensor]):
        super().__init__()
        self.layers = torch.nn.ModuleList(SparseLinear(layer.weight, layer.bias, mask[f"layers.{i}.weight"])
                                          for i, layer in enumerate(model.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def sparse_loop(hp: Hparams, data: Data, percent: float, iterations: int) -> tuple[float, SparseMLP]:
    model, mask = pruned_lenet(hp, percent)
    sparse = SparseMLP(model, mask)
    opt = torch.optim.Adam(sparse.parameters(), lr=hp.training.lr, fused=True)
    x_all, y_all = data.train.x, data.train.y
    b = hp.training.batch_size
    order = epoch_order(len(y_all), 0, 0, torch.device("cpu"))
    t0 = time.perf_counter()
    for it in range(iterations):
        idx = order[it * b:(it + 1) * b]
        loss = loss_fn(sparse(x_all.index_select(0, idx)), y_all.index_select(0, idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return iterations / (time.perf_counter() - t0), sparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", type=int, default=50, help="iterations of the equivalence check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]parse")  # "CSR support is in beta" and friends
    header(f"sparse kernels vs dense-masked, LeNet-300-100 batch 60, {args.threads} thread(s)")
    hp = Hparams()
    data = mnist(hp)

    def dense(percent: float, iterations: int) -> tuple[float, dict]:
        thp = dataclasses.replace(hp.training, iterations=iterations, eval_every=iterations, test_every=iterations)
        model, mask = pruned_lenet(hp, percent)
        result = train(model, data, thp, seed=0, mask=mask)
        return iterations / result.seconds["train"], result.state

    variants = {}
    for p in PERCENTS:
        variants[f"dense {p}"] = lambda p=p: dense(p, args.iterations)[0]
        variants[f"sparse {p}"] = lambda p=p: sparse_loop(hp, data, p, args.iterations)[0]
    res = interleave(variants, args.repeats)
    print(f"{'% remaining':>12}{'dense-masked it/s':>19}{'sparse it/s':>13}{'sparse/dense':>14}{'max |dw|':>11}")
    for p in PERCENTS:
        _, state = dense(p, args.check)
        _, sparse = sparse_loop(hp, data, p, args.check)
        diff = max(float((state[f"layers.{i}.weight"] - layer.dense_weight()).abs().max())
                   for i, layer in enumerate(sparse.layers))
        d, s = median(res[f"dense {p}"]), median(res[f"sparse {p}"])
        print(f"{p:12.1f}{d:19.0f}{s:13.0f}{s / d:13.2f}x{diff:11.1e}")


if __name__ == "__main__":
    main()
