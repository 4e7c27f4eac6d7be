"""Plain helpers shared by the tests (no fixtures, no tests): a project on disk driven through subprocesses,
a reader of the HTML report's tables, digests of a project's outputs, and params documents."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]  # the project's checkout: stages/, src/, presets/


class Project:
    """A project directory (stages, library, params.yaml; usually its own git + DVC repo), driven the way a
    user drives it: `dvc` and `lth` in subprocesses, with the project's copy of the library."""

    def __init__(self, root: Path, output: str = ""):
        self.root = root
        self.output = output  # what the command that trained it printed (see the trained_project fixture)
        self.env = dict(os.environ)
        self.env.update(
            {
                "PYTHONPATH": str(root / "src"),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}",
                "GIT_AUTHOR_NAME": "lth-test",
                "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "lth-test",
                "GIT_COMMITTER_EMAIL": "test@example.com",
                "CI": "true",
            }
        )
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def run(self, *cmd: str, check: bool = True, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def python(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.run(sys.executable, *args, **kw)

    def lth(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.python("-m", "lth.cli", *args, **kw)

    def dvc(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.python("-m", "dvc", *args, **kw)

    def set_params(self, values: dict[str, Any]) -> None:
        """Change params.yaml: `values` maps dotted keys (training.lr) to values."""
        import yaml

        path = self.root / "params.yaml"
        path.write_text(yaml.safe_dump(with_changes(yaml.safe_load(path.read_text()), values), sort_keys=False))

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def with_changes(doc: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    """A deep copy of the params document `doc` with `changes` (dotted keys: {"training.lr": 3e-4}) applied."""
    out = copy.deepcopy(doc)
    for key, value in (changes or {}).items():
        d = out
        *parents, last = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return out


OUTPUT_NAMES = ("mask.pt", "metrics.json", "final.pt", "curve.csv")


def output_digests(root: Path) -> dict[str, str]:
    """MD5 of every mask, metrics file, learning curve and final weights file under runs/ (what must be
    reproducible), by path. Tensor files are hashed by their tensors, not their pickle bytes."""
    out = {}
    for f in sorted((root / "runs").rglob("*")):
        if f.name in OUTPUT_NAMES:
            if f.suffix == ".pt":
                tensors = torch.load(f, weights_only=True)
                digest = hashlib.md5(b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(tensors.items())))
            else:
                digest = hashlib.md5(f.read_bytes())
            out[str(f.relative_to(root))] = digest.hexdigest()
    return out


def modification_times(root: Path) -> dict[str, int]:
    """Every file under `root` with its modification time: equal snapshots mean nothing was touched."""
    return {str(f.relative_to(root)): f.stat().st_mtime_ns for f in sorted(root.rglob("*")) if f.is_file()}


class Cells(HTMLParser):
    """Text of each <td> of the table with id `table_id`, row by row."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table" and dict(attrs).get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag == "td":
            self.cell = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif self.inside and tag == "td" and self.cell is not None:
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell += data
