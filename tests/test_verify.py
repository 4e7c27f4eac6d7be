"""`lth verify` re-runs a recorded round in a temporary directory: pass when untouched, fail after tampering."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.helpers import Project, modification_times


def test_verify_passes_then_fails_after_tampering(trained_project: Callable[..., Project], xor_params) -> None:
    p = trained_project(xor_params())  # rounds 0 and 1, trained by `dvc repro`
    assert (p.root / "mlflow.db").exists()  # the stages logged their rounds
    before = modification_times(p.root)
    r = p.lth("verify", "--round", "1")
    assert "lth verify: PASS: ticket round 1 trial 0 reproduces exactly" in r.stdout
    assert modification_times(p.root) == before  # neither the outputs, MLflow's store nor checkpoints are touched

    metrics = p.root / "runs/ticket/round_01/trial_0/metrics.json"
    doc = json.loads(metrics.read_text())
    recorded = doc["test_accuracy_final"]
    doc["test_accuracy_final"] = recorded + 0.01
    metrics.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    r = p.lth("verify", "--round", "1", check=False)
    assert r.returncode == 1
    assert f"MISMATCH metrics.json test_accuracy_final: recorded {recorded + 0.01!r}, re-run {recorded!r}" in r.stdout
    assert "lth verify: FAIL: ticket round 1 trial 0 does not reproduce (1 of" in r.stdout
    # ... and DVC's record says which output changed since the stage ran.
    assert "lth verify: output runs/ticket/round_01 modified since dvc.lock recorded ticket_round_01" in r.stdout

    r = p.lth("verify", "--round", "5", check=False)
    assert r.returncode == 1 and "--round 5: not a round of this experiment (rounds 0..1" in r.stderr
    metrics.unlink()
    r = p.lth("verify", "--round", "1", check=False)
    assert r.returncode == 1 and "runs/ticket/round_01/trial_0: no recorded metrics.json" in r.stderr
