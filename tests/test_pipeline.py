"""The whole pipeline, for real: `dvc repro` of a tiny LeNet/MNIST experiment in a temp git + DVC repo,
with MLflow logging to a real sqlite store. Every test works on its own copy of a project trained once (see
the trained_project fixture), so none depends on what another did."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import pytest
import torch

from lth.core import config
from lth.pipeline import render
from lth.reporting.aggregate import read_sparsity_csv
from tests.helpers import Project, output_digests

pytestmark = pytest.mark.mnist


ALL_STAGES = ["prepare", "ticket_round_00", "ticket_round_01", "ticket_round_02", "masks", "evaluate"]


def trained_stages(output: str) -> list[str]:
    """Stages that actually ran their command (not skipped, not restored from the run-cache)."""
    ran, current = [], None
    for line in output.splitlines():
        if line.startswith("Running stage '"):
            current = line.split("'")[1]
        elif line.startswith("> ") and current:
            ran.append(current)
            current = None
    return ran


@pytest.fixture
def proj(trained_project: Callable[..., Project], lenet_params) -> Project:
    """A LeNet project of 3 rounds (0, 1, 2) of 200 iterations after its first `dvc repro`."""
    return trained_project(lenet_params({"training.iterations": 200}))


def test_repro_runs_every_stage_in_order(proj: Project) -> None:
    assert trained_stages(proj.output) == ALL_STAGES
    dag = proj.dvc("dag", "--md").stdout
    for stage in ("prepare", "ticket_round_00", "ticket_round_02", "masks", "evaluate"):
        assert stage in dag
    rounds = read_sparsity_csv((proj.root / "results" / "plots" / "sparsity.csv").read_text())
    assert [(r["kind"], r["round"]) for r in rounds] == [("ticket", k) for k in range(3)]
    pct = [r["percent_remaining"] for r in rounds]
    assert pct[0] == 100.0 and pct[0] > pct[1] > pct[2]
    for k in range(3):
        trial = proj.root / "runs" / "ticket" / f"round_{k:02d}" / "trial_0"
        m = json.loads((trial / "metrics.json").read_text())
        assert 0.5 < m["test_accuracy_at_early_stop"] <= 1.0  # LeNet learns MNIST within 200 iterations
        assert m["early_stop_iteration"] in (0, 100, 200)
        run = json.loads((trial / "run.json").read_text())  # how it ran: measured, never compared
        assert run["seconds"]["train"] > 0 and run["seconds"]["eval"] > 0
    for fig in ("accuracy.png", "early_stop.png", "learning_curves.png"):
        assert (proj.root / "results" / "figures" / fig).stat().st_size > 10_000
    # the summary: three rounds reach none of the key sparsities (51% and below)
    metrics = json.loads((proj.root / "results" / "metrics.json").read_text())
    best = max(rounds[1:], key=lambda r: r["test_accuracy_at_early_stop"])
    assert metrics == {
        "dense": round(rounds[0]["test_accuracy_at_early_stop"], 4),
        "best": round(best["test_accuracy_at_early_stop"], 4),
        "best_round": best["round"],
        "best_at%": float(f"{best['percent_remaining']:.3g}"),
    }


def test_plots_show_draws_each_plot_once(proj: Project) -> None:
    """Each interactive plot and each PNG figure once, no default plot of the plot data, and lines coloured by
    kind with a band around each."""
    plots = json.loads(proj.dvc("plots", "show", "--json").stdout)["data"]
    figures = [f"results/figures/{name}.png" for name in ("accuracy", "early_stop", "learning_curves", "masks")]
    assert sorted(plots) == sorted([*render.SPARSITY_PLOTS, "learning_curves", *figures])
    assert all(len(renderers) == 1 for renderers in plots.values()), {k: len(v) for k, v in plots.items()}
    assert [plots[f][0]["type"] for f in figures] == ["image"] * len(figures)
    for plot_id, labels in [(m, {"winning ticket (IMP)"}) for m in render.SPARSITY_PLOTS] + [
        ("learning_curves", {"winning ticket (IMP)", "dense network"})
    ]:
        spec = plots[plot_id][0]["content"]
        values = spec["data"]["values"]
        assert {v["label"] for v in values} == labels, plot_id
        y = "test_accuracy" if plot_id == "learning_curves" else plot_id
        assert all(float(v[f"{y}_low"]) <= float(v[y]) <= float(v[f"{y}_high"]) for v in values), plot_id
        encoding = spec.get("spec", spec)["encoding"]
        assert encoding["color"]["field"] == "label", plot_id


def test_pruned_weights_stay_zero_and_rewind_to_init(proj: Project) -> None:
    runs = proj.root / "runs" / "ticket"
    rewind = torch.load(runs / "round_00" / "trial_0" / "rewind.pt", weights_only=True)
    for k in (1, 2):
        mask = torch.load(runs / f"round_{k:02d}" / "trial_0" / "mask.pt", weights_only=True)
        final = torch.load(runs / f"round_{k:02d}" / "trial_0" / "final.pt", weights_only=True)
        for name, m in mask.items():
            assert (final[name][~m] == 0).all(), f"pruned weights of {name} moved in round {k}"
            assert (final[name][m] != rewind[name][m]).any(), "survivors should have trained"
    # round 2's mask is a subset of round 1's (iterative pruning never revives a weight)
    m1 = torch.load(runs / "round_01" / "trial_0" / "mask.pt", weights_only=True)
    m2 = torch.load(runs / "round_02" / "trial_0" / "mask.pt", weights_only=True)
    assert all((m2[n] & ~m1[n]).sum() == 0 for n in m1)


def test_mlflow_has_every_round(proj: Project) -> None:
    from mlflow.tracking import MlflowClient

    hp = config.load(proj.root / "params.yaml")
    client = MlflowClient(proj.tracking_uri)
    [exp] = client.search_experiments(filter_string=f"tags.`lth.hash` = '{hp.hash}'")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "lth.round" in r.data.tags]  # not the parent
    assert sorted(int(r.data.tags["lth.round"]) for r in runs) == [0, 1, 2]
    for r in runs:
        assert r.data.tags["lth.hash"] == hp.hash
        assert r.data.params["training.lr"] == "0.0012"
        assert 0 < r.data.metrics["percent_remaining"] <= 100
        assert r.data.metrics["seconds_train"] > 0  # from run.json
        history = client.get_metric_history(r.info.run_id, "curve_val_loss")
        assert [m.step for m in history] == [0, 100, 200]
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"mask.npz", "final.pt"} <= artifacts
    # MLflow's files stay outside every DVC output
    assert (proj.root / "mlflow.db").exists() and not list((proj.root / "runs").rglob("*.db"))
    located = proj.lth("locate").stdout
    assert hp.hash in located and "3 runs" in located and "runs/ticket/round_02/trial_0" in located


def test_second_repro_is_a_no_op(proj: Project) -> None:
    out = proj.dvc("repro").stdout
    assert trained_stages(out) == []


def test_verify_reproduces_the_last_round(proj: Project) -> None:
    """`lth verify` re-trains round 2 in its own process, whose default thread count differs from the
    stage's (one thread for LeNet): it must train the same way and find the same bits."""
    out = proj.lth("verify")
    assert "PASS" in out.stdout, out.stdout + out.stderr


def test_adding_rounds_keeps_earlier_ones(proj: Project) -> None:
    proj.set_params({"pruning.rounds": 3})
    # dvc.yaml is stale until re-rendered: the evaluate stage says so
    stale = proj.dvc("repro", check=False)
    assert stale.returncode != 0 and "lth pipeline" in stale.stdout + stale.stderr
    proj.lth("pipeline")
    out = proj.dvc("repro").stdout
    assert trained_stages(out) == ["ticket_round_03", "masks", "evaluate"]


def test_changing_lr_retrains_and_going_back_restores_from_run_cache(proj: Project) -> None:
    """A value (not the structure) edited in params.yaml: plain `dvc repro` retrains and leaves dvc.yaml as
    committed; the old value again restores every output from DVC's run-cache."""
    before = output_digests(proj.root)
    proj.set_params({"training.lr": 0.002})
    out = proj.dvc("repro").stdout
    assert "prepare" not in trained_stages(out)
    assert {"ticket_round_00", "ticket_round_01", "ticket_round_02"} <= set(trained_stages(out))
    assert output_digests(proj.root) != before
    assert proj.run("git", "status", "--porcelain", "dvc.yaml").stdout == ""
    proj.set_params({"training.lr": 0.0012})
    out = proj.dvc("repro").stdout
    assert [s for s in trained_stages(out) if s.startswith("ticket")] == [], out
    assert output_digests(proj.root) == before


def test_regenerate_from_nothing(proj: Project) -> None:
    """Delete every output and the DVC cache: `dvc repro` recomputes identical masks and metrics."""
    before = output_digests(proj.root)
    assert len(before) == 12  # 3 rounds x (mask, final, metrics, curve)
    for d in ("runs", "data", "results", ".dvc/cache", ".lth"):
        shutil.rmtree(proj.root / d, ignore_errors=True)
    out = proj.dvc("repro").stdout
    assert trained_stages(out) == ALL_STAGES
    assert output_digests(proj.root) == before
