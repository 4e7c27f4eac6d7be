"""The training loop on LeNet-300-100 and MNIST: deterministic to the bit, pruned weights exactly zero, and
early stopping that tests only every `test_every` iterations reports what testing at every evaluation does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lth.core import pruning
from lth.core.data import Data, load_prepared, prepare
from lth.core.hparams import Hparams, TrainingHparams
from lth.core.training import train
from lth.lottery.round import init_model

from .conftest import needs_mnist

pytestmark = needs_mnist
HP = Hparams()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    path = tmp_path_factory.mktemp("prepared") / "mnist.pt"
    prepare(HP.dataset, path)
    return load_prepared(path, HP.dataset)


def pruned_network(percent: float = 50.0, seed: int = 0) -> tuple[torch.nn.Module, pruning.Mask]:
    """LeNet magnitude-pruned at initialization to `percent` remaining in every layer."""
    model = init_model(HP, seed)
    params = dict(model.named_parameters())
    kinds = model.layer_kinds()
    mask = pruning.dense_mask(kinds, {n: params[n].shape for n in kinds})
    for n in kinds:
        mask.update(pruning.keep_top({n: params[n].abs()}, mask, [n], round(params[n].numel() * percent / 100)))
    pruning.apply_mask(model, mask)
    return model, mask


def short(**changes: object) -> TrainingHparams:
    return dataclasses.replace(HP.training, **{"iterations": 300, "eval_every": 100, "test_every": 100, **changes})


@pytest.mark.parametrize(
    "changes",
    [{}, {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, {"weight_decay": 1e-3}],
    ids=["adam", "sgd-momentum-wd", "adam-wd"],
)
def test_same_seed_same_bits_and_pruned_weights_stay_zero(data: Data, changes: dict) -> None:
    results = []
    for _ in range(2):
        model, mask = pruned_network()
        results.append(train(model, data, short(**changes), seed=3, mask=mask))
    a, b = results
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state), "two runs with the same seed differ"
    assert a.curve == b.curve and a.metrics == b.metrics
    start, _ = pruned_network()
    for name, m in mask.items():
        assert int((a.state[name][~m] != 0).sum()) == 0, f"pruned weights of {name} moved"
        # The kept weights did train (the check above is not vacuous).
        assert not torch.equal(a.state[name][m], start.state_dict()[name][m])


def test_other_seed_other_weights(data: Data) -> None:
    model, mask = pruned_network()
    a = train(model, data, short(iterations=100), seed=0, mask=mask)
    model, mask = pruned_network()
    b = train(model, data, short(iterations=100), seed=1, mask=mask)
    assert not torch.equal(a.state["layers.0.weight"], b.state["layers.0.weight"])


def test_early_stop_test_accuracy_matches_testing_at_every_evaluation(data: Data) -> None:
    """The default tests every 1000 iterations and once on the best-validation snapshot; testing at every
    evaluation must give the same early-stopping iteration and test accuracy there."""
    runs = {}
    for test_every in (100, 1000):
        model, mask = pruned_network(20.0)
        runs[test_every] = train(model, data, short(iterations=600, test_every=test_every), seed=0, mask=mask)
    every, sparse = runs[100], runs[1000]
    assert sparse.metrics["early_stop_iteration"] == every.metrics["early_stop_iteration"]
    assert sparse.metrics["test_accuracy_at_early_stop"] == every.metrics["test_accuracy_at_early_stop"]
    # ... and that accuracy is the one the every-100 curve recorded at the early-stopping iteration.
    row = next(r for r in every.curve if r["iteration"] == every.metrics["early_stop_iteration"])
    assert row["test_accuracy"] == sparse.metrics["test_accuracy_at_early_stop"]
    assert sum(r["test_accuracy"] == r["test_accuracy"] for r in sparse.curve) == 2  # iterations 0 and 600
