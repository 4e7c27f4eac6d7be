"""Runtime settings: how and where to run, never what is computed (they are not part of any hash).

They come from params.yaml's `runtime` section and `LTH_*` environment variables (which win), and are
resolved once per process, by the stage or command, into one `RuntimeSettings` that is passed down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lth.core.sparse import SETTINGS as SPARSE_SETTINGS

# Networks whose every layer is fully connected: at batch 60 a second thread gains little on an idle machine
# and costs up to 16x on a busy one (OpenMP threads wait for each other), see docs/performance.md.
FC_MODELS = ("lenet_300_100", "xor")
NUMERICS = ("portable", "native")


class SettingsError(ValueError):
    """A runtime setting has a bad value; the message names it and the fix."""


@dataclass(frozen=True)
class RuntimeSettings:
    device: torch.device
    threads: int = 0  # per training process; 0 = automatic (see threads_for)
    workers: int = 0  # processes that train a round's trials; 0 = automatic (see workers_for)
    quiet: bool = False
    checkpoint_seconds: float | None = 60.0  # None: no checkpoints and no resuming (`lth verify`)
    sparse: str = "auto"
    checkpoint_dir: Path = Path(".lth/checkpoints")
    numerics: str = "portable"  # portable | native CPU kernels (lth.pipeline.numerics pins them at start-up)
    deterministic: bool = False  # torch.use_deterministic_algorithms and cuDNN's deterministic flags (GPU)
    processes_per_node: int = 1  # > 1 (or nodes > 1): one network trained by several processes (lth.core.distributed)
    nodes: int = 1
    rdzv_endpoint: str = ""  # HOST:PORT of torchrun's rendezvous; "" = this machine, a free port (one node)

    @property
    def world_size(self) -> int:
        """Processes that train one network together (torchrun's world size)."""
        return self.processes_per_node * self.nodes

    def workers_for(self, trials: int) -> int:
        """min(trials, CPU cores) on CPU and 1 on CUDA unless set; never more than the trials. Under distributed
        training 1: the group of processes trains a round's trials one after another."""
        if self.world_size > 1:
            return 1
        n = self.workers or (1 if self.device.type != "cpu" else cpu_count())
        return max(1, min(n, trials))

    def threads_for(self, model_name: str, n_workers: int = 1) -> int:
        """Threads per training process: as set, else 1 for fully connected networks and the cores divided
        among the workers for the others. The thread count can change the last bits of results (the matmul
        splits its sums differently): set it to compare conv-net runs made with different worker counts."""
        if self.threads:
            return self.threads
        return 1 if model_name in FC_MODELS else max(1, cpu_count() // (n_workers * self.processes_per_node))

    def without_checkpoints(self) -> RuntimeSettings:
        return replace(self, checkpoint_seconds=None)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve(section: dict[str, Any], checkpoint_dir: Path, env: dict[str, str] | None = None) -> RuntimeSettings:
    """Settings from params.yaml's runtime section, overridden by LTH_DEVICE, LTH_THREADS, LTH_WORKERS,
    LTH_CHECKPOINT_SECONDS, LTH_SPARSE, LTH_PROCESSES_PER_NODE, LTH_NODES, LTH_RDZV_ENDPOINT and
    LTH_CHECKPOINT_DIR (else `checkpoint_dir`)."""
    env = os.environ if env is None else env

    def pick(key: str) -> tuple[Any, str]:
        name = f"LTH_{key.upper()}"
        return (env[name], name) if env.get(name) not in (None, "") else (section.get(key), f"runtime.{key}")

    device_name, source = pick("device")
    device_name = str(device_name or "auto")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.split(":")[0] not in ("cpu", "cuda"):
        raise SettingsError(f"{source}={device_name!r} is not a device; use auto, cpu or cuda (cuda:N).")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"{source}={device_name} but CUDA is not available; use 'auto' or 'cpu'.")
    sparse, source = pick("sparse")
    sparse = {True: "on", False: "off", None: "auto"}.get(sparse, sparse)  # YAML reads a bare on/off as a bool
    if sparse not in SPARSE_SETTINGS:
        raise SettingsError(
            f"{source}={sparse!r} is not a sparse-kernel setting; use one of {', '.join(SPARSE_SETTINGS)}."
        )
    numerics, source = pick("numerics")
    if (numerics or "portable") not in NUMERICS:
        raise SettingsError(f"{source}={numerics!r} is not a numerics mode; use portable or native.")
    seconds, source = pick("checkpoint_seconds")
    checkpoint_dir = env.get("LTH_CHECKPOINT_DIR") or checkpoint_dir
    nodes, endpoint = _processes(*pick("nodes")), str(pick("rdzv_endpoint")[0] or "")
    if nodes > 1 and not endpoint:
        raise SettingsError(f"runtime.nodes={nodes} needs runtime.rdzv_endpoint (HOST:PORT of the first node).")
    return RuntimeSettings(
        device=torch.device(device_name),
        threads=_count(*pick("threads")),
        workers=_count(*pick("workers")),
        quiet=bool(section.get("quiet", False)),
        checkpoint_seconds=60.0 if seconds is None else _seconds(seconds, source),
        sparse=sparse,
        checkpoint_dir=Path(checkpoint_dir),
        numerics=numerics or "portable",
        deterministic=bool(section.get("deterministic", False)),
        processes_per_node=_processes(*pick("processes_per_node")),
        nodes=nodes,
        rdzv_endpoint=endpoint,
    )


def _count(value: Any, source: str) -> int:
    """A whole number >= 0 (0 = automatic)."""
    if value is None or value == "":
        return 0
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0 or str(number) != str(value).strip():
        raise SettingsError(f"{source}={value!r} must be a whole number >= 0 (0 = automatic).")
    return number


def _processes(value: Any, source: str) -> int:
    """A whole number >= 1 (1 = one process)."""
    if value is None or value == "":
        return 1
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise SettingsError(f"{source}={value!r} must be a whole number >= 1 (1 = no distributed training).")
    return number


def _seconds(value: Any, source: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise SettingsError(f"{source}={value!r} must be a number of seconds >= 0 (0 = at every evaluation).")
    return seconds
