"""Masks and magnitude pruning.

A mask is a dict: prunable weight name -> bool tensor of the weight's shape (True = kept).
Every prunable weight has an entry; excluded layers and kinds with rate 0 stay all True.
Counts follow open_lth: each round removes ceil(rate * remaining) weights.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping

import numpy as np
import torch

from lth.core.hparams import PruningHparams

Mask = dict[str, torch.Tensor]


def dense_mask(kinds: Mapping[str, str], shapes: Mapping[str, torch.Size]) -> Mask:
    return {name: torch.ones(shapes[name], dtype=torch.bool) for name in kinds}


def layer_rate(name: str, kind: str, hp: PruningHparams) -> float:
    if name in hp.exclude or name.removesuffix(".weight") in hp.exclude or kind == "shortcut":
        return 0.0
    return {"conv": hp.conv_rate, "fc": hp.fc_rate, "output": hp.output_rate}[kind]


def pruned_count(remaining: int, rate: float) -> int:
    """How many of `remaining` weights one round removes."""
    return min(remaining, math.ceil(rate * remaining)) if rate > 0 else 0


def groups(kinds: Mapping[str, str], hp: PruningHparams) -> list[tuple[list[str], float]]:
    """Sets of layers pruned together: one per layer (layerwise) or one per kind (global)."""
    pruned = [(n, layer_rate(n, k, hp)) for n, k in kinds.items()]
    pruned = [(n, r) for n, r in pruned if r > 0]
    if hp.strategy == "layerwise":
        return [([n], r) for n, r in pruned]
    by_kind: dict[str, list[str]] = {}
    for n, _ in pruned:
        by_kind.setdefault(kinds[n], []).append(n)
    return [(names, layer_rate(names[0], kind, hp)) for kind, names in by_kind.items()]


def keep_top(scores: Mapping[str, torch.Tensor], mask: Mask, names: list[str], keep: int) -> Mask:
    """New masks for `names` keeping the `keep` highest-scoring weights among those currently kept."""
    flat = torch.cat([torch.where(mask[n], scores[n].detach().float().cpu(), -math.inf).flatten() for n in names])
    order = torch.argsort(flat, descending=True, stable=True)[:keep]
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[order] = True
    out, offset = {}, 0
    for n in names:
        size = mask[n].numel()
        out[n] = kept[offset : offset + size].view(mask[n].shape).clone()
        offset += size
    return out


def magnitude_prune(
    weights: Mapping[str, torch.Tensor], mask: Mask, kinds: Mapping[str, str], hp: PruningHparams, steps: int = 1
) -> Mask:
    """Remove the smallest-magnitude surviving weights; `steps` rounds' worth of removal at once
    (steps > 1 is one-shot pruning to the sparsity that `steps` iterative rounds reach)."""
    new = {n: m.clone() for n, m in mask.items()}
    for names, rate in groups(kinds, hp):
        keep = sum(int(mask[n].sum()) for n in names)
        for _ in range(steps):
            keep -= pruned_count(keep, rate)
        new.update(keep_top({n: weights[n].abs() for n in names}, mask, names, keep))
    return new


def random_prune_like(mask: Mask, generator: torch.Generator) -> Mask:
    """A uniformly random mask with exactly the same number of kept weights in every layer."""
    out = {}
    for n, m in mask.items():
        scores = torch.rand(m.shape, generator=generator)
        out[n] = keep_top({n: scores}, {n: torch.ones_like(m)}, [n], int(m.sum()))[n]
    return out


@torch.no_grad()
def apply_mask(model: torch.nn.Module, mask: Mask) -> None:
    params = dict(model.named_parameters())
    for n, m in mask.items():
        params[n].mul_(m.to(params[n].device, params[n].dtype))


def density(mask: Mask) -> tuple[int, int]:
    """(kept, total) over all prunable weights."""
    return sum(int(m.sum()) for m in mask.values()), sum(m.numel() for m in mask.values())


def percent_remaining(mask: Mask) -> float:
    kept, total = density(mask)
    return 100.0 * kept / total


def check_mask(mask: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Raise a clear error when a loaded mask does not fit the model."""
    params = dict(model.named_parameters())
    kinds = model.layer_kinds()  # type: ignore[operator]
    missing, extra = set(kinds) - set(mask), set(mask) - set(kinds)
    if missing or extra:
        raise ValueError(
            f"{source}: mask layers do not match the model (missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}); it was made for another network: re-run its stage."
        )
    for n, m in mask.items():
        if m.shape != params[n].shape:
            raise ValueError(
                f"{source}: mask '{n}' has shape {tuple(m.shape)} ({m.dtype}), the model's weight "
                f"has {tuple(params[n].shape)}; it was made for another network: re-run its stage."
            )
        if m.dtype != torch.bool:
            raise ValueError(
                f"{source}: mask '{n}' has the wrong dtype {m.dtype} (expected torch.bool: True = kept); "
                "it was not written by lth: re-run its stage."
            )


def pack(mask: Mask) -> bytes:
    """Compact, deterministic bytes of a mask (1 bit per weight): for artifacts and hashing."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        **{n: np.packbits(m.cpu().numpy().reshape(-1)) for n, m in sorted(mask.items())},
        **{f"{n}.shape": np.asarray(m.shape) for n, m in sorted(mask.items())},
    )
    return buf.getvalue()


def unpack(data: bytes) -> Mask:
    arrays = np.load(io.BytesIO(data), allow_pickle=False)
    out = {}
    for n in arrays.files:
        if n.endswith(".shape"):
            continue
        shape = tuple(int(s) for s in arrays[f"{n}.shape"])
        bits = np.unpackbits(arrays[n])[: int(np.prod(shape))]
        out[n] = torch.from_numpy(bits.astype(bool)).view(shape)
    return out


def mask_hash(mask: Mask) -> str:
    h = hashlib.md5()
    for n, m in sorted(mask.items()):
        h.update(n.encode())
        h.update(np.packbits(m.cpu().numpy().reshape(-1)).tobytes())
    return h.hexdigest()
