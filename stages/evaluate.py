"""DVC stage: aggregate every round and the instability analysis into DVC metrics, plot data, PNG figures and
the HTML report (which embeds the masks stage's figure)."""

import json
from pathlib import Path

from lth.pipeline import render, stage
from lth.pipeline.workspace import RESULTS_DIR, RUNS_DIR
from lth.reporting import aggregate, figures, html, statistics
from lth.tracking.store import experiment_url
from lth.tracking.writer import log_summary


def check_own(hp, rows: list[dict]) -> None:
    """Every row read is of params.yaml's experiment."""
    foreign = sorted(  # an instability summary has no kind
        {
            f"{r.get('kind', 'instability')} round {r['round']} ({str(r.get('hash'))[:8]})"
            for r in rows
            if r.get("hash") != hp.hash
        }
    )
    if foreign:
        raise ValueError(
            f"{RUNS_DIR}/ holds rounds of another experiment than params.yaml's {hp.hash[:8]}: "
            f"{', '.join(foreign[:4])}; run `lth run` (or `dvc repro`) first."
        )


def instability(hp, runs: Path, plots: Path, figures_dir: Path) -> dict:
    """The instability analysis' plot data and figure, or (no round analysed) none: earlier ones removed, so
    that no stale figure reaches the report or MLflow."""
    rows = aggregate.collect_instability(runs, hp.instability.rounds, hp.trials)
    check_own(hp, rows)
    inst = aggregate.aggregate_instability(rows)
    data = [plots / name for name in render.INSTABILITY_PLOT_DATA]
    figure = figures_dir / render.INSTABILITY_FIGURE
    if not inst:
        for path in (*data, figure):
            path.unlink(missing_ok=True)
        return inst
    aggregate.write_instability_csv(inst, data[0])
    aggregate.write_interpolation_csv(inst, data[1])
    figures.instability_figure(inst, figures.describe(hp), figure)
    return inst


def main() -> None:
    hp = stage.load().hp
    render.check_current(hp)
    results, runs, plots = Path(RESULTS_DIR), Path(RUNS_DIR), Path(render.PLOTS)
    rows = aggregate.collect(runs, hp.pruning.rounds, ("ticket", *render.control_kinds(hp)), hp.trials)
    check_own(hp, rows)
    agg = aggregate.aggregate(rows)
    inst = instability(hp, runs, plots, Path(render.FIGURES))
    results.mkdir(parents=True, exist_ok=True)
    (results / "metrics.json").write_text(json.dumps(aggregate.metrics_document(agg, inst), indent=2) + "\n")
    aggregate.write_sparsity_csv(agg, plots / "sparsity.csv")
    curves = aggregate.learning_curves(runs, agg)
    aggregate.write_curves_csv(curves, plots / "curves.csv")
    pngs = figures.plot_figures(agg, curves, Path(render.FIGURES), title=figures.describe(hp))
    claims = statistics.claims(rows)
    statistics.write_claims_csv(claims, plots / "claims.csv")
    page = html.write(hp, agg, Path(render.FIGURES), results / "report.html", experiment_url(hp), claims, inst)
    print(f"lth: wrote {results / 'metrics.json'}, {len(pngs) + bool(inst)} figures in {render.FIGURES} and {page}")
    log_summary(hp, results)


if __name__ == "__main__":
    stage.run(main)
