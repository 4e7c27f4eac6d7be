"""Registries of the named concepts that params select: models, datasets, optimizers."""

from __future__ import annotations

from collections.abc import Callable

from lth.core.datasets import DATASETS
from lth.core.hparams import Hparams
from lth.core.models import conv, lenet, resnet, vgg
from lth.core.models.base import PrunableModel

# name -> (constructor, dataset it is built for). Constructors take keyword arguments
# (num_classes, dropout, hidden) and ignore the ones they do not use.
MODELS: dict[str, tuple[Callable[..., PrunableModel], str]] = {
    "lenet_300_100": (lenet.lenet_300_100, "mnist"),
    "xor": (lenet.xor_net, "xor"),
    "conv2": (conv.conv2, "cifar10"),
    "conv4": (conv.conv4, "cifar10"),
    "conv6": (conv.conv6, "cifar10"),
    "resnet20": (resnet.resnet20, "cifar10"),
    "vgg16": (vgg.vgg16, "cifar10"),
    "vgg19": (vgg.vgg19, "cifar10"),
}

OPTIMIZERS = ("adam", "sgd")


def build_model(hp: Hparams) -> PrunableModel:
    constructor, _ = MODELS[hp.model.name]
    num_classes = DATASETS[hp.dataset.name].num_classes
    return constructor(num_classes=num_classes, dropout=hp.model.dropout, hidden=hp.model.hidden)


def check(hp: Hparams) -> list[str]:
    """Problems with the names in `hp` (unknown model, dataset, optimizer), one line each."""
    problems = []
    if hp.model.name not in MODELS:
        problems.append(f"model.name: unknown '{hp.model.name}' (valid: {', '.join(sorted(MODELS))})")
    if hp.dataset.name not in DATASETS:
        problems.append(f"dataset.name: unknown '{hp.dataset.name}' (valid: {', '.join(sorted(DATASETS))})")
    elif hp.model.name in MODELS and MODELS[hp.model.name][1] != hp.dataset.name:
        problems.append(
            f"model.name: '{hp.model.name}' is built for dataset '{MODELS[hp.model.name][1]}', "
            f"not '{hp.dataset.name}' (set dataset.name: {MODELS[hp.model.name][1]})"
        )
    if hp.training.optimizer not in OPTIMIZERS:
        problems.append(f"training.optimizer: unknown '{hp.training.optimizer}' (valid: {', '.join(OPTIMIZERS)})")
    if hp.pruning.exclude and not problems:  # a misspelled layer name would silently prune that layer
        try:
            layers = [n.removesuffix(".weight") for n in build_model(hp).layer_kinds()]
        except Exception:  # invalid values (e.g. dropout) are reported by the range checks
            layers = []
        unknown = [n for n in hp.pruning.exclude if n.removesuffix(".weight") not in layers]
        if layers and unknown:
            problems.append(
                f"pruning.exclude: {', '.join(unknown)}: not prunable layers of {hp.model.name} "
                f"(valid: {', '.join(layers)})"
            )
    return problems
