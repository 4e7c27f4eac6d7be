"""Raw datasets, read from torchvision's files offline and checked: MNIST, CIFAR-10, generated XOR.

`DATASETS` is the registry: name -> `Dataset` (loader, number of classes, training-set size). A loader
returns uint8 images [N, C, H, W] (or [N, F]) and int64 labels of the full training and test sets;
`Dataset.load` also checks that every label is one the network can have. Every file read is checked before
use (size, header, md5 of what is read: LTH_ALLOW_UNVERIFIED_DATA=1 skips the md5 for files of one's own),
and every error is a `DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ALLOW_UNVERIFIED = "LTH_ALLOW_UNVERIFIED_DATA"  # "1": skip the md5 checks (raw files of one's own)
RAW_KEYS = ("train_x", "train_y", "test_x", "test_y")  # what a loader returns


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

# The four idx files: name -> (magic number, shape). The magic number is 0x00000800 (unsigned bytes) plus the
# number of dimensions; the header is the magic number and one big-endian uint32 per dimension.
MNIST_FILES = {
    "train-images-idx3-ubyte": (0x00000803, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (0x00000801, (60000,)),
    "t10k-images-idx3-ubyte": (0x00000803, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (0x00000801, (10000,)),
}
# Sizes of the uncompressed idx files: a truncated file is caught before it is parsed.
MNIST_SIZES = {name: 4 + 4 * len(shape) + math.prod(shape) for name, (_, shape) in MNIST_FILES.items()}
# MD5 of the uncompressed idx files: those of torchvision's MNIST files (the .gz archives of MNIST.resources,
# whose md5 torchvision records) once decompressed. The uncompressed file is what is read, so it is what is checked.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_FILE_LIST = ", ".join(f"{name}[.gz]" for name in MNIST_FILES)


def verified() -> bool:
    """Whether raw files are md5-checked: yes unless LTH_ALLOW_UNVERIFIED_DATA=1 (files of one's own)."""
    return os.environ.get(ALLOW_UNVERIFIED) != "1"


def _mnist_fix(f: Path) -> str:
    """How to repair a bad uncompressed MNIST file `f`."""
    gz = f.with_name(f"{f.name}.gz")
    if gz.exists():
        return f"Delete it (MNIST is then read from {gz.name} beside it, checked too) or replace it with a good copy."
    return f"Replace it with a good copy (or delete it and put torchvision's {gz.name} beside it)."


def _read_mnist_file(raw: Path, name: str, num_classes: int) -> torch.Tensor:
    """One idx file as a uint8 tensor of its shape, from the uncompressed file when present, else from its .gz;
    its size, header, md5 and (labels) range are checked, and every error names the file and the fix."""
    magic, shape = MNIST_FILES[name]
    f, gz = raw / name, raw / f"{name}.gz"
    if f.exists():
        source, fix = f, _mnist_fix(f)
        try:
            data = f.read_bytes()
        except OSError as e:
            raise DataError(f"{f} cannot be read ({e.strerror or e}). {fix}") from None
        if len(data) != MNIST_SIZES[name]:
            raise DataError(f"{f} is truncated or corrupt ({len(data)} bytes, expected {MNIST_SIZES[name]}). {fix}")
    else:
        source = gz
        fix = f"Delete it, then download MNIST again or copy a good copy of {gz.name} there."
        try:
            packed = gz.read_bytes()
        except OSError as e:
            raise DataError(f"{gz} cannot be read ({e.strerror or e}). {fix}") from None
        if verified() and hashlib.md5(packed).hexdigest() != _mnist_gz_md5().get(gz.name):
            raise DataError(f"{gz} is corrupt (md5 mismatch with torchvision's record). {fix}")
        try:
            data = gzip.decompress(packed)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{gz} is not a readable gzip file ({e}). {fix}") from None
        if len(data) != MNIST_SIZES[name]:
            raise DataError(f"{gz} holds {len(data)} bytes, expected {MNIST_SIZES[name]}: it is corrupt. {fix}")
    header = struct.unpack(f">{1 + len(shape)}I", data[: 4 + 4 * len(shape)])
    if header[0] != magic:
        raise DataError(
            f"{source} is corrupt or not an MNIST idx file: magic number {header[0]:#010x}, expected {magic:#010x} "
            f"({name}). {fix}"
        )
    if tuple(header[1:]) != shape:
        raise DataError(f"{source} is corrupt: its header says shape {tuple(header[1:])}, expected {shape}. {fix}")
    values = torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * len(shape)).view(shape)
    if len(shape) == 1 and int(values.max()) >= num_classes:
        i = int(torch.argmax((values >= num_classes).to(torch.uint8)))
        raise DataError(
            f"{source} is corrupt: label {int(values[i])} at index {i} is outside 0..{num_classes - 1}. {fix}"
        )
    if source == f and verified():
        digest = hashlib.md5(data).hexdigest()
        if digest != MNIST_MD5[name]:
            raise DataError(
                f"{f} failed its md5 check ({digest}, torchvision's file decompressed is {MNIST_MD5[name]}): it is "
                f"corrupt. {fix} To use MNIST files of your own, set {ALLOW_UNVERIFIED}=1."
            )
    return values


def _mnist_gz_md5() -> dict[str, str]:
    from torchvision.datasets import MNIST

    return {Path(url).name: digest for url, digest in MNIST.resources}


def _load_mnist(root: Path) -> dict[str, torch.Tensor]:
    raw = root / "MNIST" / "raw"
    missing = [n for n in MNIST_FILES if not (raw / n).exists() and not (raw / f"{n}.gz").exists()]
    if 0 < len(missing) < len(MNIST_FILES):  # a partial copy: say so instead of trying to download
        raise DataError(
            f"{raw} lacks {', '.join(missing)} (nor its .gz). Copy the missing MNIST file(s) there, "
            "or point LTH_DATA_DIR at a directory with a complete MNIST/raw/."
        )
    if missing:
        from torchvision.datasets import MNIST

        try:  # downloads the .gz archives into raw/ (and extracts them)
            MNIST(str(root), train=True, download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError when offline
            raise DataError(
                f"MNIST not found under {raw} and it could not be downloaded ({type(e).__name__}: {e}). "
                f"Put the four MNIST files ({MNIST_FILE_LIST}) in {raw}, "
                f"or point LTH_DATA_DIR at a directory that has MNIST/raw/ inside."
            ) from e
    out = {key: _read_mnist_file(raw, name, 10) for key, name in zip(RAW_KEYS, MNIST_FILES, strict=True)}
    out["train_x"], out["test_x"] = out["train_x"].unsqueeze(1), out["test_x"].unsqueeze(1)
    return {k: v.long() if k.endswith("_y") else v for k, v in out.items()}


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
    if verified():
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


def check_labels(raw: dict[str, torch.Tensor], num_classes: int, source: str) -> dict[str, torch.Tensor]:
    """Refuse labels the network cannot have (a corrupt or foreign file would crash or skew training later):
    int64 labels in 0..num_classes-1, or 0/1 for a single logit (num_classes 1), one per example."""
    top = max(num_classes, 2) - 1
    for split in ("train", "test"):
        x, y = raw[f"{split}_x"], raw[f"{split}_y"]
        if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
            raise DataError(
                f"{source}: the {split} labels are {y.dtype} {tuple(y.shape)}, expected int64 [{len(x)}] (one per "
                "example); the raw files are corrupt or not this dataset. Replace them with a good copy."
            )
        bad = (y < 0) | (y > top)
        if bool(bad.any()):
            i = int(torch.argmax(bad.to(torch.uint8)))
            raise DataError(
                f"{source}: {split} label {int(y[i])} at index {i} is outside 0..{top}; the raw files are corrupt "
                "or not this dataset. Replace them with a good copy."
            )
    return raw


@dataclass(frozen=True)
class Dataset:
    read: Callable[[Path], dict[str, torch.Tensor]]  # root -> the raw tensors (RAW_KEYS)
    num_classes: int  # 1 means a single logit with binary cross-entropy
    train_size: int  # examples in the full training set (before the validation split): checked before any work
    folder: str = ""  # where its files live under the data root (named in errors); "" for generated data

    def load(self, root: Path) -> dict[str, torch.Tensor]:
        """uint8 images and int64 labels of the full training and test sets, labels range-checked."""
        return check_labels(self.read(root), self.num_classes, str(Path(root) / self.folder) if self.folder else "data")


DATASETS = {
    "mnist": Dataset(lambda root: _load_mnist(root), 10, 60000, "MNIST/raw"),
    "xor": Dataset(lambda root: _make_xor(), 1, 6000),
    "cifar10": Dataset(lambda root: _load_cifar10(root), 10, 50000, CIFAR_DIR),
}
