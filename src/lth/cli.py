"""The `lth` command line. Each subcommand is a thin layer over the library."""

from __future__ import annotations

from lth.pipeline import numerics

numerics.pin()  # before torch is imported (lth verify re-trains): see lth.pipeline.numerics

import contextlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import click  # noqa: E402

from lth import __version__  # noqa: E402
from lth.core import config  # noqa: E402
from lth.core.hparams import Hparams  # noqa: E402
from lth.core.runtime import RuntimeSettings  # noqa: E402
from lth.lottery.layout import KINDS  # noqa: E402
from lth.pipeline import render, stage  # noqa: E402
from lth.pipeline.workspace import DATA_DIR, RESULTS_DIR, RUNS_DIR  # noqa: E402

if TYPE_CHECKING:
    from lth.pipeline.cluster import Resources
    from lth.reporting.compare import Experiment


def regular_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A file option naming a device, FIFO or socket is refused: /dev/zero would be read forever, and writing
    a file next to /dev/full, then renaming it over /dev/full, would replace the device."""
    if value is not None and Path(value).exists() and not Path(value).is_file():
        flag = max(param.opts, key=len) if param.opts else param.name
        raise click.ClickException(f"{flag} {value}: not a regular file (a device, FIFO or socket); give a file path.")
    return value


PARAMS_OPTION = click.option(
    "--params",
    "-p",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    callback=regular_file,
    help="params file of the experiment",
)
# -S means the same everywhere: one override of the params (--params), as in `dvc exp run -S`.
SET_OPTION = click.option(
    "--set",
    "-S",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="override one key of the params, e.g. -S training.lr=3e-4 (repeat -S for more)",
)


def refuse_while_dvc_runs() -> None:
    """DVC would wait for its lock in silence, and dvc.yaml must not change under a running pipeline."""
    from lth.pipeline import schedule

    busy = schedule.running_dvc(Path.cwd())
    if busy:
        raise click.ClickException(
            f"another DVC run is working in this workspace ({'; '.join(busy[:2])}); wait for it to finish "
            "(or stop it), then run the command again."
        )


def load_or_exit(params_path: str, overrides: tuple[str, ...] = ()) -> Hparams:
    with user_errors():
        return config.load(params_path, overrides)


def settings_or_exit(params_path: str, overrides: tuple[str, ...] = ()) -> RuntimeSettings:
    """The runtime settings of the params file with the `runtime.*` ones of `overrides` applied (the
    overrides are validated by `load_or_exit` first)."""
    from lth.core import runtime
    from lth.pipeline.workspace import checkpoint_dir

    with user_errors():
        section = config.runtime_section(params_path)
        for key, value in map(config.parse_override, overrides):
            if key.startswith("runtime."):
                section[key.removeprefix("runtime.")] = value
        return runtime.resolve(section, checkpoint_dir())


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """An error the user can fix (bad params, settings, files or data, an unreachable MLflow store: the library's
    messages name the problem and the fix) becomes click's `Error:` line and exit status 1, never a traceback.
    Anything else is a bug and keeps its traceback."""
    try:
        yield
    except OSError as e:
        if e.filename is None:  # the library's own message
            raise click.ClickException(str(e)) from None
        raise click.ClickException(f"{e.filename}: {e.strerror or e}; check the path and its permissions.") from None
    except stage.USER_ERRORS as e:
        raise click.ClickException(str(e)) from None


def out_option(default: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """--out/-o: a regular file to write (devices, FIFOs and sockets are refused)."""
    return click.option(
        "--out",
        "-o",
        type=click.Path(dir_okay=False),
        default=None,
        callback=regular_file,
        help=f"output file [default: {default}]",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lth")
def main() -> None:
    """Lottery Ticket Hypothesis experiments: iterative magnitude pruning with DVC and MLflow.

    Run from the project root (where params.yaml and dvc.yaml live).
    """


@main.command("pipeline")
@PARAMS_OPTION
def pipeline_cmd(params_path: str) -> None:
    """Render dvc.yaml from params.yaml (one stage per round and control)."""
    hp = load_or_exit(params_path)
    refuse_while_dvc_runs()
    with user_errors():
        changed = render.write(hp)
    click.echo(f"dvc.yaml {'updated' if changed else 'already up to date'}: {render.describe_stages(hp)}")


def write_params_and_pipeline(params_path: str, overrides: tuple[str, ...]) -> Hparams:
    """`lth run`'s first steps: validate the params with the -S overrides, write those into the params file,
    render dvc.yaml; each says what it changed."""
    from lth.pipeline import presets

    hp = load_or_exit(params_path, overrides)
    refuse_while_dvc_runs()
    with user_errors():
        if overrides:
            changes = presets.write_overrides(Path(params_path), overrides)
            click.echo(f"lth: {params_path}: {'; '.join(changes) or 'already holds these values'}", err=True)
        changed = render.write(hp)
    if changed:  # only when the stage structure changed (rounds, controls, schedule)
        click.echo(
            f"lth: dvc.yaml re-rendered: its stages now follow params.yaml (pruning.rounds={hp.pruning.rounds}, "
            f"controls: {', '.join(render.control_kinds(hp)) or 'none'}); commit it with dvc.lock",
            err=True,
        )
    return hp


@main.command("run", context_settings={"ignore_unknown_options": True})
@PARAMS_OPTION
@SET_OPTION
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="stages run side by side (0 = auto: one per core for fully connected networks, else 1)",
)
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def run_cmd(params_path: str, overrides: tuple[str, ...], jobs: int, dvc_args: tuple[str, ...]) -> None:
    """Validate params, render dvc.yaml, then reproduce the pipeline through DVC.

    With -S, the overrides are validated and written into the params file first (comments kept), as
    `dvc exp run -S` does. With one job this is `dvc repro` (extra arguments go to it). With several,
    independent stages (a round's controls beside the next round, the rounds of a one-shot experiment)
    run at the same time, each as `dvc repro --single-item STAGE`: DVC records and caches them as usual;
    on a terminal a live line per running stage shows its progress.
    """
    from lth.lottery import progress
    from lth.pipeline import schedule

    hp = write_params_and_pipeline(params_path, overrides)
    if jobs > 1 and dvc_args:
        raise click.UsageError(
            f"extra dvc repro arguments ({' '.join(dvc_args)}) work with one job only: drop them or pass -j 1"
        )
    jobs = jobs or (1 if dvc_args else schedule.auto_jobs(hp.model.name))
    graph = schedule.stage_graph()
    todo: list[str] = []
    if jobs > 1:
        try:
            todo = schedule.stale_stages(graph)
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
        jobs = min(jobs, schedule.width(graph, todo))  # a chain runs as plain dvc repro, with live bars
    live = jobs > 1 and progress.interactive()
    env = schedule.child_env(jobs, hp.model.name, settings_or_exit(params_path), live)
    if jobs <= 1:
        click.echo(f"lth: experiment {hp.short_name} ({hp.pruning.rounds} rounds); running dvc repro", err=True)
        sys.exit(subprocess.call([*schedule.DVC, "repro", *dvc_args], env=env))
    click.echo(
        f"lth: experiment {hp.short_name} ({hp.pruning.rounds} rounds); {len(todo)} of {len(graph)} "
        f"stages to run, up to {jobs} at a time",
        err=True,
    )
    sys.exit(schedule.repro(graph, todo, jobs, env, progress.StageDisplay(live)))


@main.command("locate")
@PARAMS_OPTION
@SET_OPTION
@click.option("--no-mlflow", is_flag=True, help="do not query the MLflow store")
def locate_cmd(params_path: str, overrides: tuple[str, ...], no_mlflow: bool) -> None:
    """Print where the results of an experiment are: its hash, DVC outputs and MLflow runs."""
    from lth.reporting import aggregate as report
    from lth.tracking.store import experiment_name, tracking_uri

    hp = load_or_exit(params_path, overrides)
    click.echo(f"experiment: {hp.short_name}")
    click.echo(f"hash (MD5 of canonical hyperparameters): {hp.hash}")
    with user_errors():
        rows = [r for r in report.collect(Path(RUNS_DIR)) if r.get("hash") == hp.hash]
    if rows:
        click.echo(f"DVC outputs in this workspace ({len(rows)} trained networks):")
        for r in sorted(rows, key=lambda r: (r["kind"], r["round"], r["trial"])):
            click.echo(
                f"  {render.round_out(r['kind'], r['round'])}/trial_{r['trial']}  "
                f"{r['percent_remaining']:.2f}% remaining  test acc {r['test_accuracy_at_early_stop']:.4f}"
            )
    else:
        click.echo(
            "DVC outputs: none in this workspace for these hyperparameters "
            "(`dvc exp show` lists experiments; `lth run` computes them)"
        )
    if no_mlflow:
        return
    from lth.tracking.store import Tracker, TrackingError

    try:
        runs = Tracker(check=True).find_runs(hp.hash)
    except TrackingError as e:
        raise click.ClickException(f"{e} (`lth locate --no-mlflow` skips MLflow)") from None
    click.echo(f"MLflow ({tracking_uri()}), experiment '{experiment_name(hp)}': {len(runs)} runs")
    for r in runs:
        acc = r.data.metrics.get("test_accuracy_at_early_stop")
        click.echo(
            f"  run {r.info.run_id}  {r.info.run_name}  test acc {acc:.4f}"
            if acc is not None
            else f"  run {r.info.run_id}  {r.info.run_name}"
        )


@main.command("preset")
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="list the presets with a description and estimated CPU time")
@click.option(
    "--force",
    is_flag=True,
    help="replace params.yaml even with uncommitted edits or results "
    "(the old params.yaml is saved in .lth/params-backup/)",
)
@PARAMS_OPTION
def preset_cmd(name: str | None, list_: bool, force: bool, params_path: str) -> None:
    """Select one experiment of the paper: copy presets/NAME.yaml to params.yaml and render dvc.yaml."""
    from lth.pipeline import presets

    if list_ or not name:
        click.echo(
            "Presets, with an estimate of the whole experiment's CPU time on one core (measured seconds per "
            "iteration x iterations x networks, plus each stage's start-up; a rough guide, a GPU is far faster):"
        )
        for preset_name, path in presets.available().items():
            with user_errors():
                click.echo(f"  {preset_name:<16} {'~' + presets.estimate(path):>10}  {presets.description(path)}")
        if not name:
            click.echo("Select one with `lth preset NAME`, then `lth run`.")
        return
    with user_errors():
        click.echo(presets.select(name, Path(params_path), force=force))


@main.command("sync-mlflow")
@PARAMS_OPTION
@SET_OPTION
def sync_mlflow_cmd(params_path: str, overrides: tuple[str, ...]) -> None:
    """Log to MLflow every finished round under runs/ that MLflow lacks (after the server was down, or after
    `dvc pull` into a clone with its own store), nested under its trajectory, and results/ to the parents."""
    from lth.tracking.store import Tracker, TrackingError, tracking_uri
    from lth.tracking.sync import sync

    hp = load_or_exit(params_path, overrides)
    try:
        sync(hp, Path(RUNS_DIR), Tracker(check=True), echo=click.echo)
    except TrackingError as e:
        raise click.ClickException(f"{e} Nothing on disk changed; run it again then.") from None
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except Exception as e:  # MLflow's errors (server down, store locked) have many types
        raise click.ClickException(
            f"MLflow at {tracking_uri()} failed ({type(e).__name__}: {e}). Nothing on disk "
            "changed; fix the server (or MLFLOW_TRACKING_URI) and run it again."
        ) from None


@main.command("verify")
@PARAMS_OPTION
@SET_OPTION
@click.option("--round", "round_index", type=int, default=None, help="round to re-run [default: the last]")
@click.option("--kind", type=click.Choice(KINDS), default="ticket", show_default=True)
@click.option("--trial", type=int, default=0, show_default=True)
def verify_cmd(params_path: str, overrides: tuple[str, ...], round_index: int | None, kind: str, trial: int) -> None:
    """Re-run one round from its recorded inputs in a temporary directory and compare it with the recorded
    outputs (mask, final weights, curve, metrics). Exits 1 on a mismatch; the workspace and MLflow are
    not touched."""
    from lth.lottery.verify import verify

    hp = load_or_exit(params_path, overrides)
    round_index = hp.pruning.rounds if round_index is None else round_index
    if not 0 <= round_index <= hp.pruning.rounds:
        raise click.ClickException(
            f"--round {round_index}: not a round of this experiment (rounds 0..{hp.pruning.rounds}, pruning.rounds)."
        )
    if not 0 <= trial < hp.trials:
        raise click.ClickException(f"--trial {trial}: not a trial of this experiment (trials 0..{hp.trials - 1}).")
    from lth.pipeline.schedule import recorded_changes

    settings = settings_or_exit(params_path, overrides)
    with user_errors():
        ok = verify(hp, round_index, kind, trial, Path(RUNS_DIR), Path(DATA_DIR), settings, echo=click.echo)
    if not ok:  # name the first thing that differs from DVC's record: an input, or the round itself
        changes = recorded_changes(render.stage_name(kind, round_index))
        if changes:
            click.echo(
                f"lth verify: {changes[0]} since dvc.lock recorded {render.stage_name(kind, round_index)}"
                + (f" (and {len(changes) - 1} more)" if len(changes) > 1 else "")
                + ": run `dvc repro` to restore the recorded state, then verify again."
            )
    sys.exit(0 if ok else 1)


# A comma that starts the next KEY=VALUE of a `lth compare` argument (not one inside a list value: [1,2]).
NEXT_OVERRIDE = re.compile(r",(?=\s*[A-Za-z_][\w.]*\s*=)")


def compare_experiment(spec: str, overrides: tuple[str, ...], params_path: str) -> Experiment:
    """One argument of `lth compare` as a `lth.reporting.compare.Experiment`; -S `overrides` apply to every
    experiment read from params."""
    from lth.pipeline import presets
    from lth.reporting import compare

    if Path(spec).is_file():
        return compare.from_params(spec, overrides)
    if "=" in spec:
        return compare.from_params(params_path, (*overrides, *NEXT_OVERRIDE.split(spec)), label=spec)
    if spec in presets.available():
        return compare.from_params(str(presets.path_of(spec)), overrides, label=spec)
    if compare.HASH_RE.match(spec.lower()):
        return compare.Experiment(spec, spec.lower())
    raise click.ClickException(
        f"'{spec}' is no experiment: give a params file that exists, a preset ({', '.join(presets.available())}), "
        "KEY=VALUE[,KEY=VALUE...] overrides of the params, or an experiment hash (6+ hex digits, as "
        "`lth locate` prints)."
    )


@main.command("compare")
@click.argument("experiments", nargs=-1, metavar="EXPERIMENT...")
@PARAMS_OPTION
@SET_OPTION
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    default="ticket",
    show_default=True,
    help="which networks to tabulate: the winning ticket or a control",
)
@click.option("--no-mlflow", is_flag=True, help="only the workspace's DVC outputs, do not query the MLflow store")
def compare_cmd(
    experiments: tuple[str, ...], params_path: str, overrides: tuple[str, ...], kind: str, no_mlflow: bool
) -> None:
    """Compare two or more experiments side by side: per round, percent of weights remaining, test accuracy
    at early stop (mean [min-max] over trials) and early-stop iteration.

    Each EXPERIMENT is one of: a params file; a preset name (presets/NAME.yaml); KEY=VALUE[,KEY=VALUE...],
    the params (--params) with these changes; or an experiment hash (the full MD5 or a prefix of 6+ hex
    digits, as `lth locate` prints). -S KEY=VALUE changes every experiment read from params (files,
    presets, KEY=VALUE). Results come from the workspace (runs/) and the MLflow store.

    \b
    Examples:
      lth compare training.lr=1.2e-3 training.lr=3e-4
      lth compare training.lr=3e-4,trials=2 params.yaml -S pruning.rounds=5
      lth compare lenet lenet_oneshot
      lth compare params.yaml 94435125
    """
    from lth.reporting import compare
    from lth.tracking.store import TrackingError

    if len(experiments) < 2:
        raise click.UsageError(
            "give two or more experiments: params files, presets, KEY=VALUE overrides or hashes "
            "(e.g. `lth compare training.lr=1.2e-3 training.lr=3e-4`)"
        )
    with user_errors():
        exps = [compare_experiment(spec, overrides, params_path) for spec in experiments]
        try:
            text = compare.compare(exps, Path(RUNS_DIR), use_mlflow=not no_mlflow, kind=kind)
        except TrackingError as e:
            raise click.ClickException(f"{e} (`lth compare --no-mlflow` uses only the workspace)") from None
    click.echo(text)


@main.command("export")
@PARAMS_OPTION
@SET_OPTION
@click.option("--round", "round_index", type=int, default=None, help="IMP round of the ticket [default: the last]")
@click.option("--trial", type=int, default=0, show_default=True)
@out_option("exports/<experiment>-round_<k>-trial_<t>.pt")
@click.option("--force", is_flag=True, help="replace an existing --out file that is not an earlier export")
def export_cmd(
    params_path: str, overrides: tuple[str, ...], round_index: int | None, trial: int, out: str | None, force: bool
) -> None:
    """Export the winning ticket of a round as one file for plain PyTorch: the mask and the masked rewound
    weights, with the model name, hyperparameters and hash.

    \b
    Load it with:
      from lth.lottery import export
      model, mask, ticket = export.load(PATH)   # pruned weights are 0; mask says which
    """
    from lth.lottery import export

    hp = load_or_exit(params_path, overrides)
    round_index = hp.pruning.rounds if round_index is None else round_index
    with user_errors():
        path, doc = export.export(hp, round_index, Path(out) if out else None, trial, Path(RUNS_DIR), force)
    click.echo(
        f"wrote {path}: {hp.model.name} ticket of round {round_index} (trial {trial}), "
        f"{doc['percent_remaining']:.2f}% of weights remaining, experiment {hp.hash}"
    )


@main.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to listen on (0.0.0.0: all)")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui_cmd(host: str, port: int) -> None:
    """Open the MLflow UI on the project's tracking store (mlflow.db at the project root, or
    MLFLOW_TRACKING_URI). Stop it with Ctrl-C."""
    import os

    from lth.tracking.store import relocate, tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        click.echo(f"MLFLOW_TRACKING_URI points at a tracking server: open {uri} in a browser.")
        return
    relocate(uri)  # a moved or copied project: the store's artifact paths follow it
    click.echo(f"MLflow UI of {uri} at http://{host}:{port} (Ctrl-C stops it)", err=True)
    # A viewer: without MLflow's job runner (seven huey worker processes for GenAI jobs lth never submits),
    # it starts faster and leaves nothing behind. Set the variable to true to have them.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # exec: Ctrl-C and kill reach MLflow's server directly.
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
        ],
    )


@main.command("report")
@PARAMS_OPTION
@SET_OPTION
@out_option(f"{RESULTS_DIR}/report.html")
@click.option("--force", is_flag=True, help="replace an existing --out file that is not an earlier report")
def report_cmd(params_path: str, overrides: tuple[str, ...], out: str | None, force: bool) -> None:
    """Write the one-page HTML report of the experiment (key table, figures, hyperparameters and hash)
    from the workspace's outputs. The evaluate stage writes the same page to results/report.html."""
    from lth.reporting import html as html_report

    hp = load_or_exit(params_path, overrides)
    with user_errors():
        path = html_report.from_workspace(hp, Path(RUNS_DIR), Path(RESULTS_DIR), Path(out) if out else None, force)
    click.echo(f"wrote {path}: open {path.resolve().as_uri()}")


@main.group("sweep")
def sweep_group() -> None:
    """Sweeps: run a grid of experiments (`lth sweep run`) and aggregate them (`lth sweep report`)."""


@sweep_group.command("run")
@click.option(
    "--set",
    "-S",
    "grid",
    multiple=True,
    metavar="KEY=V1,V2",
    help="override a key of params.yaml with one value or a choice of several: one experiment per combination",
)
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option(
    "--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, help="local: experiments at once"
)
@click.option("--address", metavar="HOST:PORT", help="ray: the cluster's head, as `ray start --head` prints it")
@click.option("--cpus-per-task", type=click.FloatRange(min=0, min_open=True), help="ray: CPUs of each experiment [1]")
@click.option(
    "--gpus-per-task", type=click.FloatRange(min=0), help="ray: GPUs of each experiment (0.25: a quarter) [0]"
)
@click.option("--remote", "dvc_remote", metavar="URL", help="ray: the DVC remote of the tasks [the project's default]")
@click.option("--git-remote", metavar="NAME", help="ray: the git remote the tasks clone from and push to [origin]")
def sweep_run_cmd(
    grid: tuple[str, ...],
    executor: str,
    jobs: int,
    address: str | None,
    cpus_per_task: float | None,
    gpus_per_task: float | None,
    dvc_remote: str | None,
    git_remote: str | None,
) -> None:
    """Run a grid of experiments as DVC experiments, for `lth sweep report` to aggregate.

    \b
    On this machine (DVC's queue: `dvc exp run --queue`, `dvc queue start`):
      lth sweep run -S training.lr=1.2e-3,6e-4 -S pruning.fc_rate=0.2,0.4
    On a Ray cluster, from the pushed HEAD commit (docs/cluster.md):
      lth sweep run --executor ray --address 10.0.0.5:6379 -S training.lr=1.2e-3,6e-4
    """
    from lth.pipeline import cluster, queue

    ray_only = {"--address": address, "--cpus-per-task": cpus_per_task, "--gpus-per-task": gpus_per_task}
    ray_only |= {"--remote": dvc_remote, "--git-remote": git_remote}
    if executor == "local" and any(v is not None for v in ray_only.values()):
        given = ", ".join(k for k, v in ray_only.items() if v is not None)
        raise click.UsageError(f"{given}: for --executor ray only; add --executor ray, or leave them out")
    if executor == "ray" and not address:
        raise click.UsageError("--executor ray needs --address HOST:PORT of the cluster's head (`ray start --head`)")
    try:
        experiments = cluster.expand_grid(grid)
        cluster.check_grid(Path("params.yaml"), experiments)
        if executor == "local":
            sweep_locally(experiments, jobs)
            return
        resources = cluster.Resources(cpus=cpus_per_task or 1.0, gpus=gpus_per_task or 0.0)
        sweep_on_ray(experiments, address or "", resources, dvc_remote, git_remote or "origin")
    except (cluster.ClusterError, queue.QueueError) as e:
        raise click.ClickException(str(e)) from None


def describe_overrides(overrides: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "params.yaml as it is"


def sweep_locally(experiments: list[dict[str, str]], jobs: int) -> None:
    """Queue the experiments in DVC's queue, start it and follow it, one line per change, to the end."""
    from lth.pipeline import cluster, queue

    queue.check_stages(Path("params.yaml"), experiments, Path("dvc.yaml"))
    described = {cluster.experiment_name(o): describe_overrides(o) for o in experiments}
    for name, what in queue.submit(experiments).items():
        click.echo(f"lth: {name} ({described[name]}): {what}", err=True)
    queue.start(jobs)
    done: list[str] = []

    def show(entry: queue.Entry) -> None:
        if entry.state in queue.FINISHED:
            done.append(entry.name)
        count = f"{len(done)} of {len(described)} done; " if entry.state in queue.FINISHED else ""
        logs = f" (`dvc queue logs {entry.task}`)" if entry.state == "failed" else ""
        click.echo(f"lth: {count}{entry.name} ({described[entry.name]}): {entry.state}{logs}", err=True)

    try:
        final = queue.follow(list(described), show)
    except KeyboardInterrupt:
        click.echo("lth: stopped following; the queue goes on (`dvc queue status`, `dvc queue kill NAME`)", err=True)
        sys.exit(130)
    failed = [name for name, entry in final.items() if entry.state != "success"]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(final)} experiments did not succeed: {', '.join(failed)}")
    click.echo(f"lth: all {len(final)} done: `dvc exp show`, `lth sweep report`", err=True)


def sweep_on_ray(
    experiments: list[dict[str, str]], address: str, resources: Resources, dvc_remote: str | None, git_remote: str
) -> None:
    """Run the experiments on the Ray cluster at `address` from the pushed HEAD commit, one line as each
    finishes, then pull them into the workspace."""
    from lth.pipeline import cluster

    url, commit = cluster.pushed_commit(git_remote)
    cluster.check_address(address)
    env = cluster.tracking_env()
    if "MLFLOW_TRACKING_URI" not in env:
        click.echo("lth: WARNING: no MLFLOW_TRACKING_URI: the tasks' MLflow runs stay in their clones", err=True)
    click.echo(
        f"lth: {len(experiments)} experiments of {commit[:7]} ({git_remote}) on the cluster at {address}", err=True
    )
    done: list[cluster.ExperimentResult] = []

    def show(r: cluster.ExperimentResult) -> None:
        done.append(r)
        head = f"lth: {len(done)} of {len(experiments)} done; {r.name} ({describe_overrides(r.overrides)})"
        if r.error:
            click.echo(f"{head}: failed: {r.error}", err=True)
            return
        ran = [s for s, how in r.stages.items() if how == "ran"]
        restored = [s for s, how in r.stages.items() if how != "ran"]
        click.echo(
            f"{head}: {sum(r.seconds.values()):.0f} s on {r.host}; ran {', '.join(ran) or 'nothing'}; "
            f"restored {', '.join(restored) or 'nothing'}",
            err=True,
        )

    results = cluster.run_sweep(url, commit, experiments, address, resources, env, dvc_remote, show)
    succeeded = [r.name for r in results if not r.error]
    if succeeded:
        cluster.pull_experiments(succeeded, git_remote)
        click.echo(f"lth: pulled {len(succeeded)} experiments: `dvc exp show`, `lth sweep report`", err=True)
    failed = [r.name for r in results if r.error]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} experiments failed: {', '.join(failed)}")


@sweep_group.command("report")
@click.option(
    "--out",
    "-o",
    default=f"{RESULTS_DIR}/sweep",
    show_default=True,
    type=click.Path(),
    help="writes OUT.csv (the table) and OUT.png (the figure)",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY",
    help="the swept hyperparameter(s) [default: every one that differs between experiments]",
)
@click.option("--kind", type=click.Choice(KINDS), default="ticket", show_default=True)
@click.option("--all-commits", "-A", is_flag=True, help="experiments of every commit, not only of HEAD")
@click.option("--force", is_flag=True, help="replace OUT.csv and OUT.png even when they are not an earlier sweep's")
@click.option(
    "--claims",
    is_flag=True,
    help="also OUT_claims.csv and OUT_claims.png: whether each claim holds at each grid point (a robustness study)",
)
def sweep_report_cmd(
    out: str, params: tuple[str, ...], kind: str, all_commits: bool, force: bool, claims: bool
) -> None:
    """Aggregate the DVC experiments of this repo (a sweep) into one table and one figure: test accuracy at
    early stop against percent of weights remaining, one curve per value of the swept hyperparameter.
    With --claims, each experiment's claims (its results/plots/claims.csv) at the key sparsities, a panel
    per experiment, and how many claims hold at each.

    \b
    A learning-rate sweep:
      dvc exp run --queue -S training.lr=3e-4
      dvc exp run --queue -S training.lr=1.2e-3
      dvc queue start --jobs 1 && dvc queue status   # wait for Success
      lth sweep report --param training.lr --out results/lr_sweep
    """
    from lth.reporting import robustness, sweep

    try:
        show = sweep.exp_show(Path("."), all_commits)
        text, csv_path, png_path, skipped = sweep.sweep(show, Path(out), params, kind, force)
        click.echo(text)
        click.echo(f"wrote {csv_path} and {png_path}")
        if claims:
            text, csv_path, png_path, missing = robustness.report(show, Path(out), params, force)
            click.echo(text)
            click.echo(f"wrote {csv_path} and {png_path}")
            if missing:
                click.echo(
                    f"no claims (no {robustness.CLAIMS_FILE}: an older evaluate): {', '.join(missing)}", err=True
                )
    except sweep.SweepError as e:
        raise click.ClickException(str(e)) from None
    if skipped:
        click.echo(
            f"skipped (no results/metrics.json: queued, failed or not evaluated): {', '.join(skipped)}", err=True
        )


if __name__ == "__main__":
    main()
