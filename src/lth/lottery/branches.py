"""The network a round starts from: the ticket of IMP, or one of its controls (branches of the trajectory).

- `ticket`, round 0: the dense network at its initialization.
- `ticket`, round k: prune the previous round's final weights by magnitude (or, one-shot, round 0's by k
  steps), then rewind the survivors to round 0's rewind weights.
- `reinit`: the ticket's mask of round k with freshly drawn weights (Figure 4's random reinitialization).
- `random_pruning`: a random mask with the ticket's per-layer sparsity, on the rewind weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lth.core import pruning
from lth.core.hparams import Hparams
from lth.core.models.base import PrunableModel
from lth.core.registry import build_model
from lth.lottery.layout import KINDS, load_mask, load_weights, read_metrics, trial_dir

# Seeds of the controls' randomness are offset so that they never coincide with a ticket's.
REINIT_SEED_OFFSET = 1_000_000
RANDOM_MASK_SEED_OFFSET = 2_000_000


def trial_seed(hp: Hparams, trial: int) -> int:
    return hp.training.seed + trial


def init_model(hp: Hparams, seed: int) -> PrunableModel:
    model = build_model(hp)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def prepare_network(
    hp: Hparams, runs: Path, round_index: int, kind: str, trial: int
) -> tuple[PrunableModel, pruning.Mask, int]:
    """(model with its starting weights, its mask applied; the mask; the iteration training starts at)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind '{kind}' (valid: {', '.join(KINDS)})")
    if round_index == 0 and kind != "ticket":
        raise ValueError("controls start at round 1 (round 0 is the dense network)")
    seed = trial_seed(hp, trial)
    model = init_model(hp, seed)
    if round_index == 0:
        return model, pruning.dense_mask(model.layer_kinds(), {n: p.shape for n, p in model.named_parameters()}), 0
    check_input(hp, trial_dir(runs, "ticket", 0, trial))
    rewind = trial_dir(runs, "ticket", 0, trial) / "rewind.pt"
    start = hp.pruning.rewind_iteration
    if kind == "ticket":
        mask = _magnitude_mask(hp, runs, round_index, trial, model)
        load_weights(model, rewind)
        pruning.apply_mask(model, mask)
        return model, mask, start
    check_input(hp, trial_dir(runs, "ticket", round_index, trial))  # a control branches off this ticket round
    if kind == "reinit":
        mask, start = load_mask(model, trial_dir(runs, "ticket", round_index, trial) / "mask.pt"), 0
        model = init_model(hp, seed + REINIT_SEED_OFFSET + 1000 * round_index)
    else:
        ticket_mask = load_mask(model, trial_dir(runs, "ticket", round_index, trial) / "mask.pt")
        g = torch.Generator().manual_seed(seed + RANDOM_MASK_SEED_OFFSET + 1000 * round_index)
        mask = pruning.random_prune_like(ticket_mask, g)
        load_weights(model, rewind)
    pruning.apply_mask(model, mask)
    return model, mask, start


class ForeignInput(ValueError):
    """An input of this round (an earlier round's outputs) belongs to another experiment."""


def check_input(hp: Hparams, directory: Path) -> None:
    """A round only builds on outputs of its own trajectory: the recorded hash must be this experiment's."""
    recorded = read_metrics(directory).get("hash")
    if recorded != hp.hash:
        raise ForeignInput(
            f"{directory} was trained for experiment {str(recorded)[:8]}, but params.yaml gives {hp.hash[:8]}: "
            "params changed since that round ran. Run `lth run` (or `dvc repro`) so that every round is of one "
            "experiment; nothing was trained or recorded."
        )


def _magnitude_mask(hp: Hparams, runs: Path, round_index: int, trial: int, model: PrunableModel) -> pruning.Mask:
    """IMP: prune the previous round's trained weights (one-shot: round 0's, by `round_index` steps)."""
    if hp.pruning.schedule == "oneshot":
        source, steps = trial_dir(runs, "ticket", 0, trial), round_index
    else:
        source, steps = trial_dir(runs, "ticket", round_index - 1, trial), 1
    check_input(hp, source)
    previous = init_model(hp, trial_seed(hp, trial))
    load_weights(previous, source / "final.pt")
    mask = load_mask(model, source / "mask.pt")
    return pruning.magnitude_prune(
        dict(previous.named_parameters()), mask, model.layer_kinds(), hp.pruning, steps=steps
    )
