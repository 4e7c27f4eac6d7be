"""IMP sweeps on a real local Ray cluster (lth.pipeline.cluster, `lth sweep run --executor ray`): a head and two
worker nodes of one CPU each (`ray start --block`, so that ending each start process stops its node), a bare git
repo as the project's remote, and a team's services (scripts/team-infra): a DVC remote over SSH and an MLflow
server on PostgreSQL that asks for a login. One worker node is killed while it trains; the sweep must still match
the same experiments run in DVC's local queue (`lth sweep run`), and be complete in the DVC remote (a fresh clone
pulls it) and in MLflow (one run per round hash), with the MLflow password in none of the files."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from lth.core.config import read_yaml
from lth.core.hparams import flatten
from lth.pipeline import cluster
from tests.helpers import ROOT, Project

RAY = str(Path(sys.executable).parent / "ray")
GRID = ["training.lr=0.0012,0.006", "training.seed=0,1"]  # 4 experiments
GRID_ARGS = [arg for item in GRID for arg in ("-S", item)]
INFRA = ROOT / "scripts" / "team-infra"


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
    """A head and worker nodes on this machine, each a `ray start --block` process of ours, in environment `env`."""

    def __init__(self, temp_dir: Path, env: dict[str, str] | None = None):
        self.temp_dir, self.env, self.nodes = temp_dir, env, []
        self.port, self.dashboard, self.client = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"

    def start_node(self, head: bool) -> subprocess.Popen:
        """Start a node, again (up to 3 times in all) when Ray gave up waiting for its raylet to register: `ray
        start` waits 30 s, which a machine busy with other work can exceed."""
        for attempt in range(3):
            node, log = self.launch(head)
            deadline = time.monotonic() + 180
            while "block forever" not in log.read_text():
                if node.poll() is not None:
                    if "timed out during startup" in log.read_text() and attempt < 2:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(node.pid, signal.SIGKILL)  # what that start left behind
                        break
                    raise AssertionError(f"ray start exited: {log.read_text()[-2000:]}")
                assert time.monotonic() < deadline, "ray start did not start its node within 180 s"
                time.sleep(0.5)
            else:
                self.nodes.append(node)
                return node
        raise AssertionError("unreachable")

    def launch(self, head: bool) -> tuple[subprocess.Popen, Path]:
        """A `ray start --block` of a head or worker node, and its log."""
        agent, grpc, runtime_env, metrics = free_ports(4)
        role = (
            ["--head", "--port", str(self.port), "--temp-dir", str(self.temp_dir), "--include-dashboard", "false"]
            + ["--dashboard-port", str(self.dashboard), "--ray-client-server-port", str(self.client)]
            if head
            else ["--address", self.address]
        )
        log = self.temp_dir / f"node{len(self.nodes)}.log"
        with open(log, "w") as out:
            node = subprocess.Popen(
                [RAY, "start", "--block", "--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
                + ["--object-store-memory", str(100 * 2**20), "--dashboard-agent-listen-port", str(agent)]
                + ["--dashboard-agent-grpc-port", str(grpc), "--runtime-env-agent-port", str(runtime_env)]
                + ["--metrics-export-port", str(metrics), *role],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        return node, log

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
def local_ray_cluster(workers: int = 2, env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    """A head and `workers` worker nodes of one CPU each on this machine, stopped at the end."""
    # Ray's Unix sockets live under its temp dir: a short path (a socket path holds 107 bytes).
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:
        c = RayCluster(Path(tmp), env)
        try:
            c.start_node(head=True)
            for _ in range(workers):
                c.start_node(head=False)
            yield c
        finally:
            c.stop()


@dataclass
class Team:
    dir: Path
    env: dict[str, str]  # what `source DIR/env` sets: the MLflow server and the member's login, the DVC remote
    base: dict[str, str]  # this environment without MLflow's settings, HOME the one the services trust


@contextlib.contextmanager
def team_services(home: Path) -> Iterator[Team]:
    """scripts/team-infra's services, started with HOME=`home` (its known_hosts trusts their SSH server), whose
    SSH config gives the member's key to that server, as a node's own configuration would; stopped at the end."""
    d = Path(tempfile.mkdtemp(prefix="lth-team-"))  # directly under /tmp: as root, postgres must reach it
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"HOME": str(home)}
    try:
        started = subprocess.run([sys.executable, str(INFRA), "start", "--dir", str(d)], env=base, text=True)
        assert started.returncode == 0, "".join(f.read_text(errors="replace")[-3000:] for f in d.glob("*.log"))
        env = {}
        for line in (d / "env").read_text().splitlines():
            if line.startswith("export "):
                key, value = shlex.split(line)[1].split("=", 1)
                env[key] = value
        (home / ".ssh" / "config").write_text(f"Host 127.0.0.1\n  IdentityFile {env['LTH_TEAM_SSH_KEY']}\n")
        yield Team(d, env, base)
    finally:
        subprocess.run([sys.executable, str(INFRA), "stop", "--dir", str(d)], env=base, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def team(tmp_path: Path) -> Iterator[Team]:
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    with team_services(tmp_path / "home") as t:
        yield t


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
    """Wait for a worker node to start training round 1 of an experiment, then SIGKILL its raylet (the node
    dies) and record which experiment it was. Not the head: the sweep's driver joins it (Ray's choice among
    the nodes of one host), and its death would end the sweep."""
    while not done.wait(0.1):
        for node in c.nodes[1:]:
            raylet = c.raylet(node)
            stage = train_round_process(raylet, 1)
            if stage is not None:
                killed["params"] = flatten(read_yaml((Path(stage.cwd()) / "params.yaml").read_text()))
                started = raylet.children(recursive=True)  # its workers, their guards, DVC, the stage
                raylet.kill()
                _, alive = psutil.wait_procs(started, timeout=10)
                killed["survivors"] = [cmd for cmd in map(live_command, alive) if cmd]
                return


def sweep_table(p: Project) -> list[dict[str, str]]:
    """`lth sweep report`'s table of the project's experiments (their commits aside), by experiment and round."""
    p.lth("sweep", "report", "--out", "results/sweep")
    rows = list(csv.DictReader((p.root / "results" / "sweep.csv").read_text().splitlines()))
    table = [{k: v for k, v in r.items() if k != "rev"} for r in rows]
    return sorted(table, key=lambda r: (r["experiment"], r["round"]))


@pytest.mark.slow
def test_a_sweep_on_a_cluster_survives_a_dead_node_and_matches_local_runs(
    team: Team, make_project: Callable[..., Project], xor_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = make_project(xor_params())
    p.env.update({"HOME": team.base["HOME"], **{k: v for k, v in team.env.items() if k.startswith("MLFLOW_")}})
    origin = tmp_path / "origin.git"
    p.run("git", "clone", "--quiet", "--bare", str(p.root), str(origin))
    p.run("git", "remote", "add", "origin", str(origin))
    p.run("git", "fetch", "--quiet", "origin")
    experiments = cluster.expand_grid(GRID)
    names = [cluster.experiment_name(e) for e in experiments]
    sweep = ["sweep", "run", "--executor", "ray", *GRID_ARGS, "--remote", team.env["LTH_TEAM_DVC_REMOTE"]]

    with local_ray_cluster(env=team.base) as c:  # the nodes' environment: no MLflow login, the team's SSH setup
        no_gpu = p.lth(*sweep, "--address", c.address, "--gpus-per-task", "1", check=False)
        assert no_gpu.returncode == 1 and "Traceback" not in no_gpu.stderr, no_gpu.stderr
        assert re.search(r"^Error: no node of the Ray cluster at .* has 1 CPUs and 1 GPUs", no_gpu.stderr, re.M)
        killed: dict = {}
        done = threading.Event()
        killer = threading.Thread(target=kill_a_training_node, args=(c, killed, done))
        killer.start()
        try:
            start = time.monotonic()
            ran = p.lth(*sweep, "--address", c.address, check=False, timeout=1800)
            print(f"the sweep on the cluster: {time.monotonic() - start:.0f} s\n{ran.stdout}{ran.stderr}")
        finally:
            done.set()
            killer.join()
        assert ran.returncode == 0, ran.stdout + ran.stderr
        secret = team.env["MLFLOW_TRACKING_PASSWORD"]
        # Not in Ray's logs, the workspace, the DVC remote, MLflow's artifacts or any commit of the git remote.
        assert files_holding([c.temp_dir, p.root, team.dir / "remote", team.dir / "artifacts"], secret) == []
        assert secret not in p.run("git", "-C", str(origin), "log", "--all", "--patch").stdout

    assert "params" in killed, "no worker node was seen training round 1"
    # Nothing the dead node's workers started lives on (the guard ended their commands' process groups).
    assert killed["survivors"] == []
    # The retried experiment resumed from what its first attempt pushed: round 0 came from the run-cache.
    (resumed,) = [e for e in experiments if all(killed["params"][k] == float(v) for k, v in e.items())]
    line = next(ln for ln in ran.stderr.splitlines() if f"done; {cluster.experiment_name(resumed)} (" in ln)
    trained, restored = re.search(r"; ran (.*); restored (.*)$", line).groups()
    assert "ticket_round_01" in trained.split(", ") and "ticket_round_00" in restored.split(", "), line
    assert sorted(re.findall(r"lth: (\d) of 4 done; ", ran.stderr)) == ["1", "2", "3", "4"], ran.stderr

    # The same experiments in DVC's queue on this machine: the same tables, the same networks.
    local = make_project(xor_params(), "local")
    local.lth("sweep", "run", *GRID_ARGS, timeout=1800)
    assert sweep_table(p) == sweep_table(local) and len(sweep_table(local)) == 4 * 2
    rounds = {}
    for name in names:
        local.dvc("exp", "apply", name)
        rounds[name] = cluster.read_rounds(local.root)
    assert_complete_in_the_dvc_remote(origin, rounds, team, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team.env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    assert_one_mlflow_run_per_round(team.env["MLFLOW_TRACKING_URI"], rounds, secret)


def files_holding(paths: list[Path], text: str) -> list[str]:
    """Every file under `paths` whose bytes contain `text`."""
    files = [f for p in paths for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
    return [str(f) for f in files if text.encode() in f.read_bytes()]


def assert_complete_in_the_dvc_remote(origin: Path, rounds: dict[str, dict], team: Team, tmp_path: Path) -> None:
    """A fresh clone pulls each experiment (git refs, then its outputs from the team's DVC remote) and `lth sweep
    report`'s reader finds them all, each with the networks of the local run."""
    from lth.reporting import sweep

    fresh = Project(tmp_path / "fresh")
    fresh.env["HOME"] = team.base["HOME"]  # its SSH configuration reaches the team's DVC remote
    Project(tmp_path).run("git", "clone", "--quiet", str(origin), str(fresh.root))
    fresh.dvc("remote", "add", "--local", "--default", "team", team.env["LTH_TEAM_DVC_REMOTE"])
    cluster.pull_experiments(list(rounds), str(origin), fresh.root)
    found, _ = sweep.experiments(sweep.exp_show(fresh.root), fresh.root)  # read from the repo, wherever we are
    revs = {e.name: e.rev for e in found}
    assert sorted(revs) == sorted(rounds)
    for name, expected in rounds.items():
        fresh.run("git", "checkout", "--quiet", "--detach", revs[name])
        fresh.dvc("pull")  # every output of the experiment, from the DVC remote
        assert cluster.read_rounds(fresh.root) == expected, name
        assert (fresh.root / "runs" / "ticket" / "round_01" / "trial_0" / "final.pt").exists()


def assert_one_mlflow_run_per_round(uri: str, rounds: dict[str, dict], secret: str) -> None:
    """Each experiment's networks in MLflow: one finished run per round hash, the local run's numbers, and the
    password in no param or tag."""
    from lth.tracking.store import TAG_ROUND_HASH, Tracker

    tracker = Tracker(uri)
    for name, by_path in rounds.items():
        (experiment_hash,) = {m["hash"] for m in by_path.values()}
        runs = tracker.find_runs(experiment_hash)
        assert sorted(run.data.tags["lth.round"] for run in runs) == ["0", "1"], name
        assert len({run.data.tags[TAG_ROUND_HASH] for run in runs}) == 2
        assert all(run.info.status == "FINISHED" for run in runs)
        by_round = {int(run.data.tags["lth.round"]): run.data.metrics for run in runs}
        for m in by_path.values():
            assert by_round[m["round"]]["test_accuracy_at_early_stop"] == pytest.approx(
                m["test_accuracy_at_early_stop"]
            )
        for run in [*runs, *tracker.find_trajectories(experiment_hash)]:
            assert not [v for v in (*run.data.params.values(), *run.data.tags.values()) if secret in v]
