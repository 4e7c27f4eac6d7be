"""One network trained by several processes (lth.core.distributed, docs/distributed.md): 2 gloo ranks on CPU,
tiny LeNet-300-100 rounds. A DDP round is deterministic, close to one process, resumes bit-identically after a
stop that only one rank received, and only rank 0 writes; the stage under torchrun survives a SIGKILL.

The fast tests start the ranks with torch.multiprocessing (the environment torchrun gives them: RANK,
WORLD_SIZE, MASTER_ADDR...), so they run the same `process_group` and training code as under torchrun
without paying for its agent; the slow test runs the stage script itself, which re-launches under torchrun."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.multiprocessing

from lth.core import config, distributed, runtime, training
from lth.core.checkpoint import Stopped
from lth.core.runtime import RuntimeSettings
from lth.lottery.layout import read_metrics, read_run_info
from lth.lottery.round import Round, run_round
from lth.tracking.store import TAG_ROUND_HASH
from tests.helpers import Project

WORLD = 2
# Two trials of 100 iterations, an evaluation and a checkpoint every 50: trial 0 is stopped partway.
TRAINING = {"training.iterations": 100, "training.eval_every": 50, "training.test_every": 50, "trials": 2}
CHANGES = TRAINING | {"runtime.threads": 1, "runtime.checkpoint_seconds": 0}
# |DDP - one process| of the test accuracy. Seeds 0-7 of this network reach 0.896 to 0.923 (std 1.0 point);
# DDP's other float summation order moved it by at most 0.05 points (docs/distributed.md). Half a point is
# well inside the seed-to-seed noise, and ten times the float effects.
ACCURACY_TOLERANCE = 0.005
STOP_SIGNAL_AT = 75  # rank 1 receives SIGTERM here; the ranks agree at the next multiple of STOP_CHECK_EVERY
STOPPED_AT = -(-STOP_SIGNAL_AT // distributed.STOP_CHECK_EVERY) * distributed.STOP_CHECK_EVERY  # 80


def open_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(checkpoints: Path, processes: int = WORLD) -> RuntimeSettings:
    return RuntimeSettings(
        torch.device("cpu"), threads=1, workers=1, quiet=True, checkpoint_seconds=0, checkpoint_dir=checkpoints,
        processes_per_node=processes,
    )  # fmt: skip


def _rank(local_rank: int, port: int, doc: dict[str, Any], tmp: Path, data_dir: Path) -> None:
    """One rank, as torchrun starts it (its environment, the stage's `process_group`), training four runs of
    round 0: a/ (both trials), b/ (trial 0 again), stopped/ (trial 0, stopped by a SIGTERM to rank 1 alone at
    STOP_SIGNAL_AT), then stopped/ again, which resumes. Each rank has its own runs/, checkpoint directory and
    log (round 0 reads no runs/), so that whatever rank 1 writes or prints shows."""
    os.environ.update(
        RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CI="1",
    )  # fmt: skip
    sys.stderr = open(tmp / f"rank{local_rank}.log", "w", buffering=1)  # noqa: SIM115 (the process's life)
    torch.set_num_threads(1)
    hp = config.from_dict(doc)
    with distributed.process_group(settings(tmp / f"ckpt_rank{local_rank}")) as s:

        def round_0(name: str, trials: list[int] | None = None) -> None:
            run_round(Round(hp, "ticket", 0, tmp / name / f"rank{local_rank}", data_dir), s, trials)

        round_0("a")
        round_0("b", [0])
        restore = signal_at(STOP_SIGNAL_AT) if local_rank == 1 else None
        try:
            round_0("stopped", [0])
            raise AssertionError("a SIGTERM to rank 1 did not stop the round")
        except Stopped as e:
            if local_rank == 0:
                print(f"lth: {e}", file=sys.stderr)  # as the stage reports it
        if restore:
            restore()
        round_0("stopped", [0])
        with pytest.raises(distributed.DistributedError, match=r"disagree on the rank \(rank 0: 0, rank 1: 1\)"):
            distributed.check_same(local_rank, "the rank")


def signal_at(iteration: int) -> Callable[[], None]:
    """SIGTERM this process once it has trained `iteration` iterations (a stop request between two
    evaluations, on this rank alone); returns what undoes it."""
    after_step = training._Run.after_step

    def and_signal(self: training._Run, loss: torch.Tensor) -> None:
        after_step(self, loss)
        if self.state["iteration"] == iteration:
            os.kill(os.getpid(), signal.SIGTERM)

    training._Run.after_step = and_signal
    return lambda: setattr(training._Run, "after_step", after_step)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / "final.pt", weights_only=True)


def md5(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.md5()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The four runs of `_rank`, trained by 2 ranks once per module: (their directory, the params)."""
    from tests.conftest import LENET_TINY
    from tests.helpers import with_changes

    doc = with_changes(LENET_TINY, CHANGES)
    tmp = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.start_processes(
        _rank, args=(open_port(), doc, tmp, mnist_dir), nprocs=WORLD, start_method="spawn"
    )
    return tmp, doc


def trial(runs: Path, t: int) -> Path:
    return runs / "ticket" / "round_00" / f"trial_{t}"


@pytest.mark.mnist
def test_a_ddp_round_is_deterministic_and_within_noise_of_one_process(
    ddp_runs: tuple[Path, dict[str, Any]], mnist_dir: Path, tmp_path: Path
) -> None:
    tmp, doc = ddp_runs
    hp = config.from_dict(doc)
    one = tmp_path / "one"
    run_round(Round(hp, "ticket", 0, one, mnist_dir), settings(tmp_path / "ckpt", processes=1))
    a, b = trial(tmp / "a" / "rank0", 0), trial(tmp / "b" / "rank0", 0)
    assert md5(weights(a)) == md5(weights(b)), "two DDP runs gave different weights"
    assert (a / "curve.csv").read_bytes() == (b / "curve.csv").read_bytes()
    for t in range(hp.trials):  # the group trained the round's trials one after another
        ddp, single = read_metrics(trial(tmp / "a" / "rank0", t)), read_metrics(trial(one, t))
        assert ddp["mask_md5"] == single["mask_md5"]
        gap = abs(ddp["test_accuracy_final"] - single["test_accuracy_final"])
        w, w1 = weights(trial(tmp / "a" / "rank0", t)), weights(trial(one, t))
        print(f"trial {t}: test accuracy DDP {ddp['test_accuracy_final']:.4f}, one process "
              f"{single['test_accuracy_final']:.4f}; max abs weight difference "
              f"{max(float((w[k] - w1[k]).abs().max()) for k in w):.3g}")  # fmt: skip
        assert gap <= ACCURACY_TOLERANCE, f"DDP's test accuracy is {gap:.4f} from one process's"
    assert read_run_info(a)["environment"]["processes"] == WORLD
    assert "processes" not in read_run_info(trial(one, 0))["environment"]


@pytest.mark.mnist
def test_a_stop_on_one_rank_stops_every_rank_and_the_round_resumes_bit_identically(
    ddp_runs: tuple[Path, dict[str, Any]],
) -> None:
    tmp, _ = ddp_runs
    log = (tmp / "rank0.log").read_text()
    stopped_at = STOPPED_AT  # past the checkpoint at 50, with a partial train loss to keep
    assert f"interrupted (signal {int(signal.SIGTERM)}) at iteration {stopped_at}; checkpoint saved" in log, log
    assert log.count(f"resuming ticket round 0 trial 0 from iteration {stopped_at} ") == 1, log
    resumed, uninterrupted = trial(tmp / "stopped" / "rank0", 0), trial(tmp / "a" / "rank0", 0)
    assert md5(weights(resumed)) == md5(weights(uninterrupted))
    assert (resumed / "curve.csv").read_bytes() == (uninterrupted / "curve.csv").read_bytes()
    assert not list((tmp / "ckpt_rank0").glob("*.pt")), "a finished round deletes its checkpoint"


@pytest.mark.mnist
def test_rank_0_writes_and_prints_and_the_other_ranks_do_not(ddp_runs: tuple[Path, dict[str, Any]]) -> None:
    tmp, _ = ddp_runs
    assert (tmp / "rank0.log").read_text() and read_metrics(trial(tmp / "a" / "rank0", 1))
    assert [p.name for p in tmp.rglob("*rank1*")] == ["rank1.log"], "rank 1 wrote outputs or checkpoints"
    assert (tmp / "rank1.log").read_text() == ""


# ---------------------------------------------------------------------------------------- the launcher


def test_the_runtime_keys_choose_torchrun_arguments() -> None:
    env = {"LTH_PROCESSES_PER_NODE": "4"}
    one_node = runtime.resolve({"processes_per_node": 2}, Path("ckpt"), env)
    assert one_node.world_size == 4 and one_node.workers_for(trials=5) == 1
    assert distributed.torchrun_args(one_node, ["stages/train_round.py", "--round", "1"], "job") == [
        "--standalone", "--nproc-per-node", "4", "--max-restarts", "0", "stages/train_round.py", "--round", "1"
    ]  # fmt: skip
    two_nodes = runtime.resolve({"processes_per_node": 2, "nodes": 2, "rdzv_endpoint": "node0:29400"}, Path("c"), {})
    assert distributed.torchrun_args(two_nodes, ["s.py"], "job")[:8] == [
        "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job"
    ]  # fmt: skip
    with pytest.raises(runtime.SettingsError, match="runtime.rdzv_endpoint"):
        runtime.resolve({"nodes": 2}, Path("ckpt"), {})
    with pytest.raises(runtime.SettingsError, match="LTH_PROCESSES_PER_NODE='0' must be a whole number >= 1"):
        runtime.resolve({}, Path("ckpt"), {"LTH_PROCESSES_PER_NODE": "0"})


def test_a_torchrun_child_trains_where_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage re-launches only from outside torchrun: its ranks (RANK set) train."""
    many = RuntimeSettings(torch.device("cpu"), processes_per_node=2)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.launch_needed(many) and not distributed.launch_needed(RuntimeSettings(torch.device("cpu")))
    monkeypatch.setenv("RANK", "1")
    assert not distributed.launch_needed(many)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not any(path.glob("*.pt")):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    assert any(path.glob("*.pt")), f"no checkpoint in {path} within {timeout} s"


@pytest.mark.slow  # about 3 minutes on 2 busy cores: four torchrun launches
@pytest.mark.mnist
def test_c_the_stage_under_torchrun_resumes_after_a_kill(
    workdir: Callable[..., Project], lenet_params: Callable[..., dict]
) -> None:
    """`runtime.processes_per_node: 2` makes the unchanged stage command train under torchrun; SIGKILL of
    its process group once a checkpoint exists kills every rank (none trains on as an orphan), and the same
    command then resumes, and finishes with the weights of an uninterrupted run."""
    params = lenet_params(
        {"training.iterations": 400, "training.eval_every": 50, "runtime.processes_per_node": 2}
        | {k: v for k, v in CHANGES.items() if k.startswith("runtime.")}
    )
    killed, reference = workdir(params, "killed"), workdir(params, "reference")
    for p in (killed, reference):
        assert p.python("stages/prepare.py").returncode == 0
    command = [sys.executable, "stages/train_round.py", "--round", "0"]
    proc = subprocess.Popen(
        command, cwd=killed.root, env=killed.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    wait_for(killed.root / "ckpt", proc)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == WORLD, "torchrun starts one process per rank"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    psutil.wait_procs(ranks, timeout=30)  # the ranks die with their launcher (they are in sessions of their own)
    assert not [r for r in ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]
    (ckpt,) = (killed.root / "ckpt").glob("*.pt")
    at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 0 < at < 400 and not (killed.root / "runs" / "ticket" / "round_00" / "trial_0").exists()

    done = killed.python(*command[1:])
    assert f"resuming ticket round 0 from iteration {at} " in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not ckpt.exists()
    reference.python(*command[1:])
    out, ref = (trial(p.root / "runs", 0) for p in (killed, reference))
    assert md5(weights(out)) == md5(weights(ref)), "the resumed run differs from an uninterrupted one"
    assert read_run_info(out)["environment"]["processes"] == WORLD
    assert logged_runs(killed) == [config.load(killed.root / "params.yaml").round_hash(0, 0, "ticket")]  # by rank 0


def logged_runs(p: Project) -> list[str]:
    """The round hashes of the trained networks in the project's MLflow store, one per run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(p.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r.data.tags[TAG_ROUND_HASH] for r in runs if TAG_ROUND_HASH in r.data.tags]
