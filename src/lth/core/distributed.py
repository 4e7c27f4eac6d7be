"""One network trained by several processes: torchrun and DistributedDataParallel (docs/distributed.md).

A stage whose runtime asks for more than one process (`runtime.processes_per_node` x `runtime.nodes`)
re-launches itself under torchrun (`launch`); each process it starts joins the group (`process_group`),
trains its equal slice of every global batch (`shard`) and lets DDP average the gradients. The global
batch, its data order and the update are those of one process, up to the order of float additions.
Rank 0 writes every output, checkpoint and log; the others write nothing. Outside a group every function
here is the one-process behaviour, so the training code has one path.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lth.core.checkpoint import Checkpointer, Stopped, StopRequest
from lth.core.runtime import RuntimeSettings

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # nccl: one GPU per rank, its LOCAL_RANK (unchecked on this project's CPUs)
# Ranks receive a stop signal at different iterations, so they agree on one: a collective, every this many
# iterations (each costs about as much as a tiny step's gradient all-reduce).
STOP_CHECK_EVERY = 10


class DistributedError(RuntimeError):
    """A rank of the group failed, or the ranks disagree on what must be identical."""


def is_child() -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process."""
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def launch_needed(settings: RuntimeSettings) -> bool:
    return settings.world_size > 1 and not is_child()


def torchrun_args(settings: RuntimeSettings, command: list[str], run_id: str) -> list[str]:
    """torchrun's arguments: one node on a free local port, or the nodes meeting at runtime.rdzv_endpoint."""
    where = ["--standalone"] if settings.nodes == 1 and not settings.rdzv_endpoint else []
    if not where:
        where = ["--nnodes", str(settings.nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", settings.rdzv_endpoint]
        where += ["--rdzv-id", run_id]
    return [*where, "--nproc-per-node", str(settings.processes_per_node), "--max-restarts", "0", *command]


def launch(settings: RuntimeSettings, command: list[str], run_id: str, threads: int) -> None:
    """Run `command` (a script and its arguments) under torchrun in this process, as `torchrun ARGS` does.
    A stop signal is forwarded to every rank (rank 0 saves the checkpoint) and raises `Stopped`; a failed rank
    raises `DistributedError` naming it (its own error is printed above)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun would set 1 and print a banner
    try:
        run(parse_args(torchrun_args(settings, command, run_id)))
    except SignalException as e:
        message = f"torchrun job {run_id} stopped ({e.sigval.name}); run the same command again to resume"
        raise Stopped(message, e.sigval) from None
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in sorted(e.failures.items())}
        stops = {128 + signal.SIGINT, 128 + signal.SIGTERM}
        if all(code in stops for code in codes.values()):
            code = next(iter(codes.values()))
            raise Stopped(f"torchrun job {run_id} stopped; run the same command again to resume", code - 128) from None
        ranks = ", ".join(f"rank {r} ({_exit(code)})" for r, code in codes.items())
        raise DistributedError(f"distributed training failed: {ranks}; the error is printed above") from None
    except RendezvousError as e:
        raise DistributedError(
            f"torchrun's rendezvous failed ({e}): check runtime.rdzv_endpoint={settings.rdzv_endpoint!r} and that "
            f"all runtime.nodes={settings.nodes} nodes run the same stage"
        ) from None


def _exit(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


@contextmanager
def process_group(settings: RuntimeSettings) -> Iterator[RuntimeSettings]:
    """Under torchrun: join the group (gloo on CPU, nccl on CUDA with this rank's LOCAL_RANK GPU) and yield
    this rank's settings; else yield `settings` unchanged."""
    if not is_child():
        yield settings
        return
    device = settings.device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"rank {os.environ.get('RANK')} needs GPU {device.index}, but this node has "
                f"{torch.cuda.device_count()}: set runtime.processes_per_node to at most its GPUs (one process each)"
            )
        torch.cuda.set_device(device)
    _die_with_parent()
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS[device.type], device_id=device if device.type == "cuda" else None)
    try:
        yield replace(settings, device=device, quiet=settings.quiet or not is_writer())
    finally:
        dist.destroy_process_group()


def _die_with_parent() -> None:
    """A rank dies with a killed launcher, never an orphan that trains on beside the run that resumes it
    (torchrun starts each rank in a session of its own). A stopped launcher forwards SIGTERM or SIGINT
    instead, and the ranks save a checkpoint. SIGKILL, not SIGTERM: the kernel may send the signal once
    per thread of the dying launcher, and a second SIGTERM means "stop at once" (StopRequest)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher died before that
            os.kill(os.getpid(), signal.SIGKILL)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Rank 0 (or the only process): it writes outputs and checkpoints, prints and logs."""
    return rank() == 0


def shard(batch_size: int) -> slice:
    """This rank's rows of a global batch: an equal, contiguous slice."""
    world = world_size()
    if batch_size % world:
        raise ValueError(
            f"training.batch_size={batch_size} does not divide among {world} processes; pick a multiple of {world}"
        )
    per_rank = batch_size // world
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """`net` as DDP trains it: its gradients averaged over the ranks in backward. The ranks' slices are equal,
    so the mean of their mean-loss gradients is the global batch's: no rescaling is needed."""
    if not active():
        return net
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        if device.type != "cuda":  # each rank would normalize by its own slice's statistics
            raise ValueError(
                "BatchNorm under distributed training needs CUDA (torch's SyncBatchNorm computes the global batch's "
                "statistics on GPUs only): set runtime.processes_per_node and runtime.nodes to 1 on CPU"
            )
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def agree_stop(stop: StopRequest) -> bool:
    """Whether to stop, the same on every rank: a signal any rank received (a collective under DDP)."""
    if active():
        signum = torch.tensor([stop.signum or 0], device=_object_device())
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        stop.signum = int(signum) or None
    return stop.signum is not None


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the ranks (`value` itself in one process)."""
    if not active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def per_rank(value: torch.Tensor) -> torch.Tensor:
    """`value` of every rank, stacked (one per rank); in one process `value` itself."""
    if not active():
        return value
    parts = [torch.empty_like(value) for _ in range(world_size())]
    dist.all_gather(parts, value.contiguous())
    return torch.stack(parts)


def own_part(saved: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sum saved by `per_rank`, such that the mean over the ranks is the saved one: its
    own element when saved by a group of this size (the bits of an uninterrupted run), else the mean."""
    if saved.dim() == 0:
        return saved  # saved by one process: every rank continues from it
    return saved[rank()] if len(saved) == world_size() else saved.mean()


def check_same(value: Any, what: str) -> None:
    """Raise unless every rank has the same `value` (a digest, a loss)."""
    if not active():
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        found = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(
            f"the ranks disagree on {what} ({found}): they must train one network from the same inputs; check that "
            "every node sees the same data/ and runs/ (a shared filesystem) and the same code"
        )


def load_checkpoint(checkpointer: Checkpointer, device: torch.device, engine: str) -> dict[str, Any] | None:
    """The checkpoint to resume from, read by rank 0 (which wrote it) and sent to every rank."""
    if not active():
        return checkpointer.load(device, engine)
    box = [checkpointer.load(torch.device("cpu"), engine) if is_writer() else None]
    dist.broadcast_object_list(box, src=0, device=_object_device())
    return _to(box[0], device)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def _object_device() -> torch.device:
    """Where collectives put their tensors: the rank's GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def environment() -> dict[str, Any]:
    """How many processes trained the network (run.json), recorded only under distributed training."""
    return {"processes": world_size(), "backend": dist.get_backend()} if active() else {}
