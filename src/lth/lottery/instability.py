"""Instability analysis: linear mode connectivity of a ticket round (Frankle et al. 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis").

Copy A of ticket round r, trial t is the round's trained network (its final weights). Copy B starts from the
rewind weights (iteration k = pruning.rewind_iteration of the dense network's training; the initialization
for k = 0) with the round's mask, as `branches.prepare_network` builds the ticket, and trains from iteration
k with another data order: its seed is the trial's seed plus DATA_ORDER_SEED_OFFSET, and a training seed
drives only data order, augmentation and dropout (`TrainJob.seed`). A pruned round's copy A started there
too, and the dense round 0 passed through those weights at iteration k: every round is the paper's
instability at k.

The test error is evaluated at `instability.points` evenly spaced alphas along (1 - alpha) * A + alpha * B
(every weight and floating-point buffer interpolated; pruned weights stay zero, as both copies share the
mask). The instability is the paper's error barrier: the highest test error along the path minus the mean
test error of its two ends. About 0 means stable: A and B are linearly mode connected.

    runs/instability/round_<rr>/trial_<t>/
        interpolation.csv   one row per point: point, alpha, test_error, test_loss
        instability.json    the barrier, the ends' errors, copy B's training metrics, percent remaining, hash
        run.json            how it ran (wall-clock start and end, wall time by phase, environment; never compared)
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from lth.core import pruning
from lth.core.checkpoint import StopRequest
from lth.core.data import Data, Split, load_prepared, prepared_path
from lth.core.environment import make_deterministic, numeric_environment
from lth.core.evaluation import ProgressFn, evaluate
from lth.core.hparams import Hparams
from lth.core.runtime import RuntimeSettings
from lth.core.training import TrainJob, TrainResult, train
from lth.lottery.branches import check_input, init_model, prepare_network, trial_seed
from lth.lottery.layout import load_weights, read_metrics, trial_dir
from lth.lottery.progress import RoundProgress
from lth.lottery.trial import code_checkpointer, git_commit, now_ms

INSTABILITY = "instability"  # runs/instability/...: the analysis' outputs, beside the trained kinds
# Copy B's training seed: another data order than every ticket's and control's (branches: 1M and 2M offsets).
DATA_ORDER_SEED_OFFSET = 3_000_000
CURVE_FILE, SUMMARY_FILE = "interpolation.csv", "instability.json"
CURVE_COLUMNS = ("point", "alpha", "test_error", "test_loss")
SPLIT = "test"  # the paper's: the barrier of the test error


def alphas(points: int) -> list[float]:
    """`points` evenly spaced interpolation coefficients from 0 (copy A) to 1 (copy B), ends included."""
    return [i / (points - 1) for i in range(points)]


def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * a + alpha * b for floating-point tensors (torch.lerp: exactly a at 0 and b at 1); other
    tensors (a batch-norm counter) are a's."""
    return {k: torch.lerp(v, b[k], alpha) if v.is_floating_point() else v.clone() for k, v in a.items()}


def error_barrier(errors: list[float]) -> float:
    """The highest error along the path minus the mean error of its two ends (Frankle et al. 2020)."""
    return max(errors) - (errors[0] + errors[-1]) / 2


def interpolation_curve(
    model: torch.nn.Module, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], split: Split, points: int
) -> list[dict[str, float]]:
    """Error and loss on `split` of the network at each of `points` alphas between the states `a` and `b`."""
    curve = []
    for i, alpha in enumerate(alphas(points)):
        model.load_state_dict(interpolate(a, b, alpha))
        loss, accuracy = evaluate(model, split)
        curve.append({"point": i, "alpha": alpha, "test_error": 1.0 - accuracy, "test_loss": loss})
    return curve


def copy_b_seed(hp: Hparams, trial: int) -> int:
    return trial_seed(hp, trial) + DATA_ORDER_SEED_OFFSET


def label(hp: Hparams, round_index: int, trial: int) -> str:
    return f"instability round {round_index}" + (f" trial {trial}" if hp.trials > 1 else "")


def train_copy_b(
    hp: Hparams,
    network: tuple[torch.nn.Module, pruning.Mask, int],
    round_index: int,
    trial: int,
    data: Data,
    settings: RuntimeSettings,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train copy B, `network` = (model at the round's starting point, mask, starting iteration), with another
    data order; it resumes from its checkpoint, as a round does."""
    model, mask, start = network
    model.to(settings.device)
    seed = copy_b_seed(hp, trial)
    job = TrainJob(
        hp.training, seed, mask=mask, start_iteration=start, sparse=settings.sparse, label=label(hp, round_index, trial)
    )
    checkpointer = code_checkpointer(settings, hp.round_hash(round_index, trial, INSTABILITY), f"-seed{seed}")
    result = train(model, data, job, checkpointer, progress, stop)
    if checkpointer is not None:
        checkpointer.remove()
    return result


def starting_point(hp: Hparams, runs: Path, round_index: int, trial: int) -> tuple[torch.nn.Module, pruning.Mask, int]:
    """(model, mask, iteration) copy B starts from: the ticket's (`prepare_network`); for the dense round 0, the
    rewind weights of iteration k as well (prepare_network gives the initialization, where round 0 started)."""
    model, mask, start = prepare_network(hp, runs, round_index, "ticket", trial)
    if round_index == 0 and hp.pruning.rewind_iteration > 0:
        check_input(hp, trial_dir(runs, "ticket", 0, trial))
        load_weights(model, trial_dir(runs, "ticket", 0, trial) / "rewind.pt")
        start = hp.pruning.rewind_iteration
    return model, mask, start


def copy_a(hp: Hparams, runs: Path, round_index: int, trial: int, mask: pruning.Mask) -> dict[str, Any]:
    """The ticket round's metrics, checked: of this experiment, and trained with the mask copy B gets."""
    directory = trial_dir(runs, "ticket", round_index, trial)
    check_input(hp, directory)
    metrics = read_metrics(directory)
    if metrics.get("mask_md5") != pruning.mask_hash(mask):
        raise ValueError(
            f"{directory}: its mask is not the one its inputs give (mask_md5 differs); the round is stale: "
            "run `dvc repro` so that every round is of one experiment."
        )
    return metrics


def analyse_trial(
    hp: Hparams,
    runs: Path,
    round_index: int,
    trial: int,
    data: Data,
    settings: RuntimeSettings,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
) -> Path:
    """Train copy B of ticket round `round_index`, trial `trial`, interpolate it with copy A on the test set and
    write the outputs under runs/instability/; returns their directory."""
    started = now_ms()
    network = starting_point(hp, runs, round_index, trial)
    a_metrics = copy_a(hp, runs, round_index, trial, network[1])  # checked before copy B trains
    result = train_copy_b(hp, network, round_index, trial, data, settings, progress, stop)
    t0 = time.perf_counter()
    model = init_model(hp, trial_seed(hp, trial))
    load_weights(model, trial_dir(runs, "ticket", round_index, trial) / "final.pt")
    model.to(settings.device)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curve = interpolation_curve(model, a, result.state, data.test, hp.instability.points)
    summary = {
        "round": round_index,
        "trial": trial,
        **summarize(curve),
        "points": hp.instability.points,
        "percent_remaining": a_metrics["percent_remaining"],
        "start_iteration": network[2],
        "seed_b": copy_b_seed(hp, trial),
        "copy_a": {k: a_metrics[k] for k in ("test_accuracy_final", "test_accuracy_at_early_stop")},
        "copy_b": result.metrics,
        "mask_md5": a_metrics["mask_md5"],
        "hash": hp.hash,
    }
    run_info = {
        "seconds": {**result.seconds, "interpolate": time.perf_counter() - t0},
        "environment": numeric_environment(settings.device, result.engine),
        "start_ms": started,
        "end_ms": now_ms(),
        **({"git_commit": commit} if (commit := git_commit()) else {}),
    }
    out = trial_dir(runs, INSTABILITY, round_index, trial)
    write_outputs(out, summary, curve, run_info)
    return out


def summarize(curve: list[dict[str, float]]) -> dict[str, Any]:
    """The barrier of an interpolation curve, the errors of its ends and where along it the error peaks."""
    errors = [row["test_error"] for row in curve]
    peak = max(curve, key=lambda row: row["test_error"])
    return {
        "split": SPLIT,
        "error_barrier": error_barrier(errors),
        "error_a": errors[0],
        "error_b": errors[-1],
        "max_error": peak["test_error"],
        "max_error_alpha": peak["alpha"],
    }


def write_outputs(out: Path, summary: dict[str, Any], curve: list[dict[str, float]], run_info: dict[str, Any]) -> None:
    """The curve (numbers as Python writes them: exact), the run, then the summary (present = complete)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CURVE_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(curve)
    (out / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_curve(directory: Path) -> list[dict[str, float]]:
    path = Path(directory) / CURVE_FILE
    try:
        with open(path) as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable interpolation curve ({e}); run `dvc repro` to restore it.") from e


def read_summary(directory: Path) -> dict[str, Any]:
    path = Path(directory) / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable instability summary ({e}); run `dvc repro` to restore it.") from e


def run_round(hp: Hparams, round_index: int, runs: Path, data_dir: Path, settings: RuntimeSettings) -> list[Path]:
    """Analyse every trial of ticket round `round_index`, one after the other; returns the output directories.
    Ctrl-C or SIGTERM saves copy B's checkpoint and raises `Stopped`; running again resumes it."""
    torch.set_num_threads(settings.threads_for(hp.model.name, 1))
    if settings.deterministic:
        make_deterministic()
    data = load_prepared(prepared_path(data_dir, hp.dataset), hp.dataset).to(settings.device)
    done = []
    with StopRequest() as stop:
        for trial in range(hp.trials):
            with RoundProgress(
                label(hp, round_index, trial),
                hp.training.iterations,
                quiet=settings.quiet,
                round_index=round_index,
                rounds=hp.pruning.rounds,
            ) as bar:
                done.append(analyse_trial(hp, runs, round_index, trial, data, settings, bar.update, stop))
            if stop.signum is not None and trial + 1 < hp.trials:  # the signal came after copy B trained
                stop.stop(f"instability round {round_index} interrupted after trial {trial}; run it again to resume")
    return done
