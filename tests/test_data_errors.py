"""Missing, truncated or corrupt files give an error that names the file and the fix.

Corrupted copies are written into tmp directories; the shared MNIST copy is only read (symlinked)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lth.core import config
from lth.core.data import DataError, load_prepared, prepare, prepared_path
from lth.core.datasets import DATASETS, MNIST_SIZES
from lth.core.hparams import DatasetHparams, Hparams
from lth.core.registry import build_model
from lth.lottery.branches import init_model
from lth.lottery.layout import load_mask, load_weights, trial_dir
from tests.helpers import Project

MNIST_RAW = Path(os.environ.get("LTH_DATA_DIR", "data/raw")) / "MNIST" / "raw"


def mnist_root(tmp_path: Path, skip: str | None = None) -> Path:
    """A data root whose MNIST/raw/ links the good uncompressed files (all but `skip`)."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_SIZES:
        if name != skip:
            (raw / name).symlink_to((MNIST_RAW / name).resolve())
    return tmp_path / "root"


@pytest.mark.mnist
def test_truncated_mnist_file(tmp_path: Path) -> None:
    name = "train-labels-idx1-ubyte"
    root = mnist_root(tmp_path, skip=name)
    bad = root / "MNIST" / "raw" / name
    bad.write_bytes((MNIST_RAW / name).read_bytes()[:1000])
    with pytest.raises(DataError) as e:
        prepare(DatasetHparams(), tmp_path / "out.pt", root)
    assert str(bad) in str(e.value) and "truncated" in str(e.value) and "good copy" in str(e.value)
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.mnist
def test_corrupt_mnist_file_of_the_right_size(tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte"
    root = mnist_root(tmp_path, skip=name)
    (root / "MNIST" / "raw" / name).write_bytes(b"\0" * MNIST_SIZES[name])  # no valid idx header
    with pytest.raises(DataError) as e:
        prepare(DatasetHparams(), tmp_path / "out.pt", root)
    assert str(root / "MNIST" / "raw") in str(e.value) and "corrupt" in str(e.value)
    assert "good copy" in str(e.value)


@pytest.mark.mnist
def test_corrupt_gz_file(tmp_path: Path) -> None:
    name = "train-labels-idx1-ubyte"
    root = mnist_root(tmp_path, skip=name)
    gz = root / "MNIST" / "raw" / f"{name}.gz"
    gz.write_bytes(gzip.compress(b"not mnist"))
    with pytest.raises(DataError) as e:
        prepare(DatasetHparams(), tmp_path / "out.pt", root)
    assert str(gz) in str(e.value) and "decompresses to 9 bytes, expected 60008" in str(e.value)
    assert "Delete it" in str(e.value)
    labels = bytearray((MNIST_RAW / name).read_bytes())
    labels[-1] = (labels[-1] + 1) % 10  # the right size and a valid label, but not MNIST's
    gz.write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(DataError, match=r"\.gz failed its md5 check \(of its decompressed content\)"):
        prepare(DatasetHparams(), tmp_path / "out.pt", root)


@pytest.mark.mnist
def test_gz_of_the_right_content_is_read_whatever_its_compression(tmp_path: Path) -> None:
    """What is read is what is checked: a .gz recompressed (as Debian ships Fashion-MNIST) passes the md5 check
    of its decompressed content, while its own md5 differs from torchvision's record of the original .gz."""
    name = "t10k-labels-idx1-ubyte"
    root = mnist_root(tmp_path, skip=name)
    good = (MNIST_RAW / name).read_bytes()
    (root / "MNIST" / "raw" / f"{name}.gz").write_bytes(gzip.compress(good, compresslevel=1, mtime=0))
    raw = DATASETS["mnist"].load(root)
    assert raw["test_y"].tolist() == list(good[8:])


@pytest.mark.mnist
def test_missing_mnist_file_is_named_without_trying_to_download(tmp_path: Path) -> None:
    root = mnist_root(tmp_path, skip="t10k-images-idx3-ubyte")
    with pytest.raises(DataError) as e:
        prepare(DatasetHparams(), tmp_path / "out.pt", root)
    assert "lacks t10k-images-idx3-ubyte" in str(e.value) and "LTH_DATA_DIR" in str(e.value)


@pytest.mark.mnist
def test_prepare_stage_fails_naming_the_file(tmp_path: Path, workdir: Callable[..., Project], lenet_params) -> None:
    name = "train-images-idx3-ubyte"
    root = mnist_root(tmp_path, skip=name)
    bad = root / "MNIST" / "raw" / name
    bad.write_bytes(b"\0" * 100)
    work = workdir(lenet_params())
    work.env["LTH_DATA_DIR"] = str(root)
    proc = work.python("stages/prepare.py", check=False, timeout=300)
    assert proc.returncode == 1  # a user error: one line naming the file and the fix, no traceback
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"lth: {bad} is truncated or corrupt (100 bytes, expected {MNIST_SIZES[name]})")
    assert "good copy" in line
    assert not (work.root / "data").exists()


# --------------------------------------------------------------------------------- prepared tensors


def xor_prepared(tmp_path: Path) -> tuple[Path, DatasetHparams]:
    hp = DatasetHparams(name="xor", validation_size=1000)
    path = tmp_path / "prepared" / "xor.pt"
    prepare(hp, path)
    return path, hp


def test_prepared_file_missing_truncated_or_foreign(tmp_path: Path) -> None:
    path, hp = xor_prepared(tmp_path)
    assert len(load_prepared(path, hp).train) == 5000
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as e:
        load_prepared(path, hp)
    assert str(path) in str(e.value) and "dvc repro prepare" in str(e.value)
    torch.save([torch.zeros(3)], path)
    with pytest.raises(DataError, match="is not a prepared dataset") as e:
        load_prepared(path, hp)
    assert "dvc repro prepare" in str(e.value)
    path.unlink()
    with pytest.raises(DataError, match="not found: run the prepare stage first"):
        load_prepared(path, hp)


# ------------------------------------------------------------------------------ masks and weights


class NotATensor:
    """Pickled by torch.save as a class: weights_only loading refuses it (arbitrary code)."""


def lenet() -> torch.nn.Module:
    return init_model(Hparams(), 0)


def test_mask_of_the_wrong_shape_or_layers(tmp_path: Path) -> None:
    model = lenet()
    good = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    path = tmp_path / "mask.pt"
    torch.save(good, path)
    assert load_mask(model, path).keys() == good.keys()
    wrong = dict(good, **{"layers.0.weight": torch.ones(10, 784, dtype=torch.bool)})
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"mask 'layers.0.weight' has shape \(10, 784\)") as e:
        load_mask(model, path)
    assert str(path) in str(e.value) and "re-run its stage" in str(e.value)
    torch.save({k: v for k, v in good.items() if k != "layers.2.weight"}, path)
    with pytest.raises(ValueError, match=r"missing \['layers.2.weight'\]"):
        load_mask(model, path)
    torch.save({k: v.float() for k, v in good.items()}, path)
    with pytest.raises(ValueError, match="torch.float32"):
        load_mask(model, path)


def test_weights_of_the_wrong_shape(tmp_path: Path) -> None:
    model = lenet()
    path = tmp_path / "final.pt"
    state = init_model(Hparams(), 1).state_dict()
    torch.save(state, path)
    load_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    torch.save(dict(state, **{"layers.1.weight": torch.zeros(3, 3)}), path)
    with pytest.raises(ValueError, match=r"do not fit .*layers.1.weight") as e:
        load_weights(model, path)
    assert str(path) in str(e.value) and "re-run that stage" in str(e.value)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (NotATensor(), "is corrupt or not a tensor file"),
        ({"layers.0.weight": 1.0}, "is not a dict of tensors"),
        ([torch.zeros(2)], "is not a dict of tensors"),
    ],
)
def test_non_tensor_files_are_refused(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "mask.pt"
    torch.save(obj, path)
    for load in (load_mask, load_weights):
        with pytest.raises(ValueError, match=message) as e:
            load(lenet(), path)
        assert str(path) in str(e.value)


def test_missing_input_names_the_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mask not found; run the stage that makes it"):
        load_mask(lenet(), tmp_path / "mask.pt")


def test_train_stage_refuses_a_mask_of_another_network(workdir: Callable[..., Project], xor_params) -> None:
    """Round 1 reads round 0's outputs: a mask made for another network stops it before training."""
    work = workdir(xor_params())
    hp = config.load(work.root / "params.yaml")
    prepare(hp.dataset, prepared_path(work.root / "data" / "prepared", hp.dataset))
    round0 = trial_dir(work.root / "runs", "ticket", 0, 0)
    round0.mkdir(parents=True)
    model = build_model(hp)
    for name in ("final.pt", "rewind.pt"):
        torch.save(model.state_dict(), round0 / name)
    torch.save({n: torch.ones(7, 7, dtype=torch.bool) for n in model.layer_kinds()}, round0 / "mask.pt")
    (round0 / "metrics.json").write_text(json.dumps({"hash": hp.hash}))  # of this experiment, but a wrong mask
    proc = work.python("stages/train_round.py", "--round", "1", check=False, timeout=300)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("lth: runs/ticket/round_00/trial_0/mask.pt: mask '") and "re-run its stage" in line
    assert not (work.root / "runs" / "ticket" / "round_01").exists()
