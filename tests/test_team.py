"""A team's shared services, all real (scripts/team-infra): PostgreSQL under an MLflow server that asks for a
login and proxies artifacts, and a DVC remote on an SSH server. The services start once for the module (35-45 s
on 2 busy cores, most of it MLflow's server importing itself and creating its tables) and are stopped
afterwards, even on failure."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, Project, output_digests

INFRA = ROOT / "scripts" / "team-infra"
INSTALL = ROOT / "scripts" / "install-system-packages"


@dataclass
class Team:
    dir: Path
    script_env: dict[str, str]  # what started the services (the admin's password included)
    env: dict[str, str]  # what `source DIR/env` sets in a member's shell, and that shell's HOME
    passwords: dict[str, str]  # the admin's and the member's


def infra(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INFRA), *args], env=env, capture_output=True, text=True, timeout=600)


def sourced(env_file: Path) -> dict[str, str]:
    """The variables that `source env_file` exports."""
    words = (shlex.split(line)[1] for line in env_file.read_text().splitlines() if line.startswith("export "))
    return dict(word.split("=", 1) for word in words)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    # Directly under /tmp: as root, PostgreSQL runs as the postgres user, who cannot enter pytest's private dirs.
    d = Path(tempfile.mkdtemp(prefix="lth-team-"))
    home = tmp_path_factory.mktemp("home")  # the known_hosts entry the script adds and DVC reads: not the user's
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"HOME": str(home)}
    passwords = {"admin": secrets.token_urlsafe(18), "member": secrets.token_urlsafe(18)}
    script_env = base | {
        "LTH_TEAM_DIR": str(d),
        "MLFLOW_AUTH_ADMIN_PASSWORD": passwords["admin"],
        "MLFLOW_TRACKING_USERNAME": f"member-{secrets.token_hex(3)}",
        "MLFLOW_TRACKING_PASSWORD": passwords["member"],
    }
    try:
        started = infra("start", env=script_env)
        logs = "".join(f.read_text(errors="replace")[-3000:] for f in d.glob("*.log"))
        assert started.returncode == 0, started.stdout + started.stderr + logs
        yield Team(d, script_env, sourced(d / "env") | {"HOME": str(home)}, passwords)
    finally:
        infra("stop", env=script_env)
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------- the script


def test_status_of_services_never_started(tmp_path: Path) -> None:
    done = infra("status", "--dir", str(tmp_path / "none"), env=dict(os.environ))
    assert done.returncode == 3
    assert [line.split() for line in done.stdout.splitlines()] == [
        [s, "stopped"] for s in ("postgres", "mlflow", "ssh")
    ]


def test_start_refuses_a_busy_port_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = infra("start", "--dir", str(tmp_path / "t"), "--ssh-port", str(port), env=dict(os.environ))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"team-infra: port {port} for ssh is busy: stop what listens there (ss -ltnp 'sport = :{port}') "
        "or start with --ssh-port PORT"
    ]
    assert not (tmp_path / "t" / "postgres").exists() and not (tmp_path / "t" / "mlflow.pid").exists()


def test_install_system_packages_is_quick_when_all_are_present() -> None:
    query = ["dpkg-query", "-W", "-f=${Status}\n", "chromium", "postgresql", "openssh-server"]
    if (
        shutil.which("dpkg-query") is None
        or subprocess.run(query, capture_output=True, text=True).stdout.count("install ok installed") != 3
    ):
        pytest.skip("not every package is installed here: the script would install them")
    begin = time.monotonic()
    done = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "already installed" in done.stdout, done.stdout + done.stderr
    assert time.monotonic() - begin < 5


def test_start_again_changes_nothing_and_status_reports_each_service(team: Team) -> None:
    before = (team.dir / "env").read_text()
    again = infra("start", env=team.script_env)
    assert again.returncode == 0, again.stderr
    assert (team.dir / "env").read_text() == before
    status = infra("status", env=team.script_env)
    assert status.returncode == 0
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        [s, "running"] for s in ("postgres", "mlflow", "ssh")
    ]
    assert (team.dir / "env").stat().st_mode & 0o777 == 0o600
    assert (team.dir / "state.json").stat().st_mode & 0o777 == 0o600
    port = team.env["LTH_TEAM_DVC_REMOTE"].split(":")[2].split("/")[0]
    known = (Path(team.env["HOME"]) / ".ssh" / "known_hosts").read_text().splitlines()
    assert sum(line.startswith(f"[127.0.0.1]:{port} ") for line in known) == 1


# ------------------------------------------------------------------------------------------------ MLflow


def test_mlflow_refuses_a_client_without_a_valid_login(team: Team, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    url = team.env["MLFLOW_TRACKING_URI"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=60)
    assert refused.value.code == 401
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(url).search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team.env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + team.passwords["member"])
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(url).create_experiment(f"refused-{secrets.token_hex(4)}")


@pytest.fixture
def member(team: Team, monkeypatch: pytest.MonkeyPatch):
    """MLflow's client, logged in as the member the way a member's shell does: by environment."""
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, team.env[name])
    return MlflowClient(team.env["MLFLOW_TRACKING_URI"])


def test_a_member_logs_a_run_whose_artifact_reads_back(team: Team, member, tmp_path: Path) -> None:
    run = member.create_run(member.create_experiment(f"team-{secrets.token_hex(4)}"))
    member.log_param(run.info.run_id, "lr", "0.1")
    note = tmp_path / "note.bin"
    note.write_bytes(os.urandom(256))
    member.log_artifact(run.info.run_id, str(note))
    member.set_terminated(run.info.run_id)

    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # no path of the client's or the server's
    back = member.download_artifacts(run.info.run_id, "note.bin", str(tmp_path / "back"))
    assert Path(back).read_bytes() == note.read_bytes()
    assert [f.read_bytes() for f in (team.dir / "artifacts").rglob("note.bin")] == [note.read_bytes()]
    assert member.get_run(run.info.run_id).data.params == {"lr": "0.1"}


# ------------------------------------------------------------------------------------- a project shared


def files_holding(paths: list[Path], texts: list[str]) -> list[str]:
    """Every file among `paths` (or under those that are directories) whose bytes contain one of `texts`."""
    needles = [t.encode() for t in texts]
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return [str(f) for f in files if any(n in f.read_bytes() for n in needles)]


def test_a_member_shares_a_project_through_the_team_services(
    team: Team, member, trained_project: Callable[..., Project], xor_params, tmp_path: Path
) -> None:
    alice = trained_project(xor_params())  # rounds 0 and 1, trained by `dvc repro` (once per session)
    alice.env.update(team.env)
    alice.lth("sync-mlflow")  # lth's one MLflow writer logs every trained network to the team's server
    alice.dvc("remote", "add", "-d", "team", team.env["LTH_TEAM_DVC_REMOTE"])
    alice.dvc("remote", "modify", "--local", "team", "keyfile", team.env["LTH_TEAM_SSH_KEY"])
    alice.run("git", "add", "-A")
    alice.run("git", "commit", "-qm", "results")
    assert "pushed" in alice.dvc("push").stdout
    assert [f for f in (team.dir / "remote").rglob("*") if f.is_file()]  # on the SSH server's side

    bob = Project(tmp_path / "bob")
    bob.env.update(team.env)
    subprocess.run(["git", "clone", "-q", str(alice.root), str(bob.root)], check=True, env=bob.env)
    bob.dvc("remote", "modify", "--local", "team", "keyfile", team.env["LTH_TEAM_SSH_KEY"])
    bob.dvc("pull")
    assert output_digests(bob.root) == output_digests(alice.root) and output_digests(alice.root)
    assert "up to date" in bob.dvc("status").stdout  # every output as dvc.lock records it, results/ included

    experiments = [e.experiment_id for e in member.search_experiments() if e.name.startswith("lth/")]
    runs = member.search_runs(experiments)
    assert sorted(r.data.tags["lth.round"] for r in runs if "lth.round" in r.data.tags) == ["0", "1"]
    passwords = list(team.passwords.values())
    for r in runs:
        logged = [*r.data.params.items(), *r.data.tags.items()]
        assert not [kv for kv in logged if any(p in "=".join(kv) for p in passwords)]
        member.download_artifacts(r.info.run_id, "", str(tmp_path / "artifacts" / r.info.run_id))
    assert len(list((tmp_path / "artifacts").rglob("final.pt"))) == 2
    service_files = [f for f in team.dir.iterdir() if f.name != "env"]  # env: the member's login, by design
    assert files_holding([tmp_path / "artifacts", alice.root, bob.root, *service_files], passwords) == []
