"""Keep the README true: every fenced bash/sh/python block of README.md is run here, on tiny params.

`HOW` is the one table that says how each block runs, keyed by a fragment of the block's first line. A README
block without an entry fails (a new block must be covered), and so does an entry that matches no block.

A block runs for real through `bash` with `set -e` (a Python block: the venv's python), in the directory its
entry names:
- `fresh`: a new committed git + DVC project (stages, library, presets/) with the tiny XOR params;
- `trained`: a copy of such a project in which the README's own first block (`lth run` from the activated
  venv) ran, once per session and params; that run is the `default_experiment` block's test;
- `checkout`: the checkout itself; `tmp`: an empty directory.
Commands get the environment of `tests.helpers.Project`: PATH starts with the venv's bin (so `lth` and `dvc`
resolve), PYTHONPATH is the project's src. What cannot run here as written is replaced by exact strings
(`subs`: each must occur in the block; `{port}`, `{tmp}`, `{venv}`, `{hash12}`, `{export}` are filled in);
the README text itself is never rewritten. A block that ends in a server (`lth ui`, `mlflow server`) is
started, must answer HTTP on a free port, and is stopped. A block is skipped only with its reason in the
table; the skips are counted and printed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lth.core import config
from tests.conftest import XOR_TINY, copy_project, create_project, have_mnist
from tests.helpers import ROOT, Project, with_changes

README = ROOT / "README.md"
LANGS = ("bash", "sh", "python")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # README line of the block's first line of code
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0] if self.text else ""


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block tagged bash, sh or python, in README order."""
    blocks: list[Block] = []
    lang, start, lines = None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if lang is None:
            m = re.match(r"^```\s*([\w+-]*)", line)
            if m:
                lang, start, lines = m.group(1).lower(), n + 1, []
        elif line.strip() == "```":
            if lang in LANGS:
                blocks.append(Block(lang, start, "\n".join(lines) + "\n"))
            lang = None
        else:
            lines.append(line)
    assert lang is None, f"README.md: the block opened at line {start - 1} is never closed"
    return blocks


# ------------------------------------------------------------------------------------------------ the table

Check = Callable[[Path, str], None]  # (the block's working directory, its output) -> assertions


@dataclass(frozen=True)
class How:
    name: str  # the test id
    where: str = "fresh"  # fresh | trained | checkout | tmp (see the module docstring)
    params: dict[str, Any] = field(default_factory=dict)  # changes to the tiny XOR params (fresh, trained)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # changes to the project's presets/NAME.yaml
    subs: dict[str, str] = field(default_factory=dict)  # exact README string -> what runs instead
    setup: str = ""  # bash run first, in the project (not README text)
    needs: str = ""  # another entry whose block (with its setup) runs first, in the same project
    cwd: str = ""  # where the block runs when not in the project ({tmp}/...: created)
    server: str = ""  # the block ends in a server: the HTTP path that must answer on {port}
    expect: tuple[str, ...] = ()  # in the output
    reject: tuple[str, ...] = ()  # not in the output
    creates: tuple[str, ...] = ()  # files that exist afterwards (relative to the working directory)
    check: Check | None = None
    mnist: bool = False  # skipped without an MNIST copy (LTH_DATA_DIR)
    slow: bool = False  # marked slow (pytest -m slow): trains experiments of its own beyond the shared ones
    skip: str = ""  # why it cannot run here at all


def same_as_ci(cwd: Path, out: str) -> None:
    """The README says its test command is what .ci/run runs."""
    block = next(b for b in BLOCKS if entry_of(b) is HOW_BY_NAME["test_suite"])
    assert block.text.strip() in (ROOT / ".ci" / "run").read_text().splitlines(), ".ci/run runs another command"


def lenet_selected_again(cwd: Path, out: str) -> None:
    assert (cwd / "params.yaml").read_text() == (cwd / "presets" / "lenet.yaml").read_text()
    assert "test accuracy" in out and "at early stop" in out, out


def shared_outputs(cwd: Path, out: str) -> None:
    remote = cwd.parent / "lth-cache"
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*")), "dvc push uploaded nothing"


def pulled_outputs(cwd: Path, out: str) -> None:
    clone = cwd / "lth"
    assert (clone / "results" / "metrics.json").is_file() and (clone / "runs" / "ticket" / "round_01").is_dir()
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    assert out.count("didn't change, skipping") == len(stages), out  # every stage, none re-run
    assert not (clone / "mlflow.db").exists(), "a stage ran in the clone"


def readable_results(cwd: Path, out: str) -> None:
    """The summary and the experiments table fit 120 columns and hold the summary; each plot is drawn once."""
    lines = [line for line in out.splitlines() if "dvc_plots" not in line]  # the page's path varies
    assert max(map(len, lines)) <= 120, out
    metrics = json.loads((cwd / "results" / "metrics.json").read_text())
    header = next(line.split() for line in lines if line.startswith("Experiment") or " Experiment " in line)
    assert header == ["Experiment", *metrics], out  # the summary, no param or dependency (nothing differs)
    page = (cwd / "dvc_plots" / "index.html").read_text()
    for figure in ("accuracy", "early_stop", "learning_curves"):
        assert page.count(f"results_figures_{figure}.png") == 1, figure


def robustness_verdicts(cwd: Path, out: str) -> None:
    """Both grid points are in the claims table, each claim of the (sparsest) round with a verdict: 3 trials."""
    with open(cwd / "results" / "robustness_claims.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["training.lr"] for r in rows}) == ["0.0006", "0.0024"], rows
    assert len(rows) == 2 * 4 and {r["verdict"] for r in rows} <= {"holds", "does not hold"}, rows


# `dvc queue start` returns at once; the README says to wait until `dvc queue status` says Success.
UNTIL_DONE = "while dvc queue status | grep -qE 'Queued|Running'; do sleep 2; done; dvc queue status"
# The shared trained project: tiny XOR, one round, with the random-reinit control (`lth verify --kind reinit`).
TRAINED = {"controls.random_reinit": True}
# The base of queued experiments: the dense round only, so each experiment trains one network.
DENSE = {"pruning.rounds": 0}
# The lenet_quick preset, shrunk: 5 rounds of 2,000 iterations -> 1 round of 100 (still MNIST, with its control).
QUICK = {"training.iterations": 100, "training.test_every": 100, "pruning.rounds": 1}

HOW: dict[str, How] = {
    # Two commands: the default experiment on the tiny XOR params (with a control, so `lth run` runs two stages
    # side by side) instead of 20 LeNet rounds, in the venv of this suite instead of a new one. This run trains
    # the project that every `trained` entry copies.
    "pip install -e '.[dev]' && . .venv/bin/activate && lth run": How(
        "default_experiment",
        where="trained",
        params=TRAINED,
        subs={
            "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' "
            "&& . .venv/bin/activate": ". {venv}/bin/activate"
        },
        expect=("lth: experiment", "ticket round 1", "reinit round 1"),
        creates=("dvc.lock", "results/metrics.json", "results/report.html", "runs/reinit/round_01/trial_0/mask.pt"),
    ),
    # The test command: lint and format of the checkout for real, pytest only collecting (running the suite
    # would run this test again); the venv is this suite's.
    ".venv/bin/ruff check .": How(
        "test_suite",
        where="checkout",
        subs={
            "scripts/install-system-packages && python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && ": "",
            ".venv/bin/python -m pytest": ".venv/bin/python -m pytest --collect-only -q",
        },
        expect=("tests collected",),
        check=same_as_ci,
    ),
    # From clone to first figure, with the project's lenet_quick preset shrunk to 1 round of 100 iterations
    # (selecting `lenet` afterwards is then allowed: params.yaml is still a preset).
    "lth preset lenet_quick": How(
        "lenet_quick",
        presets={"lenet_quick": QUICK},
        subs={"xdg-open results/report.html": "test -f results/report.html"},
        creates=tuple(f"results/figures/{f}.png" for f in ("accuracy", "early_stop", "learning_curves")),
        check=lenet_selected_again,
        mnist=True,
        slow=True,
    ),
    # Reading the results of the shared trained project, as written.
    "dvc metrics show": How(
        "reading_results",
        where="trained",
        params=TRAINED,
        creates=("dvc_plots/index.html",),
        check=readable_results,
    ),
    # Everyday commands: the project's hash instead of the example's, round 1 of 1 instead of 7, `lth ui` on a
    # free port (it must answer HTTP).
    "lth locate": How(
        "everyday_commands",
        where="trained",
        params=TRAINED,
        subs={"944351256a0d": "{hash12}", "--round 7": "--round 1", "--port 5000": "--port {port}"},
        server="/",
        expect=("hash (MD5 of canonical hyperparameters)", "wrote results/report.html", "wrote {export}"),
    ),
    # Loading an exported ticket: the export of round 1 instead of the example's file name.
    "from lth.lottery import export": How(
        "export_load",
        where="trained",
        params=TRAINED,
        setup="lth export --round 1",
        subs={"exports/lenet_300_100-mnist-e9058de2-round_07-trial_0.pt": "{export}"},
    ),
    # A CIFAR-10 preset: selected, its pipeline rendered and shown, instead of days of training (no CIFAR copy
    # is needed for that; `lth run --dry` would need the prepared data).
    "lth preset conv4 && lth run": How(
        "presets",
        subs={"lth preset conv4 && lth run": "lth preset conv4 && lth pipeline && dvc dag"},
        expect=("conv4", "xor", "ticket_round_20"),
    ),
    # A learning-rate sweep of 2 values instead of 4, waiting for the queue where the README says to.
    'git commit -m "baseline"': How(
        "sweep",
        where="trained",
        params=DENSE,
        subs={"for lr in 1e-4 3e-4 1.2e-3 3e-3": "for lr in 3e-4 3e-3", "dvc queue status": UNTIL_DONE},
        expect=("Success", "wrote results/lr_sweep.csv"),
        reject=("Failed",),
        creates=("results/lr_sweep.csv", "results/lr_sweep.png"),
        slow=True,
    ),
    # The robustness study: its preset shrunk as lenet_quick is (1 round of 100 iterations, still 3 trials and
    # both controls), a grid of 2 learning rates instead of 12 points.
    "lth preset lenet_robustness": How(
        "robustness",
        presets={"lenet_robustness": {**QUICK, "runtime.workers": 1}},  # the trials in the stage's process
        subs={
            "-S training.lr=6e-4,1.2e-3,2.4e-3 -S pruning.fc_rate=0.2,0.4 -S pruning.rewind_iteration=0,1000": (
                "-S training.lr=6e-4,2.4e-3"
            )
        },
        expect=("claims held", "wrote results/robustness_claims.csv and results/robustness_claims.png"),
        reject=("Failed",),
        creates=("results/robustness.csv", "results/robustness_claims.csv", "results/robustness_claims.png"),
        check=robustness_verdicts,
        mnist=True,
        slow=True,
    ),
    # Sharing, the side that computed: a local directory as the DVC remote, a bare repo as git's remote.
    "dvc remote add -d shared": How(
        "share_push",
        where="trained",
        params=TRAINED,
        setup="git init -q --bare ../lth.git && git remote add origin ../lth.git && git push -q -u origin HEAD",
        subs={"/mnt/team/lth-cache": "{tmp}/lth-cache"},
        check=shared_outputs,
    ),
    # Sharing, the collaborator: clones that bare repo (share_push runs first) and pulls; nothing re-runs.
    "git clone ...": How(
        "share_pull",
        where="trained",
        params=TRAINED,
        needs="share_push",
        cwd="{tmp}/collaborator",
        subs={"git clone ...": "git clone -q {tmp}/lth.git"},
        expect=("didn't change, skipping",),
        reject=("Running stage",),
        check=pulled_outputs,
    ),
    # A team tracking server: sqlite and a local directory instead of PostgreSQL and S3, localhost, a free port.
    "mlflow server --backend-store-uri": How(
        "mlflow_server",
        where="tmp",
        subs={
            "postgresql://user:pass@db/mlflow": "sqlite:///{tmp}/mlflow.db",
            "s3://bucket/mlflow": "{tmp}/artifacts",
            "--host 0.0.0.0 --port 5000": "--host 127.0.0.1 --port {port}",
        },
        server="/health",
        slow=True,
    ),
    "lth sync-mlflow": How("sync_mlflow", where="trained", params=TRAINED),
    # Parallel experiments, waiting for the queue where the README says to.
    "dvc exp run --queue -S training.lr=0.0006": How(
        "parallel_experiments",
        where="trained",
        params=DENSE,
        subs={"dvc queue status": UNTIL_DONE},
        expect=("Success", "0.0006", "0.0024"),
        reject=("Failed",),
        slow=True,
    ),
    # Verifying: round 1 (the last) instead of 3.
    "lth verify": How(
        "verify",
        where="trained",
        params=TRAINED,
        subs={"--round 3": "--round 1"},
        expect=("PASS",),
        reject=("FAIL",),
    ),
}
HOW_BY_NAME = {how.name: how for how in HOW.values()}
TRAINS = HOW_BY_NAME["default_experiment"]  # the block that trains the `trained` projects
BLOCKS = readme_blocks(README.read_text())


def entry_of(block: Block) -> How | None:
    found = [how for key, how in HOW.items() if key in block.first]
    assert len(found) <= 1, f"README.md:{block.line}: several entries of HOW match {block.first!r}"
    return found[0] if found else None


def block_of(how: How) -> Block:
    return next(b for b in BLOCKS if entry_of(b) is how)


def test_the_table_covers_every_block_and_nothing_else() -> None:
    assert BLOCKS, "no bash/sh/python block found in README.md"
    unlisted = [f"README.md:{b.line}: {b.first}" for b in BLOCKS if entry_of(b) is None]
    assert not unlisted, "README blocks with no entry in HOW (say how to run them):\n" + "\n".join(unlisted)
    for key, how in HOW.items():
        lines = [b.line for b in BLOCKS if key in b.first]
        assert len(lines) == 1, f"HOW[{key!r}] ({how.name}) matches {len(lines)} README blocks, not 1"
        assert how.where in ("fresh", "trained", "checkout", "tmp"), how
        assert not how.needs or HOW_BY_NAME[how.needs].where == how.where, how
    assert len(HOW_BY_NAME) == len(HOW), "two entries share a name"
    skipped = {how.name: how.skip for how in HOW.values() if how.skip}
    assert all(len(reason) > 20 for reason in skipped.values()), f"a skip needs its reason: {skipped}"
    print(f"{len(BLOCKS)} README blocks, {len(skipped)} skipped{': ' if skipped else ''}{skipped or ''}")


# ------------------------------------------------------------------------------------------------ running


def fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def script_of(how: How, block: Block, values: dict[str, str]) -> str:
    text = block.text
    for old, new in how.subs.items():
        assert old in text, f"README.md:{block.line}: {old!r} (HOW entry {how.name}) is no longer in the block"
        text = text.replace(old, fill(new, values))
    return text


def bash(script: str) -> list[str]:
    return ["bash", "-c", "set -e\n" + script]


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> tuple[int, str]:
    """Run `cmd` in its own process group; past `timeout`, stop the whole group (a queue worker or a training
    stage must not outlive the test) and fail with what it printed so far."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout:.0f} s, stopped; its output so far:\n{out}")
    return proc.returncode, out


def serve(cmd: list[str], cwd: Path, env: dict[str, str], port: str, path: str, log: Path) -> str:
    """Start `cmd` (which ends in a server), wait until http://127.0.0.1:port/path answers, stop it."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    assert r.status == 200, r.status
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"exited ({proc.returncode}) before answering on port {port}:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no answer on port {port} after 300 s:\n{log.read_text()}")
                time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return log.read_text()


def add_presets(project: Project, changes: dict[str, dict[str, Any]]) -> None:
    """presets/ as a clone has it (committed), with `changes` to some presets (their description kept)."""
    shutil.copytree(ROOT / "presets", project.root / "presets")
    for name, values in changes.items():
        path = project.root / "presets" / f"{name}.yaml"
        text = path.read_text()
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        path.write_text(header + yaml.safe_dump(with_changes(yaml.safe_load(text), values), sort_keys=False))
    project.run("git", "add", "presets")
    project.run("git", "commit", "-qm", "presets")


@pytest.fixture(scope="session")
def readme_trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], tuple[Project, int]]:
    """Projects in which the README's first block (TRAINS) ran, once per session and params: (project, exit
    status), its output in `.output`. Only ever copied (the default_experiment test only reads it)."""
    made: dict[str, tuple[Project, int]] = {}

    def get(params: dict[str, Any]) -> tuple[Project, int]:
        key = json.dumps(params, sort_keys=True)
        if key not in made:
            project = create_project(tmp_path_factory.mktemp("readme") / "project", params)
            add_presets(project, {})
            script = script_of(TRAINS, block_of(TRAINS), {"venv": sys.prefix})
            status, project.output = run(bash(script), project.root, project.env)
            made[key] = project, status
        return made[key]

    return get


def params_of(block: Block) -> list[Any]:
    how = entry_of(block)
    name = how.name if how else f"unlisted_line_{block.line}"
    return [pytest.param(block, id=name, marks=[pytest.mark.slow] if how and how.slow else [])]


@pytest.mark.parametrize("block", [p for b in BLOCKS for p in params_of(b)])
def test_readme_block(block: Block, tmp_path: Path, make_project, xor_params, readme_trained, free_port: int) -> None:
    how = entry_of(block)
    assert how is not None, f"README.md:{block.line}: no entry in HOW for {block.first!r}; add one"
    if how.skip:
        pytest.skip(how.skip)
    if how.mnist and not have_mnist():
        pytest.skip("needs an MNIST copy (set LTH_DATA_DIR)")
    where = f"README.md:{block.line} ({how.name})"

    if how.where == "fresh":
        project = make_project(xor_params(how.params))
        add_presets(project, how.presets)
    elif how.where == "trained":
        trained, status = readme_trained(with_changes(XOR_TINY, how.params))
        assert status == 0, f"README.md:{block_of(TRAINS).line} (training the project) failed:\n{trained.output}"
        # TRAINS ran in the session's project: its test only reads it
        project = trained if how is TRAINS else copy_project(trained.root, tmp_path / "trained", trained.output)
    else:
        project = Project(ROOT if how.where == "checkout" else tmp_path / "work")
        project.root.mkdir(exist_ok=True)
    values = {"port": str(free_port), "tmp": str(project.root.parent), "venv": sys.prefix}
    if how.where in ("fresh", "trained"):
        hp = config.load(project.root / "params.yaml")
        values |= {"hash12": hp.hash[:12], "export": f"exports/{hp.short_name}-round_01-trial_0.pt"}

    if how.needs:
        before = HOW_BY_NAME[how.needs]
        project.run(*bash(fill(before.setup, values) + "\n" + script_of(before, block_of(before), values)))
    if how.setup:
        project.run(*bash(fill(how.setup, values)))
    cwd = Path(fill(how.cwd, values)) if how.cwd else project.root
    cwd.mkdir(parents=True, exist_ok=True)
    script = script_of(how, block, values)

    if how is TRAINS:  # it ran when the project was trained: check that run
        out = project.output
    elif how.server:
        out = serve(bash(script), cwd, project.env, str(free_port), how.server, tmp_path / "server.log")
    else:
        cmd = [sys.executable, "-c", script] if block.lang == "python" else bash(script)
        status, out = run(cmd, cwd, project.env, timeout=2700 if how.slow else 900)  # slow: queues of experiments
        assert status == 0, f"{where} failed ({status}):\n{script}\n{out}"
    for text in how.expect:
        assert fill(text, values) in out, f"{where}: {fill(text, values)!r} not in the output:\n{out}"
    for text in how.reject:
        assert text not in out, f"{where}: {text!r} in the output:\n{out}"
    for name in how.creates:
        assert (cwd / name).is_file(), f"{where}: {name} was not written:\n{out}"
    if how.check:
        how.check(cwd, out)
