"""`lth run -j 2`: independent stages run side by side through DVC, with the same outputs as `dvc repro`."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lth.core import hparams
from lth.pipeline import render as pipeline
from lth.pipeline import schedule

from .conftest import make_project, preset_params

XOR = preset_params(
    "xor",
    **{
        "training.iterations": 200,
        "training.eval_every": 50,
        "training.test_every": 50,
        "pruning.rounds": 2,
        "controls.random_reinit": True,
    },
)


def test_stage_graph_follows_the_rendered_pipeline(tmp_path: Path) -> None:
    hp = hparams.from_dict({"pruning": {"rounds": 3}, "controls": {"random_reinit": True}})
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
    oneshot = hparams.from_dict({"pruning": {"rounds": 3, "schedule": "oneshot"}})
    (tmp_path / "dvc.yaml").write_text(pipeline.render(oneshot))
    graph = schedule.stage_graph(tmp_path / "dvc.yaml")
    assert graph["ticket_round_03"] == {"prepare", "ticket_round_00"}
    assert schedule.width(graph, list(graph)) == 3


def lock_outs(root: Path) -> dict[str, list[str]]:
    """Each stage's output hashes from dvc.lock."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: sorted(o["md5"] for o in s.get("outs", [])) for name, s in stages.items()}


def test_two_jobs_run_stages_side_by_side_with_the_outputs_of_dvc_repro(tmp_path: Path) -> None:
    one = make_project(tmp_path / "one", XOR)
    one.dvc("repro")
    two = make_project(tmp_path / "two", XOR)
    out = two.lth("run", "-j", "2").stderr
    assert "7 of 7 stages to run, up to 2 at a time" in out
    # After round 1, its control and round 2 are independent: they ran at the same time.
    together = [set(m.split(", ")) for m in re.findall(r"running: (.+)\)", out)]
    assert {"reinit_round_01", "ticket_round_02"} in together, out
    assert "[reinit_round_01]" in out  # each stage's own output, prefixed
    assert lock_outs(two.root) == lock_outs(one.root)
    assert "Data and pipelines are up to date" in two.dvc("repro").stdout  # dvc repro has nothing left to do
    again = two.lth("run", "-j", "2")  # nothing to run side by side: plain dvc repro, which skips every stage
    assert "running dvc repro" in again.stderr and "Data and pipelines are up to date" in again.stdout + again.stderr


def test_a_failing_stage_stops_new_launches_and_keeps_finished_ones(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "project", XOR)
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
    done = lock_outs(proj.root)
    assert {"prepare", "ticket_round_00", "ticket_round_01"} <= set(done)  # finished stages are recorded
