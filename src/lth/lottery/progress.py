"""Progress of long work: a live bar on a terminal, quiet periodic lines in CI or a log file.

When `lth run` runs several stages at once, a stage's output goes through a pipe, so its own bar cannot
show. Then `lth run` sets LTH_PROGRESS=json: each round prints machine-readable RECORD lines instead, and
`StageDisplay` turns them into one live line per running stage on `lth run`'s terminal.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

PROGRESS_ENV = "LTH_PROGRESS"  # "json": print RECORD lines for the process that relays this one's output
RECORD = "lth-progress: "  # followed by one JSON object: label, iteration, total, val_loss, val_accuracy
RECORD_SECONDS = 0.5  # at most one record per this many seconds (plus the first and the last)
LINE_SECONDS = 30  # line mode: at most one line per this many seconds (plus the last)


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def machine_readable() -> bool:
    return os.environ.get(PROGRESS_ENV) == "json"


def parse_record(line: str) -> dict[str, Any] | None:
    """The progress record of a RECORD line; None for any other line (printed as it is)."""
    if not line.startswith(RECORD):
        return None
    try:
        record = json.loads(line[len(RECORD) :])
    except ValueError:
        return None
    keys = {"label", "iteration", "total"}
    return record if isinstance(record, dict) and keys <= set(record) else None


class RoundProgress:
    """Iterations, current validation loss and accuracy, time left: a bar on a terminal, a line every
    LINE_SECONDS otherwise, or RECORD lines (LTH_PROGRESS=json)."""

    def __init__(
        self, label: str, total: int, quiet: bool = False, round_index: int | None = None, rounds: int | None = None
    ):
        # Each round is its own DVC stage process, so the overall position comes from the round index and
        # pruning.rounds rather than from shared state: "round 3 of 20" (round 0 is the dense network).
        if round_index is not None and rounds is not None:
            here = f"round {round_index}"
            label = label.replace(here, f"{here} of {rounds}", 1) if here in label else f"{label} ({here} of {rounds})"
        self.label, self.total, self.quiet = label, total, quiet
        self.machine = machine_readable()
        self.bar = None
        self.last_line = 0.0
        self.start = time.perf_counter()
        self.first_iteration: int | None = None

    def __enter__(self) -> RoundProgress:
        if not self.quiet and not self.machine and interactive():
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
        now = time.perf_counter()
        if self.machine:
            if iteration == self.total or iteration == self.first_iteration or now - self.last_line >= RECORD_SECONDS:
                record = {"label": self.label, "iteration": iteration, "total": self.total}
                record |= {"val_loss": row["val_loss"], "val_accuracy": row["val_accuracy"]}
                print(RECORD + json.dumps(record), file=sys.stderr, flush=True)
                self.last_line = now
            return
        done = iteration - self.first_iteration
        todo = self.total - self.first_iteration
        if iteration == self.total or (now - self.last_line > LINE_SECONDS and done > 0):
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


# A stage's bar: before its first record the stage's name and its time so far, then the round's progress.
WAITING = "{desc} [{elapsed}]"
TRAINING = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


@dataclass
class _Line:
    stage: str
    bar: Any  # tqdm
    label: str | None = None  # the round's label, once its first record came


class StageDisplay:
    """What `lth run` prints while several stages run: its own lines and every stage's output line,
    prefixed with the stage's name; when `live` (a terminal), below them one bar per running stage (per
    round: a stage trains its trials one after another, or side by side in worker processes)."""

    def __init__(self, live: bool, file: IO[str] | None = None):
        self.live, self.file = live, file or sys.stderr
        self.lines: list[_Line] = []
        self.lock = threading.Lock()
        self.ticked = 0.0

    def __enter__(self) -> StageDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self._close(list(self.lines))

    def say(self, text: str) -> None:
        with self.lock:
            self._print(text)

    def started(self, stage: str) -> None:
        if self.live:
            with self.lock:
                self.lines.append(_Line(stage, self._bar(stage)))

    def finished(self, stage: str) -> None:
        with self.lock:
            self._close([line for line in self.lines if line.stage == stage])

    def feed(self, stage: str, text: str) -> None:
        """One line of a stage's output: a record moves its bar, anything else is printed."""
        record = parse_record(text) if self.live else None
        with self.lock:
            if record is None:
                self._print(f"[{stage}] {text.rstrip()}")
            else:
                self._show(stage, record)

    def tick(self) -> None:
        """Redraw the bars of stages starting up and of rounds in training, so that their clocks go on (a
        round's bar stops with its training; its stage then records the outputs). At most once a second."""
        if time.monotonic() - self.ticked < 1:
            return
        self.ticked = time.monotonic()
        with self.lock:
            for line in self.lines:
                if line.label is None or line.bar.n < (line.bar.total or 0):
                    line.bar.refresh()

    def _close(self, lines: list[_Line]) -> None:
        for line in lines:
            line.bar.close()
            self.lines.remove(line)
        if lines:
            self.file.write("\r")  # a bar cleared below the first leaves the cursor at the end of a line

    def _print(self, text: str) -> None:
        if self.lines:
            from tqdm import tqdm

            tqdm.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def _bar(self, desc: str) -> Any:
        from tqdm import tqdm

        used = {abs(line.bar.pos) for line in self.lines}  # tqdm keeps a given position as -position
        position = next(p for p in range(len(used) + 1) if p not in used)
        return tqdm(desc=desc, position=position, leave=False, file=self.file, dynamic_ncols=True, bar_format=WAITING)

    def _show(self, stage: str, record: dict[str, Any]) -> None:
        """Move the bar of the record's round: the stage's bar of that round, else one that waits or whose
        round ended, else a new one."""
        mine = [line for line in self.lines if line.stage == stage]
        line = next((x for x in mine if x.label == record["label"]), None) or next(
            (x for x in mine if x.label is None or x.bar.n >= (x.bar.total or 0)), None
        )
        if line is None:
            line = _Line(stage, self._bar(stage))
            self.lines.append(line)
        bar = line.bar
        if "val_loss" in record and "val_accuracy" in record:
            bar.set_postfix(
                val_loss=f"{record['val_loss']:.4f}", val_acc=f"{record['val_accuracy']:.4f}", refresh=False
            )
        if line.label != record["label"]:  # a new round on this line: its own clock, from where it starts
            line.label = record["label"]
            bar.bar_format, bar.desc = TRAINING, record["label"]
            bar.reset(total=record["total"])
            bar.initial = record["iteration"]
        bar.n = record["iteration"]
        bar.refresh()
