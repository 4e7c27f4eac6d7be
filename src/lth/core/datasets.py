"""Raw datasets, read from torchvision's files offline and checked: MNIST, CIFAR-10, generated XOR.

`DATASETS` is the registry: name -> `Dataset` (loader, number of classes, training-set size). A loader
returns uint8 images [N, C, H, W] (or [N, F]) and int64 labels of the full training and test sets.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(RuntimeError):
    """A dataset is missing, truncated or corrupt; the message says which file and how to fix it."""


def data_root() -> Path:
    """Where raw datasets live: $LTH_DATA_DIR, else ./data/raw (torchvision's layout below it)."""
    return Path(os.environ.get("LTH_DATA_DIR", "data/raw")).expanduser()


def md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- MNIST

# Sizes of the uncompressed idx files: a truncated file is caught before torchvision misreads it.
MNIST_SIZES = {
    "train-images-idx3-ubyte": 16 + 60000 * 784,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}


def _check_mnist_files(raw: Path) -> None:
    from torchvision.datasets import MNIST

    expected_md5 = {Path(url).name: digest for url, digest in MNIST.resources}
    missing = [n for n in MNIST_SIZES if not (raw / n).exists() and not (raw / f"{n}.gz").exists()]
    if 0 < len(missing) < len(MNIST_SIZES):  # a partial copy: say so instead of trying to download
        raise DataError(
            f"{raw} lacks {', '.join(missing)} (nor its .gz). Copy the missing MNIST file(s) there, "
            "or point LTH_DATA_DIR at a directory with a complete MNIST/raw/."
        )
    for name, size in MNIST_SIZES.items():
        f = raw / name
        gz = raw / f"{name}.gz"
        if gz.exists() and md5(gz) != expected_md5.get(gz.name):
            raise DataError(
                f"{gz} is corrupt (md5 mismatch with torchvision's record). Delete it and the "
                f"uncompressed file next to it, then download MNIST again or copy a good copy there."
            )
        if f.exists() and f.stat().st_size != size:
            raise DataError(
                f"{f} is truncated or corrupt ({f.stat().st_size} bytes, expected {size}). "
                f"Delete it (it is re-extracted from {gz.name} when that is present) "
                f"or replace it with a good copy."
            )


def _load_mnist(root: Path) -> dict[str, torch.Tensor]:
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    if raw.exists():
        _check_mnist_files(raw)
    try:
        train = MNIST(str(root), train=True, download=True)
        test = MNIST(str(root), train=False, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError when offline with no copy
        if raw.exists() and all((raw / n).exists() for n in MNIST_SIZES):
            raise DataError(
                f"the MNIST files in {raw} could not be read ({type(e).__name__}: {e}): one is corrupt. "
                "Replace them with a good copy (or delete them and keep the .gz files)."
            ) from e
        raise DataError(
            f"MNIST not found under {raw} and it could not be downloaded ({type(e).__name__}: {e}).\n"
            f"Put the four MNIST files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in {raw}, "
            f"or point LTH_DATA_DIR at a directory that has MNIST/raw/ inside."
        ) from e
    return {
        "train_x": train.data.unsqueeze(1),
        "train_y": train.targets,
        "test_x": test.data.unsqueeze(1),
        "test_y": test.targets,
    }


# ------------------------------------------------------------------------------------------------ XOR


def _make_xor(seed: int = 0, n_train: int = 6000, n_test: int = 1000) -> dict[str, torch.Tensor]:
    """Points in the unit square labelled by the XOR of their rounded coordinates; quantized to uint8."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, 256, (n, 2), generator=g, dtype=torch.uint8)
        y = ((x[:, 0] >= 128) ^ (x[:, 1] >= 128)).long()
        return x, y

    tx, ty = draw(n_train)
    sx, sy = draw(n_test)
    return {"train_x": tx, "train_y": ty, "test_x": sx, "test_y": sy}


# ------------------------------------------------------------------------------------------- CIFAR-10

CIFAR_DIR = "cifar-10-batches-py"  # torchvision's folder (the extracted cifar-10-python.tar.gz)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ALLOW_UNVERIFIED = "LTH_ALLOW_UNVERIFIED_DATA"


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 use to store bytes; no other codec is allowed."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"codec '{encoding}' is not allowed in a CIFAR-10 batch")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; both map to the same functions.
    out: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return out


class _BatchUnpickler(pickle.Unpickler):
    """Loads only what CIFAR-10 batch files hold: dicts, lists, bytes, numbers and numpy arrays.
    Any other global (a class or function an arbitrary pickle could call) is refused."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 3, 32, 32], int64 labels [N]) of one batch file, safely unpickled and checked."""
    import numpy as np

    fix = (
        f"Delete it and download CIFAR-10 again ({CIFAR_URL}, extracted into {path.parent.parent}), "
        f"or copy a good copy there."
    )
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # UnpicklingError (also for a refused global), EOFError, ValueError, ...
        raise DataError(f"{path} is truncated, corrupt or not a CIFAR-10 batch file ({e}). {fix}") from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or not isinstance(labels, list)
        or len(labels) != len(data)
        or not all(isinstance(v, int) and 0 <= v < 10 for v in labels)
    ):
        raise DataError(
            f"{path} does not hold CIFAR-10 data (expected b'data' uint8 [N, 3072] and N b'labels' in 0..9). {fix}"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.int64)


def _load_cifar10(root: Path) -> dict[str, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR_DIR
    expected = dict(CIFAR10.train_list + CIFAR10.test_list)  # file name -> md5 (torchvision's record)
    missing = [name for name in expected if not (folder / name).exists()]
    if len(missing) == len(expected):
        try:
            CIFAR10(str(root), train=True, download=True)  # downloads and extracts the whole archive
        except Exception as e:  # URLError/OSError offline; RuntimeError for a bad download
            raise DataError(
                f"CIFAR-10 not found in {folder} and it could not be downloaded ({type(e).__name__}: {e}).\n"
                f"Download {CIFAR_URL} elsewhere, extract it, and put its folder {CIFAR_DIR}/ (data_batch_1 ... "
                f"data_batch_5, test_batch) at {folder}, or point LTH_DATA_DIR at a directory that has "
                f"{CIFAR_DIR}/ inside."
            ) from e
        missing = [name for name in expected if not (folder / name).exists()]
    if missing:
        raise DataError(
            f"CIFAR-10 in {folder} is incomplete: missing {', '.join(missing)}. Copy the whole "
            f"{CIFAR_DIR}/ folder of {CIFAR_URL} there (or delete the folder to download it again)."
        )
    if os.environ.get(ALLOW_UNVERIFIED) != "1":
        for name, digest in expected.items():
            if md5(folder / name) != digest:
                raise DataError(
                    f"{folder / name} failed its md5 check (torchvision's record is {digest}): it is truncated, "
                    f"corrupt or not the official CIFAR-10 file. Delete it and download CIFAR-10 again "
                    f"({CIFAR_URL}), or set {ALLOW_UNVERIFIED}=1 to use files of your own (results are then not "
                    f"comparable with the paper's)."
                )
    train = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    return {
        "train_x": torch.cat([x for x, _ in train]),
        "train_y": torch.cat([y for _, y in train]),
        "test_x": test_x,
        "test_y": test_y,
    }


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Dataset:
    load: Callable[[Path], dict[str, torch.Tensor]]
    num_classes: int  # 1 means a single logit with binary cross-entropy
    train_size: int  # examples in the full training set (before the validation split): checked before any work


DATASETS = {
    "mnist": Dataset(lambda root: _load_mnist(root), 10, 60000),
    "xor": Dataset(lambda root: _make_xor(), 1, 6000),
    "cifar10": Dataset(lambda root: _load_cifar10(root), 10, 50000),
}
