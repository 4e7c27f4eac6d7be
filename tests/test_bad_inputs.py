"""Every bad input gets one clear line naming the problem and the fix, never a traceback (issue 11).

One table, one row per bad input: (case id, how the bad input is made, the command, a fragment of the message).
Each row runs on its own copy of one tiny XOR project trained once per session. `lth` commands run in-process
(click's test runner: a traceback would surface as an exception); stages run as users run them, through DVC
(`dvc repro --single-item -f STAGE`) in a subprocess. Every row asserts a non-zero exit status, the fragment
in the output, an `lth:` or `Error:` line, and no traceback."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

from lth.cli import main
from lth.core import config
from lth.core.datasets import DATASETS, DataError, check_labels
from tests.helpers import Project

MNIST_RAW = Path(os.environ.get("LTH_DATA_DIR", "data/raw")) / "MNIST" / "raw"
ROUND_0 = Path("runs/ticket/round_00/trial_0")
CLOSED_PORT = "{closed_port}"  # replaced by a port nothing listens on

Setup = Callable[[Project, Path], None]


# ----------------------------------------------------------------------------------------- bad inputs


def params(changes: dict[str, Any]) -> Setup:
    """params.yaml with `changes` (dotted keys)."""
    return lambda project, tmp: project.set_params(changes)


def params_bytes(make: Callable[[bytes], bytes]) -> Setup:
    """params.yaml's bytes rewritten by `make` (for what a YAML dump cannot write)."""

    def setup(project: Project, tmp: Path) -> None:
        path = project.root / "params.yaml"
        path.write_bytes(make(path.read_bytes()))

    return setup


def lenet_params(project: Project) -> None:
    """The project's params switched to LeNet-300-100 on MNIST (one round, as the XOR project's dvc.yaml)."""
    project.set_params(
        {"dataset.name": "mnist", "dataset.validation_size": 5000, "model.name": "lenet_300_100", "runtime.threads": 1}
    )


def mnist_root(tmp: Path, name: str, corrupt: Callable[[bytearray], None]) -> Path:
    """A data root whose MNIST/raw/ links the good MNIST files (the .gz archives too), but `name` is a copy
    corrupted by `corrupt`. The shared copy is only read."""
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNIST_RAW.iterdir():
        if f.name != name:
            (raw / f.name).symlink_to(f.resolve())
    data = bytearray((MNIST_RAW / name).read_bytes())
    corrupt(data)
    (raw / name).write_bytes(bytes(data))
    return tmp / "data"


def mnist_file(name: str, corrupt: Callable[[bytearray], None]) -> Setup:
    """The project switched to LeNet on MNIST, its LTH_DATA_DIR a `mnist_root` with `name` corrupted."""

    def setup(project: Project, tmp: Path) -> None:
        project.env["LTH_DATA_DIR"] = str(mnist_root(tmp, name, corrupt))
        lenet_params(project)

    return setup


def zero_a_pixel(data: bytearray) -> None:
    i = next(i for i in range(16, len(data)) if data[i])  # the first pixel that is not black
    data[i] = 0


def label_250(data: bytearray) -> None:
    data[data.index(7, 8)] = 250  # the first label 7 becomes 250


def bad_magic(data: bytearray) -> None:
    data[0:4] = (0x0803).to_bytes(4, "big")  # an image file's magic number in a label file


def wrong_mask(make: Callable[[Any], Any]) -> Setup:
    """Round 0's mask.pt replaced by `make(mask)` (a dict of tensors)."""

    def setup(project: Project, tmp: Path) -> None:
        path = project.root / ROUND_0 / "mask.pt"
        mask = torch.load(path, weights_only=True)
        path.unlink()  # a DVC output is a read-only link into the cache: write a new file
        torch.save(make(mask), path)

    return setup


def corrupt_prepared(project: Project, tmp: Path) -> None:
    path = project.root / "data" / "prepared" / "xor.pt"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


def write_file(relative: str, content: bytes) -> Setup:
    def setup(project: Project, tmp: Path) -> None:
        path = project.root / relative
        path.unlink(missing_ok=True)  # DVC outputs may be read-only links into the cache: write a new file
        path.write_bytes(content)

    return setup


def corrupt_metrics(project: Project, tmp: Path) -> None:
    path = project.root / ROUND_0 / "metrics.json"
    path.unlink()
    path.write_text("{not json")


def commit_results(project: Project, tmp: Path) -> None:
    """The trained workspace committed, so that `dvc exp show` lists an experiment with results (a sweep)."""
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "results")


def commit_results_without_claims(project: Project, tmp: Path) -> None:
    """Results committed as an evaluate stage from before the claims table left them."""
    (project.root / "results" / "plots" / "claims.csv").unlink()
    commit_results(project, tmp)


def pushed(then: Setup | None = None) -> Setup:
    """The trained workspace committed and pushed to `origin` (a bare repo), as a Ray sweep needs it; then `then`."""

    def setup(project: Project, tmp: Path) -> None:
        commit_results(project, tmp)
        project.run("git", "clone", "--quiet", "--bare", str(project.root), str(tmp / "origin.git"))
        project.run("git", "remote", "add", "origin", str(tmp / "origin.git"))
        project.run("git", "fetch", "--quiet", "origin")
        if then:
            then(project, tmp)

    return setup


def new_commit(project: Project, tmp: Path) -> None:
    project.run("git", "commit", "--allow-empty", "-qm", "not pushed")


def nothing(project: Project, tmp: Path) -> None:
    pass


@dataclass(frozen=True)
class Case:
    id: str
    setup: Setup
    command: tuple[str, ...]  # ("lth", ...) runs in-process, ("dvc", ...) in a subprocess
    expect: str | tuple[str, ...]  # fragment(s) of the message
    env: dict[str, str] = field(default_factory=dict)
    mnist: bool = False


LTH_PIPELINE = ("lth", "pipeline")  # validates params.yaml, then renders dvc.yaml: no training
ROUND_01 = ("dvc", "repro", "--single-item", "-f", "ticket_round_01")
PREPARE = ("dvc", "repro", "--single-item", "-f", "prepare")
MLFLOW_DOWN = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{CLOSED_PORT}"}
SWEEP_RAY = ("lth", "sweep", "run", "-S", "training.lr=1e-3,2e-3", "--executor", "ray", "--address")

CASES = [
    # params.yaml (validated by lth.core.config: `lth run`, `lth pipeline` and every stage load it)
    Case("lr-inf", params({"training.lr": float("inf")}), LTH_PIPELINE, ("training.lr", "finite")),
    Case("lr-nan", params({"training.lr": float("nan")}), LTH_PIPELINE, ("training.lr", "finite")),
    Case("lr-inf-stage", params({"training.lr": float("inf")}), ROUND_01, ("training.lr", "finite")),
    Case("seed-2^63", params({"training.seed": 2**63}), LTH_PIPELINE, "training.seed"),
    Case("validation-59999", params({"dataset.validation_size": 59999}), LTH_PIPELINE, "dataset.validation_size"),
    Case("batch-1e9", params({"training.batch_size": 1_000_000_000}), LTH_PIPELINE, "training.batch_size"),
    Case("device-tpu", params({"runtime.device": "tpu"}), LTH_PIPELINE, "runtime.device"),
    Case("processes-0", params({"runtime.processes_per_node": 0}), LTH_PIPELINE, "runtime.processes_per_node"),
    Case("processes-env-0", nothing, ROUND_01, "LTH_PROCESSES_PER_NODE='0'", {"LTH_PROCESSES_PER_NODE": "0"}),
    Case("batch-by-7-processes", params({"runtime.processes_per_node": 7}), ROUND_01, ("batch_size=60", "7 processes")),
    Case("nodes-2-no-rendezvous", params({"runtime.nodes": 2}), LTH_PIPELINE, "runtime.rdzv_endpoint"),
    Case("not-utf8", params_bytes(lambda b: b"\xff\xfe" + b), LTH_PIPELINE, "UTF-8"),
    Case("duplicate-key", params_bytes(lambda b: b + b"trials: 2\n"), LTH_PIPELINE, "duplicate key"),
    Case("eval-every", params({"training.eval_every": 500}), LTH_PIPELINE, "training.eval_every"),
    Case("empty", params_bytes(lambda b: b""), LTH_PIPELINE, "empty"),
    Case("instability-round-2", params({"instability.rounds": [2]}), LTH_PIPELINE, "instability.rounds: [2] not among"),
    Case("instability-points-2", params({"instability.points": 2}), LTH_PIPELINE, "instability.points: must be 3"),
    Case("params-device-file", nothing, ("lth", "locate", "--no-mlflow", "-p", "/dev/zero"), "/dev/zero"),
    # raw data (lth.core.datasets), through the prepare stage
    Case(
        "mnist-pixel-zeroed",
        mnist_file("t10k-images-idx3-ubyte", zero_a_pixel),
        PREPARE,
        "t10k-images-idx3-ubyte failed its md5 check",
        mnist=True,
    ),
    Case(
        "mnist-label-250",
        mnist_file("train-labels-idx1-ubyte", label_250),
        PREPARE,
        "train-labels-idx1-ubyte is corrupt: label 250",
        mnist=True,
    ),
    Case(
        "mnist-bad-magic",
        mnist_file("t10k-labels-idx1-ubyte", bad_magic),
        PREPARE,
        "t10k-labels-idx1-ubyte is corrupt or not an MNIST idx file: magic number 0x00000803",
        mnist=True,
    ),
    # a round's inputs, through its stage
    Case("prepared-corrupt", corrupt_prepared, ROUND_01, "data/prepared/xor.pt is corrupt or truncated"),
    Case(
        "mask-wrong-shape",
        wrong_mask(lambda m: {n: v[:1] for n, v in m.items()}),
        ROUND_01,
        f"{ROUND_0}/mask.pt: mask '",
    ),
    Case(
        "mask-wrong-dtype",
        wrong_mask(lambda m: {n: v.float() for n, v in m.items()}),
        ROUND_01,
        "has the wrong dtype torch.float32 (expected torch.bool",
    ),
    # the CLI with MLflow down, or writing where it must not or cannot
    Case("locate-mlflow-down", nothing, ("lth", "locate"), "is unreachable", MLFLOW_DOWN),
    Case(
        "compare-mlflow-down",
        nothing,
        ("lth", "compare", "params.yaml", "training.lr=3e-4"),
        "is unreachable",
        MLFLOW_DOWN,
    ),
    Case(
        "locate-mlflow-db-corrupt",
        write_file("mlflow.db", b"not a database" * 100),
        ("lth", "locate"),
        "mlflow.db failed",
    ),
    Case("sync-mlflow-down", nothing, ("lth", "sync-mlflow"), "is unreachable", MLFLOW_DOWN),
    Case("export-over-params", nothing, ("lth", "export", "--round", "1", "-o", "params.yaml"), "params.yaml exists"),
    Case("export-dev-full", nothing, ("lth", "export", "--round", "1", "-o", "/dev/full"), "/dev/full"),
    Case(
        "export-dev-full-force", nothing, ("lth", "export", "--round", "1", "-o", "/dev/full", "--force"), "/dev/full"
    ),
    Case("export-unwritable", nothing, ("lth", "export", "--round", "1", "-o", "/proc/x/t.pt"), "/proc/x/t.pt"),
    Case("report-dev-full", nothing, ("lth", "report", "-o", "/dev/full"), "/dev/full"),
    Case("report-over-params", nothing, ("lth", "report", "-o", "params.yaml"), "params.yaml exists"),
    Case("report-unwritable", nothing, ("lth", "report", "-o", "/proc/x/report.html"), "/proc/x/report.html"),
    Case(
        "sweep-unwritable", commit_results, ("lth", "sweep", "report", "--out", "/proc/x"), "cannot write /proc/x.csv"
    ),
    Case(  # the evaluate stage's plot data is no sweep table
        "sweep-over-plot-data",
        commit_results,
        ("lth", "sweep", "report", "--out", "results/plots/sparsity"),
        "results/plots/sparsity.csv exists and is not a table written by `lth sweep report`",
    ),
    Case(
        "sweep-claims-missing",
        commit_results_without_claims,
        ("lth", "sweep", "report", "--claims"),
        "no experiment has results/plots/claims.csv",
    ),
    Case("locate-corrupt-metrics", corrupt_metrics, ("lth", "locate", "--no-mlflow"), "metrics.json: unreadable"),
    Case("verify-round-99", nothing, ("lth", "verify", "--round", "99"), "--round 99: not a round"),
    Case("export-trial-5", nothing, ("lth", "export", "--trial", "5"), "trial 5"),
    Case("preset-unwritable", nothing, ("lth", "preset", "xor", "-p", "/proc/x/params.yaml"), "/proc/x/params.yaml"),
    Case("preset-unknown", nothing, ("lth", "preset", "nonexistent"), "nonexistent"),
    Case("locate-bad-override", nothing, ("lth", "locate", "-S", "training.lr"), "training.lr"),
    Case("locate-override-bad-yaml", nothing, ("lth", "locate", "-S", "training.lr=[1"), "training.lr"),
    # -S KEY=VALUE: one override of the params in every command (`lth run` writes it only once it is valid)
    Case(
        "run-override-not-a-number", nothing, ("lth", "run", "-S", "training.lr=abc"), "training.lr: expected a number"
    ),
    Case("run-override-unknown-key", nothing, ("lth", "run", "-S", "training.lrr=0.1"), "did you mean 'training.lr'"),
    Case("run-override-no-value", nothing, ("lth", "run", "-S", "training.lr"), "not of the form key=value"),
    Case("report-override-out-of-range", nothing, ("lth", "report", "-S", "trials=0"), "trials: must be a positive"),
    Case("verify-override-runtime", nothing, ("lth", "verify", "-S", "runtime.threads=-1"), "runtime.threads"),
    Case("export-override-unknown-model", nothing, ("lth", "export", "-S", "model.name=resnet99"), "model.name"),
    Case("compare-not-an-experiment", nothing, ("lth", "compare", "nonexistent", "params.yaml"), "'nonexistent' is no"),
    Case("compare-one-experiment", nothing, ("lth", "compare", "training.lr=3e-4"), "two or more experiments"),
    Case("compare-bad-override-set", nothing, ("lth", "compare", "training.lr=3e-4,trials=x", "params.yaml"), "trials"),
    # lth sweep run: a grid, run in DVC's queue or on a Ray cluster
    Case("sweep-run-unknown-key", nothing, ("lth", "sweep", "run", "-S", "training.lrr=1e-3,2e-3"), "training.lrr"),
    Case("sweep-run-rounds", nothing, ("lth", "sweep", "run", "-S", "pruning.rounds=2"), "changes the pipeline"),
    Case("sweep-run-ray-option", nothing, ("lth", "sweep", "run", "--address", "h:1"), "for --executor ray only"),
    Case("sweep-run-no-address", nothing, ("lth", "sweep", "run", "--executor", "ray"), "needs --address HOST:PORT"),
    Case("sweep-run-no-origin", nothing, (*SWEEP_RAY, "127.0.0.1:1"), "no git remote 'origin'"),
    Case("sweep-run-dirty", pushed(params({"training.lr": 0.002})), (*SWEEP_RAY, "127.0.0.1:1"), "uncommitted"),
    Case("sweep-run-unpushed", pushed(new_commit), (*SWEEP_RAY, "127.0.0.1:1"), "git push origin HEAD"),
    Case("sweep-run-no-cluster", pushed(), (*SWEEP_RAY, f"127.0.0.1:{CLOSED_PORT}"), "no Ray cluster answers at"),
]


# ------------------------------------------------------------------------------------------- running


def run(
    project: Project, command: tuple[str, ...], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """(exit status, output) of `command` in the project."""
    if command[0] == "dvc":
        project.env.update(env)
        proc = project.dvc(*command[1:], check=False, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    monkeypatch.chdir(project.root)
    # The project's own store unless the case names one; Tracker sets MLflow's HTTP settings with setdefault:
    # set here, they are undone after the command.
    env = {"MLFLOW_TRACKING_URI": None, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "LTH_DATA_DIR": None, **env}
    result = CliRunner().invoke(main, list(command[1:]), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        return 99, result.output + "Traceback:\n" + "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.output


@pytest.fixture
def xor_project(trained_project: Callable[..., Project], xor_params: Callable[..., dict]) -> Project:
    """This test's copy of the tiny XOR project, trained once per session (prepare, rounds 0 and 1, evaluate)."""
    return trained_project(xor_params())


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.mnist] if c.mnist else []) for c in CASES]
)
def test_bad_input_gives_one_line(
    case: Case, xor_project: Project, tmp_path: Path, free_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    case.setup(xor_project, tmp_path)
    env = {k: v.replace(CLOSED_PORT, str(free_port)) for k, v in case.env.items()}
    command = tuple(c.replace(CLOSED_PORT, str(free_port)) for c in case.command)
    start = time.perf_counter()
    status, output = run(xor_project, command, env, monkeypatch)
    seconds = time.perf_counter() - start
    print(output)
    assert seconds < 60, f"{seconds:.0f} s: a bad input must be reported within seconds"
    assert status != 0, output
    assert "Traceback" not in output, output
    for fragment in (case.expect,) if isinstance(case.expect, str) else case.expect:
        assert fragment in output, output
    assert any(line.startswith(("lth: ", "Error: ")) for line in output.splitlines()), output


# ------------------------------------------------------------------------------------- good inputs


def test_yaml_exponent_without_a_dot_is_a_number(xor_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """`training.lr: 1e-3` in params.yaml (YAML 1.1 reads it as a string) is accepted as 0.001."""
    path = xor_project.root / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["training"]["lr"] = 0.001
    path.write_text(yaml.safe_dump(doc, sort_keys=False).replace("lr: 0.001", "lr: 1e-3"))
    assert "lr: 1e-3" in path.read_text()
    status, output = run(xor_project, ("lth", "pipeline"), {}, monkeypatch)
    assert status == 0, output
    assert config.load(path).training.lr == 0.001


def test_labels_out_of_range_are_refused_for_every_dataset() -> None:
    """The registry's check: labels in 0..num_classes-1, or 0/1 for a single logit (XOR)."""
    for name, dataset in DATASETS.items():
        raw = {"train_x": torch.zeros(3, 2), "test_x": torch.zeros(2, 2), "test_y": torch.zeros(2, dtype=torch.int64)}
        raw["train_y"] = torch.tensor([0, max(dataset.num_classes, 2), 1])
        with pytest.raises(DataError, match=rf"^SOURCE: train label {max(dataset.num_classes, 2)} at index 1 "):
            check_labels(raw, dataset.num_classes, "SOURCE")
        raw["train_y"] = torch.tensor([0, max(dataset.num_classes, 2) - 1, 1])
        assert check_labels(raw, dataset.num_classes, name) is raw


@pytest.mark.mnist
def test_unverified_data_skips_the_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LTH_ALLOW_UNVERIFIED_DATA=1: MNIST files of one's own (here one changed pixel) are read as they are."""
    root = mnist_root(tmp_path, "t10k-images-idx3-ubyte", zero_a_pixel)
    with pytest.raises(DataError, match="failed its md5 check"):
        DATASETS["mnist"].load(root)
    monkeypatch.setenv("LTH_ALLOW_UNVERIFIED_DATA", "1")
    raw = DATASETS["mnist"].load(root)
    good = (MNIST_RAW / "t10k-images-idx3-ubyte").read_bytes()[16:]
    assert raw["test_x"].shape == (10000, 1, 28, 28)
    assert int((raw["test_x"].flatten() != torch.frombuffer(bytearray(good), dtype=torch.uint8)).sum()) == 1
