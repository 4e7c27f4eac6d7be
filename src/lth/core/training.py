"""The training loop: plain, fast, masked, resumable.

Data order is a pure function of (seed, epoch), and stochastic layers are reseeded per iteration, so a
run can start at any iteration (rewinding) or resume from a checkpoint and produce bit-identical
results. Evaluation and early stopping (`EarlyStopping`), checkpoints (`Checkpointer`), stop requests
and the sparse training view (`TrainingView`) are collaborators; the loop only trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lth.core.checkpoint import Checkpointer, StopRequest, note
from lth.core.data import Data, augment_batch
from lth.core.evaluation import EarlyStopping, ProgressFn, loss_fn, snapshot
from lth.core.hparams import TrainingHparams
from lth.core.pruning import Mask
from lth.core.sparse import TrainingView


@dataclass(frozen=True)
class TrainJob:
    """One training run of an (already initialized, masked, placed) model."""

    hp: TrainingHparams
    seed: int
    mask: Mask | None = None
    start_iteration: int = 0  # > 0 when the weights were rewound to iteration k
    rewind_iteration: int | None = None  # keep the weights of this iteration (ticket round 0)
    sparse: str = "auto"  # runtime.sparse: auto | on | off
    label: str = "training"


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]  # final weights
    curve: list[dict[str, float]]  # one row per evaluation
    metrics: dict[str, float]
    rewind_state: dict[str, torch.Tensor] | None = None  # weights at the rewind iteration, when asked for
    seconds: dict[str, float] = field(default_factory=dict)  # wall time by phase: train, eval
    engine: str = "dense"  # dense, or sparse kernels (lth.core.sparse)


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


def batch(data: Data, job: TrainJob, iteration: int, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch of `iteration`: a slice of this epoch's order (the last partial batch is dropped)."""
    step = iteration % (len(data.train) // job.hp.batch_size)
    idx = order[step * job.hp.batch_size : (step + 1) * job.hp.batch_size]
    x, y = data.train.x.index_select(0, idx), data.train.y.index_select(0, idx)  # faster than x[idx] on CPU
    if data.augment:
        x = augment_batch(x, torch.Generator(device=x.device).manual_seed(job.seed * 1_000_003 + iteration))
    return x, y


def train(
    model: nn.Module,
    data: Data,
    job: TrainJob,
    checkpointer: Checkpointer | None = None,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train `model` from `job.start_iteration` to `job.hp.iterations`; pruned weights stay exactly zero.
    With a `checkpointer`, resume from its checkpoint and save at evaluations and on a stop request."""
    hp, device = job.hp, next(model.parameters()).device
    if hp.batch_size > len(data.train):
        raise ValueError(f"training.batch_size={hp.batch_size} exceeds the training split ({len(data.train)} examples)")
    view = TrainingView(model, job.mask, device, job.sparse)
    optimizer = make_optimizer(view.net, hp)
    early = EarlyStopping(data, hp, progress)
    s = {
        "iteration": job.start_iteration,
        "rewind_state": None,
        "loss_sum": torch.zeros((), device=device),
        "loss_count": 0,
        "seconds": {"train": 0.0, "eval": 0.0},
    }
    ck = checkpointer.load(device, view.engine) if checkpointer else None
    if ck is not None:
        model.load_state_dict(ck["model"])
        view = TrainingView(model, job.mask, device, job.sparse)  # rebuilt from the restored weights
        optimizer = make_optimizer(view.net, hp)
        optimizer.load_state_dict(ck["optimizer"])
        early.restore(ck)
        s = {k: ck[k] for k in s}
        note(f"resuming {job.label} from iteration {s['iteration']} ({checkpointer.path})")

    def evaluate_now() -> None:
        view.sync()
        n = s["loss_count"]
        early.record(model, s["iteration"], float(s["loss_sum"]) / n if n else float("nan"))
        s["loss_sum"], s["loss_count"] = torch.zeros((), device=device), 0

    def save() -> None:
        view.sync()
        s["seconds"]["eval"] = early.seconds
        checkpointer.save(
            {
                "engine": view.engine,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                **early.state(),
                **s,
            }
        )

    if ck is None:
        if job.rewind_iteration == s["iteration"]:
            s["rewind_state"] = snapshot(model)
        evaluate_now()
    model.train()
    view.net.train()
    stochastic = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    order, order_epoch, lr = None, -1, None
    eval_before, t_loop = early.seconds, time.perf_counter()
    while s["iteration"] < hp.iterations:
        if stop is not None and stop.signum is not None:  # Ctrl-C or SIGTERM: save, then stop
            if checkpointer:
                save()
            stop.stop(
                f"{job.label} interrupted (signal {stop.signum}) at iteration {s['iteration']}; "
                + (
                    f"checkpoint saved to {checkpointer.path}; run the same command again to resume"
                    if checkpointer
                    else "no checkpoint (checkpointing is off)"
                )
            )
        epoch = s["iteration"] // (len(data.train) // hp.batch_size)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(data.train), job.seed, epoch, device), epoch
        if learning_rate(hp, s["iteration"]) != lr:
            lr = learning_rate(hp, s["iteration"])
            for group in optimizer.param_groups:
                group["lr"] = lr
        x, y = batch(data, job, s["iteration"], order)
        if stochastic:
            torch.manual_seed(job.seed * 1_000_003 + s["iteration"])
        loss = loss_fn(view.net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        view.mask_gradients()
        optimizer.step()
        s["loss_sum"] += loss.detach()
        s["loss_count"] += 1
        s["iteration"] += 1
        if job.rewind_iteration == s["iteration"]:
            view.sync()
            s["rewind_state"] = snapshot(model)
        if s["iteration"] % hp.eval_every == 0 or s["iteration"] == hp.iterations:
            evaluate_now()
            if checkpointer and checkpointer.due():
                save()
    s["seconds"]["train"] += time.perf_counter() - t_loop - (early.seconds - eval_before)
    view.sync()
    metrics = early.metrics(model)
    s["seconds"]["eval"] = early.seconds
    return TrainResult(snapshot(model), early.curve, metrics, s["rewind_state"], s["seconds"], view.engine)
