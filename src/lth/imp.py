"""Iterative magnitude pruning, one round at a time, as DVC stages run it.

Output layout (every file is a DVC output; nothing here depends on MLflow):

    runs/<kind>/round_<kk>/trial_<t>/
        mask.pt       bool masks, one per prunable weight (True = kept)
        final.pt      weights at the end of training
        rewind.pt     weights at the rewind iteration (ticket round 0 only: every round rewinds to them)
        metrics.json  summary metrics of the round (accuracy at early stop and at the end, ...)
        curve.csv     learning curve: one row per evaluation

`kind` is `ticket` (IMP), `reinit` (the ticket's mask, fresh weights) or `random_pruning` (a random
mask with the ticket's per-layer sparsity, original weights).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from lth import pruning
from lth.data import Data, load_prepared, prepared_path
from lth.hparams import Hparams
from lth.models.base import PrunableModel
from lth.registry import build_model
from lth.training import CURVE_COLUMNS, StopRequest, TrainResult, train

KINDS = ("ticket", "reinit", "random_pruning")
# Seeds of the controls' randomness are offset so that they never coincide with a ticket's.
REINIT_SEED_OFFSET = 1_000_000
RANDOM_MASK_SEED_OFFSET = 2_000_000


def round_dir(runs: Path, kind: str, round_index: int) -> Path:
    return Path(runs) / kind / f"round_{round_index:02d}"


def trial_dir(runs: Path, kind: str, round_index: int, trial: int) -> Path:
    return round_dir(runs, kind, round_index) / f"trial_{trial}"


def code_fingerprint() -> str:
    """MD5 of the library code that training runs (the files a round's DVC stage depends on): a checkpoint
    saved by other code is never resumed, so a fix to the loop cannot mix with results of the old one."""
    from lth.pipeline import TRAIN_CODE

    package = Path(__file__).parent
    paths = [package / name.removeprefix("src/lth/") for name in TRAIN_CODE]
    files = sorted(f for p in paths for f in ([p] if p.suffix == ".py" else p.rglob("*.py")))
    digest = hashlib.md5()
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def checkpoint_key(hp: Hparams, round_index: int, trial: int, kind: str) -> str:
    """What a checkpoint must have been saved under to be resumed: the round's hash and the code's."""
    return f"{hp.round_hash(round_index, trial, kind)}-code-{code_fingerprint()[:12]}"


def checkpoint_path(hp: Hparams, round_index: int, trial: int, kind: str) -> Path:
    """Checkpoints live outside DVC outputs (DVC deletes outputs before a stage runs)."""
    from lth.tracking import repo_root

    base = Path(os.environ.get("LTH_CHECKPOINT_DIR", repo_root() / ".lth" / "checkpoints"))
    return base / f"{hp.round_hash(round_index, trial, kind)}.pt"


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Safe load (tensors only) with an error that names the file and the fix."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that makes it (`dvc repro`).")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{path}: {what} is corrupt or not a tensor file ({e}); delete it and `dvc repro`.") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: {what} is not a dict of tensors; delete it and run `dvc repro`.")
    return obj


def load_weights(model: PrunableModel, path: Path) -> None:
    state = load_tensors(path, "weights")
    expected = model.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if bad or set(state) - set(expected):
        raise ValueError(f"{path}: weights do not fit {type(model).__name__} (mismatched: {bad[:5]}); "
                         "they were made with other model params: re-run that stage.")
    model.load_state_dict(state)


def load_mask(model: PrunableModel, path: Path) -> pruning.Mask:
    mask = load_tensors(path, "mask")
    pruning.check_mask(mask, model, str(path))
    return mask


def init_model(hp: Hparams, seed: int) -> PrunableModel:
    model = build_model(hp)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def trial_seed(hp: Hparams, trial: int) -> int:
    return hp.training.seed + trial


def prepare_network(hp: Hparams, runs: Path, round_index: int, kind: str, trial: int
                    ) -> tuple[PrunableModel, pruning.Mask, int]:
    """The network a round starts from: (model with its starting weights, mask, start iteration)."""
    seed = trial_seed(hp, trial)
    model = init_model(hp, seed)
    kinds = model.layer_kinds()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    if round_index == 0:
        if kind != "ticket":
            raise ValueError("controls start at round 1 (round 0 is the dense network)")
        return model, pruning.dense_mask(kinds, shapes), 0
    rewind = trial_dir(runs, "ticket", 0, trial) / "rewind.pt"
    start = hp.pruning.rewind_iteration
    if kind == "ticket":
        if hp.pruning.schedule == "oneshot":
            source, steps = trial_dir(runs, "ticket", 0, trial), round_index
        else:
            source, steps = trial_dir(runs, "ticket", round_index - 1, trial), 1
        previous = init_model(hp, seed)
        load_weights(previous, source / "final.pt")
        mask = pruning.magnitude_prune(dict(previous.named_parameters()), load_mask(model, source / "mask.pt"),
                                       kinds, hp.pruning, steps=steps)
        load_weights(model, rewind)
    else:
        ticket_mask = load_mask(model, trial_dir(runs, "ticket", round_index, trial) / "mask.pt")
        if kind == "reinit":
            mask, start = ticket_mask, 0
            model = init_model(hp, seed + REINIT_SEED_OFFSET + 1000 * round_index)
        elif kind == "random_pruning":
            g = torch.Generator().manual_seed(seed + RANDOM_MASK_SEED_OFFSET + 1000 * round_index)
            mask = pruning.random_prune_like(ticket_mask, g)
            load_weights(model, rewind)
        else:
            raise ValueError(f"unknown kind '{kind}' (valid: {', '.join(KINDS)})")
    pruning.apply_mask(model, mask)
    return model, mask, start


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for row in curve:
            w.writerow([int(row["iteration"])] + ["" if math.isnan(row[c]) else f"{row[c]:.6g}"
                                                   for c in CURVE_COLUMNS[1:]])


def run_trial(hp: Hparams, data: Data, runs: Path, round_index: int, kind: str, trial: int,
              device: torch.device, progress=None, checkpoint_seconds: float | None = 60.0,  # noqa: ANN001
              stop: StopRequest | None = None, label: str = "training") -> tuple[dict, TrainResult, pruning.Mask]:
    """Train one trial and write its outputs under `runs`. `checkpoint_seconds=None` turns checkpoints
    off (no resuming either): `lth verify` re-runs a round that way."""
    model, mask, start = prepare_network(hp, runs, round_index, kind, trial)
    model.to(device)
    from lth import runtime

    ckpt = checkpoint_path(hp, round_index, trial, kind) if checkpoint_seconds is not None else None
    rewind_at = hp.pruning.rewind_iteration if (round_index == 0 and kind == "ticket") else None
    result = train(model, data, hp.training, seed=trial_seed(hp, trial), mask=mask, start_iteration=start,
                   rewind_iteration=rewind_at, checkpoint=ckpt, checkpoint_seconds=checkpoint_seconds or 0.0,
                   progress=progress, checkpoint_key=checkpoint_key(hp, round_index, trial, kind), label=label,
                   stop=stop, sparse=runtime.sparse_setting())
    kept, total = pruning.density(mask)
    metrics = {"round": round_index, "trial": trial, "kind": kind, **result.metrics,
               "percent_remaining": 100.0 * kept / total, "weights_remaining": kept, "weights_total": total,
               "mask_md5": pruning.mask_hash(mask), "hash": hp.hash}
    out = trial_dir(runs, kind, round_index, trial)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.cpu() for k, v in result.state.items()}
    torch.save(cpu, out / "final.pt")
    torch.save({k: v.cpu() for k, v in mask.items()}, out / "mask.pt")
    if result.rewind_state is not None:
        torch.save({k: v.cpu() for k, v in result.rewind_state.items()}, out / "rewind.pt")
    write_curve(out / "curve.csv", result.curve)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics, result, mask


def run_round(hp: Hparams, round_index: int, kind: str, runs: Path, data_dir: Path,
              device: torch.device | None = None, track: bool = True, quiet: bool = False,
              checkpoint_seconds: float | None = 60.0, trials: list[int] | None = None,
              workers: int | None = None) -> list[dict]:
    """Train every trial of one round (or only `trials`) and write its outputs; log each to MLflow when `track`.
    Ctrl-C or SIGTERM saves a checkpoint and exits; running the round again resumes it. With several trials,
    `workers` processes (default: runtime.workers, auto = min(trials, cores)) train them in parallel, each
    with `runtime.threads` threads; every trial's results are the same as when trained alone."""
    from lth import runtime

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trials = list(range(hp.trials)) if trials is None else trials
    workers = workers or runtime.workers(len(trials), device)
    if workers > 1:
        return _run_in_workers(hp, round_index, kind, runs, data_dir, device, track, quiet, checkpoint_seconds,
                               trials, workers)
    torch.set_num_threads(runtime.threads(hp.model.name, 1))
    data = load_prepared(prepared_path(data_dir, hp.dataset), hp.dataset).to(device)
    tracker = None
    if track:
        from lth.tracking import Tracker, warn

        try:
            tracker = Tracker()
        except Exception as e:
            warn(f"MLflow is unavailable ({e}); training goes on and results are written to {runs}. "
                 "Replay the logging later with `lth sync-mlflow`.")
    all_metrics = []
    with StopRequest() as stop:
        for i, trial in enumerate(trials):
            all_metrics.append(_run_and_log(hp, data, runs, round_index, kind, trial, device, tracker, quiet,
                                            checkpoint_seconds, stop))
            if stop.signum is not None and i + 1 < len(trials):  # the signal came after training ended
                stop.exit(f"{kind} round {round_index} interrupted after trial {trial}; run it again to resume")
    return all_metrics


def _run_in_workers(hp: Hparams, round_index: int, kind: str, runs: Path, data_dir: Path, device: torch.device,
                    track: bool, quiet: bool, checkpoint_seconds: float | None, trials: list[int],
                    workers: int) -> list[dict]:
    """Trials split round-robin over `workers` spawned processes, each a `run_round` of its share. Workers
    sit in their own process group, so a Ctrl-C reaches them once, forwarded from here: each saves its
    checkpoint and exits, and running the round again resumes every trial."""
    import multiprocessing

    from lth import runtime

    threads = runtime.threads(hp.model.name, workers)
    if track:  # create (migrate) a new sqlite store and the experiment once: concurrent migrations collide
        from lth.tracking import Tracker

        try:
            Tracker().experiment_id(hp)
        except Exception:  # noqa: BLE001 - each worker reports an unavailable store itself, and carries on
            pass
    ctx = multiprocessing.get_context("spawn")  # fork after OpenMP has started can hang the child
    procs = [ctx.Process(target=_worker, name=f"lth-trials-{w}",
                         args=(hp, round_index, kind, runs, data_dir, str(device), track, quiet, checkpoint_seconds,
                               trials[w::workers], threads))
             for w in range(workers)]
    with StopRequest() as stop:
        for proc in procs:
            proc.start()
        forwarded = False
        while any(proc.is_alive() for proc in procs):
            if stop.signum is not None and not forwarded:
                for proc in procs:
                    if proc.is_alive():
                        os.kill(proc.pid, stop.signum)
                forwarded = True
            for proc in procs:
                proc.join(timeout=0.1)
        if stop.signum is not None:
            stop.exit(f"{kind} round {round_index} interrupted; run it again to resume every trial")
    failed = [f"{proc.name} (exit code {proc.exitcode})" for proc in procs if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"{kind} round {round_index}: trial worker {', '.join(failed)} failed; its error is "
                           "printed above. Finished trials are kept: fix the cause and run the round again.")
    return [json.loads((trial_dir(runs, kind, round_index, t) / "metrics.json").read_text()) for t in trials]


def _worker(hp: Hparams, round_index: int, kind: str, runs: Path, data_dir: Path, device: str, track: bool,
            quiet: bool, checkpoint_seconds: float | None, trials: list[int], threads: int) -> None:
    os.setpgrp()  # terminal signals go to the parent, which forwards them once
    if sys.platform.startswith("linux"):  # if the parent dies, SIGTERM: checkpoint and exit, not an orphan
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    os.environ["CI"] = "1"  # progress as lines: several live bars on one terminal would overwrite each other
    os.environ["LTH_THREADS"] = str(threads)  # what run_round applies
    run_round(hp, round_index, kind, runs, data_dir, torch.device(device), track, quiet, checkpoint_seconds,
              trials, workers=1)


def _run_and_log(hp: Hparams, data: Data, runs: Path, round_index: int, kind: str, trial: int,
                 device: torch.device, tracker, quiet: bool, checkpoint_seconds: float | None,  # noqa: ANN001
                 stop: StopRequest) -> dict:
    """One trial: train (resuming from its checkpoint), write the DVC outputs, then log to MLflow."""
    from lth.progress import RoundProgress

    label = f"{kind} round {round_index}" + (f" trial {trial}" if hp.trials > 1 else "")
    t0 = time.perf_counter()
    with RoundProgress(label, hp.training.iterations, quiet=quiet, round_index=round_index,
                       rounds=hp.pruning.rounds) as bar:
        metrics, result, mask = run_trial(hp, data, runs, round_index, kind, trial, device, bar.update,
                                          checkpoint_seconds, stop, label)
    print(f"lth: {label}: {metrics['percent_remaining']:.2f}% remaining, test accuracy "
          f"{metrics['test_accuracy_at_early_stop']:.4f} at early stop (iteration "
          f"{metrics['early_stop_iteration']}), {metrics['test_accuracy_final']:.4f} at the end "
          f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    if tracker is not None:
        try:
            tracker.log_round(hp, round_index, kind, trial, metrics, result.curve, pruning.pack(mask),
                              trial_dir(runs, kind, round_index, trial) / "final.pt", result.seconds)
        except Exception as e:
            from lth.tracking import warn

            warn(f"MLflow logging of {label} failed ({type(e).__name__}: {e}); the results are safe in "
                 f"{trial_dir(runs, kind, round_index, trial)}. Replay with `lth sync-mlflow`.")
    checkpoint_path(hp, round_index, trial, kind).unlink(missing_ok=True)
    return metrics

