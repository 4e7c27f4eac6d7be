"""The instability analysis (lth.lottery.instability): interpolation and barrier on tensors, params, aggregation,
and the stage for real: the tiny XOR project (trained once per session, shared with other tests) with
`instability.rounds: [1]` added, re-rendered and reproduced with `dvc repro` in its own git + DVC repo, logging
to a real MLflow store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lth.core import config
from lth.core.data import load_prepared, prepared_path
from lth.core.evaluation import evaluate
from lth.lottery import instability
from lth.lottery.branches import init_model, trial_seed
from lth.lottery.layout import load_weights, read_metrics, trial_dir
from lth.pipeline import render
from lth.reporting import aggregate
from lth.reporting.statistics import mean_ci
from tests.conftest import XOR_TINY, copy_project
from tests.helpers import Project, with_changes
from tests.test_pipeline import trained_stages

ANALYSED = {"instability.rounds": [1], "instability.points": 7}


def test_interpolation_is_exact_at_the_ends_and_keeps_pruned_weights_zero() -> None:
    mask = torch.tensor([[True, False], [False, True]])
    a = {"w": torch.randn(2, 2) * mask, "count": torch.tensor(3)}
    b = {"w": torch.randn(2, 2) * mask, "count": torch.tensor(5)}
    assert torch.equal(instability.interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(instability.interpolate(a, b, 1.0)["w"], b["w"])
    middle = instability.interpolate(a, b, 0.25)
    assert torch.allclose(middle["w"], 0.75 * a["w"] + 0.25 * b["w"]) and (middle["w"][~mask] == 0).all()
    assert middle["count"] == 3  # not a weight: copy A's
    assert instability.alphas(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert instability.error_barrier([0.1, 0.3, 0.2]) == pytest.approx(0.3 - 0.15)
    assert instability.error_barrier([0.1, 0.1, 0.1]) == 0.0


def test_instability_params_are_checked_and_never_change_the_hash() -> None:
    base = {"dataset": {"name": "xor"}, "model": {"name": "xor"}, "pruning": {"rounds": 2}}
    analysed = config.from_dict({**base, "instability": {"rounds": [2, 0], "points": 5}})
    assert analysed.hash == config.from_dict(base).hash
    assert analysed.round_hash(1, 0) == config.from_dict(base).round_hash(1, 0)
    names = render.stage_names(analysed)
    assert names[-4:] == ["instability_round_00", "instability_round_02", "masks", "evaluate"]
    assert render.describe_stages(analysed) == "prepare, 3 ticket rounds, instability of rounds 0, 2, masks, evaluate"
    controlled = config.from_dict({**base, "controls": {"random_reinit": True, "random_pruning": True}})
    assert render.describe_stages(controlled) == (
        "prepare, 3 ticket rounds, 2 reinit rounds, 2 random_pruning rounds, masks, evaluate"
    )
    with pytest.raises(config.HparamsError, match=r"instability.rounds: \[3\] not among the experiment's rounds"):
        config.from_dict({**base, "instability": {"rounds": [1, 3]}})
    with pytest.raises(config.HparamsError, match="instability.rounds: \\[1\\] listed more than once"):
        config.from_dict({**base, "instability": {"rounds": [1, 1]}})
    with pytest.raises(config.HparamsError, match="instability.points: must be 3 or more"):
        config.from_dict({**base, "instability": {"points": 2}})


def test_aggregate_instability_over_trials() -> None:
    def row(trial: int, errors: list[float]) -> dict:
        curve = [{"alpha": a, "test_error": e} for a, e in zip(instability.alphas(len(errors)), errors, strict=True)]
        return {"round": 1, "trial": trial, "percent_remaining": 80.0, **instability.summarize(curve), "curve": curve}

    inst = aggregate.aggregate_instability([row(0, [0.1, 0.3, 0.1]), row(1, [0.2, 0.2, 0.2])])
    assert inst[1]["trials"] == 2 and inst[1]["percent_remaining"] == 80.0
    mean, low, high = mean_ci([0.2, 0.0])
    assert (inst[1]["error_barrier"]["mean"], inst[1]["error_barrier"]["ci_low"]) == pytest.approx((mean, low))
    assert inst[1]["error_barrier"]["ci_high"] == pytest.approx(high)
    assert [p["test_error"]["mean"] for p in inst[1]["curve"]] == pytest.approx([0.15, 0.25, 0.15])
    assert aggregate.metrics_document({}, inst) == {"instability": {"round_01": 0.1}}


@pytest.fixture(scope="module")
def analysed(trained_projects, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The trained XOR project, then instability.rounds=[1]: dvc.yaml re-rendered and `dvc repro` (read-only)."""
    trained = trained_projects(with_changes(XOR_TINY, None), ("dvc", "repro"))
    proj = copy_project(trained.root, tmp_path_factory.mktemp("analysed") / "project")
    proj.set_params(ANALYSED)
    render.write(config.load(proj.root / "params.yaml"), proj.root / "dvc.yaml")  # what `lth pipeline` does
    proj.output = proj.dvc("repro").stdout
    return proj


def test_the_stage_runs_alone_after_the_rounds_it_analyses(analysed: Project) -> None:
    assert trained_stages(analysed.output) == ["instability_round_01", "evaluate"], analysed.output
    out = analysed.root / "runs" / "instability" / "round_01" / "trial_0"
    assert {p.name for p in out.iterdir()} == {"interpolation.csv", "instability.json", "run.json"}


def test_barrier_and_ends_recomputed_from_the_outputs(analysed: Project) -> None:
    root = analysed.root
    hp = config.load(root / "params.yaml")
    out = trial_dir(root / "runs", "instability", 1, 0)
    summary = json.loads((out / "instability.json").read_text())
    curve = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(out / "interpolation.csv"))]
    errors = [r["test_error"] for r in curve]
    assert [r["alpha"] for r in curve] == instability.alphas(7) and [r["point"] for r in curve] == list(range(7))
    assert summary["error_barrier"] == max(errors) - (errors[0] + errors[-1]) / 2
    assert (summary["error_a"], summary["error_b"], summary["split"]) == (errors[0], errors[-1], "test")
    # copy A: the ticket round's network, as recorded and as evaluated here
    ticket = read_metrics(trial_dir(root / "runs", "ticket", 1, 0))
    assert errors[0] == 1 - ticket["test_accuracy_final"]
    model = init_model(hp, trial_seed(hp, 0))
    load_weights(model, trial_dir(root / "runs", "ticket", 1, 0) / "final.pt")
    data = load_prepared(prepared_path(root / "data" / "prepared", hp.dataset), hp.dataset)
    assert errors[0] == 1 - evaluate(model, data.test)[1]
    # copy B: trained from the same start (round 1 of XOR: the initialization) with another data order
    assert errors[-1] == 1 - summary["copy_b"]["test_accuracy_final"]
    assert summary["copy_b"]["val_loss_final"] != ticket["val_loss_final"]
    assert summary["seed_b"] == trial_seed(hp, 0) + instability.DATA_ORDER_SEED_OFFSET
    assert (summary["start_iteration"], summary["percent_remaining"]) == (0, ticket["percent_remaining"])
    assert summary["hash"] == hp.hash


def test_evaluate_reports_the_barrier(analysed: Project) -> None:
    results = analysed.root / "results"
    summary = json.loads((analysed.root / "runs/instability/round_01/trial_0/instability.json").read_text())
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["instability"] == {"round_01": round(summary["error_barrier"], 4)}
    [row] = list(csv.DictReader(open(results / "plots" / "instability.csv")))
    assert (row["round"], float(row["error_barrier"])) == ("1", pytest.approx(summary["error_barrier"], abs=1e-6))
    assert len(list(csv.DictReader(open(results / "plots" / "interpolation.csv")))) == 7
    assert (results / "figures" / "instability.png").read_bytes()[:4] == b"\x89PNG"
    page = (results / "report.html").read_text()
    assert '<h2>Instability</h2><table id="instability">' in page and "instability.png is missing" not in page
    plots = json.loads(analysed.dvc("plots", "show", "--json").stdout)["data"]
    assert {"instability", "interpolation", "results/figures/instability.png"} <= set(plots)
    assert all(len(plots[p]) == 1 for p in ("instability", "interpolation", "results/figures/instability.png"))


def test_mlflow_child_runs_under_the_ticket_trajectory(analysed: Project, tmp_path: Path) -> None:
    """A child run of the ticket's trajectory, logged from the outputs: `lth sync-mlflow` replays the same run,
    and logging again replaces it."""
    from mlflow.tracking import MlflowClient

    from lth.tracking.store import Tracker
    from lth.tracking.sync import sync
    from lth.tracking.writer import log_instability

    proj = copy_project(analysed.root, tmp_path / "copy")  # its store changes below
    hp = config.load(proj.root / "params.yaml")
    out = proj.root / "runs" / "instability" / "round_01" / "trial_0"
    client = MlflowClient(proj.tracking_uri)
    [exp] = client.search_experiments(filter_string=f"tags.`lth.hash` = '{hp.hash}'")
    trajectory = "tags.`lth.trajectory` = 'true' and tags.`lth.kind` = 'ticket'"

    def logged() -> tuple[str, list]:
        """The one instability run: checked, with its curve as logged (step, value, time)."""
        [run] = client.search_runs([exp.experiment_id], "tags.`lth.analysis` = 'instability'")
        [parent] = client.search_runs([exp.experiment_id], trajectory)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["mlflow.runName"] == "instability-round01-trial0" and run.info.status == "FINISHED"
        summary = json.loads((out / "instability.json").read_text())
        assert run.data.metrics["error_barrier"] == summary["error_barrier"]
        history = client.get_metric_history(run.info.run_id, "interpolation_test_error")
        curve = list(csv.DictReader(open(out / "interpolation.csv")))
        assert sorted((m.step, m.value) for m in history) == [(int(r["point"]), float(r["test_error"])) for r in curve]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["interpolation.csv"]
        return run.info.run_id, sorted((m.step, m.value, m.timestamp) for m in history)

    run_id, live = logged()
    client.delete_run(run_id)
    tracker, said = Tracker(proj.tracking_uri), []
    sync(hp, proj.root / "runs", tracker, said.append)  # what `lth sync-mlflow` does
    assert any("logged the instability analysis" in line for line in said), said
    assert logged()[1] == live  # replayed from the outputs: the same points at the same times
    log_instability(tracker, hp, out)
    assert logged()[1] == live  # logged again: replaced, not doubled


def test_sweep_draws_the_barrier_against_the_swept_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lth sweep report`'s instability view, on experiments of a rewind-iteration sweep (their committed
    results/plots/instability.csv read as DVC would, from each experiment's commit)."""
    from lth.reporting import sweep

    def experiment(rewind: int) -> sweep.Experiment:
        params = {"pruning.rewind_iteration": rewind, "instability.rounds": [0, 2]}
        return sweep.Experiment(f"rewind-{rewind}", f"{rewind:07d}abc", params, [])

    def read_at(path: str, rev: str, repo: Path = Path(".")) -> str:
        assert path == sweep.INSTABILITY_FILE
        inst = {k: {"percent_remaining": p, "trials": 1, "curve": []} for k, p in ((0, 100.0), (2, 64.0))}
        for k, e in inst.items():  # the barrier falls with the rewind iteration, and with sparsity
            barrier = 0.2 / (1 + int(rev[:7])) / (1 + k)
            e |= {m: {"mean": barrier, "ci_low": barrier, "ci_high": barrier} for m in aggregate.INSTABILITY_METRICS}
        aggregate.write_instability_csv(inst, tmp_path / "instability.csv")
        return (tmp_path / "instability.csv").read_text()

    monkeypatch.setattr(sweep, "read_at", read_at)
    exps = [experiment(500), experiment(0), experiment(100)]
    note = sweep.instability_sweep(exps, ["pruning.rewind_iteration"], tmp_path / "out" / "rewind.csv")
    rows = list(csv.DictReader(open(tmp_path / "out" / "rewind_instability.csv")))
    assert [(r["pruning.rewind_iteration"], r["round"]) for r in rows] == [
        (str(k), str(r)) for k in (0, 100, 500) for r in (0, 2)
    ]
    assert float(rows[0]["error_barrier"]) == pytest.approx(0.2) and float(rows[-1]["error_barrier"]) < 0.001
    assert (tmp_path / "out" / "rewind_instability.png").read_bytes()[:4] == b"\x89PNG"
    assert "rewind_instability.png" in note
    assert sweep.instability_sweep([sweep.Experiment("plain", "abc", {}, [])], [], tmp_path / "plain.csv") == ""
