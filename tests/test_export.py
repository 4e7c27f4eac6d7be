"""Exported tickets load in plain PyTorch and hold exactly the masked rewound weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lth.core import hparams
from lth.core.data import prepare, prepared_path
from lth.core.registry import build_model
from lth.lottery import export
from lth.lottery.round import run_round

XOR = {
    "dataset": {"name": "xor"},
    "model": {"name": "xor", "hidden": 16},
    "training": {"iterations": 60, "eval_every": 20, "test_every": 20, "batch_size": 32, "lr": 0.01},
    "pruning": {"rounds": 2, "fc_rate": 0.5, "output_rate": 0.5, "rewind_iteration": 10},
    "trials": 2,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[hparams.Hparams, Path]:
    """Three real IMP rounds of the tiny XOR network with late resetting, two trials."""
    tmp = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.setenv("LTH_CHECKPOINT_DIR", str(tmp / "ckpt"))
    hp = hparams.from_dict(XOR)
    prepare(hp.dataset, prepared_path(tmp / "data", hp.dataset))
    for k in range(hp.pruning.rounds + 1):
        run_round(hp, k, "ticket", tmp / "runs", tmp / "data", torch.device("cpu"), track=False, quiet=True)
    mp.undo()
    return hp, tmp / "runs"


def test_export_is_the_masked_rewound_ticket(runs: tuple[hparams.Hparams, Path], tmp_path: Path) -> None:
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
    assert json.loads(doc["hparams"])["training.lr"] == 0.01


def test_export_rejects_rounds_and_trials_outside_the_experiment(runs: tuple[hparams.Hparams, Path]) -> None:
    hp, run_dir = runs
    with pytest.raises(ValueError, match="round 3 is not in this experiment"):
        export.ticket(hp, 3, runs=run_dir)
    with pytest.raises(ValueError, match="trial 2 is not in this experiment"):
        export.ticket(hp, 1, trial=2, runs=run_dir)
    with pytest.raises(FileNotFoundError, match="rewind.pt"):
        export.ticket(hp, 1, runs=run_dir.parent / "elsewhere")
