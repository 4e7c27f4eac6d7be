"""Reproducibility check (`lth verify`): re-run one recorded round and compare.

The round is re-trained from its recorded inputs (the earlier rounds' outputs and the prepared data in
the workspace) inside a temporary directory, with checkpoints and MLflow off, so nothing in the
workspace changes. Training is deterministic on a given device and PyTorch version, so the mask, the
final weights, the learning curve and every metric must match the recorded ones exactly.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lth.core import pruning
from lth.core.data import load_prepared, prepared_path
from lth.core.environment import differences
from lth.core.hparams import Hparams
from lth.core.registry import build_model
from lth.core.runtime import RuntimeSettings
from lth.lottery.layout import OUTPUT_FILES, load_mask, load_tensors, read_metrics, read_run_info, trial_dir
from lth.lottery.trial import Trial, run_trial


class VerifyError(RuntimeError):
    """The recorded outputs cannot be checked (missing, or made with other hyperparameters)."""


def weights_md5(path: Path) -> str:
    """MD5 of a weights file's tensors (names, dtypes, shapes, values): independent of pickle layout."""
    h = hashlib.md5()
    for name, t in sorted(load_tensors(path, "weights").items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _link_inputs(runs: Path, tmp_runs: Path, target: Path) -> None:
    """Every recorded trial except the target, linked (read-only use) into the temporary runs/."""
    for d in sorted(Path(runs).glob("*/round_*/trial_*")):
        rel = d.relative_to(runs)
        if d.resolve() == target.resolve():
            continue
        (tmp_runs / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_runs / rel).symlink_to(d.resolve(), target_is_directory=True)


def _md5(path: Path) -> str | None:
    if not path.exists():
        return None
    return weights_md5(path) if path.suffix == ".pt" else hashlib.md5(path.read_bytes()).hexdigest()


def _checks(hp: Hparams, recorded: Path, fresh: Path) -> list[tuple[str, object, object]]:
    """(what, recorded, re-run) for the mask, the weights, the curve and every metric."""
    old, new = read_metrics(recorded), read_metrics(fresh)
    checks = [
        ("mask md5 (metrics.json)", old.get("mask_md5"), new["mask_md5"]),
        ("mask md5 (mask.pt)", pruning.mask_hash(load_mask(build_model(hp), recorded / "mask.pt")), new["mask_md5"]),
        ("final weights md5", _md5(recorded / "final.pt"), _md5(fresh / "final.pt")),
        ("curve.csv md5", _md5(recorded / "curve.csv"), _md5(fresh / "curve.csv")),
    ]
    if (fresh / "rewind.pt").exists():
        checks.append(("rewind weights md5", _md5(recorded / "rewind.pt"), _md5(fresh / "rewind.pt")))
    return checks + [(f"metrics.json {k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))]


def verify(
    hp: Hparams,
    round_index: int,
    kind: str,
    trial: int,
    runs: Path,
    data_dir: Path,
    settings: RuntimeSettings,
    echo: Callable[[str], None] = print,
) -> bool:
    """Re-run one trained network from its recorded inputs; True when everything matches exactly (or, in
    another numeric environment, when its accuracy lies within the recorded trials' range)."""
    recorded = trial_dir(runs, kind, round_index, trial)
    missing = [n for n in OUTPUT_FILES if not (recorded / n).exists()]
    if missing:
        raise VerifyError(f"{recorded}: no recorded {', '.join(missing)}; run `dvc repro` (or `lth run`) first.")
    if read_metrics(recorded).get("hash") != hp.hash:
        raise VerifyError(
            f"{recorded} was made with other hyperparameters (hash {read_metrics(recorded).get('hash')}, "
            f"params.yaml gives {hp.hash}); `dvc repro` or `dvc exp apply` the matching ones first."
        )
    label = f"{kind} round {round_index} trial {trial}"
    echo(f"lth verify: re-running {label} from its recorded inputs in a temporary directory")
    data = load_prepared(prepared_path(data_dir, hp.dataset), hp.dataset).to(settings.device)
    # The thread count the round's stage used (its trials shared the cores): threads change the last bits.
    torch.set_num_threads(settings.threads_for(hp.model.name, settings.workers_for(hp.trials)))
    with tempfile.TemporaryDirectory(prefix="lth-verify-") as tmp:
        _link_inputs(runs, Path(tmp) / "runs", recorded)
        run_trial(Trial(hp, kind, round_index, trial, Path(tmp) / "runs"), data, settings.without_checkpoints())
        fresh = trial_dir(Path(tmp) / "runs", kind, round_index, trial)
        checks, new_metrics = _checks(hp, recorded, fresh), read_metrics(fresh)
        env_changes = differences(
            read_run_info(recorded).get("environment", {}), read_run_info(fresh).get("environment", {})
        )
    bad = [(what, old, new) for what, old, new in checks if old != new]
    for what, old, new in bad:
        echo(f"  MISMATCH {what}: recorded {old!r}, re-run {new!r}")
    if env_changes:
        echo(
            f"lth verify: the numeric environment differs from the recorded one ({'; '.join(env_changes)}): "
            "bit identity is not expected, agreement within the spread of trials is."
        )
        if bad:
            return _within_spread(new_metrics, recorded.parent, label, echo)
    if bad:
        echo(
            f"lth verify: FAIL: {label} does not reproduce ({len(bad)} of {len(checks)} checks differ). "
            f"Its recorded outputs in {recorded} were changed, or made with other code."
        )
        return False
    echo(
        f"lth verify: PASS: {label} reproduces exactly ({len(checks)} checks: mask {new_metrics['mask_md5']}, "
        "final weights, curve, every metric)"
    )
    return True


def _within_spread(fresh: dict, round_dir: Path, label: str, echo: Callable[[str], None]) -> bool:
    """In another numeric environment: does the re-run's accuracy at early stop fall within the recorded
    trials' range of this round?"""
    key = "test_accuracy_at_early_stop"
    recorded = [read_metrics(d)[key] for d in sorted(round_dir.glob("trial_*")) if (d / "metrics.json").exists()]
    if len(recorded) < 2:
        echo(
            f"lth verify: FAIL: {label} differs and one recorded trial gives no spread to compare with; "
            "record more trials (`trials: 3`) or re-run in the recorded environment."
        )
        return False
    low, high = min(recorded), max(recorded)
    ok = low <= fresh[key] <= high
    echo(
        f"lth verify: {'PASS' if ok else 'FAIL'}: {label}: {key} {fresh[key]:.4f} is "
        f"{'within' if ok else 'outside'} the recorded trials' range [{low:.4f}, {high:.4f}] ({len(recorded)} trials)"
    )
    return ok
