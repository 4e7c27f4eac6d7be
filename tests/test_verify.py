"""`lth verify` re-runs a recorded round in a temporary directory: pass when untouched, fail after tampering."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT, Project

XOR = {
    "dataset": {"name": "xor", "validation_size": 1000},
    "model": {"name": "xor"},
    "training": {"iterations": 200, "eval_every": 50, "test_every": 100},
    "pruning": {"rounds": 1},
    "runtime": {"threads": 1},
}


def snapshot(root: Path) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_mtime_ns for f in sorted(root.rglob("*")) if f.is_file()}


def test_verify_passes_then_fails_after_tampering(tmp_path: Path) -> None:
    p = Project(tmp_path)  # the stages, run directly (verify needs params.yaml, data/ and runs/ only)
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(XOR))
    p.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for args in (
        ["stages/prepare.py"],
        ["stages/train_round.py", "--round", "0"],
        ["stages/train_round.py", "--round", "1"],
    ):
        p.run(sys.executable, *args)
    before = snapshot(p.root)
    r = p.lth("verify", "--round", "1")
    assert "lth verify: PASS: ticket round 1 trial 0 reproduces exactly" in r.stdout
    assert snapshot(p.root) == before  # neither the outputs, MLflow's store nor checkpoints are touched

    metrics = p.root / "runs/ticket/round_01/trial_0/metrics.json"
    doc = json.loads(metrics.read_text())
    recorded = doc["test_accuracy_final"]
    doc["test_accuracy_final"] = recorded + 0.01
    metrics.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    r = p.lth("verify", "--round", "1", check=False)
    assert r.returncode == 1
    assert f"MISMATCH metrics.json test_accuracy_final: recorded {recorded + 0.01!r}, re-run {recorded!r}" in r.stdout
    assert "lth verify: FAIL: ticket round 1 trial 0 does not reproduce (1 of" in r.stdout

    r = p.lth("verify", "--round", "5", check=False)
    assert r.returncode == 1 and "runs/ticket/round_05/trial_0: no recorded" in r.stderr
