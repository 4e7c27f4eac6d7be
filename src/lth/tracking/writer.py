"""The one MLflow writer: a finished trial is logged from its DVC outputs, and only from them.

The train stage calls `log_trial` after writing a trial's outputs, and `lth sync-mlflow` calls it for
what MLflow lacks, so a run logged live and the same run replayed later are identical: its times, commit
and environment come from run.json, its numbers from metrics.json and curve.csv, its files from the
outputs. Each trial is a child of its trajectory's parent run (`lth.tracking.trajectory`). The evaluate
stage adds its report to the parents with `log_summary`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from lth.core import pruning
from lth.core.data import identity, prepared_path
from lth.core.hparams import Hparams
from lth.core.registry import build_model
from lth.lottery.layout import load_mask, read_curve, read_metrics, read_run_info, trial_dir
from lth.lottery.trial import now_ms
from lth.pipeline.render import stage_name
from lth.pipeline.workspace import DATA_DIR, RUNS_DIR
from lth.tracking.store import (
    TAG_HASH,
    TAG_PARENT,
    TAG_ROUND_HASH,
    Tracker,
    param_text,
    retry,
    trajectory_params,
    warn,
)
from lth.tracking.trajectory import finish_round, parent_run

SOURCE = "stages/train_round.py"  # what trains (and logs) a trial
NOT_METRICS = ("round", "trial")  # tags: as metrics they would clutter every chart


class MaskMismatch(ValueError):
    """mask.pt is not the mask that metrics.json records."""


def log_trial(tracker: Tracker, hp: Hparams, directory: Path) -> str:
    """Log the trained network in `directory` as one MLflow run, nested under its trajectory's parent: params,
    tags, the dataset, summary metrics, wall time by phase, the learning curve, the packed mask and the
    final weights, over the wall-clock span of its training. Returns the run id.

    Idempotent by round hash: a network that MLflow holds finished is not logged again (its run's id is
    returned), and runs of it left unfinished (a process killed while logging, a task that a cluster retried)
    are replaced."""
    m = read_metrics(directory)
    mask = load_mask(build_model(hp), directory / "mask.pt")
    if pruning.mask_hash(mask) != m.get("mask_md5"):
        raise MaskMismatch(
            f"{directory / 'mask.pt'} does not match the mask_md5 in {directory / 'metrics.json'}; "
            "run `dvc repro` (it restores or re-runs the stage), then `lth sync-mlflow`."
        )
    info = read_run_info(directory)
    start, end = info.get("start_ms"), info.get("end_ms")  # None in trials recorded before lth recorded them
    client = tracker.client
    tags = run_tags(hp, m, info)
    with tracker.lock():  # the parent and its children are found and made one process at a time
        logged = finished_round(tracker, tracker.experiment_id(hp), tags[TAG_ROUND_HASH])
        if logged:
            return logged
        experiment, parent = parent_run(tracker, hp, m["kind"], m["trial"], start, directory.parents[2])
        tags[TAG_PARENT] = parent
        run_id = retry(lambda: client.create_run(experiment, start, tags, tags["mlflow.runName"])).info.run_id
    summary = {
        **{k: v for k, v in m.items() if k not in NOT_METRICS},
        **{f"seconds_{k}": v for k, v in info.get("seconds", {}).items()},
    }
    end = end or now_ms()
    log_data(tracker, run_id, hp, summary, directory, end)
    with tempfile.TemporaryDirectory() as tmp:
        packed = Path(tmp) / "mask.npz"
        packed.write_bytes(pruning.pack(mask))
        client.log_artifact(run_id, str(packed))
    client.log_artifact(run_id, str(directory / "final.pt"))
    finish_round(tracker, hp, experiment, run_id, m, end)
    return run_id


def finished_round(tracker: Tracker, experiment: str, round_hash: str) -> str | None:
    """The id of the finished run of the trained network `round_hash`, when MLflow holds one. Otherwise its
    unfinished runs, whose logging broke off, are deleted (they would count twice). Call under the lock."""
    client = tracker.client
    runs = retry(lambda: client.search_runs([experiment], f"tags.`{TAG_ROUND_HASH}` = '{round_hash}'"))
    finished = [r.info.run_id for r in runs if r.info.status == "FINISHED"]
    if finished:
        return finished[0]
    for run in runs:
        retry(lambda run=run: client.delete_run(run.info.run_id))
    return None


def run_tags(hp: Hparams, m: dict[str, Any], info: dict[str, Any]) -> dict[str, str]:
    """A trained network's tags: its identity, where it comes from (stage, script, commit) and how it ran."""
    kind, round_index, trial = m["kind"], m["round"], m["trial"]
    return {
        TAG_ROUND_HASH: hp.round_hash(round_index, trial, kind),
        "lth.kind": kind,
        "lth.mask_md5": m["mask_md5"],
        **provenance_tags(hp, round_index, trial, info, kind, SOURCE),
    }


def provenance_tags(
    hp: Hparams, round_index: int, trial: int, info: dict[str, Any], stage_kind: str, source: str
) -> dict[str, str]:
    """The tags every run of a trial carries: experiment, round and trial, the DVC stage and script that made
    it, its commit and its numeric environment (run.json's `info`)."""
    tags = {
        TAG_HASH: hp.hash,
        "lth.round": str(round_index),
        "lth.trial": str(trial),
        "lth.model": hp.model.name,
        "lth.dvc.stage": stage_name(stage_kind, round_index),
        "mlflow.runName": f"{stage_kind}-round{round_index:02d}-trial{trial}",
        "mlflow.source.name": source,
        "mlflow.source.type": "LOCAL",
        **{f"lth.env.{k}": str(v) for k, v in info.get("environment", {}).items()},
    }
    if info.get("git_commit"):
        tags["mlflow.source.git.commit"] = info["git_commit"]
    return tags


def log_data(tracker: Tracker, run_id: str, hp: Hparams, summary: dict[str, Any], directory: Path, at: int) -> None:
    """Params (the trajectory's hyperparameters: a round is the same network whatever the controls and rounds
    around it, so a run logged before a control was switched on equals its replay after), the dataset it
    trained on, summary metrics and the learning curve (step = iteration), timestamped with the end of
    training."""
    from mlflow.entities import Metric, Param

    client = tracker.client
    params = [Param(k, param_text(v)) for k, v in trajectory_params(hp).items()]
    items = [
        Metric(k, float(v), at, 0)
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))
    ]
    for row in read_curve(directory / "curve.csv"):
        items += [
            Metric(f"curve_{k}", v, at, int(row["iteration"]))
            for k, v in row.items()
            if k != "iteration" and not math.isnan(v)
        ]
    while params or items:  # MLflow's batch limits: 100 params, 1000 values in all (each call is a commit)
        batch_params, params = params[:100], params[100:]
        cut = 1000 - len(batch_params)
        batch_metrics, items = items[:cut], items[cut:]
        retry(lambda p=batch_params, m=batch_metrics: client.log_batch(run_id, metrics=m, params=p))
    retry(lambda: client.log_inputs(run_id, datasets=[dataset_input(hp)]))


def dataset_input(hp: Hparams) -> Any:
    """The prepared data as an MLflow dataset: its path in the project and a digest of its identity (what the
    split depends on; the raw files are checked against their checksums when read)."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = prepared_path(Path(DATA_DIR), hp.dataset).as_posix()
    source = get_dataset_source_from_json(json.dumps({"uri": path}), "local")
    digest = hashlib.md5(identity(hp.dataset).encode()).hexdigest()
    dataset = MetaDataset(source, name=hp.dataset.name, digest=digest)
    return DatasetInput(Dataset(**dataset.to_dict()), tags=[InputTag("mlflow.data.context", "training")])


def log_finished(hp: Hparams, directories: list[Path], uri: str | None = None) -> None:
    """What a train stage logs after writing its outputs. MLflow failing never fails the stage: the outputs
    are the record, and `lth sync-mlflow` replays what is missing."""
    try:
        tracker = Tracker(uri)
    except Exception as e:  # MLflow's errors (server down, store locked) have many types
        warn(
            f"MLflow is unavailable ({e}); results are in {', '.join(map(str, directories))}. "
            "Replay the logging later with `lth sync-mlflow`."
        )
        return
    for directory in directories:
        try:
            log_trial(tracker, hp, directory)
        except Exception as e:  # report any failure, never fail the stage
            warn(
                f"MLflow logging of {directory} failed ({type(e).__name__}: {e}); the results are safe there. "
                "Replay with `lth sync-mlflow`."
            )


# Of results/, as the evaluate stage writes them: figures, report, summary metrics, claims and mask analysis.
SUMMARY_FILES = ("figures/*.png", "report.html", "metrics.json", "plots/claims.csv", "plots/mask_*.csv")


def log_results(tracker: Tracker, hp: Hparams, results: Path) -> int:
    """Log the evaluate stage's figures, report and metrics under `results/` of every trajectory parent of
    `hp` (logging again replaces them). Returns how many parents got them."""
    files = sorted(f for pattern in SUMMARY_FILES for f in Path(results).glob(pattern))
    log_mask_points(tracker, hp, results)  # replayed with the files that hold them
    parents = tracker.find_trajectories(hp.hash)
    for run_id in (run.info.run_id for run in parents):
        for f in files:
            folder = (Path("results") / f.parent.relative_to(results)).as_posix()
            retry(lambda run_id=run_id, f=f, folder=folder: tracker.client.log_artifact(run_id, str(f), folder))
    return len(parents)


def log_summary(hp: Hparams, results_dir: Path, uri: str | None = None) -> None:
    """What the evaluate stage logs after writing its results. MLflow failing never fails the stage, and
    `lth sync-mlflow` logs the summary with the runs it replays."""
    try:
        logged = log_results(Tracker(uri), hp, Path(results_dir))
    except Exception as e:  # MLflow's errors (server down, store locked) have many types
        warn(f"MLflow logging of {results_dir} failed ({type(e).__name__}: {e}); replay with `lth sync-mlflow`.")
        return
    if not logged:
        warn(f"MLflow has no runs of {hp.short_name}, so {results_dir} was not logged: `lth sync-mlflow` logs both.")


# ------------------------------------------------------------------------------------ the analysis stages

INSTABILITY_SOURCE = "stages/instability.py"
INSTABILITY_METRICS = ("error_barrier", "error_a", "error_b", "max_error", "max_error_alpha", "percent_remaining")


def _log_batches(tracker: Tracker, run_id: str, params: list[Any], metrics: list[Any]) -> None:
    """Within MLflow's batch limits: 100 params, 1000 values in all per call."""
    while params or metrics:
        batch_params, params = params[:100], params[100:]
        batch_metrics, metrics = metrics[: 1000 - len(batch_params)], metrics[1000 - len(batch_params) :]
        retry(lambda p=batch_params, m=batch_metrics: tracker.client.log_batch(run_id, metrics=m, params=p))


def _instability_runs(tracker: Tracker, hp: Hparams, experiment: str, round_index: int, trial: int) -> list[Any]:
    query = (
        f"tags.`lth.analysis` = 'instability' and tags.`{TAG_HASH}` = '{hp.hash}' "
        f"and tags.`lth.round` = '{round_index}' and tags.`lth.trial` = '{trial}'"
    )
    return retry(lambda: tracker.client.search_runs([experiment], query))


def _instability_tags(hp: Hparams, round_index: int, trial: int, info: dict[str, Any]) -> dict[str, str]:
    """An instability run's tags: what it analyses, where it comes from and how it ran (no round hash: it is no
    trained network of the experiment, which `lth sync-mlflow` and `lth compare` count)."""
    return {
        "lth.analysis": "instability",
        **provenance_tags(hp, round_index, trial, info, "instability", INSTABILITY_SOURCE),
    }


def log_instability(tracker: Tracker, hp: Hparams, directory: Path) -> str:
    """The instability analysis of one ticket round and trial (runs/instability/round_<r>/trial_<t>/) as a child
    run of the ticket's trajectory parent, `instability-round<rr>-trial<t>`: the error barrier and the ends'
    errors as metrics, the interpolation curve as metric steps (step = point: `interpolation_test_error`,
    `interpolation_test_loss`, `interpolation_alpha`), the curve's CSV as artifact. Logging again replaces the
    earlier run. Returns the run id."""
    from mlflow.entities import Metric, Param

    from lth.lottery.instability import CURVE_FILE, read_curve, read_summary

    s, info = read_summary(directory), read_run_info(directory)
    round_index, trial = s["round"], s["trial"]
    start, end = info.get("start_ms"), info.get("end_ms") or now_ms()
    client = tracker.client
    with tracker.lock():
        experiment, parent = parent_run(tracker, hp, "ticket", trial, start, directory.parents[2])
        for old in _instability_runs(tracker, hp, experiment, round_index, trial):
            retry(lambda old=old: client.delete_run(old.info.run_id))
        tags = {**_instability_tags(hp, round_index, trial, info), TAG_PARENT: parent}
        run_id = retry(lambda: client.create_run(experiment, start, tags, tags["mlflow.runName"])).info.run_id
    summary = {**{k: s[k] for k in INSTABILITY_METRICS}, **{f"copy_b_{k}": v for k, v in s["copy_b"].items()}}
    summary |= {f"seconds_{k}": v for k, v in info.get("seconds", {}).items()}
    metrics = [Metric(k, float(v), end, 0) for k, v in summary.items() if not math.isnan(float(v))]
    for row in read_curve(directory):
        point = int(row["point"])
        metrics += [Metric(f"interpolation_{k}", row[k], end, point) for k in ("test_error", "test_loss", "alpha")]
    params = [Param(k, param_text(v)) for k, v in trajectory_params(hp).items()] + [Param("seed_b", str(s["seed_b"]))]
    _log_batches(tracker, run_id, params, metrics)
    client.log_artifact(run_id, str(directory / CURVE_FILE))
    retry(lambda: client.set_terminated(run_id, "FINISHED", end_time=end))
    return run_id


def log_instability_finished(hp: Hparams, directories: list[Path], uri: str | None = None) -> None:
    """What the instability stage logs after writing its outputs; MLflow failing never fails the stage."""
    try:
        tracker = Tracker(uri)
        for directory in directories:
            log_instability(tracker, hp, directory)
    except Exception as e:  # MLflow's errors (server down, store locked) have many types
        warn(
            f"MLflow logging of the instability analysis failed ({type(e).__name__}: {e}); the results are safe in "
            f"{', '.join(map(str, directories))}."
        )


def log_missing_instability(tracker: Tracker, hp: Hparams, runs: Path) -> list[Path]:
    """`lth sync-mlflow`: every instability analysis of `hp` under runs/instability/ without a finished run in
    MLflow, logged as its stage logs it; returns their directories."""
    from lth.lottery.instability import INSTABILITY, SUMMARY_FILE, read_summary

    found = [f.parent for f in sorted((Path(runs) / INSTABILITY).glob(f"round_*/trial_*/{SUMMARY_FILE}"))]
    mine = [(d, s) for d in found if (s := read_summary(d)).get("hash") == hp.hash]
    experiment = tracker.experiment_id(hp) if mine else ""
    missing = [
        d
        for d, s in mine
        if not any(
            r.info.status == "FINISHED" for r in _instability_runs(tracker, hp, experiment, s["round"], s["trial"])
        )
    ]
    for directory in missing:
        log_instability(tracker, hp, directory)
    return missing


MASK_POINTS = "plots/mask_trials.csv"  # of results/: the mask analysis' points (lth.reporting.masks)


def log_mask_analysis(hp: Hparams, results: Path, files: list[Path], uri: str | None = None) -> int:
    """What the masks stage logs: its points (`log_mask_points`) and `files` (under results/) as artifacts of the
    ticket's trajectory parents. Returns how many parents got them; MLflow failing never fails the stage."""
    try:
        tracker = Tracker(uri)
        parents = log_mask_points(tracker, hp, results)
        for run_id, f in ((run_id, f) for run_id in parents for f in files):
            folder = (Path("results") / f.parent.relative_to(results)).as_posix()
            retry(lambda run_id=run_id, f=f, folder=folder: tracker.client.log_artifact(run_id, str(f), folder))
    except Exception as e:  # MLflow's errors (server down, store locked) have many types
        warn(
            f"MLflow logging of the mask analysis failed ({type(e).__name__}: {e}); `lth sync-mlflow` logs "
            "results/ with the runs it replays."
        )
        return 0
    return len(parents)


def log_mask_points(tracker: Tracker, hp: Hparams, results: Path) -> list[str]:
    """The mask analysis on each ticket trajectory parent, from results/plots/mask_trials.csv: its trial's points,
    step = round, timestamped with the end of that round's training (runs/ beside results/), so that logging
    live and replaying give the same points; a point already there is not logged again. Returns the parents."""
    results = Path(results)
    path = results / MASK_POINTS
    if not path.exists():
        return []
    with open(path) as f:
        rows = [(int(r["trial"]), int(r["round"]), r["metric"], float(r["value"])) for r in csv.DictReader(f)]
    done = []
    for parent in tracker.find_trajectories(hp.hash):
        tags = parent.data.tags
        trial = int(tags.get("lth.trial", -1))
        mine = [(k, name, v) for t, k, name, v in rows if t == trial and tags.get("lth.kind") == "ticket"]
        if mine:
            _log_trajectory_points(tracker, parent.info.run_id, mine, results.parent / RUNS_DIR, trial)
            done.append(parent.info.run_id)
    return done


def _log_trajectory_points(
    tracker: Tracker, run_id: str, points: list[tuple[int, str, float]], runs: Path, trial: int
) -> None:
    """(round, metric, value) points on the parent of the ticket's trajectory of `trial`, each timestamped with
    the end of its round's training (run.json under `runs`), except those it has already."""
    from mlflow.entities import Metric

    client = tracker.client
    history = [
        m for name in {n for _, n, _ in points} for m in retry(lambda n=name: client.get_metric_history(run_id, n))
    ]
    seen = {(m.key, m.step, m.value) for m in history}
    new = [
        Metric(name, value, read_run_info(trial_dir(runs, "ticket", k, trial)).get("end_ms", 0), k)
        for k, name, value in points
        if (name, k, value) not in seen
    ]
    _log_batches(tracker, run_id, [], new)
