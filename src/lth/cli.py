"""The `lth` command line. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from lth import hparams, pipeline

PARAMS_OPTION = click.option("--params", "-p", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(dir_okay=False), help="params file of the experiment")
SET_OPTION = click.option("--set", "-S", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="override one hyperparameter, e.g. -S training.lr=3e-4 (repeatable)")


def load_or_exit(params_path: str, overrides: tuple[str, ...] = ()) -> hparams.Hparams:
    try:
        return hparams.load(params_path, overrides)
    except hparams.HparamsError as e:
        raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Lottery Ticket Hypothesis experiments: iterative magnitude pruning with DVC and MLflow.

    Run from the project root (where params.yaml and dvc.yaml live).
    """


@main.command("pipeline")
@PARAMS_OPTION
def pipeline_cmd(params_path: str) -> None:
    """Render dvc.yaml from params.yaml (one stage per round and control)."""
    hp = load_or_exit(params_path)
    changed = pipeline.write(hp)
    n = hp.pruning.rounds
    click.echo(f"dvc.yaml {'updated' if changed else 'already up to date'}: prepare, {n + 1} ticket rounds"
               f"{', controls: ' + ', '.join(pipeline.control_kinds(hp)) if pipeline.control_kinds(hp) else ''}"
               ", evaluate")


@main.command("run", context_settings={"ignore_unknown_options": True})
@PARAMS_OPTION
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def run_cmd(params_path: str, dvc_args: tuple[str, ...]) -> None:
    """Validate params, render dvc.yaml, then `dvc repro` (extra arguments go to dvc repro)."""
    hp = load_or_exit(params_path)
    pipeline.write(hp)
    click.echo(f"lth: experiment {hp.short_name} ({hp.pruning.rounds} rounds); running dvc repro", err=True)
    sys.exit(subprocess.call(["dvc", "repro", *dvc_args]))


@main.command("locate")
@PARAMS_OPTION
@SET_OPTION
@click.option("--no-mlflow", is_flag=True, help="do not query the MLflow store")
def locate_cmd(params_path: str, overrides: tuple[str, ...], no_mlflow: bool) -> None:
    """Print where the results of an experiment are: its hash, DVC outputs and MLflow runs."""
    from lth import report
    from lth.tracking import experiment_name, tracking_uri

    hp = load_or_exit(params_path, overrides)
    click.echo(f"experiment: {hp.short_name}")
    click.echo(f"hash (MD5 of canonical hyperparameters): {hp.hash}")
    rows = [r for r in report.collect(Path(pipeline.RUNS_DIR)) if r.get("hash") == hp.hash]
    if rows:
        click.echo(f"DVC outputs in this workspace ({len(rows)} trained networks):")
        for r in sorted(rows, key=lambda r: (r["kind"], r["round"], r["trial"])):
            click.echo(f"  {pipeline.round_out(r['kind'], r['round'])}/trial_{r['trial']}  "
                       f"{r['percent_remaining']:.2f}% remaining  test acc {r['test_accuracy_at_early_stop']:.4f}")
    else:
        click.echo("DVC outputs: none in this workspace for these hyperparameters "
                   "(`dvc exp show` lists experiments; `lth run` computes them)")
    if no_mlflow:
        return
    from lth.tracking import Tracker

    runs = Tracker().find_runs(hp.hash)
    click.echo(f"MLflow ({tracking_uri()}), experiment '{experiment_name(hp)}': {len(runs)} runs")
    for r in runs:
        acc = r.data.metrics.get("test_accuracy_at_early_stop")
        click.echo(f"  run {r.info.run_id}  {r.info.run_name}  "
                   f"test acc {acc:.4f}" if acc is not None else f"  run {r.info.run_id}  {r.info.run_name}")


if __name__ == "__main__":
    main()
