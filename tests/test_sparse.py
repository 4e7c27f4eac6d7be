"""Sparse kernels for pruned fully connected layers: the same gradients as the dense masked layer, the same
training up to rounding, exact resume, and the choice of kernels made only from the mask and the setting."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from lth.core import config, runtime
from lth.core.checkpoint import Checkpointer, Stopped, StopRequest
from lth.core.data import Data
from lth.core.hparams import Hparams, TrainingHparams
from lth.core.models.conv import conv2
from lth.core.sparse import SparseLinear, use_sparse
from lth.core.training import TrainJob, train

CPU = torch.device("cpu")


def test_sparse_linear_matches_the_masked_dense_layer() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(30, 20)
    mask = torch.rand(20, 30) < 0.2
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = SparseLinear(dense, mask)
    x = torch.randn(8, 30, requires_grad=True)
    xs = x.detach().clone().requires_grad_(True)
    y, ys = dense(x), sparse(xs)
    assert torch.allclose(y, ys, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ys.backward(g)
    assert torch.allclose(x.grad, xs.grad, atol=1e-6)
    assert torch.allclose(dense.bias.grad, sparse.bias.grad, atol=1e-6)
    assert torch.allclose(dense.weight.grad[mask], sparse.values.grad, atol=1e-6)
    copy = nn.Linear(30, 20)
    sparse.write_to(copy)
    assert torch.equal(copy.weight, dense.weight) and torch.equal(copy.bias, dense.bias)


def test_kernels_are_chosen_from_the_mask_and_the_setting(pruned_network) -> None:
    model = nn.Module()
    for percent, expected in ((50.0, False), (20.0, False), (5.0, True)):
        lenet, mask = pruned_network(percent)
        model = lenet
        assert use_sparse(lenet, mask, CPU) is expected, percent
        assert use_sparse(lenet, mask, CPU, "on") and not use_sparse(lenet, mask, CPU, "off")
        assert not use_sparse(lenet, mask, torch.device("cuda"))
        assert not use_sparse(lenet, None, CPU, "on")
    conv = conv2()
    conv_mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in conv.named_parameters() if n.endswith("weight")}
    assert not use_sparse(conv, conv_mask, CPU, "on")
    with pytest.raises(ValueError, match="runtime.sparse='fast'"):
        use_sparse(model, mask, CPU, "fast")


def test_runtime_setting_is_validated(tmp_path: Path) -> None:
    def sparse(section: dict, env: dict[str, str] | None = None) -> str:
        return runtime.resolve(section, tmp_path, env or {}).sparse

    assert sparse({}) == "auto"
    params = tmp_path / "params.yaml"
    params.write_text("runtime:\n  sparse: off\n")  # YAML reads a bare off as false
    assert sparse(config.runtime_section(params)) == "off"
    params.write_text("runtime:\n  sparse: 'on'\n")
    assert sparse(config.runtime_section(params)) == "on"
    assert sparse(config.runtime_section(params), {"LTH_SPARSE": "off"}) == "off"  # the environment wins
    params.write_text("runtime:\n  sparse: fast\n")
    with pytest.raises(config.HparamsError, match="runtime.sparse: expected auto, on or off, got 'fast'"):
        config.load(params)
    with pytest.raises(runtime.SettingsError, match="LTH_SPARSE='always'.*auto, on, off"):
        sparse({}, {"LTH_SPARSE": "always"})


def short(iterations: int = 300) -> TrainingHparams:
    return dataclasses.replace(Hparams().training, iterations=iterations, eval_every=100, test_every=100)


@pytest.mark.mnist
def test_sparse_training_equals_dense_up_to_rounding(mnist_data: Data, pruned_network) -> None:
    results = {}
    for setting in ("off", "on"):
        model, mask = pruned_network(5.0)
        results[setting] = train(model, mnist_data, TrainJob(short(), seed=0, mask=mask, sparse=setting))
    dense, sparse = results["off"], results["on"]
    assert (dense.engine, sparse.engine) == ("dense", "sparse")
    for name, m in mask.items():
        assert int((sparse.state[name][~m] != 0).sum()) == 0, f"pruned weights of {name} moved"
        assert torch.allclose(dense.state[name], sparse.state[name], atol=1e-4), name
    start, _ = pruned_network(5.0)
    assert not torch.equal(sparse.state["layers.0.weight"], start.state_dict()["layers.0.weight"])
    assert sparse.metrics["early_stop_iteration"] == dense.metrics["early_stop_iteration"]
    assert sparse.metrics["test_accuracy_at_early_stop"] == pytest.approx(
        dense.metrics["test_accuracy_at_early_stop"], abs=2e-3
    )
    # Same setting, same bits.
    model, mask = pruned_network(5.0)
    again = train(model, mnist_data, TrainJob(short(), seed=0, mask=mask, sparse="on"))
    assert all(torch.equal(again.state[k], sparse.state[k]) for k in sparse.state)


@pytest.mark.mnist
def test_sparse_training_resumes_bit_identical(mnist_data: Data, pruned_network, tmp_path: Path) -> None:
    job = TrainJob(short(), seed=0, sparse="on")
    model, mask = pruned_network(5.0)
    whole = train(model, mnist_data, dataclasses.replace(job, mask=mask))
    ckpt = tmp_path / "ckpt.pt"
    stop = StopRequest()

    def stop_at_200(iteration: int, row: dict) -> None:
        if iteration == 200:
            stop.signum = signal.SIGTERM

    model, mask = pruned_network(5.0)
    with pytest.raises(Stopped, match="interrupted .* at iteration 200") as e:
        train(model, mnist_data, dataclasses.replace(job, mask=mask), Checkpointer(ckpt, "k"), stop_at_200, stop)
    assert e.value.signum == signal.SIGTERM
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == 200 and saved["engine"] == "sparse"
    model, mask = pruned_network(5.0)
    resumed = train(model, mnist_data, dataclasses.replace(job, mask=mask), Checkpointer(ckpt, "k"))
    assert all(torch.equal(resumed.state[k], whole.state[k]) for k in whole.state)
    assert resumed.metrics == whole.metrics
