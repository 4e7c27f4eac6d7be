"""Mask analysis: where IMP keeps weights, and how stable its choice is.

- Sparsity per layer per round (the percent of each layer's weights remaining).
- Overlap (Jaccard index of the kept weights) of the masks of different trials at the same round, of
  consecutive rounds of one trial, and of a ticket with the random mask of the same sparsity that the
  random-pruning control drew (or, without that control, what two independent random masks of those
  layer densities share on average: p / (2 - p) per layer).
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

import torch

from lth.core.pruning import Mask
from lth.lottery.layout import load_mask, trial_dir

Masks = dict[tuple[str, int, int], Mask]  # (kind, round, trial) -> mask


def read_masks(runs: Path, model: torch.nn.Module, kinds: tuple[str, ...], rounds: int, trials: int) -> Masks:
    """Every mask.pt on disk for those kinds, rounds 0..`rounds` and trials (absent ones are skipped)."""
    found = {}
    for kind, k, t in itertools.product(kinds, range(rounds + 1), range(trials)):
        path = trial_dir(runs, kind, k, t) / "mask.pt"
        if path.exists():
            found[(kind, k, t)] = load_mask(model, path)
    return found


def layer_percent(mask: Mask) -> dict[str, float]:
    """layer -> percent of its weights remaining."""
    return {name: 100.0 * float(m.sum()) / m.numel() for name, m in mask.items()}


def jaccard(a: Mask, b: Mask) -> float:
    """|kept in both| / |kept in either|, over every prunable weight."""
    both = sum(int((a[n].bool() & b[n].bool()).sum()) for n in a)
    either = sum(int((a[n].bool() | b[n].bool()).sum()) for n in a)
    return both / either if either else 1.0


def random_jaccard(mask: Mask) -> float:
    """The expected Jaccard index of two independent random masks with `mask`'s density in each layer."""
    both = sum(float(m.sum()) ** 2 / m.numel() for m in mask.values())
    either = sum(2 * float(m.sum()) - float(m.sum()) ** 2 / m.numel() for m in mask.values())
    return both / either if either else 1.0


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def overlap_rows(masks: Masks) -> list[dict[str, Any]]:
    """One row per pruned round of the ticket: mean Jaccard across trial pairs, with the previous round
    (mean over trials), with the random-pruning control's mask (or the random expectation)."""
    rows = []
    rounds = sorted({k for kind, k, _ in masks if kind == "ticket" and k > 0})
    for k in rounds:
        trials = sorted(t for kind, kk, t in masks if kind == "ticket" and kk == k)
        ticket = {t: masks[("ticket", k, t)] for t in trials}
        random = [
            jaccard(ticket[t], masks[("random_pruning", k, t)]) for t in trials if ("random_pruning", k, t) in masks
        ]
        rows.append(
            {
                "round": k,
                "across_trials": _mean([jaccard(ticket[a], ticket[b]) for a, b in itertools.combinations(trials, 2)]),
                "with_previous_round": _mean(
                    [jaccard(ticket[t], masks[("ticket", k - 1, t)]) for t in trials if ("ticket", k - 1, t) in masks]
                ),
                "with_random_mask": _mean(random) if random else _mean([random_jaccard(ticket[t]) for t in trials]),
                "random_mask_source": "random_pruning control" if random else "expected for random masks",
            }
        )
    return rows


def layer_rows(masks: Masks) -> list[dict[str, Any]]:
    """One row per ticket round and layer: percent remaining, mean over trials."""
    by_round: dict[int, list[Mask]] = {}
    for (kind, k, _), mask in sorted(masks.items()):
        if kind == "ticket":
            by_round.setdefault(k, []).append(mask)
    return [
        {"round": k, "layer": layer, "percent_remaining": statistics.fmean(layer_percent(m)[layer] for m in ms)}
        for k, ms in by_round.items()
        for layer in ms[0]
    ]


def trajectory_rows(masks: Masks) -> list[dict[str, Any]]:
    """One row (trial, round, metric, value) per point that MLflow charts against the round on the trial's ticket
    trajectory: each layer's percent remaining (`layer_percent_remaining/<layer>`), the Jaccard index with the
    trial's previous round (`jaccard_previous_round`) and with a random mask of its sparsity (`jaccard_random`:
    the random-pruning control's, or the expectation), and the round's mean across trial pairs
    (`jaccard_across_trials`, the same in every trial)."""
    across = {row["round"]: row["across_trials"] for row in overlap_rows(masks)}
    points: list[tuple[int, int, str, float]] = []
    for (kind, k, t), mask in sorted(masks.items()):
        if kind != "ticket":
            continue
        points += [(t, k, f"layer_percent_remaining/{layer}", p) for layer, p in layer_percent(mask).items()]
        if k == 0:
            continue
        previous, random = masks.get(("ticket", k - 1, t)), masks.get(("random_pruning", k, t))
        if previous is not None:
            points.append((t, k, "jaccard_previous_round", jaccard(mask, previous)))
        points.append((t, k, "jaccard_random", jaccard(mask, random) if random is not None else random_jaccard(mask)))
        if across[k] is not None:
            points.append((t, k, "jaccard_across_trials", across[k]))
    return [{"trial": t, "round": k, "metric": name, "value": value} for t, k, name, value in points]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Plot data of the analysis (results/plots/mask_*.csv); numbers as Python writes them (exact)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["round"])
        writer.writeheader()
        writer.writerows(rows)
