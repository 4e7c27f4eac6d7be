"""Datasets as tensors in memory.

`prepare()` reads the raw dataset once (`lth.core.datasets`), splits a seeded validation set out of
the training set and saves uint8 tensors; `load_prepared()` turns them into normalized float tensors
that the training loop indexes directly (no per-example DataLoader: that is what made older LTH
frameworks slow).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lth.core.datasets import DATASETS, DataError, data_root
from lth.core.hparams import DatasetHparams


@dataclass
class Split:
    x: torch.Tensor  # float, normalized
    y: torch.Tensor  # int64 class labels (float 0/1 for a single-logit task)

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    num_classes: int  # 1 means a single logit with binary cross-entropy
    augment: bool = False  # random flips and 4-pixel pad-and-crop per batch

    def to(self, device: torch.device) -> Data:
        return Data(self.train.to(device), self.val.to(device), self.test.to(device), self.num_classes, self.augment)


def identity(hp: DatasetHparams) -> str:
    """What the prepared splits depend on; stored in the file, checked when training loads it."""
    return json.dumps(
        {"name": hp.name, "validation_size": hp.validation_size, "split_seed": hp.split_seed}, sort_keys=True
    )


def prepare(hp: DatasetHparams, out: Path, root: Path | None = None) -> dict[str, int]:
    """Load raw data, split off the validation set with a seeded permutation, save uint8 tensors."""
    if hp.name not in DATASETS:
        raise DataError(f"unknown dataset '{hp.name}' (valid: {', '.join(sorted(DATASETS))})")
    raw = DATASETS[hp.name].load(root or data_root())
    n = len(raw["train_y"])
    if not 0 < hp.validation_size < n:
        raise DataError(f"dataset.validation_size={hp.validation_size} must be between 1 and {n - 1}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(hp.split_seed))
    val_idx, train_idx = perm[: hp.validation_size], perm[hp.validation_size :]
    train_x = raw["train_x"][train_idx]
    # Normalization statistics come from the training split only (per channel).
    dims = [0] + list(range(2, train_x.dim()))
    xf = train_x.float() / 255.0
    mean, std = xf.mean(dim=dims), xf.std(dim=dims)
    prepared = {
        "train_x": train_x.contiguous(),
        "train_y": raw["train_y"][train_idx].contiguous(),
        "val_x": raw["train_x"][val_idx].contiguous(),
        "val_y": raw["train_y"][val_idx].contiguous(),
        "test_x": raw["test_x"].contiguous(),
        "test_y": raw["test_y"].contiguous(),
        "mean": mean,
        "std": std,
        "identity": identity(hp),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(prepared, tmp)
    os.replace(tmp, out)
    return {"train": len(train_idx), "val": len(val_idx), "test": len(prepared["test_y"])}


def prepared_path(data_dir: Path, hp: DatasetHparams) -> Path:
    return Path(data_dir) / f"{hp.name}.pt"


def load_prepared(path: Path, hp: DatasetHparams) -> Data:
    """Normalized float tensors of the prepared splits, safely loaded (tensors only)."""
    if not path.exists():
        raise DataError(f"{path} not found: run the prepare stage first (`dvc repro prepare`).")
    try:
        t = torch.load(path, weights_only=True)
    except Exception as e:
        raise DataError(f"{path} is corrupt or truncated ({e}); delete it and run `dvc repro prepare`.") from e
    expected = {"train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std"}
    if not isinstance(t, dict) or set(t) - {"identity"} != expected:
        raise DataError(f"{path} is not a prepared dataset; delete it and run `dvc repro prepare`.")
    if t.get("identity", identity(hp)) != identity(hp):  # files prepared before lth 0.2 carry none
        raise DataError(
            f"{path} was prepared for {t['identity']}, but params.yaml gives {identity(hp)}: "
            "run `dvc repro prepare` (or `lth run`) first."
        )
    num_classes = DATASETS[hp.name].num_classes
    shape = [1, -1] + [1] * (t["train_x"].dim() - 2)

    def split(x: torch.Tensor, y: torch.Tensor) -> Split:
        xf = (x.float() / 255.0 - t["mean"].view(shape)) / t["std"].view(shape)
        return Split(xf.contiguous(), y.float() if num_classes == 1 else y.long())

    return Data(
        split(t["train_x"], t["train_y"]),
        split(t["val_x"], t["val_y"]),
        split(t["test_x"], t["test_y"]),
        num_classes,
        augment=hp.augment,
    )


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random 4-pixel pad-and-crop of an image batch [B, C, H, W]."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator, device=generator.device) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (b,), generator=generator, device=generator.device)
    dy = torch.randint(0, 9, (b,), generator=generator, device=generator.device)
    rows = dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h)  # [B, H]
    cols = dx.view(b, 1) + torch.arange(w, device=x.device).view(1, w)  # [B, W]
    idx_b = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_b, rows.view(b, h, 1), cols.view(b, 1, w)]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
