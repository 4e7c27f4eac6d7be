"""Training checkpoints and stop requests: what makes a round resumable, bit for bit.

A checkpoint is written atomically (temp file, fsync, rename), so a kill never leaves a half-written one.
It carries a key (the round's identity and the code's fingerprint): one made for anything else is
ignored with a message, never resumed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 1


def save_atomic(obj: Any, path: Path) -> None:
    """Write to a temp file, fsync, rename: a checkpoint is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def note(message: str) -> None:
    print(f"lth: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """Saves the loop's state to `path` every `seconds` (at evaluations) and on a stop request, and
    gives it back to resume. A directory that cannot be written costs the checkpoint, not the round."""

    def __init__(self, path: Path, key: str, seconds: float = 60.0):
        self.path, self.key, self.seconds = path, key, seconds
        self.last = time.perf_counter()

    def load(self, device: torch.device, engine: str) -> dict[str, Any] | None:
        """The saved state to resume from, or None (nothing saved, unreadable, or made for something else)."""
        if not self.path.exists():
            return None
        try:
            ck = torch.load(self.path, weights_only=True, map_location=device)
        except Exception as e:  # any unreadable file means: start over
            note(f"ignoring unreadable checkpoint {self.path} ({type(e).__name__}); starting the round over")
            return None
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or ck.get("key") != self.key:
            found = ck.get("key") if isinstance(ck, dict) else None
            note(
                f"ignoring checkpoint {self.path}: it was made for {found or 'an unknown run'}, not {self.key}; "
                "starting the round over"
            )
            return None
        if ck.get("engine", "dense") != engine:
            note(
                f"ignoring checkpoint {self.path}: it was trained with {ck.get('engine', 'dense')} kernels, this "
                f"run uses {engine} ones (runtime.sparse); starting the round over"
            )
            return None
        return ck

    def save(self, state: dict[str, Any]) -> None:
        try:
            save_atomic({"format": CHECKPOINT_FORMAT, "key": self.key, **state}, self.path)
        except OSError as e:
            note(f"WARNING: cannot write checkpoint {self.path} ({e.strerror or e}); training goes on without it")
        self.last = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.last > self.seconds

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class StopRequest:
    """While training, SIGINT (Ctrl-C) and SIGTERM only set a flag: the loop then saves a checkpoint at the
    next iteration boundary and stops. A second Ctrl-C stops at once. Only the main thread can do this."""

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

    def stop(self, message: str) -> None:
        """Raise `Stopped`, which the stage turns into the signal's exit status."""
        raise Stopped(message, self.signum or 0)


class Stopped(Exception):
    """Training stopped on SIGINT or SIGTERM after saving its state; running again resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
