"""The training loop: plain, fast, masked, resumable.

Data order is a pure function of (seed, epoch), and stochastic layers are reseeded per iteration, so a
run can start at any iteration (rewinding) or resume from a checkpoint and produce bit-identical
results. Evaluation and early stopping (`EarlyStopping`), checkpoints (`Checkpointer`), stop requests,
the sparse training view (`TrainingView`) and distributed training (`lth.core.distributed`: each rank
trains its slice of the global batch) are collaborators; the loop only trains.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lth.core import distributed
from lth.core.checkpoint import Checkpointer, StopRequest, note
from lth.core.data import Data, augment_batch
from lth.core.evaluation import EarlyStopping, ProgressFn, loss_fn, snapshot
from lth.core.hparams import TrainingHparams
from lth.core.pruning import Mask
from lth.core.sparse import TrainingView, use_sparse


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


def batch(
    data: Data, job: TrainJob, iteration: int, order: torch.Tensor, rows: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` (a rank's share; all by default) of the minibatch of `iteration`: a slice of this epoch's order
    (the last partial batch is dropped)."""
    step = iteration % (len(data.train) // job.hp.batch_size)
    idx = order[step * job.hp.batch_size : (step + 1) * job.hp.batch_size]
    idx = idx if data.augment else idx[rows]  # augmented: the whole batch, as one process draws its flips and crops
    x, y = data.train.x.index_select(0, idx), data.train.y.index_select(0, idx)  # faster than x[idx] on CPU
    if data.augment:
        x = augment_batch(x, torch.Generator(device=x.device).manual_seed(job.seed * 1_000_003 + iteration))
        x, y = x[rows], y[rows]
    return x, y


def layer_seed(job: TrainJob, iteration: int) -> int:
    """The seed of stochastic layers (dropout) at `iteration`; each rank draws its own masks for its rows."""
    return (job.seed * 1_000_003 + iteration) * distributed.world_size() + distributed.rank()


class _Run:
    """The loop's state and bookkeeping: resuming, evaluating, checkpointing, stopping, the result."""

    def __init__(
        self,
        model: nn.Module,
        data: Data,
        job: TrainJob,
        checkpointer: Checkpointer | None,
        progress: ProgressFn | None,
    ):
        self.model, self.job, self.checkpointer = model, job, checkpointer
        self.device = next(model.parameters()).device
        self.early = EarlyStopping(data, job.hp, progress)
        self.rows = distributed.shard(job.hp.batch_size)  # this rank's rows of every batch
        self.state = {
            "iteration": job.start_iteration,
            "rewind_state": None,
            "loss_count": 0,
            "loss_sum": torch.zeros((), device=self.device),
            "seconds": {"train": 0.0, "eval": 0.0},
        }
        engine = "sparse" if use_sparse(model, job.mask, self.device, job.sparse) else "dense"
        ck = distributed.load_checkpoint(checkpointer, self.device, engine) if checkpointer else None
        if ck is not None:
            model.load_state_dict(ck["model"])
        self.view = TrainingView(model, job.mask, self.device, job.sparse)
        self.optimizer = make_optimizer(self.view.net, job.hp)
        self.net = distributed.wrap(self.view.net, self.device)  # what the loop calls: DDP under torchrun
        if ck is not None:
            self.optimizer.load_state_dict(ck["optimizer"])
            self.early.restore(ck)
            self.state = {k: ck[k] for k in self.state}
            self.state["loss_sum"] = distributed.own_part(ck["loss_sum"])
            if distributed.is_writer():
                note(f"resuming {job.label} from iteration {self.state['iteration']} ({checkpointer.path})")
        else:
            self.keep_rewind_weights()
            self.evaluate()

    def keep_rewind_weights(self) -> None:
        if self.job.rewind_iteration == self.state["iteration"]:
            self.view.sync()
            self.state["rewind_state"] = snapshot(self.model)

    def evaluate(self) -> None:
        """Every rank evaluates its identical weights on the same data, so all take the same decisions (best
        iteration, divergence) with no broadcast, while the others would only wait for rank 0; a check of
        the validation loss across ranks makes sure that they agree."""
        self.view.sync()
        n, it = self.state["loss_count"], self.state["iteration"]
        self.early.record(self.model, it, float(distributed.mean(self.state["loss_sum"])) / n if n else math.nan)
        distributed.check_same(self.early.curve[-1]["val_loss"], f"the validation loss at iteration {it}")
        self.state["loss_sum"], self.state["loss_count"] = torch.zeros((), device=self.device), 0

    def save(self) -> None:
        if not distributed.is_writer():  # rank 0 holds the same state and writes it
            return
        self.view.sync()
        self.state["seconds"]["eval"] = self.early.seconds
        self.checkpointer.save(
            {
                "engine": self.view.engine,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                **self.early.state(),
                **self.state,
            }
        )

    def after_step(self, loss: torch.Tensor) -> None:
        """Count the step; keep the rewind weights, evaluate and checkpoint when it is their iteration."""
        s = self.state
        s["loss_sum"] += loss.detach()
        s["loss_count"] += 1
        s["iteration"] += 1
        self.keep_rewind_weights()
        if s["iteration"] % self.job.hp.eval_every == 0 or s["iteration"] == self.job.hp.iterations:
            self.evaluate()
            if self.checkpointer and self.checkpointer.due():
                self.save()

    def stopping(self, stop: StopRequest | None) -> bool:
        """Whether a stop was requested; under DDP the ranks agree on it every STOP_CHECK_EVERY iterations."""
        if stop is None or (distributed.active() and self.state["iteration"] % distributed.STOP_CHECK_EVERY):
            return False
        return distributed.agree_stop(stop)

    def stop(self, stop: StopRequest) -> None:
        """Ctrl-C or SIGTERM: save a checkpoint, then raise `Stopped`."""
        where = f"{self.job.label} interrupted (signal {stop.signum}) at iteration {self.state['iteration']}"
        if self.checkpointer is None:
            stop.stop(f"{where}; no checkpoint (checkpointing is off)")
        self.state["loss_sum"] = distributed.per_rank(self.state["loss_sum"])  # each rank resumes from its own
        self.save()
        stop.stop(f"{where}; checkpoint saved to {self.checkpointer.path}; run the same command again to resume")

    def result(self, train_seconds: float) -> TrainResult:
        self.view.sync()
        metrics = self.early.metrics(self.model)
        seconds = {"train": self.state["seconds"]["train"] + train_seconds, "eval": self.early.seconds}
        return TrainResult(
            snapshot(self.model), self.early.curve, metrics, self.state["rewind_state"], seconds, self.view.engine
        )


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
    hp = job.hp
    if hp.batch_size > len(data.train):
        raise ValueError(f"training.batch_size={hp.batch_size} exceeds the training split ({len(data.train)} examples)")
    run = _Run(model, data, job, checkpointer, progress)
    net, optimizer = run.net, run.optimizer
    model.train()
    net.train()
    stochastic = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    steps_per_epoch = len(data.train) // hp.batch_size  # the last partial batch of each epoch is dropped
    order, order_epoch, lr = None, -1, None
    eval_before, t_loop = run.early.seconds, time.perf_counter()
    while (it := run.state["iteration"]) < hp.iterations:
        if run.stopping(stop):
            run.stop(stop)
        if it // steps_per_epoch != order_epoch:
            order_epoch = it // steps_per_epoch
            order = epoch_order(len(data.train), job.seed, order_epoch, run.device)
        if learning_rate(hp, it) != lr:
            lr = learning_rate(hp, it)
            for group in optimizer.param_groups:
                group["lr"] = lr
        x, y = batch(data, job, it, order, run.rows)
        if stochastic:
            torch.manual_seed(layer_seed(job, it))
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.view.mask_gradients()
        optimizer.step()
        run.after_step(loss)
    return run.result(time.perf_counter() - t_loop - (run.early.seconds - eval_before))
