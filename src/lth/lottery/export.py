"""Export a winning ticket as one file that plain PyTorch loads with `torch.load(weights_only=True)`.

A ticket of round k is the mask found by round k applied to the weights every round rewinds to
(round 0's rewind.pt: the initialization, or iteration `pruning.rewind_iteration` with late resetting).
The file holds only tensors, strings and numbers, so loading it executes no code:

    {"state_dict": masked rewound weights, "mask": {weight name: bool tensor}, "model": registry name,
     "hparams": JSON of the nested hyperparameters, "hash": experiment hash, "round": k,
     "trial": t, "percent_remaining": float, "mask_md5": str, "format": "lth-ticket-1"}

`load(path)` rebuilds the network in one call, after checking the file's hash and mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lth.core import config, pruning
from lth.core.hparams import Hparams
from lth.core.models.base import PrunableModel
from lth.core.registry import build_model
from lth.lottery.layout import load_mask, load_weights, read_metrics, trial_dir

EXPORT_DIR = "exports"
FORMAT = "lth-ticket-1"


class ExportError(ValueError):
    """The ticket cannot be exported (or loaded) as asked; the message says why and what to do."""


def default_path(hp: Hparams, round_index: int, trial: int) -> Path:
    return Path(EXPORT_DIR) / f"{hp.short_name}-round_{round_index:02d}-trial_{trial}.pt"


def _recorded(hp: Hparams, runs: Path, round_index: int, trial: int) -> dict[str, Any]:
    """The round's metrics, refusing outputs of another experiment (e.g. `-S` selects one not in runs/)."""
    directory = trial_dir(runs, "ticket", round_index, trial)
    metrics = read_metrics(directory)
    if metrics.get("hash") != hp.hash:
        raise ExportError(
            f"{directory} holds experiment {str(metrics.get('hash'))[:8]}, not {hp.short_name} (the params you "
            "selected): bring that experiment's outputs into the workspace first (`dvc exp apply NAME`, or "
            "`lth run` with those params), then export."
        )
    return metrics


def ticket(hp: Hparams, round_index: int, trial: int = 0, runs: Path = Path("runs")) -> dict[str, Any]:
    """The exported document of the ticket of `round_index` (see the module docstring)."""
    if not 0 <= round_index <= hp.pruning.rounds:
        raise ExportError(
            f"round {round_index} is not in this experiment (rounds 0..{hp.pruning.rounds}); "
            "pick --round within pruning.rounds."
        )
    if not 0 <= trial < hp.trials:
        raise ExportError(f"trial {trial} is not in this experiment (trials 0..{hp.trials - 1}); pick --trial.")
    _recorded(hp, runs, 0, trial)
    metrics = _recorded(hp, runs, round_index, trial)
    model = build_model(hp)
    load_weights(model, trial_dir(runs, "ticket", 0, trial) / "rewind.pt")
    mask_path = trial_dir(runs, "ticket", round_index, trial) / "mask.pt"
    mask = load_mask(model, mask_path)
    if pruning.mask_hash(mask) != metrics.get("mask_md5"):
        raise ExportError(
            f"{mask_path} is not the mask its metrics.json records (mask_md5); run `dvc repro` to "
            "restore it, then export."
        )
    pruning.apply_mask(model, mask)
    return {
        "format": FORMAT,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "mask": {k: v.clone() for k, v in mask.items()},
        "mask_md5": metrics["mask_md5"],
        "model": hp.model.name,
        "hparams": json.dumps(hp.to_dict(), sort_keys=True),
        "hash": hp.hash,
        "round": round_index,
        "trial": trial,
        "percent_remaining": pruning.percent_remaining(mask),
    }


def _is_export(path: Path) -> bool:
    try:
        return torch.load(path, weights_only=True, map_location="cpu").get("format") == FORMAT
    except Exception:  # anything unreadable is not an earlier export
        return False


def export(
    hp: Hparams,
    round_index: int,
    out: Path | None = None,
    trial: int = 0,
    runs: Path = Path("runs"),
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Write the ticket to `out` (default exports/<experiment>-round_<k>-trial_<t>.pt); returns (path, document).
    Refuses to overwrite a file that is not an earlier export unless `force`."""
    doc = ticket(hp, round_index, trial, runs)
    out = Path(out) if out is not None else default_path(hp, round_index, trial)
    if out.exists() and not out.is_file():
        raise ExportError(f"{out} is not a regular file (a device, directory or pipe); choose a file for --out.")
    if out.exists() and not force and not _is_export(out):
        raise ExportError(
            f"{out} exists and is not an exported ticket; choose another --out, or pass --force to replace it."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        torch.save(doc, tmp)
        tmp.replace(out)
    except OSError as e:
        raise ExportError(f"cannot write {out} ({e.strerror or e}); choose a writable --out.") from None
    return out, doc


def load(path: str | Path) -> tuple[PrunableModel, pruning.Mask, dict[str, Any]]:
    """Rebuild an exported ticket: (the network with its masked rewound weights, the mask, the document).
    The file's hash and mask checksum are verified first."""
    doc = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ExportError(f"{path} is not a ticket exported by `lth export` ({FORMAT}).")
    hp = config.from_dict(json.loads(doc["hparams"]), str(path))
    if hp.hash != doc["hash"] or pruning.mask_hash(doc["mask"]) != doc["mask_md5"]:
        raise ExportError(f"{path} is inconsistent (hash or mask checksum differs from its contents); re-export it.")
    model = build_model(hp)
    model.load_state_dict(doc["state_dict"])
    return model, doc["mask"], doc
