"""Registries of the named concepts that params select: models, datasets, optimizers."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from lth.core.datasets import DATASETS
from lth.core.hparams import Hparams
from lth.core.models import conv, lenet, resnet, vgg
from lth.core.models.base import PrunableModel


class Model(NamedTuple):
    """A network: its constructor, the dataset of the paper, and the other datasets whose examples it takes.
    Constructors take keyword arguments (num_classes, input_shape, dropout, hidden) and ignore the ones they
    do not use; `build_model` gives them the dataset's number of classes and input shape."""

    build: Callable[..., PrunableModel]
    dataset: str  # the paper's dataset (suggested when params name one the network does not take)
    others: tuple[str, ...] = ()

    @property
    def datasets(self) -> tuple[str, ...]:
        return (self.dataset, *self.others)


IMAGES_28 = ("mnist", "fashion_mnist")  # 1x28x28
IMAGES_32 = ("cifar100", "svhn")  # 3x32x32, besides CIFAR-10

MODELS: dict[str, Model] = {
    "lenet_300_100": Model(lenet.lenet_300_100, "mnist", ("fashion_mnist",)),
    "xor": Model(lenet.xor_net, "xor"),
    "conv2": Model(conv.conv2, "cifar10", IMAGES_32 + IMAGES_28),
    "conv4": Model(conv.conv4, "cifar10", IMAGES_32 + IMAGES_28),
    "conv6": Model(conv.conv6, "cifar10", IMAGES_32 + IMAGES_28),
    "resnet20": Model(resnet.resnet20, "cifar10", IMAGES_32),
    "vgg16": Model(vgg.vgg16, "cifar10", IMAGES_32),  # needs 32x32 inputs
    "vgg19": Model(vgg.vgg19, "cifar10", IMAGES_32),
}

OPTIMIZERS = ("adam", "sgd")


def build_model(hp: Hparams) -> PrunableModel:
    """The network of `hp`, built for its dataset: the one place a network learns its input shape and classes."""
    dataset = DATASETS[hp.dataset.name]
    return MODELS[hp.model.name].build(
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        dropout=hp.model.dropout,
        hidden=hp.model.hidden,
    )


def check(hp: Hparams) -> list[str]:
    """Problems with the names in `hp` (unknown model, dataset, optimizer), one line each."""
    problems = []
    if hp.model.name not in MODELS:
        problems.append(f"model.name: unknown '{hp.model.name}' (valid: {', '.join(sorted(MODELS))})")
    if hp.dataset.name not in DATASETS:
        problems.append(f"dataset.name: unknown '{hp.dataset.name}' (valid: {', '.join(sorted(DATASETS))})")
    elif hp.model.name in MODELS and hp.dataset.name not in MODELS[hp.model.name].datasets:
        model = MODELS[hp.model.name]
        takers = [name for name, m in MODELS.items() if hp.dataset.name in m.datasets]
        problems.append(
            f"model.name: '{hp.model.name}' does not take dataset '{hp.dataset.name}' (it takes "
            f"{', '.join(model.datasets)}); set dataset.name: {model.dataset}, or a model that takes "
            f"{hp.dataset.name} ({', '.join(takers)})"
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
