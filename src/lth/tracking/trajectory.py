"""The parent run of an IMP trajectory (experiment x kind x trial): every round's run is nested under it.

The parent is found by its tags or created, under the store's lock, since two stages of one trajectory
can log at once (`lth run -j 2`: reinit rounds k and k+1). It spans its rounds (start: the earliest
round's start, end: the latest round's end), so a round that started earlier than the parent, logged
later, gets a new parent that adopts the rounds of the old one (MLflow cannot move a run's start). Its
metrics are the IMP curve: each round's summary at step = round. The ticket's parent also holds the
rewind weights, which with a round's mask rebuild its ticket.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lth.core.hparams import Hparams
from lth.lottery.layout import trial_dir
from lth.tracking.store import (
    TAG_HASH,
    TAG_NOTE,
    TAG_PARENT,
    TAG_TRAJECTORY,
    Tracker,
    param_text,
    retry,
    trajectory_params,
)

# A round's summary metrics that the parent charts against the round (the IMP curve).
CURVE_METRICS = ("test_accuracy_at_early_stop", "test_accuracy_final", "early_stop_iteration", "percent_remaining")


def parent_run(tracker: Tracker, hp: Hparams, kind: str, trial: int, start: int | None, runs: Path) -> tuple[str, str]:
    """(experiment id, run id) of the trajectory's parent run, created when missing or when a round started
    before it. Call under `tracker.lock()`."""
    experiment = tracker.experiment_id(hp)
    found = _parents(tracker, hp, experiment, kind, trial)
    if found and (start is None or found[0].info.start_time <= start):
        return experiment, found[0].info.run_id
    new = _create(tracker, hp, experiment, kind, trial, start)
    rewind = trial_dir(runs, "ticket", 0, trial) / "rewind.pt"
    if kind == "ticket" and rewind.exists():
        tracker.client.log_artifact(new, str(rewind))
    for old in found:
        _adopt(tracker, experiment, old, new)
    return experiment, new


def _parents(tracker: Tracker, hp: Hparams, experiment: str, kind: str, trial: int) -> list[Any]:
    """The trajectory's parent runs, earliest first: one, but for a moment while it is replaced."""
    query = (
        f"tags.`{TAG_TRAJECTORY}` = 'true' and tags.`{TAG_HASH}` = '{hp.hash}' "
        f"and tags.`lth.kind` = '{kind}' and tags.`lth.trial` = '{trial}'"
    )
    return retry(lambda: tracker.client.search_runs([experiment], query, order_by=["attributes.start_time ASC"]))


def _create(tracker: Tracker, hp: Hparams, experiment: str, kind: str, trial: int, start: int | None) -> str:
    from mlflow.entities import Param

    client = tracker.client
    name = f"{kind}-trial{trial}"
    tags = {
        TAG_HASH: hp.hash,
        TAG_TRAJECTORY: "true",
        "lth.kind": kind,
        "lth.trial": str(trial),
        "lth.model": hp.model.name,
        "mlflow.runName": name,
        TAG_NOTE: f"IMP trajectory of the {kind}, trial {trial}: one child run per pruning round; the charts "
        "are the IMP curve (step = round)." + (" rewind.pt: the weights every round rewinds to." * (kind == "ticket")),
    }
    run_id = retry(lambda: client.create_run(experiment, start_time=start, tags=tags, run_name=name)).info.run_id
    params = [Param(k, param_text(v)) for k, v in trajectory_params(hp).items()]
    for i in range(0, len(params), 100):  # MLflow's batch limit
        retry(lambda i=i: client.log_batch(run_id, params=params[i : i + 100]))
    return run_id


def _adopt(tracker: Tracker, experiment: str, old: Any, new: str) -> None:
    """Move the rounds and the curve of the parent `old` to `new`, then delete `old`."""
    client = tracker.client
    old_id = old.info.run_id
    for child in retry(lambda: client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{old_id}'")):
        retry(lambda child=child: client.set_tag(child.info.run_id, TAG_PARENT, new))
    history = [m for key in old.data.metrics for m in retry(lambda key=key: client.get_metric_history(old_id, key))]
    for i in range(0, len(history), 1000):
        retry(lambda i=i: client.log_batch(new, metrics=history[i : i + 1000]))
    if old.info.end_time:
        retry(lambda: client.set_terminated(new, "FINISHED", end_time=old.info.end_time))
    retry(lambda: client.delete_run(old_id))


def finish_round(tracker: Tracker, hp: Hparams, experiment: str, run_id: str, m: dict[str, Any], end: int) -> None:
    """The round's run (metrics.json: `m`) is complete: chart its summary on its parent at step = round,
    stretch the parent to the round's end, and mark both finished. Under the lock, the parent is found anew:
    another stage may have replaced it meanwhile (and moved this run to the new one)."""
    from mlflow.entities import Metric

    client = tracker.client
    with tracker.lock():
        parent = _parents(tracker, hp, experiment, m["kind"], m["trial"])[0].info
        done = charted(tracker, parent.run_id, m["round"])
        values = {k: float(m[k]) for k in CURVE_METRICS if k in m and k not in done}
        points = [Metric(k, v, end, m["round"]) for k, v in values.items() if not math.isnan(v)]
        retry(lambda: client.log_batch(parent.run_id, metrics=points))
        # The round counts as logged once finished (`lth sync-mlflow` skips it): after its point on the curve.
        retry(lambda: client.set_terminated(run_id, "FINISHED", end_time=end))
        if parent.status != "FINISHED" or (parent.end_time or 0) < end:
            retry(lambda: client.set_terminated(parent.run_id, "FINISHED", end_time=max(end, parent.end_time or 0)))


def charted(tracker: Tracker, parent: str, round_index: int) -> set[str]:
    """The curve metrics that the parent already has a point of at this round (a run of the round whose logging
    broke off after charting it, now logged again): charted once."""
    history = {k: retry(lambda k=k: tracker.client.get_metric_history(parent, k)) for k in CURVE_METRICS}
    return {k for k, points in history.items() if any(p.step == round_index for p in points)}
