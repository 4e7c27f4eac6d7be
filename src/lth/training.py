"""The training loop: plain, fast, masked, resumable.

Data order is a pure function of (seed, epoch), and stochastic layers are reseeded per iteration, so a
run can start at any iteration (rewinding) or resume from a checkpoint and produce bit-identical
results. Validation is evaluated every `eval_every` iterations; the test set only every `test_every`
iterations and once on the best-validation weights, which gives the same early-stopping test accuracy
as testing every time at a fraction of the cost.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lth.data import Data, Split, augment_batch
from lth.hparams import TrainingHparams
from lth.pruning import Mask
from lth.sparse import SparseMLP, use_sparse

CURVE_COLUMNS = ("iteration", "train_loss", "val_loss", "val_accuracy", "test_accuracy")


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]  # final weights
    curve: list[dict[str, float]]  # one row per evaluation
    metrics: dict[str, float]
    rewind_state: dict[str, torch.Tensor] | None = None  # weights at the rewind iteration, when asked for
    seconds: dict[str, float] = field(default_factory=dict)  # wall time by phase: train, eval


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y)
    return F.cross_entropy(logits, y)


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 2000) -> tuple[float, float]:
    """(mean loss, accuracy) over a split."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(split), batch_size):
        x, y = split.x[i:i + batch_size], split.y[i:i + batch_size]
        logits = model(x)
        total_loss += float(loss_fn(logits, y)) * len(y)
        if logits.shape[-1] == 1:
            correct += int(((logits.squeeze(-1) > 0).float() == y).sum())
        else:
            correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return total_loss / len(split), correct / len(split)


def make_optimizer(model: nn.Module, hp: TrainingHparams) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        # fused: one kernel for the whole update, ~2x faster on CPU than the default per-tensor ops, whose MKL
        # sqrt is ~20x slower on the exact zeros that pruned weights leave in exp_avg_sq (docs/performance.md).
        return torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    raise ValueError(f"unknown optimizer '{hp.optimizer}' (valid: adam, sgd)")


def learning_rate(hp: TrainingHparams, iteration: int) -> float:
    """Linear warmup, then step decay at the milestones."""
    lr = hp.lr * hp.lr_gamma ** sum(iteration >= m for m in hp.lr_milestones)
    if hp.warmup_iterations > 0:
        lr *= min(1.0, (iteration + 1) / hp.warmup_iterations)
    return lr


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temp file, fsync, rename: a checkpoint is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT_FORMAT = 1


def load_checkpoint(path: Path | None, key: str, device: torch.device) -> dict[str, Any] | None:
    """A checkpoint to resume from, or None. One made for another key (other hyperparameters, round,
    trial or kind) or one that cannot be read is ignored with a message: the round starts over."""
    if path is None or not path.exists():
        return None
    try:
        ck = torch.load(path, weights_only=True, map_location=device)
    except Exception as e:  # noqa: BLE001 - any unreadable file means: start over
        print(f"lth: ignoring unreadable checkpoint {path} ({type(e).__name__}); starting the round over",
              file=sys.stderr, flush=True)
        return None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or ck.get("key") != key:
        found = ck.get("key") if isinstance(ck, dict) else None
        print(f"lth: ignoring checkpoint {path}: it was made for {found or 'an unknown run'}, not {key}; "
              "starting the round over", file=sys.stderr, flush=True)
        return None
    return ck


class StopRequest:
    """While training, SIGINT (Ctrl-C) and SIGTERM only set a flag: the loop then saves a checkpoint at the
    next iteration boundary and exits. A second Ctrl-C stops at once. Only the main thread can do this."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def exit(self, message: str) -> None:
        print(f"lth: {message}", file=sys.stderr, flush=True)
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + (self.signum or 0))


def _has_randomness(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


ProgressFn = Callable[[int, dict[str, float]], None]


def train(model: nn.Module, data: Data, hp: TrainingHparams, seed: int, mask: Mask | None = None,
          start_iteration: int = 0, rewind_iteration: int | None = None, checkpoint: Path | None = None,
          checkpoint_seconds: float = 60.0, progress: ProgressFn | None = None, checkpoint_key: str = "",
          label: str = "training", stop: StopRequest | None = None, sparse: str = "auto") -> TrainResult:
    """Train `model` (already initialized, masked and on its device) from `start_iteration` to
    `hp.iterations`. Pruned weights (mask False) stay exactly zero: their gradients are zeroed before
    each step, so their optimizer state stays zero and Adam's and SGD's updates of them are exactly zero
    (re-masking the weights after each step would cost ~5% for nothing; tests/test_training.py checks it).

    With `checkpoint`, the state is saved there atomically every `checkpoint_seconds` (at evaluations)
    and when `stop` reports SIGINT/SIGTERM; training resumes from it when it exists and was saved under
    the same `checkpoint_key` (the round hash).

    A heavily pruned fully connected network trains through sparse kernels (lth.sparse; `sparse`:
    auto | on | off): `net` is then its sparse training view, written back into `model` whenever the
    weights are read (evaluation, snapshots, checkpoints, the end)."""
    device = next(model.parameters()).device
    engine = "sparse" if use_sparse(model, mask, device, sparse) else "dense"
    ck = load_checkpoint(checkpoint, checkpoint_key, device)
    if ck is not None and ck.get("engine", "dense") != engine:
        print(f"lth: ignoring checkpoint {checkpoint}: it was trained with {ck.get('engine', 'dense')} kernels, "
              f"this run uses {engine} ones (runtime.sparse); starting the round over", file=sys.stderr, flush=True)
        ck = None
    if ck is not None:
        model.load_state_dict(ck["model"])
    net = SparseMLP(model, mask).to(device) if engine == "sparse" else model
    params = dict(model.named_parameters())
    masked = [] if engine == "sparse" else [
        (params[n], m.to(device, params[n].dtype)) for n, m in (mask or {}).items() if not bool(m.all())]
    masked_params, masked_values = [p for p, _ in masked], [m for _, m in masked]
    optimizer = make_optimizer(net, hp)

    def sync() -> None:  # the sparse view's weights into the dense model
        if net is not model:
            net.write_to(model)
    stochastic = _has_randomness(model)
    train_x, train_y = data.train.x, data.train.y
    n, b = len(train_y), hp.batch_size
    if b > n:
        raise ValueError(f"training.batch_size={b} exceeds the training set ({n} examples)")
    steps_per_epoch = n // b  # the last partial batch of each epoch is dropped

    curve: list[dict[str, float]] = []
    best: dict[str, Any] = {"val_loss": math.inf, "iteration": start_iteration, "state": None}
    rewind_state = None
    iteration = start_iteration
    seconds = {"train": 0.0, "eval": 0.0}
    loss_sum = torch.zeros((), device=device)
    loss_count = 0

    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])
        iteration, curve, seconds = ck["iteration"], ck["curve"], ck["seconds"]
        best = {"val_loss": ck["best_val_loss"], "iteration": ck["best_iteration"], "state": ck["best_state"]}
        rewind_state = ck["rewind_state"]
        loss_sum, loss_count = ck["loss_sum"].to(device), ck["loss_count"]
        print(f"lth: resuming {label} from iteration {iteration} ({checkpoint})", file=sys.stderr, flush=True)

    def record(it: int) -> None:
        nonlocal loss_sum, loss_count
        t0 = time.perf_counter()
        sync()
        val_loss, val_acc = evaluate(model, data.val)
        row = {"iteration": it, "train_loss": float(loss_sum) / loss_count if loss_count else math.nan,
               "val_loss": val_loss, "val_accuracy": val_acc, "test_accuracy": math.nan}
        if it % hp.test_every == 0 or it == hp.iterations:
            row["test_accuracy"] = evaluate(model, data.test)[1]
        if val_loss < best["val_loss"]:
            best.update(val_loss=val_loss, iteration=it,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        curve.append(row)
        loss_sum, loss_count = torch.zeros((), device=device), 0
        seconds["eval"] += time.perf_counter() - t0
        if progress:
            progress(it, row)

    def save_checkpoint() -> None:
        sync()
        save_atomic({"format": CHECKPOINT_FORMAT, "key": checkpoint_key, "engine": engine, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "iteration": iteration, "curve": curve,
                     "seconds": seconds, "best_val_loss": best["val_loss"], "best_iteration": best["iteration"],
                     "best_state": best["state"], "rewind_state": rewind_state,
                     "loss_sum": loss_sum.detach().clone(), "loss_count": loss_count}, checkpoint)

    if not curve:
        if rewind_iteration == iteration:
            rewind_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record(iteration)

    model.train()
    net.train()
    current_lr = None
    last_checkpoint = t_loop = time.perf_counter()
    eval_before_loop = seconds["eval"]
    order, order_epoch = None, -1
    gen = torch.Generator(device=device) if data.augment else None
    while iteration < hp.iterations:
        if stop is not None and stop.signum is not None:  # Ctrl-C or SIGTERM: save, then exit
            if checkpoint is not None:
                save_checkpoint()
            stop.exit(f"{label} interrupted (signal {stop.signum}) at iteration {iteration}; "
                      + (f"checkpoint saved to {checkpoint}; run the same command again to resume"
                         if checkpoint is not None else "no checkpoint (checkpointing is off)"))
        epoch, step = divmod(iteration, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(n, seed, epoch, device), epoch
        lr = learning_rate(hp, iteration)
        if lr != current_lr:
            for group in optimizer.param_groups:
                group["lr"] = lr
            current_lr = lr
        idx = order[step * b:(step + 1) * b]
        x, y = train_x.index_select(0, idx), train_y.index_select(0, idx)  # faster than x[idx] on CPU
        if gen is not None:
            x = augment_batch(x, gen.manual_seed(seed * 1_000_003 + iteration))
        if stochastic:
            torch.manual_seed(seed * 1_000_003 + iteration)
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if masked:
            torch._foreach_mul_([p.grad for p in masked_params], masked_values)
        optimizer.step()
        loss_sum += loss.detach()
        loss_count += 1
        iteration += 1
        if rewind_iteration == iteration:
            sync()
            rewind_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if iteration % hp.eval_every == 0 or iteration == hp.iterations:
            record(iteration)
            if checkpoint is not None and time.perf_counter() - last_checkpoint > checkpoint_seconds:
                save_checkpoint()
                last_checkpoint = time.perf_counter()

    seconds["train"] += time.perf_counter() - t_loop - (seconds["eval"] - eval_before_loop)
    sync()
    final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    final_test = curve[-1]["test_accuracy"]
    model.load_state_dict(best["state"])
    t0 = time.perf_counter()
    _, best_test = evaluate(model, data.test)
    seconds["eval"] += time.perf_counter() - t0
    model.load_state_dict(final_state)
    metrics = {
        "early_stop_iteration": best["iteration"],
        "test_accuracy_at_early_stop": best_test,
        "val_loss_at_early_stop": best["val_loss"],
        "test_accuracy_final": final_test,
        "val_accuracy_final": curve[-1]["val_accuracy"],
        "val_loss_final": curve[-1]["val_loss"],
    }
    return TrainResult(final_state, curve, metrics, rewind_state, seconds)
