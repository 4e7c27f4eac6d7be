"""Registries of the named concepts that params select: models, datasets, optimizers."""

from __future__ import annotations

from collections.abc import Callable

from lth.data import DATASETS
from lth.hparams import Hparams
from lth.models import lenet
from lth.models.base import PrunableModel

# name -> (constructor, dataset it is built for). Constructors take keyword arguments
# (num_classes, dropout, hidden) and ignore the ones they do not use.
MODELS: dict[str, tuple[Callable[..., PrunableModel], str]] = {
    "lenet_300_100": (lenet.lenet_300_100, "mnist"),
    "xor": (lenet.xor_net, "xor"),
}

OPTIMIZERS = ("adam", "sgd")


def build_model(hp: Hparams) -> PrunableModel:
    constructor, _ = MODELS[hp.model.name]
    _, num_classes = DATASETS[hp.dataset.name]
    return constructor(num_classes=num_classes, dropout=hp.model.dropout, hidden=hp.model.hidden)


def check(hp: Hparams) -> list[str]:
    """Problems with the names in `hp` (unknown model, dataset, optimizer), one line each."""
    problems = []
    if hp.model.name not in MODELS:
        problems.append(f"model.name: unknown '{hp.model.name}' (valid: {', '.join(sorted(MODELS))})")
    if hp.dataset.name not in DATASETS:
        problems.append(f"dataset.name: unknown '{hp.dataset.name}' (valid: {', '.join(sorted(DATASETS))})")
    elif hp.model.name in MODELS and MODELS[hp.model.name][1] != hp.dataset.name:
        problems.append(f"model.name: '{hp.model.name}' is built for dataset '{MODELS[hp.model.name][1]}', "
                        f"not '{hp.dataset.name}' (set dataset.name: {MODELS[hp.model.name][1]})")
    if hp.training.optimizer not in OPTIMIZERS:
        problems.append(f"training.optimizer: unknown '{hp.training.optimizer}' (valid: {', '.join(OPTIMIZERS)})")
    return problems
