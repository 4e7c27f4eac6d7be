"""Exported tickets load in plain PyTorch and hold exactly the masked rewound weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lth.core.config import from_dict
from lth.core.data import prepare, prepared_path
from lth.core.hparams import Hparams
from lth.core.registry import build_model
from lth.core.runtime import RuntimeSettings
from lth.lottery import export
from lth.lottery.round import Round, run_round


@pytest.fixture
def runs(tmp_path: Path, xor_params) -> tuple[Hparams, Path]:
    """Three real IMP rounds of a wider XOR network with late resetting, two trials (in this process)."""
    params = xor_params(
        {
            "model.hidden": 16,
            "training.iterations": 60,
            "training.eval_every": 20,
            "training.test_every": 20,
            "training.batch_size": 32,
            "training.lr": 0.01,
            "pruning.rounds": 2,
            "pruning.fc_rate": 0.5,
            "pruning.output_rate": 0.5,
            "pruning.rewind_iteration": 10,
            "trials": 2,
        }
    )
    hp = from_dict(params)
    settings = RuntimeSettings(torch.device("cpu"), threads=1, workers=1, quiet=True, checkpoint_dir=tmp_path / "ckpt")
    prepare(hp.dataset, prepared_path(tmp_path / "data", hp.dataset))
    for k in range(hp.pruning.rounds + 1):
        run_round(Round(hp, "ticket", k, tmp_path / "runs", tmp_path / "data"), settings)
    return hp, tmp_path / "runs"


def test_export_is_the_masked_rewound_ticket(runs: tuple[Hparams, Path], tmp_path: Path) -> None:
    hp, run_dir = runs
    path, _ = export.export(hp, 2, tmp_path / "t.pt", trial=1, runs=run_dir)
    doc = torch.load(path, weights_only=True)  # plain PyTorch, no lth code and no pickled objects
    rewind = torch.load(run_dir / "ticket/round_00/trial_1/rewind.pt", weights_only=True)
    mask = torch.load(run_dir / "ticket/round_02/trial_1/mask.pt", weights_only=True)
    model = build_model(hp)
    model.load_state_dict(doc["state_dict"])
    for name, value in model.state_dict().items():
        expected = rewind[name] * mask[name] if name in mask else rewind[name]
        assert torch.equal(value, expected), name
        if name in mask:
            assert torch.equal(doc["mask"][name], mask[name])
            assert (value[~mask[name]] == 0).all()
            assert (~mask[name]).any()  # round 2 pruned something in every layer
    metrics = json.loads((run_dir / "ticket/round_02/trial_1/metrics.json").read_text())
    assert doc["percent_remaining"] == pytest.approx(metrics["percent_remaining"])
    assert (doc["round"], doc["trial"], doc["model"], doc["hash"]) == (2, 1, "xor", hp.hash)
    assert json.loads(doc["hparams"])["training"]["lr"] == 0.01
    # `export.load` rebuilds the same network from the file alone.
    loaded, loaded_mask, _ = export.load(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert all(torch.equal(loaded_mask[n], mask[n]) for n in mask)


def test_export_rejects_rounds_and_trials_outside_the_experiment(runs: tuple[Hparams, Path]) -> None:
    hp, run_dir = runs
    with pytest.raises(ValueError, match="round 3 is not in this experiment"):
        export.ticket(hp, 3, runs=run_dir)
    with pytest.raises(ValueError, match="trial 2 is not in this experiment"):
        export.ticket(hp, 1, trial=2, runs=run_dir)
    with pytest.raises(ValueError, match=r"round_00/trial_0/metrics.json: unreadable metrics .*dvc repro"):
        export.ticket(hp, 1, runs=run_dir.parent / "elsewhere")
    other = dataclasses.replace(hp, training=dataclasses.replace(hp.training, lr=0.02))
    with pytest.raises(export.ExportError, match=f"holds experiment {hp.hash[:8]}, not {other.short_name}"):
        export.ticket(other, 1, runs=run_dir)
