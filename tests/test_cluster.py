"""IMP sweeps on a real local Ray cluster (lth.pipeline.cluster): a head and two worker nodes of one CPU each
(`ray start --block`, so that ending each start process stops its node), a bare git repo as the project's
remote, a plain directory as its DVC remote and an MLflow server on sqlite that every task logs to. One worker
node is killed while it trains; the sweep must still match the same experiments run locally one after another,
and be complete in the DVC remote (a fresh clone pulls it) and in MLflow (one run per round)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from lth.core.config import read_yaml
from lth.core.hparams import flatten
from lth.pipeline import cluster
from tests.helpers import Project

RAY = str(Path(sys.executable).parent / "ray")
GRID = ["training.lr=0.0012,0.006", "training.seed=0,1"]  # 4 experiments


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that nothing listens on (held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ------------------------------------------------------------------------------------------ fast: errors


def test_a_wrong_address_fails_in_seconds_with_one_line(free_port: int) -> None:
    start = time.monotonic()
    with pytest.raises(cluster.ClusterError) as e:
        cluster.run_sweep("unused.git", "HEAD", [{}], f"127.0.0.1:{free_port}")
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert "\n" not in message and f"127.0.0.1:{free_port}" in message and "ray start --head" in message


@pytest.mark.parametrize("address", ["localhost", "10.0.0.5:port", ":6379"])
def test_an_address_that_is_no_host_and_port_is_refused_in_one_line(address: str) -> None:
    with pytest.raises(cluster.ClusterError, match="expected HOST:PORT") as e:
        cluster.check_address(address)
    assert "\n" not in str(e.value)


def test_a_grid_is_expanded_as_dvc_expands_it() -> None:
    assert cluster.expand_grid(["training.lr=1e-3,3e-4", "trials=2", "training.lr_milestones=[100,200]"]) == [
        {"training.lr": "0.001", "trials": "2", "training.lr_milestones": "[100,200]"},
        {"training.lr": "0.0003", "trials": "2", "training.lr_milestones": "[100,200]"},
    ]
    assert len(cluster.expand_grid(GRID)) == 4
    assert cluster.expand_grid([]) == [{}]


def test_a_grid_dvc_cannot_read_is_one_line() -> None:
    with pytest.raises(cluster.ClusterError, match="not a sweep DVC can read") as e:
        cluster.expand_grid(["training.lr=[1,"])
    assert "\n" not in str(e.value)


def test_a_grid_is_checked_against_the_params_before_it_is_submitted(tmp_path: Path, xor_params) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(xor_params()))
    hashes = cluster.check_grid(params, cluster.expand_grid(GRID))
    assert len(set(hashes)) == 4
    with pytest.raises(cluster.ClusterError, match="training.lrr") as e:
        cluster.check_grid(params, cluster.expand_grid(["training.lrr=1e-3"]))
    assert "\n" not in str(e.value)
    with pytest.raises(cluster.ClusterError, match="are one experiment") as e:
        cluster.check_grid(params, cluster.expand_grid(["pruning.rounds=1,2"]))
    assert "\n" not in str(e.value)


def test_experiment_names_are_stable_and_distinct() -> None:
    a, b = cluster.expand_grid(["training.lr=1e-3,3e-4"])
    assert cluster.experiment_name(a) == cluster.experiment_name(dict(a))
    assert cluster.experiment_name(a) != cluster.experiment_name(b)


# ------------------------------------------------------------------------------- slow: a real cluster


class RayCluster:
    """A head and worker nodes on this machine, each a `ray start --block` process of ours."""

    def __init__(self, temp_dir: Path):
        self.temp_dir, self.nodes = temp_dir, []
        self.port, self.dashboard, self.client = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"

    def start_node(self, head: bool) -> subprocess.Popen:
        agent, grpc, runtime_env, metrics = free_ports(4)
        role = (
            ["--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir), "--include-dashboard", "false"]
            + ["--dashboard-port", str(self.dashboard), "--ray-client-server-port", str(self.client)]
            if head
            else ["--address", self.address]
        )
        log = open(self.temp_dir / f"node{len(self.nodes)}.log", "w")
        node = subprocess.Popen(
            [RAY, "start", "--block", "--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
            + ["--object-store-memory", str(100 * 2**20), "--dashboard-agent-listen-port", str(agent)]
            + ["--dashboard-agent-grpc-port", str(grpc), "--runtime-env-agent-port", str(runtime_env)]
            + ["--metrics-export-port", str(metrics), *role],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes.append(node)
        deadline = time.monotonic() + 180
        while "block forever" not in Path(log.name).read_text():
            assert node.poll() is None, f"ray start exited: {Path(log.name).read_text()[-2000:]}"
            assert time.monotonic() < deadline, "ray start did not start its node within 180 s"
            time.sleep(0.5)
        return node

    def raylet(self, node: subprocess.Popen) -> psutil.Process:
        return next(p for p in psutil.Process(node.pid).children() if p.name() == "raylet")

    def stop(self) -> None:
        """SIGTERM each node's `ray start` (it stops its processes), then SIGKILL what is left of them."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.terminate()
        for node in reversed(self.nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


@contextlib.contextmanager
def local_ray_cluster(workers: int = 2) -> Iterator[RayCluster]:
    """A head and `workers` worker nodes of one CPU each on this machine, stopped at the end."""
    # Ray's Unix sockets live under its temp dir: a short path (a socket path holds 107 bytes).
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:
        c = RayCluster(Path(tmp))
        try:
            c.start_node(head=True)
            for _ in range(workers):
                c.start_node(head=False)
            yield c
        finally:
            c.stop()


@contextlib.contextmanager
def local_mlflow_server(directory: Path) -> Iterator[str]:
    """An MLflow server on sqlite in `directory` that proxies the artifacts it keeps (as a team's server
    would); yields its URI."""
    port = free_ports(1)[0]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}"]
        + ["--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture
def ray_cluster() -> Iterator[RayCluster]:
    with local_ray_cluster() as c:
        yield c


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    with local_mlflow_server(tmp_path) as uri:
        yield uri


def shared_project(p: Project, tmp_path: Path) -> Path:
    """Give project `p` a committed DVC remote (a plain directory) and a git remote (a bare clone); returns
    the git remote."""
    p.dvc("remote", "add", "--default", "shared", str(tmp_path / "dvc-remote"))
    p.run("git", "commit", "-qam", "the team's DVC remote")
    origin = tmp_path / "origin.git"
    p.run("git", "clone", "--quiet", "--bare", str(p.root), str(origin))
    p.run("git", "remote", "add", "origin", str(origin))
    return origin


def train_round_process(raylet: psutil.Process, round_index: int) -> psutil.Process | None:
    """The stage process training round `round_index` among the raylet's descendants (its workers' commands)."""
    for proc in raylet.children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if any(c.endswith("train_round.py") for c in cmd) and cmd[-2:] == ["--round", str(round_index)]:
            return proc
    return None


def live_command(proc: psutil.Process) -> str:
    """The command of `proc` while it runs (not a zombie), else ""."""
    try:
        return " ".join(proc.cmdline()[:4]) if proc.status() != psutil.STATUS_ZOMBIE else ""
    except psutil.Error:
        return ""


def kill_a_training_node(c: RayCluster, killed: dict, done: threading.Event) -> None:
    """Once the sweep's driver has joined: wait for a worker node (not the driver's) to start training round
    1 of an experiment, then SIGKILL its raylet (the node dies) and record which experiment it was."""
    import ray

    while not ray.is_initialized():
        if done.wait(0.2):
            return
    driver_node = ray.get_runtime_context().get_node_id()
    workers = [n for n in c.nodes[1:] if f"--node_id={driver_node}" not in c.raylet(n).cmdline()]
    while not done.wait(0.1):
        for node in workers:
            raylet = c.raylet(node)
            stage = train_round_process(raylet, 1)
            if stage is not None:
                killed["params"] = flatten(read_yaml((Path(stage.cwd()) / "params.yaml").read_text()))
                started = raylet.children(recursive=True)  # its workers, their guards, DVC, the stage
                raylet.kill()
                _, alive = psutil.wait_procs(started, timeout=10)
                killed["survivors"] = [cmd for cmd in map(live_command, alive) if cmd]
                return


def local_rounds(p: Project, experiment: dict[str, str]) -> dict[str, dict]:
    """The experiment run the local way (`lth run -S`, in the user's workspace), its metrics by kind/round/trial."""
    p.lth("run", *(a for k, v in experiment.items() for a in ("-S", f"{k}={v}")))
    return cluster.read_rounds(p.root)


@pytest.mark.slow
def test_a_sweep_on_a_cluster_survives_a_dead_node_and_matches_local_runs(
    ray_cluster: RayCluster,
    mlflow_server: str,
    make_project: Callable[..., Project],
    xor_params,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = make_project(xor_params())
    origin = shared_project(p, tmp_path)
    commit = p.run("git", "rev-parse", "HEAD").stdout.strip()
    experiments = cluster.expand_grid(GRID)

    killed: dict = {}
    done = threading.Event()
    killer = threading.Thread(target=kill_a_training_node, args=(ray_cluster, killed, done))
    killer.start()
    try:
        results = cluster.run_sweep(
            str(origin), commit, experiments, ray_cluster.address, env={"MLFLOW_TRACKING_URI": mlflow_server}
        )
    finally:
        done.set()
        killer.join()

    assert [r.error for r in results] == [None] * 4
    assert "params" in killed, "no worker node was seen training round 1"
    # Nothing the dead node's workers started lives on (the guard ended their commands' process groups).
    assert killed["survivors"] == []
    # The retried experiment resumed from what its first attempt pushed: round 0 came from the run-cache.
    (resumed,) = [r for r in results if all(killed["params"][k] == float(v) for k, v in r.overrides.items())]
    assert resumed.stages["ticket_round_00"] == "restored" and resumed.stages["ticket_round_01"] == "ran"
    assert all(set(r.seconds) == set(cluster.PHASES) and r.seconds["train"] > 0 for r in results)

    # The same experiments, run locally one after another, give the same metrics.
    local = make_project(xor_params(), "local")
    for r in results:
        assert r.rounds == local_rounds(local, r.overrides), r.overrides
        assert {m["hash"] for m in r.rounds.values()} == {r.hash}

    assert_complete_in_the_dvc_remote(origin, results, tmp_path, monkeypatch)
    assert_one_mlflow_run_per_round(mlflow_server, results)


def assert_complete_in_the_dvc_remote(
    origin: Path, results: list[cluster.ExperimentResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh clone pulls each experiment (git refs, then its outputs from the DVC remote) and `lth sweep`'s
    reader finds them all."""
    from lth.reporting import sweep

    fresh = Project(tmp_path / "fresh")
    Project(tmp_path).run("git", "clone", "--quiet", str(origin), str(fresh.root))
    cluster.pull_experiments([r.name for r in results], str(origin), fresh.root)
    monkeypatch.chdir(fresh.root)  # `lth sweep` runs in the project (its reader takes the per-round tables from there)
    found, _ = sweep.experiments(sweep.exp_show(fresh.root))
    revs = {e.name: e.rev for e in found}
    assert sorted(revs) == sorted(r.name for r in results)
    for r in results:
        fresh.run("git", "checkout", "--quiet", "--detach", revs[r.name])
        fresh.dvc("pull")  # every output of the experiment, from the DVC remote
        assert cluster.read_rounds(fresh.root) == r.rounds
        assert (fresh.root / "runs" / "ticket" / "round_01" / "trial_0" / "final.pt").exists()


def assert_one_mlflow_run_per_round(uri: str, results: list[cluster.ExperimentResult]) -> None:
    from lth.tracking.store import TAG_ROUND_HASH, Tracker

    tracker = Tracker(uri)
    for r in results:
        runs = tracker.find_runs(r.hash)
        assert sorted(run.data.tags["lth.round"] for run in runs) == ["0", "1"], r.overrides
        assert len({run.data.tags[TAG_ROUND_HASH] for run in runs}) == 2
        assert all(run.info.status == "FINISHED" for run in runs)
        by_round = {int(run.data.tags["lth.round"]): run.data.metrics for run in runs}
        for m in r.rounds.values():
            assert by_round[m["round"]]["test_accuracy_at_early_stop"] == pytest.approx(
                m["test_accuracy_at_early_stop"]
            )
