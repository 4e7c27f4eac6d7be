"""Fashion-MNIST, CIFAR-100 and SVHN: read offline from torchvision's files and checked; networks built for
each dataset's input shape through the registry.

CIFAR-100 and SVHN are tested on small files written here in the real formats (python pickles; MATLAB .mat
files written by scipy.io.savemat); Fashion-MNIST on the shared copy (skipped without one)."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets

from lth.core import config
from lth.core.config import HparamsError, from_dict
from lth.core.data import DataError, load_prepared, prepare
from lth.core.datasets import CIFAR100_DIR, DATASETS, MNIST_FILES, Dataset
from lth.core.hparams import DatasetHparams, TrainingHparams
from lth.core.registry import MODELS, build_model
from lth.core.training import TrainJob, train
from tests.helpers import ROOT

DATA = Path(os.environ.get("LTH_DATA_DIR", "data/raw"))
FASHION_RAW = DATA / "FashionMNIST" / "raw"
needs_fashion = pytest.mark.skipif(
    not (FASHION_RAW / "train-images-idx3-ubyte").exists(), reason="no Fashion-MNIST copy (set LTH_DATA_DIR)"
)
MNIST_RAW = DATA / "MNIST" / "raw"


@pytest.fixture
def unverified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LTH_ALLOW_UNVERIFIED_DATA", "1")


def no_download(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Fail the test if torchvision's `name` class is ever constructed (it would download)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"torchvision.datasets.{name} was called")

    monkeypatch.setattr(getattr(torchvision.datasets, name), "__init__", refuse)


def conv2_trains(data_hp: DatasetHparams, out: Path, root: Path, keep: int = 0) -> list[dict]:
    """A few steps of Conv-2 built for the dataset on its prepared tensors (the first `keep` examples of each
    split when given: seconds, not minutes); the learning curve."""
    prepare(data_hp, out, root)
    if keep:
        prepared = torch.load(out, weights_only=True)
        torch.save({k: v[:keep] if k.endswith(("_x", "_y")) else v for k, v in prepared.items()}, out)
    data = load_prepared(out, data_hp)
    assert data.train.x.shape[1:] == DATASETS[data_hp.name].input_shape
    model = build_model(from_dict({"dataset": {"name": data_hp.name}, "model": {"name": "conv2"}}))
    model.reset_parameters(torch.Generator().manual_seed(0))
    t = TrainingHparams(lr=1e-3, batch_size=10, iterations=10, eval_every=5, test_every=5)
    return train(model, data, TrainJob(t, seed=0)).curve


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def fashion_root(tmp_path: Path, replace: dict[str, bytes] | None = None, skip: tuple[str, ...] = ()) -> Path:
    """A data root whose FashionMNIST/raw/ links the shared files, but `replace` (name -> bytes) and `skip`."""
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, data in (replace or {}).items():
        (raw / name).write_bytes(data)
    for name in MNIST_FILES:
        if name not in (replace or {}) and name not in skip:
            (raw / name).symlink_to((FASHION_RAW / name).resolve())
    return tmp_path / "root"


@needs_fashion
def test_fashion_mnist_is_read_and_verified(tmp_path: Path) -> None:
    raw = DATASETS["fashion_mnist"].load(DATA)
    assert raw["train_x"].shape == (60000, 1, 28, 28) and raw["test_x"].shape == (10000, 1, 28, 28)
    assert torch.bincount(raw["train_y"]).tolist() == [6000] * 10  # as published
    assert torch.bincount(raw["test_y"]).tolist() == [1000] * 10
    assert float(raw["train_x"].float().mean() / 255) == pytest.approx(0.2860, abs=1e-4)  # PROVENANCE.txt
    hp = DatasetHparams(name="fashion_mnist")
    assert prepare(hp, tmp_path / "f.pt") == {"train": 55000, "val": 5000, "test": 10000}
    mnist = DATASETS["mnist"].load(DATA) if (MNIST_RAW / "t10k-images-idx3-ubyte").exists() else None
    if mnist is not None:  # another dataset than MNIST, in the same format
        assert not torch.equal(mnist["test_x"], raw["test_x"])


@needs_fashion
def test_fashion_mnist_files_are_checked(tmp_path: Path) -> None:
    """A changed byte fails the md5 check of the file read; MNIST's files in its folder too; a .gz that is
    recompressed (Debian's) passes; a partial copy names what lacks."""
    name = "t10k-labels-idx1-ubyte"
    good = (FASHION_RAW / name).read_bytes()
    changed = good[:-1] + bytes([(good[-1] + 1) % 10])
    with pytest.raises(DataError, match=rf"{name} failed its md5 check .*LTH_ALLOW_UNVERIFIED_DATA=1"):
        DATASETS["fashion_mnist"].load(fashion_root(tmp_path / "a", {name: changed}))
    if (MNIST_RAW / name).exists():
        with pytest.raises(DataError, match=rf"FashionMNIST/raw/{name} failed its md5 check"):
            DATASETS["fashion_mnist"].load(fashion_root(tmp_path / "b", {name: (MNIST_RAW / name).read_bytes()}))
    root = fashion_root(tmp_path / "c", {f"{name}.gz": gzip.compress(good, compresslevel=9, mtime=0)}, (name,))
    assert DATASETS["fashion_mnist"].load(root)["test_y"].tolist() == list(good[8:])
    with pytest.raises(DataError, match=rf"FashionMNIST/raw lacks {name} \(nor its .gz\)\. .*LTH_DATA_DIR"):
        DATASETS["fashion_mnist"].load(fashion_root(tmp_path / "d", skip=(name,)))


@needs_fashion
def test_conv2_trains_on_fashion_mnist_images(tmp_path: Path) -> None:
    """Conv-2 built for 1x28x28 inputs trains on the prepared Fashion-MNIST tensors (a small slice of them)."""
    curve = conv2_trains(DatasetHparams(name="fashion_mnist"), tmp_path / "fashion.pt", DATA, keep=40)
    assert curve[-1]["val_loss"] < curve[0]["val_loss"]


@pytest.mark.slow
@needs_fashion
def test_lenet_fashion_preset_pipeline(make_project, preset_params) -> None:
    """`dvc repro` of the lenet_fashion preset, shortened to one round of 300 iterations, through the real
    stages: the prepare stage reads and checks Fashion-MNIST, the rounds train on it."""
    changes = {"training.iterations": 300, "training.test_every": 100, "pruning.rounds": 1, "runtime.threads": 1}
    proj = make_project(preset_params("lenet_fashion", changes))
    proj.env["LTH_DATA_DIR"] = str(DATA)
    proj.dvc("repro")
    prepared = torch.load(proj.root / "data" / "prepared" / "fashion_mnist.pt", weights_only=True)
    assert '"name": "fashion_mnist"' in prepared["identity"] and prepared["train_x"].shape == (55000, 1, 28, 28)
    round_0, round_1 = (
        json.loads((proj.root / "runs" / "ticket" / f"round_0{k}" / "trial_0" / "metrics.json").read_text())
        for k in (0, 1)
    )
    assert round_1["percent_remaining"] < 100
    accuracy = round_0["test_accuracy_at_early_stop"]
    assert 0.7 < accuracy < 0.88, accuracy  # Fashion-MNIST after 300 iterations; MNIST would be above 0.9


def test_lenet_fashion_preset_is_lenet_on_fashion_mnist() -> None:
    lenet = config.load(ROOT / "presets" / "lenet.yaml")
    fashion = config.load(ROOT / "presets" / "lenet_fashion.yaml")
    assert fashion.dataset.name == "fashion_mnist"
    assert fashion.to_dict() == {**lenet.to_dict(), "dataset": {**lenet.to_dict()["dataset"], "name": "fashion_mnist"}}
    assert fashion.hash != lenet.hash


# ---------------------------------------------------------------------------------------------- CIFAR-100

SIZES = {"train": 100, "test": 40}


def cifar100_batch(seed: int, n: int) -> dict:
    """A batch in the real layout, of 10 of the 100 fine classes (0, 11, ..., 99: a few steps can learn them).
    The red channel is 2 * the fine label, so a test can tell fine labels from coarse ones and check the
    channel order."""
    rng = np.random.default_rng(seed)
    fine = [int(v) for v in rng.choice(np.arange(0, 100, 11), n)]
    data = rng.integers(0, 256, (n, 3, 1024), dtype=np.uint8)
    data[:, 0, :] = (2 * np.asarray(fine, dtype=np.uint8))[:, None]
    return {
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
        b"batch_label": f"batch {seed}".encode(),
        b"fine_labels": fine,
        b"coarse_labels": [v // 5 for v in fine],
        b"data": data.reshape(n, 3072),
    }


def write_cifar100(root: Path) -> Path:
    folder = root / CIFAR100_DIR
    folder.mkdir(parents=True)
    for seed, (name, n) in enumerate(SIZES.items()):
        (folder / name).write_bytes(pickle.dumps(cifar100_batch(seed, n), protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))  # in the real folder; not read
    return folder


CIFAR100_HP = DatasetHparams(name="cifar100", validation_size=20)


def test_cifar100_prepared_with_its_fine_labels(tmp_path: Path, unverified: None) -> None:
    write_cifar100(tmp_path / "raw")
    out = tmp_path / "cifar100.pt"
    assert prepare(CIFAR100_HP, out, tmp_path / "raw") == {"train": 80, "val": 20, "test": 40}
    raw = torch.load(out, weights_only=True)
    for split in ("train", "val", "test"):
        x, y = raw[f"{split}_x"], raw[f"{split}_y"]
        assert x.shape[1:] == (3, 32, 32) and torch.equal(x[:, 0].flatten(1).amax(1), (2 * y).to(torch.uint8))
    assert raw["test_y"].tolist() == cifar100_batch(1, 40)[b"fine_labels"] and max(raw["test_y"].tolist()) > 20
    assert load_prepared(out, CIFAR100_HP).num_classes == 100


def test_cifar100_files_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """md5 against torchvision's record; fine labels beyond 99; missing files, never downloaded."""
    no_download(monkeypatch, "CIFAR100")
    root = tmp_path / "raw"
    with pytest.raises(DataError) as e:
        DATASETS["cifar100"].load(root)
    assert f"CIFAR-100 not found in {root / CIFAR100_DIR} (it is never downloaded)" in str(e.value)
    assert "cifar-100-python.tar.gz" in str(e.value) and "train, test" in str(e.value)
    folder = write_cifar100(root)
    with pytest.raises(DataError, match=r"cifar-100-python/train failed its md5 check .*LTH_ALLOW_UNVERIFIED_DATA=1"):
        DATASETS["cifar100"].load(root)
    monkeypatch.setenv("LTH_ALLOW_UNVERIFIED_DATA", "1")
    bad = cifar100_batch(1, 40)
    bad[b"fine_labels"][3] = 100
    (folder / "test").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"test does not hold CIFAR-100 data .*b'fine_labels' in 0\.\.99"):
        DATASETS["cifar100"].load(root)
    (folder / "test").unlink()
    with pytest.raises(DataError, match=r"CIFAR-100 in .* is incomplete: missing test\. Copy the whole"):
        DATASETS["cifar100"].load(root)


def test_conv2_trains_on_cifar100(tmp_path: Path, unverified: None) -> None:
    write_cifar100(tmp_path / "raw")
    curve = conv2_trains(CIFAR100_HP, tmp_path / "c.pt", tmp_path / "raw")
    assert curve[-1]["val_loss"] < curve[0]["val_loss"]


# --------------------------------------------------------------------------------------------------- SVHN

SVHN_SIZES = {"train_32x32.mat": 100, "test_32x32.mat": 40}


def svhn_arrays(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """X [32, 32, 3, N] uint8 and y [N, 1] in 1..10, as the real files hold them. Red is 20 * the digit
    (label 10 is the digit 0); green is the row index, so a test can check the image orientation."""
    rng = np.random.default_rng(seed)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    x[:, :, 0, :] = (20 * (y[:, 0] % 10)).astype(np.uint8)
    x[:, :, 1, :] = np.arange(32, dtype=np.uint8)[:, None, None]
    return x, y


def write_svhn(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, n) in enumerate(SVHN_SIZES.items()):
        x, y = svhn_arrays(i, n)
        scipy.io.savemat(root / name, {"X": x, "y": y})
    return root


SVHN_HP = DatasetHparams(name="svhn", validation_size=20)


def test_svhn_prepared_with_digits_and_orientation(tmp_path: Path, unverified: None) -> None:
    root = write_svhn(tmp_path / "raw")
    out = tmp_path / "svhn.pt"
    assert prepare(SVHN_HP, out, root) == {"train": 80, "val": 20, "test": 40}
    raw = torch.load(out, weights_only=True)
    for split in ("train", "val", "test"):
        x, y = raw[f"{split}_x"], raw[f"{split}_y"]
        assert x.shape[1:] == (3, 32, 32) and torch.equal(x[:, 0, 5, 7], (20 * y).to(torch.uint8))
        assert torch.equal(x[:, 1, :, 9], torch.arange(32, dtype=torch.uint8).expand(len(x), 32))  # rows are H
    _, test_y = svhn_arrays(1, SVHN_SIZES["test_32x32.mat"])
    assert raw["test_y"].tolist() == [int(v) % 10 for v in test_y[:, 0]]  # label 10 is the digit 0
    assert 0 in raw["test_y"].tolist() and 10 not in raw["train_y"].tolist()
    assert load_prepared(out, SVHN_HP).num_classes == 10


def test_svhn_files_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing files named with their URLs (never downloaded); md5; labels outside 1..10; a truncated file."""
    no_download(monkeypatch, "SVHN")
    root = tmp_path / "raw"
    root.mkdir()
    with pytest.raises(DataError) as e:
        DATASETS["svhn"].load(root)
    assert f"{root} lacks train_32x32.mat, test_32x32.mat (it is never downloaded)" in str(e.value)
    assert "http://ufldl.stanford.edu/housenumbers/test_32x32.mat" in str(e.value)
    write_svhn(root)
    with pytest.raises(DataError, match=r"train_32x32.mat failed its md5 check .*LTH_ALLOW_UNVERIFIED_DATA=1"):
        DATASETS["svhn"].load(root)
    monkeypatch.setenv("LTH_ALLOW_UNVERIFIED_DATA", "1")
    x, y = svhn_arrays(1, SVHN_SIZES["test_32x32.mat"])
    y[4] = 0
    scipy.io.savemat(root / "test_32x32.mat", {"X": x, "y": y})
    with pytest.raises(DataError, match=r"test_32x32.mat does not hold SVHN data .*'y' in 1\.\.10"):
        DATASETS["svhn"].load(root)
    data = (root / "train_32x32.mat").read_bytes()
    (root / "train_32x32.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train_32x32.mat is truncated, corrupt or not an SVHN \.mat file"):
        DATASETS["svhn"].load(root)


def test_conv2_trains_on_svhn(tmp_path: Path, unverified: None) -> None:
    curve = conv2_trains(SVHN_HP, tmp_path / "s.pt", write_svhn(tmp_path / "raw"))
    assert curve[-1]["val_loss"] < curve[0]["val_loss"]


# ------------------------------------------------------------------------------------ networks and params


@pytest.mark.parametrize("model", list(MODELS))
def test_each_network_is_built_for_each_dataset_it_takes(model: str) -> None:
    for name in MODELS[model].datasets:
        dataset = DATASETS[name]
        net = build_model(from_dict({"dataset": {"name": name}, "model": {"name": model}}))
        assert net(torch.zeros(2, *dataset.input_shape)).shape == (2, dataset.num_classes)


def test_conv_networks_on_28_pixel_images() -> None:
    """1x28x28: one input channel; 28 pixels pool to 14, 7, 3 (Conv-2, -4, -6) before the first fc layer."""
    for model, inputs in (("conv2", 64 * 14 * 14), ("conv4", 128 * 7 * 7), ("conv6", 256 * 3 * 3)):
        net = build_model(from_dict({"dataset": {"name": "fashion_mnist"}, "model": {"name": model}}))
        assert net.features[0].in_channels == 1 and net.fc[0].in_features == inputs


def test_params_refuse_a_network_or_augmentation_the_dataset_cannot_take() -> None:
    with pytest.raises(HparamsError) as e:
        from_dict({"dataset": {"name": "fashion_mnist"}, "model": {"name": "vgg19"}})
    assert (
        "model.name: 'vgg19' does not take dataset 'fashion_mnist' (it takes cifar10, cifar100, svhn); set "
        "dataset.name: cifar10, or a model that takes fashion_mnist (lenet_300_100, conv2, conv4, conv6)"
    ) in str(e.value)
    with pytest.raises(HparamsError, match=r"dataset.augment: random flips .* \(cifar10, cifar100\), not svhn"):
        from_dict({"dataset": {"name": "svhn", "augment": True}, "model": {"name": "resnet20"}})
    assert from_dict({"dataset": {"name": "cifar100", "augment": True}, "model": {"name": "resnet20"}}).dataset.augment


def test_examples_of_another_shape_are_refused() -> None:
    raw = {"train_x": torch.zeros(4, 3, 28, 28), "test_x": torch.zeros(2, 3, 28, 28)}
    raw |= {"train_y": torch.zeros(4, dtype=torch.int64), "test_y": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(DataError, match=r"the train examples have shape \(3, 28, 28\), expected \(3, 32, 32\)"):
        Dataset(lambda root: raw, 10, 4, (3, 32, 32), "somewhere").load(Path("root"))
