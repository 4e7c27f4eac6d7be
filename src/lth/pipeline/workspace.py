"""The project workspace: its root, and where the pipeline's outputs live (relative to the root)."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = "data/prepared"
RUNS_DIR = "runs"
RESULTS_DIR = "results"


def repo_root(start: Path | None = None) -> Path:
    """The project root; inside a DVC experiment workspace (.dvc/tmp/exps/...), the original one."""
    start = (start or Path.cwd()).resolve()
    parts = start.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for p in (start, *start.parents):
        if (p / ".dvc").is_dir() or (p / "dvc.yaml").exists():
            return p
    return start


def checkpoint_dir() -> Path:
    """Checkpoints live outside DVC outputs (DVC deletes those before a stage runs), shared by experiments."""
    return repo_root() / ".lth" / "checkpoints"
