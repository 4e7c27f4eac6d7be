"""Runtime settings (`runtime:` in params.yaml or LTH_* variables): they never change results' identity."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lth.hparams import runtime_settings


def configure(params: str | Path = "params.yaml") -> dict[str, Any]:
    """Pick the device and thread count; environment variables override params.yaml's runtime section."""
    settings = runtime_settings(params)
    device_name = os.environ.get("LTH_DEVICE") or settings.get("device") or "auto"
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"lth: runtime.device={device_name} but CUDA is not available; use 'auto' or 'cpu'.")
    threads = _setting(settings, "threads")
    if threads:
        torch.set_num_threads(threads)
    sparse_setting(params)  # a bad value stops the stage here, before any work
    return {"device": torch.device(device_name), "threads": torch.get_num_threads(),
            "quiet": bool(settings.get("quiet", False)), "checkpoint_seconds": checkpoint_seconds(settings)}


def checkpoint_seconds(settings: dict[str, Any]) -> float:
    """Seconds between training checkpoints: LTH_CHECKPOINT_SECONDS, else runtime.checkpoint_seconds, else 60."""
    value = os.environ.get("LTH_CHECKPOINT_SECONDS")
    source = "LTH_CHECKPOINT_SECONDS"
    if value is None:
        value, source = settings.get("checkpoint_seconds"), "runtime.checkpoint_seconds"
    if value is None:
        return 60.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise SystemExit(f"lth: {source}={value!r} must be a number of seconds >= 0 (0 = at every evaluation).")
    return seconds


def sparse_setting(params: str | Path = "params.yaml") -> str:
    """Sparse kernels for pruned fully connected layers (lth.sparse): LTH_SPARSE, else runtime.sparse,
    else auto (on CPU below 10% of weights remaining)."""
    from lth.sparse import SETTINGS

    value = os.environ.get("LTH_SPARSE")
    source = "LTH_SPARSE"
    if value is None:
        value, source = runtime_settings(params).get("sparse", "auto"), "runtime.sparse"
        if isinstance(value, bool):  # YAML reads a bare on / off as true / false
            value = "on" if value else "off"
    if value not in SETTINGS:
        raise SystemExit(f"lth: {source}={value!r} is not a sparse-kernel setting; use one of {', '.join(SETTINGS)}.")
    return value


# Networks whose every layer is fully connected: at batch 60 a second thread gains little on an idle machine
# and costs up to 16x on a busy one (OpenMP threads wait for each other), see docs/performance.md.
FC_MODELS = ("lenet_300_100", "xor")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _setting(settings: dict[str, Any], key: str) -> int:
    """A non-negative integer runtime setting: LTH_<KEY>, else runtime.<key>, else 0 (= auto)."""
    env = f"LTH_{key.upper()}"
    value, source = os.environ.get(env), env
    if value is None:
        value, source = settings.get(key), f"runtime.{key}"
    if value is None or value == "":
        return 0
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        raise SystemExit(f"lth: {source}={value!r} must be a whole number >= 0 (0 = automatic).")
    return number


def workers(trials: int, device: torch.device, params: str | Path = "params.yaml") -> int:
    """Processes that train a round's trials in parallel: LTH_WORKERS, else runtime.workers, else (0 = auto)
    min(trials, CPU cores) on CPU and 1 on CUDA. Never more than the trials."""
    n = _setting(runtime_settings(params), "workers")
    if n == 0:
        n = 1 if device.type != "cpu" else cpu_count()
    return max(1, min(n, trials))


def threads(model_name: str, n_workers: int = 1, params: str | Path = "params.yaml") -> int:
    """Threads per training process: LTH_THREADS, else runtime.threads, else (0 = auto) 1 for fully connected
    networks and the cores divided among the workers for the others. The thread count can change the last
    bits of results (the matmul splits its sums differently): set it explicitly to compare conv-net runs made
    with different worker counts or on machines with different core counts."""
    n = _setting(runtime_settings(params), "threads")
    if n:
        return n
    return 1 if model_name in FC_MODELS else max(1, cpu_count() // n_workers)
