"""`lth run -j 2`: independent stages run side by side through DVC, with the same outputs as `dvc repro`."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lth.core.config import from_dict
from lth.pipeline import render as pipeline
from lth.pipeline import schedule
from tests.helpers import Project, output_digests


@pytest.fixture
def xor_with_control(xor_params) -> dict[str, Any]:
    """XOR, 3 rounds (0, 1, 2) and the random-reinitialization control: 7 stages, up to 2 independent."""
    return xor_params({"training.test_every": 50, "pruning.rounds": 2, "controls.random_reinit": True})


def test_stage_graph_follows_the_rendered_pipeline(tmp_path: Path) -> None:
    hp = from_dict({"pruning": {"rounds": 3}, "controls": {"random_reinit": True}})
    (tmp_path / "dvc.yaml").write_text(pipeline.render(hp))
    graph = schedule.stage_graph(tmp_path / "dvc.yaml")
    assert graph["prepare"] == set()
    assert graph["ticket_round_00"] == {"prepare"}
    assert graph["ticket_round_02"] == {"prepare", "ticket_round_00", "ticket_round_01"}
    assert graph["reinit_round_02"] == {"prepare", "ticket_round_02"}
    assert graph["evaluate"] == {s for s in graph if s.startswith(("ticket", "reinit"))}
    assert schedule.width(graph, list(graph)) == 2  # round k's control beside round k+1
    chain = [s for s in graph if not s.startswith("reinit")]
    assert schedule.width(graph, chain) == 1 and schedule.width(graph, []) == 0
    # One-shot: every round depends on round 0 only, so they can all run at once.
    oneshot = from_dict({"pruning": {"rounds": 3, "schedule": "oneshot"}})
    (tmp_path / "dvc.yaml").write_text(pipeline.render(oneshot))
    graph = schedule.stage_graph(tmp_path / "dvc.yaml")
    assert graph["ticket_round_03"] == {"prepare", "ticket_round_00"}
    assert schedule.width(graph, list(graph)) == 3


def locked_stages(root: Path) -> set[str]:
    """The stages dvc.lock records as done."""
    return set(yaml.safe_load((root / "dvc.lock").read_text())["stages"])


@pytest.mark.slow  # the pipeline twice: about 3 minutes on 2 cores
def test_two_jobs_run_stages_side_by_side_with_the_outputs_of_dvc_repro(
    make_project: Callable[..., Project], xor_with_control: dict[str, Any]
) -> None:
    one = make_project(xor_with_control, "one")
    one.dvc("repro")
    two = make_project(xor_with_control, "two")
    out = two.lth("run", "-j", "2").stderr
    assert "7 of 7 stages to run, up to 2 at a time" in out
    # After round 1, its control and round 2 are independent: they ran at the same time.
    together = [set(m.split(", ")) for m in re.findall(r"running: (.+)\)", out)]
    assert {"reinit_round_01", "ticket_round_02"} in together, out
    assert "[reinit_round_01]" in out  # each stage's own output, prefixed
    assert locked_stages(two.root) == locked_stages(one.root) == set(schedule.stage_graph(two.root / "dvc.yaml"))
    # The same networks (each output's run.json, its wall times, differs from run to run).
    assert output_digests(two.root) == output_digests(one.root) and len(output_digests(one.root)) == 5 * 4
    assert "Data and pipelines are up to date" in two.dvc("repro").stdout  # dvc repro has nothing left to do
    again = two.lth("run", "-j", "2")  # nothing to run side by side: plain dvc repro, which skips every stage
    assert "running dvc repro" in again.stderr and "Data and pipelines are up to date" in again.stdout + again.stderr


@pytest.mark.slow  # over a minute on 2 cores: run with -m slow
def test_a_failing_stage_stops_new_launches_and_keeps_finished_ones(
    make_project: Callable[..., Project], xor_with_control: dict[str, Any]
) -> None:
    proj = make_project(xor_with_control)
    (proj.root / "stages" / "train_round.py").write_text(
        (proj.root / "stages" / "train_round.py")
        .read_text()
        .replace(
            "    args = parser.parse_args()\n",
            "    args = parser.parse_args()\n    if args.kind == 'reinit':\n        raise SystemExit('boom')\n",
        )
    )
    proc = proj.lth("run", "-j", "2", check=False)
    assert proc.returncode != 0
    assert "reinit_round_01 failed" in proc.stderr and "boom" in proc.stderr
    assert "started evaluate" not in proc.stderr
    assert {"prepare", "ticket_round_00", "ticket_round_01"} <= locked_stages(proj.root)  # finished stages are recorded
