"""`lth run -j N`: run the pipeline's independent stages side by side, each through DVC.

`dvc repro` runs one stage at a time. A LeNet round is one thread's work (a second thread is slower, see
docs/performance.md), so on a 2-core machine the controls of round k and the ticket of round k+1, or the
rounds of a one-shot experiment, can run together. Each stage still runs as `dvc repro --single-item`, so
DVC records, caches and skips it exactly as a plain `dvc repro` would; DVC releases its repo lock while a
stage's command runs, and `--wait-for-lock` makes the short locked phases of two stages wait for each other.
Their output is relayed line by line to a `StageDisplay` (lth.lottery.progress): prefixed with the stage's
name, and on a terminal with a live line per running stage, fed by the stages' progress records.

On a machine with GPUs each running stage gets one of its own through CUDA_VISIBLE_DEVICES (`GpuPool`), from
those LTH_GPUS lists (comma-separated ids: to choose them, or in tests to pretend), else those
CUDA_VISIBLE_DEVICES lists, else every GPU torch sees. Without GPUs the variable is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import torch
import yaml

from lth.core.runtime import FC_MODELS, RuntimeSettings, cpu_count
from lth.lottery.progress import PROGRESS_ENV, StageDisplay

DVC = [sys.executable, "-m", "dvc"]
GPUS_ENV = "LTH_GPUS"  # the GPU ids that `lth run -j N` hands out, e.g. 0,1 (default: see visible_gpus)
CUDA = "CUDA_VISIBLE_DEVICES"  # what each stage gets: one of them


def stage_graph(dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, set[str]]:
    """Every stage of dvc.yaml, in file order, with the stages whose outputs it depends on."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    producer = {}
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            producer[(out if isinstance(out, str) else next(iter(out))).rstrip("/")] = name
    graph = {}
    for name, stage in stages.items():
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
        graph[name] = {
            producer[o]
            for d in deps
            for o in producer
            if d.rstrip("/") == o or d.startswith(o + "/") or o.startswith(d.rstrip("/") + "/")
        }
        graph[name].discard(name)
    return graph


def stale_stages(graph: dict[str, set[str]], env: dict[str, str] | None = None) -> list[str]:
    """The stages that `dvc repro` would run: those `dvc status` reports changed, and everything downstream."""
    proc = subprocess.run([*DVC, "status", "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc status` failed:\n{proc.stderr.strip()}")
    changed = set(json.loads(proc.stdout or "{}")) & set(graph)
    grew = True
    while grew:
        downstream = {s for s, deps in graph.items() if deps & changed} - changed
        changed |= downstream
        grew = bool(downstream)
    return [s for s in graph if s in changed]


def running_dvc(root: Path) -> list[str]:
    """`pid: command` of other DVC processes working in the project at `root` (they hold DVC's lock)."""
    import psutil

    root, found = root.resolve(), []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmd, cwd = proc.info.get("cmdline") or [], proc.info.get("cwd")
        is_dvc = any(Path(c).name == "dvc" for c in cmd[:3]) and any(c in ("repro", "exp", "queue") for c in cmd)
        if proc.info["pid"] != os.getpid() and is_dvc and cwd and Path(cwd).resolve() == root:
            found.append(
                f"{proc.info['pid']}: {' '.join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))}"
            )
    return found


def recorded_changes(stage: str, env: dict[str, str] | None = None) -> list[str]:
    """What differs from dvc.lock's record of `stage`, inputs first: "input data/prepared modified",
    "output runs/ticket/round_02 modified" (empty when the stage is as recorded or DVC cannot tell)."""
    proc = subprocess.run([*DVC, "status", "--json", stage], capture_output=True, text=True, env=env)
    try:
        entries = json.loads(proc.stdout or "{}").get(stage, [])
    except (ValueError, AttributeError):
        return []
    found = {"changed deps": [], "changed outs": []}
    for entry in entries:
        for key in found:
            if isinstance(entry, dict) and isinstance(entry.get(key), dict):
                found[key] += [f"{path} {state}" for path, state in entry[key].items() if not path.startswith("src/")]
    return [f"input {x}" for x in found["changed deps"]] + [f"output {x}" for x in found["changed outs"]]


# DVC's hints after every stage, said once at the end instead.
_HINTS = (
    "To track the changes with git",
    "git add ",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push` to send",
)


def width(graph: dict[str, set[str]], todo: list[str]) -> int:
    """How many of `todo` could run at once, by levels: a stage's level is one more than its deepest
    upstream stage in `todo` (1 for a chain, 2 for a ticket chain with one control)."""
    level: dict[str, int] = {}
    for stage in todo:  # dvc.yaml order is a topological order
        level[stage] = 1 + max((level[d] for d in graph[stage] if d in level), default=0)
    counts: dict[int, int] = {}
    for lv in level.values():
        counts[lv] = counts.get(lv, 0) + 1
    return max(counts.values(), default=0)


def _relay(stream: IO[str], stage: str, display: StageDisplay) -> None:
    """Hand a stage's output to the display line by line (it prefixes each with the stage's name)."""
    for line in stream:
        if not line.strip() or line.strip().startswith(_HINTS):
            continue
        display.feed(stage, line)


def stage_command(stage: str) -> list[str]:
    """The process that runs one stage: DVC, which records and caches it as `dvc repro` would."""
    return [*DVC, "--wait-for-lock", "repro", "--single-item", stage]


def repro(
    graph: dict[str, set[str]],
    todo: list[str],
    jobs: int,
    env: dict[str, str] | None = None,
    display: StageDisplay | None = None,
    command: Callable[[str], list[str]] = stage_command,
) -> int:
    """Run `todo` (in dependency order) as `command(stage)`, up to `jobs` at a time, each stage once all its
    upstream stages in `todo` have succeeded. A failing stage stops new launches; running ones finish
    (their results are kept). Ctrl-C reaches every stage, which checkpoints and exits. Returns the exit
    code: 0, or the first failure's. Output goes to `display` (plain prefixed lines by default)."""
    run = _Run(graph, todo, env, display or StageDisplay(live=False), command)
    with run.display:
        try:
            while run.running or (run.pending and run.failed is None):
                while run.failed is None and len(run.running) < jobs and run.launch():
                    pass
                time.sleep(0.1)
                run.display.tick()
                run.reap()
        except KeyboardInterrupt:
            run.display.say("lth: interrupted; every running stage saves a checkpoint and exits. `lth run` resumes.")
            for proc in run.running.values():
                proc.wait()
            return 130
        finally:
            for relay in run.relays.values():
                relay.join(timeout=5)
    if run.failed is not None:
        return run.failed[1]
    if todo:
        run.display.say("lth: all stages done; `git add dvc.lock` and commit to record them, `dvc push` to share them.")
    return 0


class _Run:
    """The state of one `repro`: which stages wait, run, are done, and the first failure."""

    def __init__(
        self,
        graph: dict[str, set[str]],
        todo: list[str],
        env: dict[str, str] | None,
        display: StageDisplay,
        command: Callable[[str], list[str]],
    ):
        self.graph, self.todo, self.env, self.display, self.command = graph, todo, env, display, command
        self.pending, self.done = list(todo), set(graph) - set(todo)
        self.running: dict[str, subprocess.Popen] = {}
        self.relays: dict[str, threading.Thread] = {}
        self.started: dict[str, float] = {}
        self.failed: tuple[str, int] | None = None
        self.gpus = GpuPool(visible_gpus(os.environ if env is None else env))
        self.gpu_of: dict[str, str | None] = {}

    def launch(self) -> bool:
        """Start the first pending stage whose upstream stages are done; False when none is ready."""
        stage = next((s for s in self.pending if self.graph[s] <= self.done), None)
        if stage is None:
            return False
        self.pending.remove(stage)
        self.started[stage] = time.perf_counter()
        self.display.say(
            f"lth: started {stage} ({len(self.done & set(self.todo))} of {len(self.todo)} done; "
            f"running: {', '.join([*self.running, stage])})"
        )
        self.display.started(stage)
        self.gpu_of[stage] = gpu = self.gpus.take()
        env = self.env if gpu is None else {**(os.environ if self.env is None else self.env), CUDA: gpu}
        proc = subprocess.Popen(
            self.command(stage), env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.running[stage] = proc
        self.relays[stage] = threading.Thread(target=_relay, args=(proc.stdout, stage, self.display), daemon=True)
        self.relays[stage].start()
        return True

    def reap(self) -> None:
        """Take the stages that exited out of `running`, after their last output line."""
        for stage, proc in list(self.running.items()):
            if proc.poll() is None:
                continue
            del self.running[stage]
            self.gpus.give_back(self.gpu_of.pop(stage))
            self.relays[stage].join(timeout=5)
            self.display.finished(stage)
            if proc.returncode == 0:
                self.done.add(stage)
                self.display.say(f"lth: finished {stage} in {time.perf_counter() - self.started[stage]:.0f} s")
            elif self.failed is None:
                self.failed = (stage, proc.returncode)
                self.display.say(
                    f"lth: {stage} failed (exit code {proc.returncode}); its output is above. "
                    + (f"Waiting for {', '.join(self.running)} to finish; " if self.running else "")
                    + "finished stages are kept: fix the cause and run `lth run` again."
                )


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The ids of the GPUs that stages may run on: those LTH_GPUS lists, else those CUDA_VISIBLE_DEVICES lists
    (none when it is empty), else every GPU torch sees."""
    for name in (GPUS_ENV, CUDA):
        if name in env:
            return [g.strip() for g in env[name].split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


class GpuPool:
    """Hands each stage that starts one GPU: the least busy one, taking turns among equals. With no more stages
    at a time than GPUs, no two running stages share one; with more, they share as evenly as they can."""

    def __init__(self, gpus: list[str]):
        self.gpus, self.busy, self.turn = list(gpus), dict.fromkeys(gpus, 0), 0

    def take(self) -> str | None:
        """A GPU for a stage that starts (None without GPUs)."""
        if not self.gpus:
            return None
        in_turn = self.gpus[self.turn :] + self.gpus[: self.turn]
        gpu = min(in_turn, key=lambda g: self.busy[g])  # the first of the least busy, from this turn on
        self.busy[gpu] += 1
        self.turn = (self.gpus.index(gpu) + 1) % len(self.gpus)
        return gpu

    def give_back(self, gpu: str | None) -> None:
        """The stage on `gpu` has ended."""
        if gpu is not None:
            self.busy[gpu] -= 1


def child_env(jobs: int, model_name: str, settings: RuntimeSettings, live: bool = False) -> dict[str, str]:
    """The environment of the stage processes: with several at once, no bar of their own (their output is
    relayed line by line), progress records for the `live` display or else sparse lines, and the cores
    shared out, unless the user set LTH_THREADS / LTH_WORKERS."""
    env = dict(os.environ)
    if jobs > 1:
        env["CI"] = env.get("CI") or "1"
        if live:
            env[PROGRESS_ENV] = "json"
        env.setdefault("LTH_THREADS", str(settings.threads_for(model_name, jobs)))
        env.setdefault("LTH_WORKERS", str(max(1, cpu_count() // jobs)))
    return env


def auto_jobs(model_name: str) -> int:
    """Stages side by side by default: one per core for fully connected networks, which use one thread
    each; one for the others, whose single process already uses every core (and whose last bits could
    otherwise depend on the thread split)."""
    if torch.cuda.is_available() or model_name not in FC_MODELS:
        return 1
    return cpu_count()
