"""Progress of long work: a live bar on a terminal, quiet periodic lines in CI or a log file."""

from __future__ import annotations

import math
import os
import sys
import time


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class RoundProgress:
    """Iterations, current validation loss and accuracy, time left. Line mode prints every ~10%."""

    def __init__(
        self, label: str, total: int, quiet: bool = False, round_index: int | None = None, rounds: int | None = None
    ):
        # Each round is its own DVC stage process, so the overall position comes from the round index and
        # pruning.rounds rather than from shared state: "round 3 of 20" (round 0 is the dense network).
        if round_index is not None and rounds is not None:
            here = f"round {round_index}"
            label = label.replace(here, f"{here} of {rounds}", 1) if here in label else f"{label} ({here} of {rounds})"
        self.label, self.total, self.quiet = label, total, quiet
        self.bar = None
        self.last_line = 0.0
        self.start = time.perf_counter()
        self.first_iteration: int | None = None

    def __enter__(self) -> RoundProgress:
        if not self.quiet and interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.label, unit="it", dynamic_ncols=True, leave=False)
        return self

    def update(self, iteration: int, row: dict[str, float]) -> None:
        if self.first_iteration is None:
            # Time left is extrapolated from the iterations trained here, not from set-up time.
            self.first_iteration, self.first_time = iteration, time.perf_counter()
        if self.bar is not None:
            self.bar.n = iteration
            self.bar.set_postfix(val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_accuracy']:.4f}", refresh=False)
            self.bar.refresh()
            return
        if self.quiet:
            return
        done = iteration - self.first_iteration
        todo = self.total - self.first_iteration
        now = time.perf_counter()
        if iteration == self.total or (now - self.last_line > 30 and done > 0):
            elapsed = now - self.start
            left = (now - self.first_time) / done * (todo - done) if done else math.nan
            print(
                f"lth: {self.label}: iteration {iteration}/{self.total}, val loss {row['val_loss']:.4f}, "
                f"val accuracy {row['val_accuracy']:.4f}, {elapsed:.0f} s elapsed, ~{left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )
            self.last_line = now

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
