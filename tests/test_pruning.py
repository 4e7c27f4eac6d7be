"""Magnitude pruning masks: layerwise and global counts, exclusions, dense kinds, one-shot, and the
masks of the controls (random pruning, random reinitialization) as the IMP rounds build them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lth.core import pruning
from lth.core.config import from_dict
from lth.core.hparams import PruningHparams
from lth.core.models.base import PrunableModel
from lth.core.registry import build_model
from lth.lottery.branches import init_model, prepare_network, trial_seed
from lth.lottery.layout import trial_dir

LENET = {"layers.0.weight": 784 * 300, "layers.1.weight": 300 * 100, "layers.2.weight": 100 * 10}


def model(name: str = "lenet_300_100", seed: int = 0) -> PrunableModel:
    dataset = {"lenet_300_100": "mnist", "xor": "xor"}.get(name, "cifar10")
    m = build_model(from_dict({"model": {"name": name}, "dataset": {"name": dataset}}))
    m.reset_parameters(torch.Generator().manual_seed(seed))
    return m


def prune(m: PrunableModel, mask: pruning.Mask | None = None, steps: int = 1, **hp) -> pruning.Mask:
    kinds = m.layer_kinds()
    weights = dict(m.named_parameters())
    mask = mask or pruning.dense_mask(kinds, {n: p.shape for n, p in weights.items()})
    return pruning.magnitude_prune(weights, mask, kinds, PruningHparams(**hp), steps=steps)


def kept(mask: pruning.Mask) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in mask.items()}


def assert_magnitude_order(m: PrunableModel, mask: pruning.Mask, names: list[str]) -> None:
    """Within a pruned group every kept weight is at least as large as every removed one."""
    w = dict(m.named_parameters())
    kept_min = min(float(w[n].detach().abs()[mask[n]].min()) for n in names)
    removed_max = max(float(w[n].detach().abs()[~mask[n]].max()) for n in names)
    assert kept_min >= removed_max


def test_layerwise_lenet_exact_counts_two_rounds() -> None:
    m = model()
    # Round 1: hidden layers lose ceil(20%), the output layer ceil(10%) of what remains.
    first = prune(m)
    assert kept(first) == {
        "layers.0.weight": 235200 - 47040,
        "layers.1.weight": 30000 - 6000,
        "layers.2.weight": 1000 - 100,
    }
    for n in LENET:
        assert_magnitude_order(m, first, [n])
    # Round 2 prunes what survived round 1 (with other weights, as after retraining).
    m2 = model(seed=1)
    second = prune(m2, first)
    assert kept(second) == {
        "layers.0.weight": 188160 - 37632,
        "layers.1.weight": 24000 - 4800,
        "layers.2.weight": 900 - 90,
    }
    assert all(bool((second[n] <= first[n]).all()) for n in LENET)  # never revives a pruned weight


def test_ceil_rounding_of_odd_counts() -> None:
    m = model("xor")  # 2x4 hidden, 4x1 output
    mask = prune(m, fc_rate=0.2, output_rate=0.1)
    assert kept(mask) == {"layers.0.weight": 8 - 2, "layers.1.weight": 4 - 1}  # ceil(1.6) = 2, ceil(0.4) = 1


def test_global_pools_the_layers_of_each_kind() -> None:
    m = model()
    mask = prune(m, strategy="global")
    counts = kept(mask)
    # The fc kind (layers 0 and 1, 265,200 weights) loses ceil(20%) = 53,040 in total.
    assert counts["layers.0.weight"] + counts["layers.1.weight"] == 265200 - 53040
    assert counts["layers.2.weight"] == 900
    assert_magnitude_order(m, mask, ["layers.0.weight", "layers.1.weight"])
    # Pooled, the wide first layer (smaller Glorot scale) loses more than 20%, the second less.
    assert counts["layers.0.weight"] / 235200 < 0.8 < counts["layers.1.weight"] / 30000


def test_global_resnet_prunes_convs_only() -> None:
    m = model("resnet20")
    mask = prune(m, strategy="global", conv_rate=0.2, fc_rate=0.0, output_rate=0.0)
    kinds = m.layer_kinds()
    conv = [n for n, k in kinds.items() if k == "conv"]
    total_conv = sum(mask[n].numel() for n in conv)
    assert total_conv == 267696
    assert sum(kept(mask)[n] for n in conv) == 267696 - 53540  # ceil(0.2 * 267,696) = 53,540
    for n, k in kinds.items():
        if k in ("shortcut", "output"):
            assert bool(mask[n].all()), n  # shortcuts are never pruned; output_rate 0 leaves it dense
    assert_magnitude_order(m, mask, conv)


def test_shortcuts_stay_dense_even_with_a_rate_and_layerwise() -> None:
    m = model("resnet20")
    mask = prune(m, conv_rate=0.5, output_rate=0.5)
    for n, k in m.layer_kinds().items():
        assert bool(mask[n].all()) == (k == "shortcut"), n


@pytest.mark.parametrize("exclude", [["layers.0"], ["layers.0.weight"]])
def test_excluded_layers_stay_dense(exclude: list[str]) -> None:
    mask = prune(model(), exclude=exclude)
    assert kept(mask) == {"layers.0.weight": 235200, "layers.1.weight": 24000, "layers.2.weight": 900}


def test_rate_zero_kinds_stay_dense() -> None:
    mask = prune(model(), output_rate=0.0)
    assert kept(mask)["layers.2.weight"] == 1000 and kept(mask)["layers.1.weight"] == 24000
    mask = prune(model("conv2"), conv_rate=0.0, fc_rate=0.2, output_rate=0.1)
    assert kept(mask)["features.0.weight"] == 3 * 64 * 9 and kept(mask)["features.2.weight"] == 64 * 64 * 9
    assert kept(mask)["fc.0.weight"] == 16384 * 256 - 838861  # ceil(0.2 * 4,194,304)


@pytest.mark.parametrize("strategy", ["layerwise", "global"])
def test_oneshot_steps_equal_iterative_counts(strategy: str) -> None:
    m = model()
    iterative = None
    for _ in range(3):
        iterative = prune(m, iterative, strategy=strategy)
    oneshot = prune(m, steps=3, strategy=strategy)
    # Same weights every round: iterative pruning keeps the top-k of the top-k, i.e. the same mask.
    assert kept(oneshot) == kept(iterative)
    assert all(torch.equal(oneshot[n], iterative[n]) for n in LENET)
    if strategy == "layerwise":
        assert kept(oneshot)["layers.0.weight"] == 120422  # 235200 -> 188160 -> 150528 -> 120422
    # With other weights the masks differ, the counts do not (global: the count of each pooled kind).
    moved = prune(model(seed=5), steps=3, strategy=strategy)
    assert not torch.equal(moved["layers.0.weight"], oneshot["layers.0.weight"])
    a, b = kept(moved), kept(iterative)
    if strategy == "layerwise":
        assert a == b
    else:
        assert a["layers.0.weight"] + a["layers.1.weight"] == b["layers.0.weight"] + b["layers.1.weight"]
        assert a["layers.2.weight"] == b["layers.2.weight"]


def test_random_prune_like_keeps_per_layer_counts() -> None:
    m = model("resnet20")
    ticket = prune(m, strategy="global", conv_rate=0.2, fc_rate=0.0, output_rate=0.0)
    rand = pruning.random_prune_like(ticket, torch.Generator().manual_seed(0))
    assert kept(rand) == kept(ticket)
    pruned_layers = [n for n in ticket if not bool(ticket[n].all())]
    assert pruned_layers and all(not torch.equal(rand[n], ticket[n]) for n in pruned_layers)
    assert all(bool(rand[n].all()) for n in ticket if bool(ticket[n].all()))  # dense layers stay dense
    again = pruning.random_prune_like(ticket, torch.Generator().manual_seed(0))
    assert all(torch.equal(rand[n], again[n]) for n in rand)  # seeded


def write_round0(runs: Path, m: PrunableModel, trained: PrunableModel, experiment: str) -> None:
    """What the ticket's round 0 writes: dense mask, weights at the rewind point and after training."""
    out = trial_dir(runs, "ticket", 0, 0)
    out.mkdir(parents=True)
    shapes = {n: p.shape for n, p in m.named_parameters()}
    torch.save(pruning.dense_mask(m.layer_kinds(), shapes), out / "mask.pt")
    torch.save(m.state_dict(), out / "rewind.pt")
    torch.save(trained.state_dict(), out / "final.pt")
    (out / "metrics.json").write_text(json.dumps({"hash": experiment}))


def test_control_networks_of_a_round(tmp_path: Path) -> None:
    """Round 1 of IMP and its controls for ResNet-20 under global pruning, as the stages build them."""
    hp = from_dict(
        {
            "model": {"name": "resnet20"},
            "dataset": {"name": "cifar10"},
            "pruning": {"strategy": "global", "conv_rate": 0.2, "fc_rate": 0.0, "output_rate": 0.0},
        }
    )
    init = init_model(hp, trial_seed(hp, 0))
    trained = model("resnet20", seed=7)  # stands in for the trained weights
    runs = tmp_path / "runs"
    write_round0(runs, init, trained, hp.hash)

    ticket, ticket_mask, start = prepare_network(hp, runs, 1, "ticket", 0)
    assert start == 0
    expected = prune(trained, strategy="global", conv_rate=0.2, fc_rate=0.0, output_rate=0.0)
    assert all(torch.equal(ticket_mask[n], v) for n, v in expected.items())  # pruned by the trained weights
    w, w0 = dict(ticket.named_parameters()), dict(init.named_parameters())
    for n, m in ticket_mask.items():  # rewound to the initial weights, pruned ones zero
        assert torch.equal(w[n].detach(), w0[n].detach() * m)
    out = trial_dir(runs, "ticket", 1, 0)
    out.mkdir(parents=True)
    torch.save(ticket_mask, out / "mask.pt")
    (out / "metrics.json").write_text(json.dumps({"hash": hp.hash}))

    reinit, reinit_mask, start = prepare_network(hp, runs, 1, "reinit", 0)
    assert start == 0 and all(torch.equal(reinit_mask[n], ticket_mask[n]) for n in ticket_mask)
    wr = dict(reinit.named_parameters())
    conv = "blocks.0.conv1.weight"
    assert not torch.equal(wr[conv].detach()[ticket_mask[conv]], w0[conv].detach()[ticket_mask[conv]])
    assert bool((wr[conv].detach()[~ticket_mask[conv]] == 0).all())

    rand, rand_mask, _ = prepare_network(hp, runs, 1, "random_pruning", 0)
    assert kept(rand_mask) == kept(ticket_mask)
    assert not torch.equal(rand_mask[conv], ticket_mask[conv])
    for n in ("blocks.3.shortcut.0.weight", "blocks.6.shortcut.0.weight", "fc.weight"):
        assert bool(rand_mask[n].all()) and bool(reinit_mask[n].all())
    wp = dict(rand.named_parameters())
    assert torch.equal(wp[conv].detach(), w0[conv].detach() * rand_mask[conv])  # original weights, random mask
