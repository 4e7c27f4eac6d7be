"""MNIST as prepared tensors: the paper's 55K/5K/10K split, seeded, normalized by training statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lth.core.data import DataError, load_prepared, prepare, prepared_path
from lth.core.hparams import DatasetHparams


@pytest.fixture
def prepared(mnist_dir: Path) -> Path:
    return prepared_path(mnist_dir, DatasetHparams())


@pytest.mark.mnist
def test_split_is_seeded_and_disjoint(prepared: Path, tmp_path: Path) -> None:
    raw = torch.load(prepared, weights_only=True)
    assert raw["train_x"].dtype == torch.uint8 and raw["train_x"].shape == (55000, 1, 28, 28)
    # The same seed gives the same split; another seed another one.
    again = tmp_path / "again.pt"
    assert prepare(DatasetHparams(), again) == {"train": 55000, "val": 5000, "test": 10000}
    assert torch.equal(torch.load(again, weights_only=True)["val_x"], raw["val_x"])
    other = tmp_path / "other.pt"
    prepare(DatasetHparams(split_seed=1), other)
    assert not torch.equal(torch.load(other, weights_only=True)["val_x"], raw["val_x"])
    # No validation image is also a training image (MNIST has few exact duplicates: compare hashes).
    train_rows = {hash(r.numpy().tobytes()) for r in raw["train_x"].view(55000, -1)}
    overlap = sum(hash(r.numpy().tobytes()) in train_rows for r in raw["val_x"].view(5000, -1))
    assert overlap < 10


@pytest.mark.mnist
def test_normalized_with_training_statistics(prepared: Path) -> None:
    data = load_prepared(prepared, DatasetHparams())
    assert abs(float(data.train.x.mean())) < 1e-4 and abs(float(data.train.x.std()) - 1) < 1e-3
    assert abs(float(data.test.x.mean())) < 0.05  # test set normalized with the training statistics
    assert data.train.y.dtype == torch.int64 and set(data.test.y.unique().tolist()) == set(range(10))


def test_missing_mnist_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MNIST/raw"):
        prepare(DatasetHparams(), tmp_path / "out.pt", root=tmp_path / "empty")


def test_missing_prepared_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dvc repro prepare"):
        load_prepared(tmp_path / "nope.pt", DatasetHparams())
