"""Where a trained network's outputs live, and reading and writing them (every file is a DVC output).

    runs/<kind>/round_<kk>/trial_<t>/
        mask.pt       bool masks, one per prunable weight (True = kept)
        final.pt      weights at the end of training
        rewind.pt     weights at the rewind iteration (ticket round 0 only: every round rewinds to them)
        metrics.json  summary metrics (accuracy at early stop and at the end, ...): what was computed
        curve.csv     learning curve: one row per evaluation
        run.json      how it ran: wall-clock start and end (epoch ms), wall time by phase, the numeric
                      environment, the git commit (measured or circumstantial, so it differs run to run;
                      no check compares it; MLflow's run takes its times and source from it)

`kind` is the branch: `ticket` (IMP), `reinit` (the ticket's mask, fresh weights) or `random_pruning`
(a random mask with the ticket's per-layer sparsity, original weights).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch

from lth.core import pruning
from lth.core.evaluation import CURVE_COLUMNS
from lth.core.models.base import PrunableModel

# The controls: kind -> its switch in params (`controls.<switch>`). The one registry of branches.
CONTROLS = {"reinit": "random_reinit", "random_pruning": "random_pruning"}
KINDS = ("ticket", *CONTROLS)
OUTPUT_FILES = ("metrics.json", "final.pt", "mask.pt", "curve.csv")  # what a finished trial must have


def round_dir(runs: Path, kind: str, round_index: int) -> Path:
    return Path(runs) / kind / f"round_{round_index:02d}"


def trial_dir(runs: Path, kind: str, round_index: int, trial: int) -> Path:
    return round_dir(runs, kind, round_index) / f"trial_{trial}"


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Safe load (tensors only) with an error that names the file and the fix."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that makes it (`dvc repro`).")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{path}: {what} is corrupt or not a tensor file ({e}); delete it and `dvc repro`.") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: {what} is not a dict of tensors; delete it and run `dvc repro`.")
    return obj


def load_weights(model: PrunableModel, path: Path) -> None:
    state = load_tensors(path, "weights")
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if bad or set(state) - set(expected):
        raise ValueError(
            f"{path}: weights do not fit {type(model).__name__} (mismatched: {bad[:5]}); "
            "they were made with other model params: re-run that stage."
        )
    model.load_state_dict(state)


def load_mask(model: PrunableModel, path: Path) -> pruning.Mask:
    mask = load_tensors(path, "mask")
    pruning.check_mask(mask, model, str(path))
    return mask


def read_metrics(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable metrics ({e}); run `dvc repro` to restore it.") from e


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for row in curve:
            w.writerow(
                [int(row["iteration"])] + ["" if math.isnan(row[c]) else f"{row[c]:.6g}" for c in CURVE_COLUMNS[1:]]
            )


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def read_run_info(directory: Path) -> dict[str, Any]:
    """run.json, or {} for a trial recorded before it existed."""
    path = Path(directory) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_outputs(
    out: Path,
    metrics: dict[str, Any],
    final: dict[str, torch.Tensor],
    mask: pruning.Mask,
    curve: list[dict[str, float]],
    rewind: dict[str, torch.Tensor] | None,
    run_info: dict[str, Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
    torch.save({k: v.cpu() for k, v in final.items()}, out / "final.pt")
    torch.save({k: v.cpu() for k, v in mask.items()}, out / "mask.pt")
    if rewind is not None:
        torch.save({k: v.cpu() for k, v in rewind.items()}, out / "rewind.pt")
    write_curve(out / "curve.csv", curve)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
