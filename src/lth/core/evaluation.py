"""Evaluation during training and early stopping at the minimum validation loss.

Validation is evaluated every `eval_every` iterations; the test set only every `test_every` iterations
and once on the best-validation weights, which gives the same early-stopping test accuracy as testing
every time at a fraction of the cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lth.core.data import Data, Split
from lth.core.hparams import TrainingHparams

CURVE_COLUMNS = ("iteration", "train_loss", "val_loss", "val_accuracy", "test_accuracy")
ProgressFn = Callable[[int, dict[str, float]], None]


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
        x, y = split.x[i : i + batch_size], split.y[i : i + batch_size]
        logits = model(x)
        total_loss += float(loss_fn(logits, y)) * len(y)
        if logits.shape[-1] == 1:
            correct += int(((logits.squeeze(-1) > 0).float() == y).sum())
        else:
            correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return total_loss / len(split), correct / len(split)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class EarlyStopping:
    """The learning curve (one row per evaluation) and the weights at the minimum validation loss."""

    def __init__(self, data: Data, hp: TrainingHparams, progress: ProgressFn | None = None):
        self.data, self.hp, self.progress = data, hp, progress
        self.curve: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"val_loss": math.inf, "iteration": 0, "state": None}
        self.seconds = 0.0

    def record(self, model: nn.Module, iteration: int, train_loss: float) -> None:
        t0 = time.perf_counter()
        val_loss, val_acc = evaluate(model, self.data.val)
        if not math.isfinite(val_loss):
            raise FloatingPointError(
                f"the validation loss is {val_loss} at iteration {iteration}: training diverged. Lower "
                "training.lr (or check the data); nothing of this round is recorded."
            )
        row = {
            "iteration": iteration,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "test_accuracy": math.nan,
        }
        if iteration % self.hp.test_every == 0 or iteration == self.hp.iterations:
            row["test_accuracy"] = evaluate(model, self.data.test)[1]
        if val_loss < self.best["val_loss"]:
            self.best = {"val_loss": val_loss, "iteration": iteration, "state": snapshot(model)}
        self.curve.append(row)
        self.seconds += time.perf_counter() - t0
        if self.progress:
            self.progress(iteration, row)

    def state(self) -> dict[str, Any]:
        return {
            "curve": self.curve,
            "best_val_loss": self.best["val_loss"],
            "best_iteration": self.best["iteration"],
            "best_state": self.best["state"],
        }

    def restore(self, ck: dict[str, Any]) -> None:
        self.curve, self.seconds = ck["curve"], ck["seconds"]["eval"]
        self.best = {"val_loss": ck["best_val_loss"], "iteration": ck["best_iteration"], "state": ck["best_state"]}

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Summary of a finished run: test accuracy at the early-stopping iteration and at the end."""
        final = snapshot(model)
        model.load_state_dict(self.best["state"])
        t0 = time.perf_counter()
        _, best_test = evaluate(model, self.data.test)
        self.seconds += time.perf_counter() - t0
        model.load_state_dict(final)
        last = self.curve[-1]
        return {
            "early_stop_iteration": self.best["iteration"],
            "test_accuracy_at_early_stop": best_test,
            "val_loss_at_early_stop": self.best["val_loss"],
            "test_accuracy_final": last["test_accuracy"],
            "val_accuracy_final": last["val_accuracy"],
            "val_loss_final": last["val_loss"],
        }
