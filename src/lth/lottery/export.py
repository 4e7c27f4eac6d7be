"""Export a winning ticket as one file that plain PyTorch loads with `torch.load(weights_only=True)`.

A ticket of round k is the mask found by round k applied to the weights every round rewinds to
(round 0's rewind.pt: the initialization, or iteration `pruning.rewind_iteration` with late resetting).
The file holds only tensors, strings and numbers, so loading it executes no code:

    {"state_dict": masked rewound weights, "mask": {weight name: bool tensor}, "model": registry name,
     "hparams": canonical JSON of the hyperparameters, "hash": experiment hash, "round": k,
     "trial": t, "percent_remaining": float}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lth.core import pruning
from lth.core.hparams import Hparams
from lth.core.registry import build_model
from lth.lottery.layout import load_mask, load_weights, trial_dir

EXPORT_DIR = "exports"


def default_path(hp: Hparams, round_index: int, trial: int) -> Path:
    return Path(EXPORT_DIR) / f"{hp.short_name}-round_{round_index:02d}-trial_{trial}.pt"


def ticket(hp: Hparams, round_index: int, trial: int = 0, runs: Path = Path("runs")) -> dict[str, Any]:
    """The exported document of the ticket of `round_index` (see the module docstring)."""
    if not 0 <= round_index <= hp.pruning.rounds:
        raise ValueError(
            f"round {round_index} is not in this experiment (rounds 0..{hp.pruning.rounds}); "
            "pick --round within pruning.rounds."
        )
    if not 0 <= trial < hp.trials:
        raise ValueError(f"trial {trial} is not in this experiment (trials 0..{hp.trials - 1}); pick --trial.")
    model = build_model(hp)
    load_weights(model, trial_dir(runs, "ticket", 0, trial) / "rewind.pt")
    mask = load_mask(model, trial_dir(runs, "ticket", round_index, trial) / "mask.pt")
    pruning.apply_mask(model, mask)
    return {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "mask": {k: v.clone() for k, v in mask.items()},
        "model": hp.model.name,
        "hparams": hp.canonical(),
        "hash": hp.hash,
        "round": round_index,
        "trial": trial,
        "percent_remaining": pruning.percent_remaining(mask),
    }


def export(
    hp: Hparams, round_index: int, out: Path | None = None, trial: int = 0, runs: Path = Path("runs")
) -> tuple[Path, dict[str, Any]]:
    """Write the ticket to `out` (default exports/<experiment>-round_<k>-trial_<t>.pt); returns (path, document)."""
    doc = ticket(hp, round_index, trial, runs)
    out = Path(out) if out is not None else default_path(hp, round_index, trial)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(doc, out)
    return out, doc
