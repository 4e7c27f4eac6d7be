"""Sparse kernels for heavily pruned fully connected networks on CPU.

Once most weights are pruned, a dense matmul spends its time on zeros. Here a pruned `nn.Linear` trains as
the vector of its kept weights in CSR order: the forward pass and the input gradient are sparse-dense
matmuls, and the weight gradient is a sampled dense-dense product (SDDMM) computed only at the kept
positions, so pruned weights cannot move at all and need no masking. benchmarks/bench_sparse.py measures
where this pays: below about 15% of weights remaining on one CPU thread (1.4x at 5%, 1.7x at 1.2%),
never above; `auto` switches it on below SPARSE_BELOW. Results equal the dense loop's up to
floating-point rounding (the sums run in another order), not bit for bit, so the choice is a pure
function of the mask and the `runtime.sparse` setting: the same params always take the same path.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lth.core.models.lenet import MLP
from lth.core.pruning import Mask

# CSR tensors work, and are what this module is for; PyTorch still calls them beta on every construction.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

SPARSE_BELOW = 0.10  # fraction of a network's prunable weights remaining
SETTINGS = ("auto", "on", "off")


def use_sparse(model: nn.Module, mask: Mask | None, device: torch.device, setting: str = "auto") -> bool:
    """Whether to train `model` with sparse kernels: fully connected networks on CPU, with a mask, when
    `setting` is `on`, or `auto` and at most SPARSE_BELOW of the weights remain."""
    if setting not in SETTINGS:
        raise ValueError(f"runtime.sparse={setting!r} (valid: {', '.join(SETTINGS)})")
    if setting == "off" or not mask or device.type != "cpu" or not isinstance(model, MLP):
        return False
    kept = sum(int(m.sum()) for m in mask.values())
    return setting == "on" or kept <= SPARSE_BELOW * sum(m.numel() for m in mask.values())


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # The structure is built once, correct by construction: checking it at every step would cost time.
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        values: torch.Tensor,
        bias: torch.Tensor,
        x: torch.Tensor,
        layer: SparseLinear,
    ) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(values, x)
        weight = _csr(layer.crow, layer.col, values, layer.shape)
        return torch.sparse.mm(weight, x.t()).t() + bias

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple:
        values, x = ctx.saved_tensors
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[2]:  # the first layer's input (the images) needs none
            weight_t = _csr(layer.crow_t, layer.col_t, values[layer.order_t], layer.shape[::-1])
            grad_x = torch.sparse.mm(weight_t, grad_y.t()).t()
        pattern = _csr(layer.crow, layer.col, torch.zeros_like(values), layer.shape)
        grad_values = torch.sparse.sampled_addmm(pattern, grad_y.t().contiguous(), x, beta=0.0).values()
        return grad_values, grad_y.sum(0), grad_x, None


def _crow(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    return crow


class SparseLinear(nn.Module):
    """A pruned linear layer whose parameters are its kept weights (row-major order) and its bias."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.shape = tuple(linear.weight.shape)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major, as CSR stores them
        self.rows, self.col, self.crow = rows, cols, _crow(rows, self.shape[0])
        self.values = nn.Parameter(linear.weight.detach()[rows, cols].clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())
        # The transpose's CSR: the same entries ordered by (column, row).
        self.order_t = torch.argsort(cols * self.shape[0] + rows)
        self.crow_t, self.col_t = _crow(cols, self.shape[1]), rows[self.order_t]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseLinearFunction.apply(self.values, self.bias, x, self)

    @torch.no_grad()
    def write_to(self, linear: nn.Linear) -> None:
        linear.weight.zero_()
        linear.weight[self.rows, self.col] = self.values
        linear.bias.copy_(self.bias)


class SparseMLP(nn.Module):
    """The training view of a pruned MLP: same computation, sparse layers. `write_to` copies the trained
    weights back into the dense model, which evaluation, snapshots and checkpoints use."""

    def __init__(self, model: MLP, mask: Mask):
        super().__init__()
        self.layers = nn.ModuleList(
            SparseLinear(layer, mask[f"layers.{i}.weight"]) for i, layer in enumerate(model.layers)
        )
        self.dropout = model.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.dropout(torch.relu(layer(x)))
        return self.layers[-1](x)

    def write_to(self, model: MLP) -> None:
        for sparse_layer, layer in zip(self.layers, model.layers, strict=True):
            sparse_layer.write_to(layer)


class TrainingView:
    """What the optimizer trains: the model itself, with pruned weights' gradients zeroed before each step
    (so their optimizer state and updates stay exactly zero), or, for a heavily pruned MLP on CPU, its
    sparse view (`SparseMLP`), whose weights `sync` writes back into the model whenever they are read."""

    def __init__(self, model: nn.Module, mask: Mask | None, device: torch.device, setting: str = "auto"):
        self.model = model
        self.engine = "sparse" if use_sparse(model, mask, device, setting) else "dense"
        self.net = SparseMLP(model, mask).to(device) if self.engine == "sparse" else model
        params = dict(model.named_parameters())
        masked = (
            []
            if self.engine == "sparse"
            else [(params[n], m.to(device, params[n].dtype)) for n, m in (mask or {}).items() if not bool(m.all())]
        )
        self._params, self._masks = [p for p, _ in masked], [m for _, m in masked]

    def mask_gradients(self) -> None:
        if self._params:
            torch._foreach_mul_([p.grad for p in self._params], self._masks)

    def sync(self) -> None:
        if self.net is not self.model:
            self.net.write_to(self.model)
