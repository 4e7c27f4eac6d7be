"""Mask analysis (lth.reporting.masks): per-layer sparsity and Jaccard overlaps, on real masks; its DVC stage."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lth.core import config, pruning
from lth.core.registry import build_model
from lth.reporting.masks import jaccard, layer_percent, layer_rows, overlap_rows, random_jaccard, read_masks


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def mask_of(*layers: list[int]) -> pruning.Mask:
    return {f"layer{i}.weight": torch.tensor(bits, dtype=torch.bool) for i, bits in enumerate(layers)}


def test_jaccard_counts_weights_kept_in_both_over_kept_in_either():
    a = mask_of([1, 1, 0, 0], [1, 0])
    b = mask_of([1, 0, 1, 0], [1, 0])
    assert jaccard(a, b) == 2 / 4
    assert jaccard(a, a) == 1.0
    assert layer_percent(a) == {"layer0.weight": 50.0, "layer1.weight": 50.0}


def test_random_jaccard_is_what_independent_random_masks_share():
    generator = torch.Generator().manual_seed(0)
    dense = {"fc1.weight": torch.ones(300, 784, dtype=torch.bool), "fc2.weight": torch.ones(100, 300, dtype=torch.bool)}
    ticket = {
        "fc1.weight": torch.rand(300, 784, generator=generator) < 0.2,
        "fc2.weight": torch.rand(100, 300, generator=generator) < 0.5,
    }
    drawn = [
        jaccard(pruning.random_prune_like(ticket, generator), pruning.random_prune_like(ticket, generator))
        for _ in range(5)
    ]
    assert abs(sum(drawn) / len(drawn) - random_jaccard(ticket)) < 0.005
    assert random_jaccard(dense) == 1.0


def test_overlap_rows_use_the_random_pruning_control_when_it_exists(pruned_network):
    _, half = pruned_network(50.0, seed=0)
    _, quarter = pruned_network(25.0, seed=0)
    _, quarter_other_seed = pruned_network(25.0, seed=1)
    generator = torch.Generator().manual_seed(1)
    random_quarter = pruning.random_prune_like(quarter, generator)
    masks = {
        ("ticket", 0, 0): half,
        ("ticket", 1, 0): half,
        ("ticket", 2, 0): quarter,
        ("ticket", 2, 1): quarter_other_seed,
    }
    (first, second) = overlap_rows({**masks, ("random_pruning", 2, 0): random_quarter})
    assert first["round"] == 1 and first["across_trials"] is None and first["with_previous_round"] == 1.0
    assert second["across_trials"] == jaccard(quarter, quarter_other_seed) < 1.0
    assert second["with_random_mask"] == jaccard(quarter, random_quarter)
    assert second["random_mask_source"] == "random_pruning control"
    (_, without) = overlap_rows(masks)
    assert without["random_mask_source"] == "expected for random masks"
    assert without["with_random_mask"] == (random_jaccard(quarter) + random_jaccard(quarter_other_seed)) / 2
    layers = layer_rows(masks)
    assert {r["layer"] for r in layers} == set(half)
    assert all(abs(r["percent_remaining"] - 25.0) < 0.5 for r in layers if r["round"] == 2)


def test_masks_stage_writes_the_analysis_and_logs_it(trained_project, xor_params) -> None:
    """The masks stage of the tiny XOR project (`dvc repro`): plot data and figure from the rounds' masks, the
    report embeds the figure, the ticket's trajectory in MLflow charts the analysis by round; again, no new point."""
    from mlflow.tracking import MlflowClient

    from lth.tracking.writer import log_mask_analysis

    proj = trained_project(xor_params())
    assert "Running stage 'masks'" in proj.output
    hp = config.load(proj.root / "params.yaml")
    found = read_masks(proj.root / "runs", build_model(hp), ("ticket",), hp.pruning.rounds, hp.trials)
    plots = proj.root / "results" / "plots"
    layers = [(int(r["round"]), r["layer"], float(r["percent_remaining"])) for r in read_csv(plots / "mask_layers.csv")]
    assert layers == [(r["round"], r["layer"], pytest.approx(r["percent_remaining"])) for r in layer_rows(found)]
    [overlap] = read_csv(plots / "mask_overlap.csv")
    previous = jaccard(found[("ticket", 1, 0)], found[("ticket", 0, 0)])
    assert float(overlap["with_previous_round"]) == pytest.approx(previous) and overlap["across_trials"] == ""
    assert (proj.root / "results" / "figures" / "masks.png").read_bytes()[:4] == b"\x89PNG"
    assert "masks.png is missing" not in (proj.root / "results" / "report.html").read_text()

    client = MlflowClient(proj.tracking_uri)
    [exp] = client.search_experiments(filter_string=f"tags.`lth.hash` = '{hp.hash}'")
    trajectory = "tags.`lth.trajectory` = 'true' and tags.`lth.kind` = 'ticket'"
    [parent] = client.search_runs([exp.experiment_id], trajectory)

    def charted() -> dict[str, list[tuple[int, float]]]:
        keys = [
            "jaccard_previous_round",
            "jaccard_random",
            *(f"layer_percent_remaining/{n}" for n in found[("ticket", 0, 0)]),
        ]
        return {k: [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, k)] for k in keys}

    points = charted()
    assert points["jaccard_previous_round"] == [(1, pytest.approx(previous))]
    assert points["jaccard_random"] == [(1, pytest.approx(random_jaccard(found[("ticket", 1, 0)])))]
    assert all(sorted(step for step, _ in v) == [0, 1] for k, v in points.items() if k.startswith("layer_"))
    assert {"results/plots/mask_layers.csv", "results/plots/mask_overlap.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "results/plots")
    }
    results = proj.root / "results"
    log_mask_analysis(hp, results, [results / "plots" / "mask_trials.csv"], proj.tracking_uri)  # as the stage logs
    assert charted() == points
