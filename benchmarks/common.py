"""Helpers shared by the benchmarks: the prepared MNIST tensors, LeNet with a pruned mask, a bare loop.

Benchmarks are scripts, not tests. The machine they were written on is a shared, noisy 2-core CPU, so
every benchmark compares its variants inside one run, interleaved and repeated, and reports medians
and ratios rather than trusting absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lth.core import pruning
from lth.core.data import Data, load_prepared, prepare, prepared_path
from lth.core.evaluation import loss_fn
from lth.core.hparams import Hparams, TrainingHparams
from lth.core.models.base import PrunableModel
from lth.lottery.branches import init_model

CACHE = Path(os.environ.get("LTH_BENCH_CACHE", Path.home() / ".cache" / "lth-bench"))
# Multiply-adds x 2 per example: forward, weight gradients, and input gradients of layers 2 and 3 (the
# images need none). The "3 x forward" rule of thumb (96 MFLOP per batch of 60) counts layer 1's too.
LENET_FLOP = 2 * (2 * (784 * 300 + 300 * 100 + 100 * 10) + 300 * 100 + 100 * 10)


def matmul_peak(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of a large float32 matmul at `threads` threads: the machine's practical peak."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - t0
    torch.set_num_threads(previous)
    return 2 * size**3 * repeats / seconds / 1e9


def mnist(hp: Hparams | None = None) -> Data:
    """The prepared MNIST splits (made once from $LTH_DATA_DIR's copy and cached in $LTH_BENCH_CACHE)."""
    hp = hp or Hparams()
    path = prepared_path(CACHE, hp.dataset)
    if not path.exists():
        prepare(hp.dataset, path)
    return load_prepared(path, hp.dataset)


def pruned_lenet(hp: Hparams, percent: float, seed: int = 0) -> tuple[PrunableModel, pruning.Mask]:
    """LeNet-300-100 initialized with `seed`, every layer magnitude-pruned to about `percent` remaining."""
    model = init_model(hp, seed)
    params = dict(model.named_parameters())
    kinds = model.layer_kinds()
    mask = pruning.dense_mask(kinds, {n: params[n].shape for n in kinds})
    if percent < 100:
        for name in kinds:
            keep = max(1, round(params[name].numel() * percent / 100))
            mask.update(pruning.keep_top({name: params[name].abs()}, mask, [name], keep))
        pruning.apply_mask(model, mask)
    return model, mask


def bare_loop(
    model: torch.nn.Module, data: Data, hp: TrainingHparams, iterations: int, seed: int = 0, fused: bool = False
) -> float:
    """The plainest PyTorch loop for the same model, batch size and Adam (PyTorch's default Adam, or the
    fused one that lth uses), no masks, no evaluation; returns iterations/s."""
    x_all, y_all = data.train.x, data.train.y
    n, b = len(y_all), hp.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr, fused=fused)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    steps = n // b
    model.train()
    t0 = time.perf_counter()
    for it in range(iterations):
        step = it % steps
        idx = order[step * b : (step + 1) * b]
        loss = loss_fn(model(x_all[idx]), y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return iterations / (time.perf_counter() - t0)


def interleave(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each variant `repeats` times, alternating (and reversing the order every round) so that the
    machine's load drifts hit every variant alike."""
    results: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(variants[name]())
    return results


def arg_parser(doc: str, iterations: int, repeats: int, threads: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes: --iterations, --repeats and (when `threads`) --threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=iterations)
    ap.add_argument("--repeats", type=int, default=repeats)
    if threads:
        ap.add_argument("--threads", type=int, default=1)
    return ap


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def header(title: str, repeated: bool = True) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {title}")
    print(
        f"# torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.2f} at start"
        + (
            "; figures are medians of interleaved repeats, ratios are within this run"
            if repeated
            else "; a single run on a shared machine: expect +-20%"
        )
    )
