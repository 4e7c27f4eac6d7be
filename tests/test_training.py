"""The training loop on LeNet-300-100 and MNIST: deterministic to the bit, pruned weights exactly zero, and
early stopping that tests only every `test_every` iterations reports what testing at every evaluation does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lth.core.data import Data
from lth.core.hparams import Hparams, TrainingHparams
from lth.core.training import TrainJob, train

pytestmark = pytest.mark.mnist


def short(**changes: object) -> TrainingHparams:
    changes = {"iterations": 300, "eval_every": 100, "test_every": 100, **changes}
    return dataclasses.replace(Hparams().training, **changes)


@pytest.mark.parametrize(
    "changes",
    [{}, {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, {"weight_decay": 1e-3}],
    ids=["adam", "sgd-momentum-wd", "adam-wd"],
)
def test_same_seed_same_bits_and_pruned_weights_stay_zero(mnist_data: Data, pruned_network, changes: dict) -> None:
    results = []
    for _ in range(2):
        model, mask = pruned_network()
        results.append(train(model, mnist_data, TrainJob(short(**changes), seed=3, mask=mask)))
    a, b = results
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state), "two runs with the same seed differ"
    assert a.curve == b.curve and a.metrics == b.metrics
    assert a.engine == "dense"  # 50% remaining: the dense loop with masked gradients
    assert set(a.seconds) == {"train", "eval"} and all(s > 0 for s in a.seconds.values())
    start, _ = pruned_network()
    for name, m in mask.items():
        assert int((a.state[name][~m] != 0).sum()) == 0, f"pruned weights of {name} moved"
        # The kept weights did train (the check above is not vacuous).
        assert not torch.equal(a.state[name][m], start.state_dict()[name][m])


def test_other_seed_other_weights(mnist_data: Data, pruned_network) -> None:
    model, mask = pruned_network()
    a = train(model, mnist_data, TrainJob(short(iterations=100), seed=0, mask=mask))
    model, mask = pruned_network()
    b = train(model, mnist_data, TrainJob(short(iterations=100), seed=1, mask=mask))
    assert not torch.equal(a.state["layers.0.weight"], b.state["layers.0.weight"])


def test_early_stop_test_accuracy_matches_testing_at_every_evaluation(mnist_data: Data, pruned_network) -> None:
    """The default tests every 1000 iterations and once on the best-validation snapshot; testing at every
    evaluation must give the same early-stopping iteration and test accuracy there."""
    runs = {}
    for test_every in (100, 1000):
        model, mask = pruned_network(20.0)
        job = TrainJob(short(iterations=600, test_every=test_every), seed=0, mask=mask)
        runs[test_every] = train(model, mnist_data, job)
    every, sparse = runs[100], runs[1000]
    assert sparse.metrics["early_stop_iteration"] == every.metrics["early_stop_iteration"]
    assert sparse.metrics["test_accuracy_at_early_stop"] == every.metrics["test_accuracy_at_early_stop"]
    # ... and that accuracy is the one the every-100 curve recorded at the early-stopping iteration.
    row = next(r for r in every.curve if r["iteration"] == every.metrics["early_stop_iteration"])
    assert row["test_accuracy"] == sparse.metrics["test_accuracy_at_early_stop"]
    assert sum(r["test_accuracy"] == r["test_accuracy"] for r in sparse.curve) == 2  # iterations 0 and 600


def test_rewind_state_is_the_weights_of_the_rewind_iteration(mnist_data: Data, pruned_network) -> None:
    """Late resetting keeps the weights of iteration k of the same run: those of a run stopped at k."""
    model, mask = pruned_network()
    full = train(model, mnist_data, TrainJob(short(iterations=200), seed=0, mask=mask, rewind_iteration=50))
    model, mask = pruned_network()
    upto = train(model, mnist_data, TrainJob(short(iterations=50), seed=0, mask=mask))
    assert full.rewind_state is not None and upto.rewind_state is None
    assert all(torch.equal(full.rewind_state[k], upto.state[k]) for k in upto.state)
