"""The constants behind `lth preset --list`'s time estimates (lth.pipeline.presets.CPU_SECONDS, STAGE_SECONDS).

    python benchmarks/bench_estimates.py [--models xor,lenet_300_100,...] [--no-stage]

Part 1, per network of the presets: seconds per training iteration and per evaluated example, on one
thread with the portable numerics (ATen capped at AVX2), on random inputs of the dataset's shape (only
shapes matter for time). A training iteration is one step of lth's loop (its batch and augmentation,
gradient masking and optimizer, at the preset's batch size, every weight kept), timed one by one in CPU
time (time.process_time: time taken by other processes is not counted); the figure is the 10th percentile
of the steps, and of evaluations of one batch. Other processes still slow a step down (shared caches and
memory, a lower clock with every core busy): on a machine busy with other work the figures come out up to
2x those of an idle one, so measure on an idle machine.
Part 2, the fixed cost of one stage: the xor preset shortened to 100 iterations per round (13 stages:
prepare, rounds 0-10, evaluate) run by `lth run -j 1` in a fresh clone of this repository's HEAD; its CPU
time (user + system of every process) less the training loops' own time, per stage, and its wall time per
stage. A stage is seconds long, so on a busy machine both are stretched: measure part 2 on an idle one.
Prints both as the Python literals of lth.pipeline.presets.
"""

from __future__ import annotations

from lth.pipeline import numerics

numerics.pin(params=__import__("pathlib").Path("/nonexistent"))  # portable: before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lth.core import config, pruning  # noqa: E402
from lth.core.data import Data, Split  # noqa: E402
from lth.core.datasets import DATASETS  # noqa: E402
from lth.core.evaluation import evaluate, loss_fn  # noqa: E402
from lth.core.sparse import TrainingView  # noqa: E402
from lth.core.training import TrainJob, batch, epoch_order, make_optimizer  # noqa: E402
from lth.lottery.branches import init_model  # noqa: E402
from lth.pipeline import presets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Timed steps per network (about 10 s or less each), and examples per timed evaluation.
STEPS = {"xor": 2000, "lenet_300_100": 1000, "conv2": 40, "conv4": 30, "conv6": 20, "resnet20": 20}
EVAL_BATCH = {"xor": 2000, "lenet_300_100": 2000}


def random_data(name: str, n: int, augment: bool) -> Data:
    g = torch.Generator().manual_seed(0)
    classes = DATASETS[name].num_classes
    x = torch.randn((n, *DATASETS[name].input_shape), generator=g)
    y = torch.randint(0, 2, (n,), generator=g).float() if classes == 1 else torch.randint(0, classes, (n,))
    return Data(Split(x, y), Split(x, y), Split(x, y), classes, augment)


def percentile(times: list[float], q: float = 0.1) -> float:
    return sorted(times)[int(q * (len(times) - 1))]


def per_model(preset: Path) -> tuple[float, float]:
    """(seconds per training iteration, seconds per evaluated example): the 10th percentile of single
    steps of the training loop (its own batch, masking and optimizer code) and of evaluations of a batch."""
    hp = config.load(preset)
    steps = STEPS.get(hp.model.name, 8)
    data = random_data(hp.dataset.name, 4 * hp.training.batch_size, hp.dataset.augment)
    model = init_model(hp, 0)
    kinds = model.layer_kinds()
    mask = pruning.dense_mask(kinds, {n: p.shape for n, p in model.named_parameters() if n in kinds})
    job = TrainJob(hp.training, 0, mask)
    view = TrainingView(model, mask, torch.device("cpu"), "off")
    optimizer = make_optimizer(view.net, hp.training)
    order = epoch_order(len(data.train), 0, 0, torch.device("cpu"))
    times = []
    for it in range(steps + 2):  # the first two warm up
        t0 = time.process_time()
        x, y = batch(data, job, it, order)
        loss = loss_fn(view.net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        view.mask_gradients()
        optimizer.step()
        times.append(time.process_time() - t0)
    examples = Split(data.val.x[: EVAL_BATCH.get(hp.model.name, 100)], data.val.y[: EVAL_BATCH.get(hp.model.name, 100)])
    evals = []
    for _ in range(12):
        t0 = time.process_time()
        evaluate(model, examples)
        evals.append((time.process_time() - t0) / len(examples))
    return percentile(times[2:]), percentile(evals[2:])


def stage_seconds() -> tuple[float, float, int]:
    """(CPU seconds per stage beyond the training loops, wall seconds per stage, stages) of a short xor run."""
    work = Path(tempfile.mkdtemp(prefix="lth-bench-estimates-")) / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(work / "src"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the stages' python
        "CI": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/m.db",
    }
    lth = [sys.executable, "-m", "lth.cli"]
    subprocess.run([*lth, "preset", "xor", "--force"], cwd=work, env=env, check=True, capture_output=True)
    short = ["training.iterations=100", "training.eval_every=100", "training.test_every=100"]
    doc = config.read_yaml((work / "params.yaml").read_text())
    for key, value in map(config.parse_override, short):
        section, name = key.split(".")
        doc[section][name] = value
    (work / "params.yaml").write_text(json.dumps(doc))  # JSON is YAML
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([*lth, "run", "-j", "1"], cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lth run failed in {work}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    loops = sum(sum(json.loads(p.read_text())["seconds"].values()) for p in work.glob("runs/*/*/*/run.json"))
    stages = len(config.read_yaml((work / "dvc.yaml").read_text())["stages"])
    return (cpu - loops) / stages, wall / stages, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated model names [default: every preset's]")
    ap.add_argument("--no-stage", action="store_true", help="skip part 2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"# torch {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}, 1 thread, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    first = {}
    for path in presets.available().values():
        first.setdefault(config.load(path).model.name, path)
    wanted = args.models.split(",") if args.models else list(first)
    print("CPU_SECONDS: dict[str, tuple[float, float]] = {")
    for name in wanted:
        train_s, eval_s = per_model(first[name])
        print(f'    "{name}": ({train_s:.2g}, {eval_s:.2g}),  # {first[name].stem}', flush=True)
    print("}")
    if not args.no_stage:
        cpu, wall, stages = stage_seconds()
        print(f"STAGE_SECONDS = {cpu:.1f}  # {stages} stages; wall {wall:.1f} s per stage")


if __name__ == "__main__":
    main()
