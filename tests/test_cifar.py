"""CIFAR-10 from torchvision's `cifar-10-batches-py` pickles: small files in the real format, safe
unpickling, md5 verification, clear errors, and a few training steps of Conv-2 on the prepared data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lth.core.config import from_dict
from lth.core.data import DataError, load_prepared, prepare
from lth.core.datasets import CIFAR_DIR
from lth.core.hparams import DatasetHparams, TrainingHparams
from lth.core.registry import build_model
from lth.core.training import TrainJob, train
from lth.reporting.aggregate import read_sparsity_csv

PER_BATCH = 120  # images per file (the real files hold 10,000)
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def batch(seed: int, n: int = PER_BATCH) -> dict:
    """A batch in the real layout. The red channel encodes the label (25 * label), so a network can
    learn it and a test can check the channel order; green and blue are noise."""
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    data = rng.integers(0, 256, (n, 3, 1024), dtype=np.uint8)
    data[:, 0, :] = (25 * np.asarray(labels, dtype=np.uint8))[:, None]
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": labels,
        b"data": data.reshape(n, 3072),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def write_cifar(root: Path) -> Path:
    folder = root / CIFAR_DIR
    folder.mkdir(parents=True)
    for i, name in enumerate(FILES):
        # Protocol 2 is what the real (Python 2 era) files use; the test batch uses today's default protocol.
        protocol = pickle.DEFAULT_PROTOCOL if name == "test_batch" else 2
        (folder / name).write_bytes(pickle.dumps(batch(i), protocol=protocol))
    return folder


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LTH_ALLOW_UNVERIFIED_DATA", "1")
    write_cifar(tmp_path / "raw")
    return tmp_path / "raw"


HP = DatasetHparams(name="cifar10", validation_size=100)


def test_prepare_and_load(cifar_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared" / "cifar10.pt"
    assert prepare(HP, out, cifar_root) == {"train": 5 * PER_BATCH - 100, "val": 100, "test": PER_BATCH}
    raw = torch.load(out, weights_only=True)
    assert raw["train_x"].shape == (5 * PER_BATCH - 100, 3, 32, 32) and raw["train_x"].dtype == torch.uint8
    for split in ("train", "val", "test"):
        x, y = raw[f"{split}_x"], raw[f"{split}_y"]
        assert torch.equal(x[:, 0].flatten(1).amin(1), (25 * y).to(torch.uint8))  # channel 0 is red
        assert torch.equal(x[:, 0].flatten(1).amax(1), (25 * y).to(torch.uint8))
    # Every training image is in exactly one of train/val, labels kept with their images.
    all_labels = sorted(v for i in range(5) for v in batch(i)[b"labels"])
    assert sorted(raw["train_y"].tolist() + raw["val_y"].tolist()) == all_labels
    assert raw["test_y"].tolist() == batch(5)[b"labels"]
    data = load_prepared(out, HP)
    assert data.num_classes == 10 and data.train.x.dtype == torch.float32
    assert torch.allclose(data.train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)  # normalized per channel


def test_md5_mismatch_is_rejected_without_the_variable(
    cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LTH_ALLOW_UNVERIFIED_DATA")
    with pytest.raises(DataError) as e:
        prepare(HP, tmp_path / "p.pt", cifar_root)
    msg = str(e.value)
    assert "data_batch_1" in msg and "md5" in msg and "LTH_ALLOW_UNVERIFIED_DATA=1" in msg
    assert not (tmp_path / "p.pt").exists()


def test_truncated_file_names_the_file(cifar_root: Path, tmp_path: Path) -> None:
    f = cifar_root / CIFAR_DIR / "data_batch_3"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DataError, match="data_batch_3 is truncated, corrupt or not a CIFAR-10 batch file"):
        prepare(HP, tmp_path / "p.pt", cifar_root)


def test_wrong_content_names_the_file(cifar_root: Path, tmp_path: Path) -> None:
    bad = batch(0)
    bad[b"data"] = bad[b"data"][:, :100]
    (cifar_root / CIFAR_DIR / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="test_batch does not hold CIFAR-10 data"):
        prepare(HP, tmp_path / "p.pt", cifar_root)


class Exploit:
    """A pickle that would run a shell command when unpickled by a plain pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_arbitrary_objects_are_never_unpickled(cifar_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {b"data": Exploit(marker), b"labels": []}
    (cifar_root / CIFAR_DIR / "data_batch_2").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2 is truncated, corrupt .*global '\w+\.system' is not allowed"):
        prepare(HP, tmp_path / "p.pt", cifar_root)
    assert not marker.exists()


def test_incomplete_copy_lists_missing_files(cifar_root: Path, tmp_path: Path) -> None:
    (cifar_root / CIFAR_DIR / "data_batch_4").unlink()
    (cifar_root / CIFAR_DIR / "test_batch").unlink()
    with pytest.raises(DataError, match=r"incomplete: missing data_batch_4, test_batch"):
        prepare(HP, tmp_path / "p.pt", cifar_root)


def test_conv2_trains_on_cifar(cifar_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cifar10.pt"
    prepare(HP, out, cifar_root)
    data = load_prepared(out, HP)
    hp = from_dict({"dataset": {"name": "cifar10"}, "model": {"name": "conv2"}})
    model = build_model(hp)
    model.reset_parameters(torch.Generator().manual_seed(0))
    t = TrainingHparams(lr=1e-3, batch_size=20, iterations=20, eval_every=10, test_every=10)
    result = train(model, data, TrainJob(t, seed=0))
    assert [r["iteration"] for r in result.curve] == [0, 10, 20]
    assert result.curve[-1]["val_loss"] < result.curve[0]["val_loss"]


def test_resnet20_trains_with_augmentation(cifar_root: Path, tmp_path: Path) -> None:
    hp_data = DatasetHparams(name="cifar10", validation_size=100, augment=True)
    out = tmp_path / "cifar10.pt"
    prepare(hp_data, out, cifar_root)
    data = load_prepared(out, hp_data)
    assert data.augment
    hp = from_dict({"dataset": {"name": "cifar10", "augment": True}, "model": {"name": "resnet20"}})
    model = build_model(hp)
    model.reset_parameters(torch.Generator().manual_seed(0))
    t = TrainingHparams(
        optimizer="sgd", lr=0.05, momentum=0.9, batch_size=20, iterations=10, eval_every=10, test_every=10
    )
    first = train(model, data, TrainJob(t, seed=0))
    model.reset_parameters(torch.Generator().manual_seed(0))
    again = train(model, data, TrainJob(t, seed=0))
    assert first.curve[-1]["train_loss"] == again.curve[-1]["train_loss"]  # augmentation is seeded


@pytest.mark.slow
def test_resnet20_rewind_preset_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_project, preset_params
) -> None:
    """`dvc repro` of the resnet20_rewind preset, shortened, with both controls, on small CIFAR files:
    global pruning of the convs only, late resetting, BatchNorm and augmentation through the real stages."""
    write_cifar(tmp_path / "raw")
    monkeypatch.setenv("LTH_DATA_DIR", str(tmp_path / "raw"))
    monkeypatch.setenv("LTH_ALLOW_UNVERIFIED_DATA", "1")
    params = preset_params(
        "resnet20_rewind",
        {
            "dataset.validation_size": 100,
            "training.batch_size": 20,
            "training.iterations": 20,
            "training.lr_milestones": [15],
            "training.eval_every": 10,
            "training.test_every": 10,
            "pruning.rewind_iteration": 5,
            "pruning.rounds": 1,
            "controls.random_reinit": True,
            "controls.random_pruning": True,
            "runtime.threads": 1,
        },
    )
    proj = make_project(params)
    proj.dvc("repro")
    rows = read_sparsity_csv((proj.root / "results" / "plots" / "sparsity.csv").read_text())
    assert {r["kind"] for r in rows} == {"ticket", "reinit", "random_pruning"}
    conv_total, dense = 267_696, 2_560 + 640  # prunable convs; shortcuts and output stay dense
    kept = conv_total - 53_540 + dense  # ceil(20% of the convs) pruned globally
    (round1,) = [r for r in rows if (r["kind"], r["round"]) == ("ticket", 1)]
    assert round1["percent_remaining"] == pytest.approx(100 * kept / (conv_total + dense), abs=1e-4)
    rewind = torch.load(proj.root / "runs" / "ticket" / "round_00" / "trial_0" / "rewind.pt", weights_only=True)
    assert "bn.running_mean" in rewind  # BatchNorm statistics are rewound too
