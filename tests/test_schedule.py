"""`lth run -j 2`: independent stages run side by side through DVC, with the same outputs as `dvc repro`;
on a terminal a live bar per running stage (checked through a pseudo-terminal), else plain lines; and the
README's example output is what `lth run` prints."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lth.core.config import from_dict
from lth.pipeline import render as pipeline
from lth.pipeline import schedule
from tests.helpers import ROOT, Project, output_digests


@pytest.fixture
def xor_with_control(xor_params) -> dict[str, Any]:
    """XOR, 3 rounds (0, 1, 2) and the random-reinitialization control: 8 stages, up to 2 independent."""
    return xor_params({"training.test_every": 50, "pruning.rounds": 2, "controls.random_reinit": True})


def test_stage_graph_follows_the_rendered_pipeline(tmp_path: Path) -> None:
    hp = from_dict({"pruning": {"rounds": 3}, "controls": {"random_reinit": True}})
    (tmp_path / "dvc.yaml").write_text(pipeline.render(hp))
    graph = schedule.stage_graph(tmp_path / "dvc.yaml")
    assert graph["prepare"] == set()
    assert graph["ticket_round_00"] == {"prepare"}
    assert graph["ticket_round_02"] == {"prepare", "ticket_round_00", "ticket_round_01"}
    assert graph["reinit_round_02"] == {"prepare", "ticket_round_02"}
    assert graph["masks"] == {s for s in graph if s.startswith("ticket")}
    assert graph["evaluate"] == {s for s in graph if s.startswith(("ticket", "reinit"))} | {"masks"}
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
    assert "8 of 8 stages to run, up to 2 at a time" in out
    # After round 1, its control and round 2 are independent: they ran at the same time.
    together = [set(m.split(", ")) for m in re.findall(r"running: (.+)\)", out)]
    assert {"reinit_round_01", "ticket_round_02"} in together, out
    assert "[reinit_round_01]" in out  # each stage's own output, prefixed
    _, plain = readme_examples()
    assert not unmatched(plain, set(out.splitlines()))  # the README's example of plain lines, every line
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


# ------------------------------------------------------------------------------------------------ GPUs


def test_each_running_stage_gets_a_gpu_of_its_own() -> None:
    pool = schedule.GpuPool(["0", "1", "2"])
    a, b = pool.take(), pool.take()
    assert (a, b) == ("0", "1")
    pool.give_back(a)
    assert [pool.take(), pool.take()] == ["2", "0"]  # taking turns: the free ones, from where it left off
    assert pool.take() in {"0", "1", "2"}  # more stages than GPUs: they share
    assert schedule.GpuPool([]).take() is None
    assert schedule.visible_gpus({"LTH_GPUS": "3, 5", "CUDA_VISIBLE_DEVICES": "0"}) == ["3", "5"]
    assert schedule.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a,GPU-2b"}) == ["GPU-1a", "GPU-2b"]
    assert schedule.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


# A stage that records the CUDA_VISIBLE_DEVICES it was started with, then waits (up to 30 s) until both first
# stages have started, so that they surely run at the same time.
GPU_STAGE = """
import os, sys, time
from pathlib import Path
Path(sys.argv[1] + ".gpu").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
deadline = time.monotonic() + 30
while not (Path("a.gpu").exists() and Path("b.gpu").exists()) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("gpus", ["0,1", None])
def test_stages_side_by_side_run_on_different_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus) -> None:
    """Two stages at once with LTH_GPUS=0,1 (GPUs that need not exist: the stages only record the variable), then
    a third after the first: each started on a GPU of its own. Without GPUs the variable is left unset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stage.py").write_text(GPU_STAGE)
    env = {k: v for k, v in os.environ.items() if k not in ("LTH_GPUS", "CUDA_VISIBLE_DEVICES")}
    env |= {"LTH_GPUS": gpus} if gpus else {}
    if not gpus and schedule.visible_gpus(env):
        pytest.skip("this machine has GPUs: no CPU-only run here")
    graph = {"a": set(), "b": set(), "c": {"a"}}
    code = schedule.repro(graph, list(graph), 2, env, command=lambda s: [sys.executable, "stage.py", s])
    got = {s: (tmp_path / f"{s}.gpu").read_text() for s in graph}
    assert code == 0
    if gpus:
        assert {got["a"], got["b"]} == {"0", "1"} and got["c"] in {"0", "1"}
    else:
        assert got == {"a": "unset", "b": "unset", "c": "unset"}


# ------------------------------------------------------------------------------------ progress display

# A stage as the display sees it: DVC's and the stage's lines, then a round of 1,000 iterations through the real
# RoundProgress (which prints progress records when LTH_PROGRESS=json), a malformed record, the trial's line.
FAKE_STAGE = """
import sys, time
from lth.lottery.progress import RoundProgress
stage = sys.argv[1]
kind, k = stage.split("_round_")
print(f"Running stage '{stage}':", flush=True)
with RoundProgress(f"{kind} round {int(k)}", 1000, round_index=int(k), rounds=2) as bar:
    for it in range(0, 1001, 100):
        bar.update(it, {"val_loss": 0.5 - it / 10000, "val_accuracy": 0.9})
        time.sleep(0.1)
print("lth-progress: {not json", file=sys.stderr, flush=True)
print(f"lth: {kind} round {int(k)}: 80.00% remaining", file=sys.stderr, flush=True)
"""
# What `lth run -j 2` does once it has its stages, with FAKE_STAGE for `dvc repro --single-item STAGE`.
FAKE_RUN = """
import sys
from pathlib import Path
from lth.core import runtime
from lth.lottery import progress
from lth.pipeline import schedule
graph = {"ticket_round_01": set(), "ticket_round_02": {"ticket_round_01"}, "reinit_round_01": {"ticket_round_01"}}
live = progress.interactive()
env = schedule.child_env(2, "xor", runtime.resolve({}, Path(".")), live)
stage = [sys.executable, sys.argv[1]]
sys.exit(schedule.repro(graph, list(graph), 2, env, progress.StageDisplay(live), lambda s: [*stage, s]))
"""
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Screen:
    """Just enough of a terminal for what tqdm writes: text, carriage return, newline, cursor up (ESC [ A)."""

    def __init__(self) -> None:
        self.rows: list[str] = [""]
        self.row = self.col = 0

    def feed(self, text: str) -> None:
        for token in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|.", text, re.S):
            if token == "\x1b[A":
                self.row = max(0, self.row - 1)
            elif token == "\r":
                self.col = 0
            elif token == "\n":
                self.row += 1
                self.rows += [""] * (self.row + 1 - len(self.rows))
            elif not token.startswith("\x1b"):
                line = self.rows[self.row].ljust(self.col)
                self.rows[self.row] = line[: self.col] + token + line[self.col + 1 :]
                self.col += 1

    def lines(self) -> list[str]:
        return [r.strip() for r in self.rows if r.strip()]


def on_terminal(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[list[list[str]], str]:
    """Run `cmd` with a pseudo-terminal of 150 columns as stdin, stdout and stderr: (the screen's lines after
    each read, everything written)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 150, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    screen, frames, raw = Screen(), [], b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        raw += chunk
        screen.feed(chunk.decode(errors="replace"))
        frames.append(screen.lines())
    os.close(master)
    assert proc.wait(timeout=600) == 0, raw.decode(errors="replace")
    return frames, raw.decode(errors="replace")


def shown(raw: str) -> set[str]:
    """Every line a terminal showed at some moment: the output cut at carriage returns and newlines."""
    return {part.strip() for part in re.split(r"[\r\n]", ANSI.sub("", raw)) if part.strip()}


def readme_examples() -> tuple[list[str], list[str]]:
    """The two example outputs of the README's "Progress" item: on a terminal, and in CI or a log."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index("- **Progress.**") :]
    blocks = re.findall(r"```text\n(.*?)```", after, re.S)[:2]
    return [[line.strip() for line in b.splitlines() if line.strip()] for b in blocks]


def as_pattern(example: str) -> re.Pattern[str]:
    """An example line with its numbers, hashes and bar drawing left open."""
    parts = re.split(r"(\|[^|]*\||\b[0-9a-f]{8}\b|\d+(?:\.\d+)?)", example.strip())
    out = ""
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out += re.escape(part)
        elif part.startswith("|"):
            out += r"\|[^|]*\|"
        else:
            out += r"[0-9a-f]{8}" if re.fullmatch(r"[0-9a-f]{8}", part) and not part.isdigit() else r"\d+(?:\.\d+)?"
    return re.compile(out)


def unmatched(examples: list[str], lines: set[str]) -> list[str]:
    return [e for e in examples if not any(as_pattern(e).fullmatch(line) for line in lines)]


BAR = re.compile(r"^((?:ticket|reinit) round \d of 2): +\d+%\|")
WAITING = re.compile(r"^\w+ \[\d\d:\d\d\]$")  # a stage's line before its round's first record


def bars(frame: list[str]) -> list[str]:
    return [m.group(1) for m in map(BAR.match, frame) if m]


def test_live_display_shows_one_bar_per_running_stage(tmp_path: Path) -> None:
    (tmp_path / "stage.py").write_text(FAKE_STAGE)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "LTH_PROGRESS")}
    frames, raw = on_terminal([sys.executable, "-c", FAKE_RUN, "stage.py"], env, tmp_path)
    # While ticket_round_02 and reinit_round_01 ran, the screen held a bar for each, each on its own line.
    assert any(sorted(bars(f)) == ["reinit round 1 of 2", "ticket round 2 of 2"] for f in frames), frames[-3:]
    assert all(len(bars(f)) <= 2 for f in frames)
    final = frames[-1]
    assert not [ln for ln in final if BAR.match(ln) or WAITING.match(ln)], final  # every bar cleared at the end
    assert not [ln for ln in final if '{"label"' in ln], final  # records moved bars, never printed
    for stage in ("ticket_round_01", "ticket_round_02", "reinit_round_01"):
        kind, k = stage.split("_round_")
        assert f"[{stage}] Running stage '{stage}':" in final
        assert f"[{stage}] lth: {kind} round {int(k)}: 80.00% remaining" in final
        assert f"[{stage}] lth-progress: {{not json" in final  # a line that is no record is printed as it is
        assert any(ln.startswith(f"lth: finished {stage} in ") for ln in final)
    # The README's example of the live display: lth's own lines and the bars (the stages here are fakes).
    live, _ = readme_examples()
    assert not unmatched([e for e in live if not e.startswith("[")], shown(raw))


def test_plain_lines_in_ci_or_without_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "stage.py").write_text(FAKE_STAGE)
    env = {k: v for k, v in os.environ.items() if k != "LTH_PROGRESS"}
    piped = subprocess.run(
        [sys.executable, "-c", FAKE_RUN, "stage.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    frames, raw = on_terminal([sys.executable, "-c", FAKE_RUN, "stage.py"], {**env, "CI": "1"}, tmp_path)
    for out in (piped.stderr, raw.replace("\r\n", "\n")):
        assert "\r" not in out and 'lth-progress: {"' not in out, out
        assert "[reinit_round_01] lth: reinit round 1 of 2: iteration 1000/1000, val loss 0.4000" in out, out
        assert "[ticket_round_02] lth: ticket round 2: 80.00% remaining" in out
        assert "[ticket_round_02] lth-progress: {not json" in out  # a line that is no record is printed as it is
    # The README's example of plain lines: lth's own and the rounds' progress lines (the stages here are fakes).
    _, plain = readme_examples()
    assert not unmatched(
        [e for e in plain if not e.startswith("[") or ": iteration " in e], set(piped.stderr.splitlines())
    )


@pytest.mark.slow  # the pipeline on a pseudo-terminal: about 2 minutes on 2 cores
def test_lth_run_on_a_terminal_shows_a_live_line_per_stage(
    make_project: Callable[..., Project], xor_with_control: dict[str, Any]
) -> None:
    proj = make_project(xor_with_control)
    env = {k: v for k, v in proj.env.items() if k not in ("CI", "LTH_PROGRESS")}
    frames, raw = on_terminal([sys.executable, "-m", "lth.cli", "run"], env, proj.root)
    # ticket_round_02 and reinit_round_01 ran side by side, a live line each; every round had its bar.
    assert any(len(bars(f)) + len([ln for ln in f if WAITING.match(ln)]) == 2 for f in frames), frames[-3:]
    assert {b for f in frames for b in bars(f)} == {
        f"{k} of 2" for k in ("ticket round 0", "ticket round 1", "ticket round 2", "reinit round 1", "reinit round 2")
    }
    assert not [ln for ln in frames[-1] if BAR.match(ln) or WAITING.match(ln)]
    assert locked_stages(proj.root) == set(schedule.stage_graph(proj.root / "dvc.yaml"))
    live, _ = readme_examples()
    assert not unmatched(live, shown(raw))  # the README's example, every line
