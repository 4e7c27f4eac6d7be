"""Missing, truncated or corrupt files give an error that names the file and the fix.

Corrupted copies are written into tmp directories; the shared MNIST copy is only read (symlinked)."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lth.core import hparams
from lth.core.data import MNIST_SIZES, DataError, load_prepared, prepare
from lth.core.hparams import DatasetHparams, Hparams
from lth.lottery import round as imp
from tests.conftest import ROOT, needs_mnist

MNIST_RAW = Path(os.environ.get("LTH_DATA_DIR", "data/raw")) / "MNIST" / "raw"


def mnist_root(tmp_path: Path, skip: str | None = None) -> Path:
    """A data root whose MNIST/raw/ links the good uncompressed files (all but `skip`)."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_SIZES:
        if name != skip:
            (raw / name).symlink_to((MNIST_RAW / name).resolve())
    return tmp_path / "root"


@needs_mnist
def test_truncated_mnist_file(tmp_path: Path) -> None:
    name = "train-labels-idx1-ubyte"
    root = mnist_root(tmp_path, skip=name)
    bad = root / "MNIST" / "raw" / name
    bad.write_bytes((MNIST_RAW / name).read_bytes()[:1000])
    with pytest.raises(DataError) as e:
        prepare(DatasetHparams(), tmp_path / "out.pt", root)
    assert str(bad) in str(e.value) and "truncated" in str(e.value) and "good copy" in str(e.value)
    assert not (tmp_path / "out.pt").exists()


@needs_mnist
def test_corrupt_mnist_file_of_the_right_size(tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte"
    root = mnist_root(tmp_path, skip=name)
    (root / "MNIST" / "raw" / name).write_bytes(b"\0" * MNIST_SIZES[name])  # no valid idx header
    with pytest.raises(DataError) as e:
        prepare(DatasetHparams(), tmp_path / "out.pt", root)
    assert str(root / "MNIST" / "raw") in str(e.value) and "corrupt" in str(e.value)
    assert "good copy" in str(e.value)


@needs_mnist
def test_corrupt_gz_file(tmp_path: Path) -> None:
    name = "train-labels-idx1-ubyte"
    root = mnist_root(tmp_path, skip=name)
    gz = root / "MNIST" / "raw" / f"{name}.gz"
    gz.write_bytes(gzip.compress(b"not mnist"))
    with pytest.raises(DataError) as e:
        prepare(DatasetHparams(), tmp_path / "out.pt", root)
    assert str(gz) in str(e.value) and "md5 mismatch" in str(e.value) and "Delete it" in str(e.value)


@needs_mnist
def test_missing_mnist_file_is_named_without_trying_to_download(tmp_path: Path) -> None:
    root = mnist_root(tmp_path, skip="t10k-images-idx3-ubyte")
    with pytest.raises(DataError) as e:
        prepare(DatasetHparams(), tmp_path / "out.pt", root)
    assert "lacks t10k-images-idx3-ubyte" in str(e.value) and "LTH_DATA_DIR" in str(e.value)


@needs_mnist
def test_prepare_stage_fails_naming_the_file(tmp_path: Path) -> None:
    name = "train-images-idx3-ubyte"
    root = mnist_root(tmp_path, skip=name)
    bad = root / "MNIST" / "raw" / name
    bad.write_bytes(b"\0" * 100)
    work = tmp_path / "work"
    for d in ("stages", "src"):
        shutil.copytree(ROOT / d, work / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "LTH_DATA_DIR": str(root)}
    proc = subprocess.run(
        [sys.executable, "stages/prepare.py"], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert f"{bad} is truncated or corrupt (100 bytes, expected {MNIST_SIZES[name]})" in proc.stderr
    assert not (work / "data").exists()


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
    return imp.init_model(Hparams(), 0)


def test_mask_of_the_wrong_shape_or_layers(tmp_path: Path) -> None:
    model = lenet()
    good = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    path = tmp_path / "mask.pt"
    torch.save(good, path)
    assert imp.load_mask(model, path).keys() == good.keys()
    wrong = dict(good, **{"layers.0.weight": torch.ones(10, 784, dtype=torch.bool)})
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"mask 'layers.0.weight' has shape \(10, 784\)") as e:
        imp.load_mask(model, path)
    assert str(path) in str(e.value) and "re-run its stage" in str(e.value)
    torch.save({k: v for k, v in good.items() if k != "layers.2.weight"}, path)
    with pytest.raises(ValueError, match=r"missing \['layers.2.weight'\]"):
        imp.load_mask(model, path)
    torch.save({k: v.float() for k, v in good.items()}, path)
    with pytest.raises(ValueError, match="torch.float32"):
        imp.load_mask(model, path)


def test_weights_of_the_wrong_shape(tmp_path: Path) -> None:
    model = lenet()
    path = tmp_path / "final.pt"
    state = imp.init_model(Hparams(), 1).state_dict()
    torch.save(state, path)
    imp.load_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    torch.save(dict(state, **{"layers.1.weight": torch.zeros(3, 3)}), path)
    with pytest.raises(ValueError, match=r"do not fit .*layers.1.weight") as e:
        imp.load_weights(model, path)
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
    for load in (imp.load_mask, imp.load_weights):
        with pytest.raises(ValueError, match=message) as e:
            load(lenet(), path)
        assert str(path) in str(e.value)


def test_missing_input_names_the_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mask not found; run the stage that makes it"):
        imp.load_mask(lenet(), tmp_path / "mask.pt")


def test_train_stage_refuses_a_mask_of_another_network(tmp_path: Path) -> None:
    """Round 1 reads round 0's outputs: a mask made for another network stops it before training."""
    import yaml

    work = tmp_path / "work"
    for d in ("stages", "src"):
        shutil.copytree(ROOT / d, work / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "dataset": {"name": "xor", "validation_size": 1000},
                "model": {"name": "xor"},
                "training": {"iterations": 100},
            }
        )
    )
    prepare(DatasetHparams(name="xor", validation_size=1000), work / "data" / "prepared" / "xor.pt")
    round0 = imp.trial_dir(work / "runs", "ticket", 0, 0)
    round0.mkdir(parents=True)
    model = imp.build_model(hparams.load(work / "params.yaml"))
    for name in ("final.pt", "rewind.pt"):
        torch.save(model.state_dict(), round0 / name)
    torch.save({n: torch.ones(7, 7, dtype=torch.bool) for n in model.layer_kinds()}, round0 / "mask.pt")
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "LTH_CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    proc = subprocess.run(
        [sys.executable, "stages/train_round.py", "--round", "1"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "runs/ticket/round_00/trial_0/mask.pt: mask '" in proc.stderr and "re-run its stage" in proc.stderr
    assert not (work / "runs" / "ticket" / "round_01").exists()
