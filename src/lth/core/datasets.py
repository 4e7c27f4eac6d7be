"""Raw datasets, read from torchvision's files offline and checked: MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100,
SVHN, and generated XOR points. docs/datasets.md says where each one's files go.

`DATASETS` is the registry: name -> `Dataset` (loader, number of classes, training-set size, input shape). A
loader returns uint8 images [N, C, H, W] (or [N, F]) and int64 labels of the full training and test sets;
`Dataset.load` also checks that every label is one the network can have. Every file read is checked before
use (size or format, md5 of what is read: LTH_ALLOW_UNVERIFIED_DATA=1 skips the md5 for files of one's own),
and every error is a `DataError` naming the file and the fix.
"""

from __future__ import annotations

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


def verified() -> bool:
    """Whether raw files are md5-checked: yes unless LTH_ALLOW_UNVERIFIED_DATA=1 (files of one's own)."""
    return os.environ.get(ALLOW_UNVERIFIED) != "1"


def _check_md5(path: Path, digest: str, fix: str) -> None:
    """Refuse a file whose md5 is not torchvision's record (unless LTH_ALLOW_UNVERIFIED_DATA=1)."""
    if verified() and md5(path) != digest:
        raise DataError(
            f"{path} failed its md5 check (torchvision's record is {digest}): it is truncated, corrupt or not the "
            f"official file. {fix} Or set {ALLOW_UNVERIFIED}=1 to use files of your own (results are then not "
            "comparable with published ones)."
        )


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}). {fix}") from None


def _torchvision_class(name: str) -> type:
    """A dataset class of torchvision.datasets: the record of its files (names, md5s, URLs) and its download."""
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


# ------------------------------------------------------------------------------ MNIST and Fashion-MNIST

# The four idx files, the same for MNIST and Fashion-MNIST: name -> (magic number, shape). The magic number is
# 0x00000800 (unsigned bytes) plus the number of dimensions; the header is the magic number and one big-endian
# uint32 per dimension.
MNIST_FILES = {
    "train-images-idx3-ubyte": (0x00000803, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (0x00000801, (60000,)),
    "t10k-images-idx3-ubyte": (0x00000803, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (0x00000801, (10000,)),
}
# Sizes of the uncompressed idx files: a truncated file is caught before it is parsed.
MNIST_SIZES = {name: 4 + 4 * len(shape) + math.prod(shape) for name, (_, shape) in MNIST_FILES.items()}
MNIST_FILE_LIST = ", ".join(f"{name}[.gz]" for name in MNIST_FILES)


@dataclass(frozen=True)
class IdxDataset:
    """A dataset of the four idx files, in torchvision's layout: <root>/<torchvision class>/raw/. What is read
    is what is checked: the md5 of each uncompressed file, whether it is stored as is or as .gz (any gzip of the
    right content passes, e.g. Debian's recompressed Fashion-MNIST archives)."""

    title: str  # named in messages
    torchvision_class: str  # its class in torchvision.datasets: its folder, and its download when absent
    md5: dict[str, str]  # md5 of each uncompressed idx file

    def raw(self, root: Path) -> Path:
        return Path(root) / self.torchvision_class / "raw"


# MD5 of the uncompressed idx files: torchvision's .gz archives (MNIST.resources, whose md5 torchvision records)
# once decompressed.
MNIST = IdxDataset(
    "MNIST",
    "MNIST",
    {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
)
# Fashion-MNIST (Zalando Research, github.com/zalandoresearch/fashion-mnist): its .gz archives (those of
# torchvision's FashionMNIST.resources) decompressed.
FASHION_MNIST = IdxDataset(
    "Fashion-MNIST",
    "FashionMNIST",
    {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
)


def _idx_fix(spec: IdxDataset, f: Path) -> str:
    """How to repair a bad uncompressed idx file `f`."""
    gz = f.with_name(f"{f.name}.gz")
    if gz.exists():
        return (
            f"Delete it ({spec.title} is then read from {gz.name} beside it, checked too) "
            "or replace it with a good copy."
        )
    return f"Replace it with a good copy (or delete it and put torchvision's {gz.name} beside it)."


def _idx_bytes(spec: IdxDataset, raw: Path, name: str) -> tuple[Path, str, bytes]:
    """(the file read, how to repair it, its uncompressed bytes of the right size): the uncompressed file when
    present, else its .gz, decompressed no further than the expected size."""
    f, gz = raw / name, raw / f"{name}.gz"
    if f.exists():
        source, fix = f, _idx_fix(spec, f)
        data = _read_bytes(f, fix)
    else:
        source, fix = gz, f"Delete it, then download {spec.title} again or copy a good copy of {gz.name} there."
        try:  # gzip framing (wbits 16+); max_length bounds what a corrupt or hostile archive can inflate to
            data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(_read_bytes(gz, fix), MNIST_SIZES[name] + 1)
        except zlib.error as e:
            raise DataError(f"{gz} is not a readable gzip file ({e}). {fix}") from None
    size = MNIST_SIZES[name]
    if source == f and len(data) != size:
        raise DataError(f"{f} is truncated or corrupt ({len(data)} bytes, expected {size}). {fix}")
    if len(data) != size:
        got = f"more than {size}" if len(data) > size else str(len(data))
        raise DataError(f"{gz} is corrupt: it decompresses to {got} bytes, expected {size}. {fix}")
    return source, fix, data


def _read_idx_file(spec: IdxDataset, raw: Path, name: str, num_classes: int) -> torch.Tensor:
    """One idx file as a uint8 tensor of its shape; its size, header, (labels) range and md5 are checked, and
    every error names the file and the fix."""
    magic, shape = MNIST_FILES[name]
    source, fix, data = _idx_bytes(spec, raw, name)
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
    if verified():
        digest = hashlib.md5(data).hexdigest()
        if digest != spec.md5[name]:
            of = "" if source.name == name else " (of its decompressed content)"
            raise DataError(
                f"{source} failed its md5 check{of} ({digest}, the official {name} is {spec.md5[name]}): it is "
                f"corrupt. {fix} To use {spec.title} files of your own, set {ALLOW_UNVERIFIED}=1."
            )
    return values


def _load_idx(spec: IdxDataset, root: Path) -> dict[str, torch.Tensor]:
    raw = spec.raw(root)
    missing = [n for n in MNIST_FILES if not (raw / n).exists() and not (raw / f"{n}.gz").exists()]
    if 0 < len(missing) < len(MNIST_FILES):  # a partial copy: say so instead of trying to download
        raise DataError(
            f"{raw} lacks {', '.join(missing)} (nor its .gz). Copy the missing {spec.title} file(s) there, "
            f"or point LTH_DATA_DIR at a directory with a complete {spec.torchvision_class}/raw/."
        )
    if missing:
        try:  # downloads the .gz archives into raw/ (and extracts them)
            _torchvision_class(spec.torchvision_class)(str(root), train=True, download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError when offline
            raise DataError(
                f"{spec.title} not found under {raw} and it could not be downloaded ({type(e).__name__}: {e}). "
                f"Put the four {spec.title} files ({MNIST_FILE_LIST}) in {raw}, "
                f"or point LTH_DATA_DIR at a directory that has {spec.torchvision_class}/raw/ inside."
            ) from e
    out = {key: _read_idx_file(spec, raw, name, 10) for key, name in zip(RAW_KEYS, MNIST_FILES, strict=True)}
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


# ----------------------------------------------------------------------------------- CIFAR-10 and CIFAR-100

CIFAR_DIR = "cifar-10-batches-py"  # torchvision's folders (the extracted archives)
CIFAR100_DIR = "cifar-100-python"


@dataclass(frozen=True)
class CifarDataset:
    """CIFAR-10 or CIFAR-100: python pickles of uint8 [N, 3072] images and their labels, in torchvision's
    folder. torchvision's class records the files, their md5s and the URL; the pickles are read here with a
    restricted unpickler (torchvision's loader would unpickle anything)."""

    title: str
    torchvision_class: str  # CIFAR10 | CIFAR100
    folder: str  # torchvision's base_folder
    label_key: bytes  # b"labels" (CIFAR-10); b"fine_labels" (CIFAR-100's 100 classes, not its 20 coarse ones)
    num_classes: int
    download: bool  # fetch the archive through torchvision when the folder is absent (and online)


CIFAR10 = CifarDataset("CIFAR-10", "CIFAR10", CIFAR_DIR, b"labels", 10, download=True)
CIFAR100 = CifarDataset("CIFAR-100", "CIFAR100", CIFAR100_DIR, b"fine_labels", 100, download=False)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 use to store bytes; no other codec is allowed."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"codec '{encoding}' is not allowed in a CIFAR batch")
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
    """Loads only what CIFAR batch files hold: dicts, lists, bytes, numbers and numpy arrays.
    Any other global (a class or function an arbitrary pickle could call) is refused."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")


def _cifar_fix(spec: CifarDataset, folder: Path) -> str:
    url = _torchvision_class(spec.torchvision_class).url
    return (
        f"Delete it and download {spec.title} again ({url}, extracted into {folder.parent}), or copy a good copy there."
    )


def _read_cifar_batch(spec: CifarDataset, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 3, 32, 32], int64 labels [N]) of one batch file, safely unpickled and checked."""
    import numpy as np

    fix = _cifar_fix(spec, path.parent)
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # UnpicklingError (also for a refused global), EOFError, ValueError, ...
        raise DataError(f"{path} is truncated, corrupt or not a {spec.title} batch file ({e}). {fix}") from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(spec.label_key) if isinstance(batch, dict) else None
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or not isinstance(labels, list)
        or len(labels) != len(data)
        or not all(isinstance(v, int) and 0 <= v < spec.num_classes for v in labels)
    ):
        raise DataError(
            f"{path} does not hold {spec.title} data (expected b'data' uint8 [N, 3072] and N {spec.label_key!r} "
            f"in 0..{spec.num_classes - 1}). {fix}"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.int64)


def _find_cifar(spec: CifarDataset, root: Path, names: list[str]) -> Path:
    """The folder holding every file of `names`: downloaded when absent and `spec.download`, else an error
    naming the missing files, the archive and where its folder goes."""
    folder, url = root / spec.folder, _torchvision_class(spec.torchvision_class).url
    where = (
        f"Download {url} elsewhere, extract it, and put its folder {spec.folder}/ ({', '.join(names)}) at "
        f"{folder}, or point LTH_DATA_DIR at a directory that has {spec.folder}/ inside."
    )
    missing = [name for name in names if not (folder / name).exists()]
    if len(missing) == len(names) and spec.download:
        try:
            _torchvision_class(spec.torchvision_class)(str(root), train=True, download=True)  # the whole archive
        except Exception as e:  # URLError/OSError offline; RuntimeError for a bad download
            raise DataError(f"{spec.title} not found in {folder} and it could not be downloaded ({e}). {where}") from e
        missing = [name for name in names if not (folder / name).exists()]
    if len(missing) == len(names):
        never = "" if spec.download else " (it is never downloaded)"
        raise DataError(f"{spec.title} not found in {folder}{never}. {where}")
    if missing:
        again = " (or delete the folder to download it again)" if spec.download else ""
        raise DataError(
            f"{spec.title} in {folder} is incomplete: missing {', '.join(missing)}. Copy the whole "
            f"{spec.folder}/ folder of {url} there{again}."
        )
    return folder


def _load_cifar(spec: CifarDataset, root: Path) -> dict[str, torch.Tensor]:
    tv = _torchvision_class(spec.torchvision_class)
    train, test = [n for n, _ in tv.train_list], [n for n, _ in tv.test_list]
    folder = _find_cifar(spec, root, train + test)
    for name, digest in tv.train_list + tv.test_list:
        _check_md5(folder / name, digest, _cifar_fix(spec, folder))
    train_batches = [_read_cifar_batch(spec, folder / name) for name in train]
    test_batches = [_read_cifar_batch(spec, folder / name) for name in test]
    return {
        "train_x": torch.cat([x for x, _ in train_batches]),
        "train_y": torch.cat([y for _, y in train_batches]),
        "test_x": torch.cat([x for x, _ in test_batches]),
        "test_y": torch.cat([y for _, y in test_batches]),
    }


# ----------------------------------------------------------------------------------------------- SVHN


def _svhn_files() -> dict[str, tuple[str, str, str]]:
    """split -> (file name, URL, md5) of the train and test .mat files, from torchvision's record. torchvision
    keeps them directly in the data root, and so does lth (the 531K `extra` images are not used)."""
    split_list = _torchvision_class("SVHN").split_list
    return {split: (split_list[split][1], split_list[split][0], split_list[split][2]) for split in ("train", "test")}


def _svhn_arrays_ok(x: object, y: object) -> bool:
    """X uint8 [32, 32, 3, N] and N labels 1..10 (any integer-valued numeric array), as the real files hold."""
    import numpy as np

    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[:3] == (32, 32, 3)):
        return False
    if not (isinstance(y, np.ndarray) and y.size == x.shape[3] and np.issubdtype(y.dtype, np.number)):
        return False
    return bool(np.all((y >= 1) & (y <= 10) & (y == np.round(y))))


def _read_svhn_file(path: Path, url: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 3, 32, 32], int64 labels 0..9 [N]) of one SVHN .mat file, read as torchvision reads it."""
    import numpy as np

    try:
        import scipy.io
    except ImportError:
        raise DataError("SVHN's .mat files are read with scipy, which is not installed: pip install scipy.") from None
    fix = f"Delete it and download it again ({url}) into {path.parent}, or copy a good copy there."
    try:
        mat = scipy.io.loadmat(str(path), variable_names=("X", "y"))
    except Exception as e:  # ValueError, TypeError, OSError, ... for a truncated or foreign file
        raise DataError(f"{path} is truncated, corrupt or not an SVHN .mat file ({e}). {fix}") from e
    x, y = mat.get("X"), mat.get("y")
    if not _svhn_arrays_ok(x, y):
        raise DataError(
            f"{path} does not hold SVHN data (expected 'X' uint8 [32, 32, 3, N] and N labels 'y' in 1..10). {fix}"
        )
    labels = y.reshape(-1).astype(np.int64) % 10  # the .mat's label 10 is the digit 0 (torchvision maps it so)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    return torch.from_numpy(images), torch.from_numpy(labels)


def _load_svhn(root: Path) -> dict[str, torch.Tensor]:
    files = _svhn_files()
    missing = [(name, url) for name, url, _ in files.values() if not (root / name).exists()]
    if missing:
        raise DataError(
            f"SVHN not found: {root} lacks {', '.join(name for name, _ in missing)} (it is never downloaded). "
            f"Download {' and '.join(url for _, url in missing)} and put the .mat file(s) directly in {root} "
            "(torchvision's layout), or point LTH_DATA_DIR at a directory that has them."
        )
    out: dict[str, torch.Tensor] = {}
    for split, (name, url, digest) in files.items():
        _check_md5(root / name, digest, f"Delete it and download it again ({url}), or copy a good copy there.")
        out[f"{split}_x"], out[f"{split}_y"] = _read_svhn_file(root / name, url)
    return out


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
    input_shape: tuple[int, ...]  # of one example, (C, H, W) or (features,): what the network is built for
    folder: str = ""  # where its files live under the data root (named in errors); "" for generated data
    augmentable: bool = False  # dataset.augment allowed: random flips and crops keep its labels (not digits)

    def load(self, root: Path) -> dict[str, torch.Tensor]:
        """uint8 images and int64 labels of the full training and test sets, labels range-checked."""
        source = str(Path(root) / self.folder) if self.folder else "data"
        raw = self.read(root)
        for split in ("train", "test"):
            if tuple(raw[f"{split}_x"].shape[1:]) != self.input_shape:
                raise DataError(
                    f"{source}: the {split} examples have shape {tuple(raw[f'{split}_x'].shape[1:])}, expected "
                    f"{self.input_shape}; the raw files are corrupt or not this dataset. Replace them with a good copy."
                )
        return check_labels(raw, self.num_classes, source)


DATASETS = {
    "mnist": Dataset(lambda root: _load_idx(MNIST, root), 10, 60000, (1, 28, 28), "MNIST/raw"),
    "fashion_mnist": Dataset(lambda root: _load_idx(FASHION_MNIST, root), 10, 60000, (1, 28, 28), "FashionMNIST/raw"),
    "xor": Dataset(lambda root: _make_xor(), 1, 6000, (2,)),
    "cifar10": Dataset(lambda root: _load_cifar(CIFAR10, root), 10, 50000, (3, 32, 32), CIFAR_DIR, augmentable=True),
    "cifar100": Dataset(
        lambda root: _load_cifar(CIFAR100, root), 100, 50000, (3, 32, 32), CIFAR100_DIR, augmentable=True
    ),
    "svhn": Dataset(lambda root: _load_svhn(root), 10, 73257, (3, 32, 32), "."),  # the .mat files in the root
}
