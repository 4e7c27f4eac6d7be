"""What params.yaml holds: a preset (one complete params file per experiment of the paper, in
presets/<name>.yaml), possibly with `-S key=value` overrides written into it; and how long it runs.

Selecting a preset copies it to params.yaml and re-renders dvc.yaml, so every experiment runs from the
same pipeline and differs only in its params. The first comment line of a preset is its description; its
time is `estimate_cpu_seconds`, never written in the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lth.core import config, hparams
from lth.pipeline import render as pipeline

# CPU seconds per training iteration (the preset's batch size, optimizer and augmentation, every weight
# kept) and per evaluated example: the fastest steps on one thread of the development machine (AMD EPYC
# without AVX-512, so the portable numerics' AVX2 cap changes nothing; 2 cores; PyTorch 2.14), which
# docs/performance.md's loop benchmarks confirm (LeNet-300-100 1.5 ms, Conv-2 0.17 s per iteration).
# `python benchmarks/bench_estimates.py` re-measures them; with the machine's cores busy with other work
# it gave 1.5x to 2.6x these (2026-11-26). A GPU is orders of magnitude faster.
CPU_SECONDS: dict[str, tuple[float, float]] = {
    "xor": (0.00027, 0.0000001),
    "lenet_300_100": (0.0016, 0.000004),
    "conv2": (0.19, 0.0014),
    "conv4": (0.31, 0.0027),
    "conv6": (0.40, 0.0032),
    "resnet20": (0.53, 0.0013),
    "vgg16": (1.4, 0.0052),
    "vgg19": (1.8, 0.0068),
}
TEST_SIZE = {"mnist": 10000, "fashion_mnist": 10000, "cifar10": 10000, "cifar100": 10000, "svhn": 26032, "xor": 1000}
# Seconds of one DVC stage beyond its training loop (python and `import torch`, DVC's checks and caching,
# MLflow's import and store, loading data): 6.0 to 7.6 s per training stage in docs/performance.md's two
# runs of the default experiment. Most of a short preset's time (xor, lenet_quick).
STAGE_SECONDS = 6.0


class PresetError(ValueError):
    """An unknown preset, or a switch that would lose local work; the message says what to do."""


def presets_dir() -> Path:
    """./presets when the project has one, else the presets shipped next to the package's source."""
    local = Path("presets")
    return local if local.is_dir() else Path(__file__).resolve().parents[3] / "presets"


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(presets_dir().glob("*.yaml"))}


def path_of(name: str) -> Path:
    found = available()
    if name not in found:
        valid = ", ".join(found) or f"none found in {presets_dir()}"
        raise PresetError(f"unknown preset '{name}' (valid: {valid}); `lth preset --list` describes them.")
    return found[name]


def description(path: Path) -> str:
    """The first comment line of a preset file."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def estimate_cpu_seconds(hp: hparams.Hparams) -> float:
    """The one estimate of how long an experiment runs, in CPU seconds on one core of the development
    machine: trained networks x (iterations x s/iteration + evaluated examples x s/example), plus the
    fixed cost of each stage. `lth run` on 2 cores runs a round's controls beside the next round, so
    with controls the wall time is shorter."""
    train_s, eval_s = CPU_SECONDS.get(hp.model.name, (1.0, 0.01))
    t = hp.training
    evaluated = (
        t.iterations // t.eval_every * hp.dataset.validation_size
        + t.iterations // t.test_every * TEST_SIZE.get(hp.dataset.name, 10000)
    )
    networks = hp.trials * (hp.pruning.rounds + 1 + len(pipeline.control_kinds(hp)) * hp.pruning.rounds)
    stages = hp.pruning.rounds + 1 + len(pipeline.control_kinds(hp)) * hp.pruning.rounds + 2
    return networks * (t.iterations * train_s + evaluated * eval_s) + stages * STAGE_SECONDS


def format_duration(seconds: float) -> str:
    """`45 s`, `95 s` (seconds up to two minutes), `2.5 min`, `1.3 h`, `4.0 d`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def estimate(path: Path) -> str:
    """A preset's estimated time, as `lth preset --list`, `lth preset NAME` and the README's table give it."""
    return format_duration(estimate_cpu_seconds(config.load(path)))


def write_overrides(params_path: Path, overrides: Sequence[str]) -> list[str]:
    """Write `key=value` overrides into a params file, as `dvc exp run -S` does: validated first, then a
    round trip through ruamel.yaml (DVC's YAML library), which keeps comments and layout. Returns
    "key: old -> new" for each value that changed."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    expected = config.load(params_path, overrides)  # every problem at once, before anything is written
    yaml = YAML()
    yaml.width = 4096  # never re-wrap a line
    doc = yaml.load(params_path.read_text())
    changes = []
    for key, value in map(config.parse_override, overrides):
        *parents, last = key.split(".")
        section = doc
        for name in parents:
            section = section.setdefault(name, {})
        if isinstance(value, list):
            value = CommentedSeq(value)
            value.fa.set_flow_style()  # [100, 200], as params files write lists
        old = section.get(last, "(unset)")
        if old != value:
            changes.append(f"{key}: {_plain(old)} -> {_plain(value)}")
        section[last] = value
    text = io.StringIO()
    yaml.dump(doc, text)
    _replace(params_path, text.getvalue(), expected)
    return changes


def _plain(value: Any) -> str:
    return str(list(value)) if isinstance(value, list) else str(value)


def _replace(path: Path, text: str, expected: hparams.Hparams) -> None:
    """Write `text` over `path` atomically, once it reads back as `expected`."""
    tmp = path.with_name(f".{path.name}.lth-tmp")
    tmp.write_text(text)
    try:
        if config.load(tmp) != expected:
            raise ValueError(f"{path}: the overrides could not be written as given; edit the file instead.")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _uncommitted(paths: list[Path]) -> list[str]:
    """Those of `paths` that git reports as changed or untracked (outside git: every existing one)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", *map(str, paths)], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [str(p) for p in paths if p.exists()]
    return [line[3:] for line in out.splitlines()]


def select(
    name: str, params_path: Path = Path("params.yaml"), dvc_yaml: Path = Path("dvc.yaml"), force: bool = False
) -> str:
    """Copy preset `name` to params.yaml and render dvc.yaml; returns what was done.

    Refuses (without `force`) when params.yaml holds uncommitted edits that are no preset, or when it is no
    preset and dvc.lock holds uncommitted results: neither may vanish silently. The replaced params.yaml
    is kept in .lth/params-backup/ unless it is a preset. Computed outputs stay in the DVC cache, its
    run-cache and MLflow, so the results of a preset come back without retraining when it is selected
    again and run."""
    source = path_of(name)
    hp = config.load(source)  # validate before touching anything
    text = source.read_text()
    if params_path.exists() and params_path.read_text() == text:
        pipeline.write(hp, dvc_yaml)
        return f"preset '{name}' is already selected; {dvc_yaml} is up to date."
    backup, is_preset, lock = None, False, dvc_yaml.with_name("dvc.lock")
    if params_path.exists():
        current = params_path.read_text()
        is_preset = any(current == p.read_text() for p in available().values())
        # A preset's results are recoverable from DVC's run-cache by selecting it again; other params
        # and their dvc.lock are the user's own work.
        dirty = [] if is_preset else _uncommitted([params_path, lock])
        if dirty and not force:
            raise PresetError(
                f"uncommitted changes in {', '.join(dirty)}: switching to preset '{name}' would replace them. "
                "Commit them first (`git add params.yaml dvc.yaml dvc.lock && git commit -m ...`, or "
                "`dvc exp save`), or pass --force (params.yaml is then saved in .lth/params-backup/)."
            )
        if not is_preset:
            digest = hashlib.md5(current.encode()).hexdigest()[:8]  # two switches in a second keep both
            backup = Path(".lth") / "params-backup" / f"params-{time.strftime('%Y%m%d-%H%M%S')}-{digest}.yaml"
            backup.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(params_path, backup)
    shutil.copy(source, params_path)
    pipeline.write(hp, dvc_yaml)
    saved = f" (previous params saved as {backup})" if backup else ""
    if is_preset and _uncommitted([lock]):
        saved += (
            " (results computed so far stay in DVC's run-cache: selecting their preset again and "
            "`lth run` restore them without retraining)"
        )
    return (
        f"params.yaml is now preset '{name}'{saved} and {dvc_yaml} is rendered: {description(source)}\n"
        f"Run it with `lth run` (estimated CPU time {estimate(source)})."
    )
