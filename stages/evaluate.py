"""DVC stage: aggregate every round into DVC metrics, plot data, PNG figures and the HTML report."""

import json
from pathlib import Path

from lth.core.registry import build_model
from lth.pipeline import render, stage
from lth.pipeline.workspace import RESULTS_DIR, RUNS_DIR
from lth.reporting import aggregate, figures, html, masks, statistics
from lth.tracking.store import experiment_url
from lth.tracking.writer import log_summary


def main() -> None:
    hp = stage.load().hp
    render.check_current(hp)
    results, runs = Path(RESULTS_DIR), Path(RUNS_DIR)
    rows = aggregate.collect(runs, hp.pruning.rounds, ("ticket", *render.control_kinds(hp)), hp.trials)
    foreign = sorted(
        {f"{r['kind']} round {r['round']} ({str(r.get('hash'))[:8]})" for r in rows if r.get("hash") != hp.hash}
    )
    if foreign:
        raise ValueError(
            f"{RUNS_DIR}/ holds rounds of another experiment than params.yaml's {hp.hash[:8]}: "
            f"{', '.join(foreign[:4])}; run `lth run` (or `dvc repro`) first."
        )
    agg = aggregate.aggregate(rows)
    results.mkdir(parents=True, exist_ok=True)
    (results / "metrics.json").write_text(json.dumps(aggregate.metrics_document(agg), indent=2) + "\n")
    aggregate.write_sparsity_csv(agg, results / "plots" / "sparsity.csv")
    curves = aggregate.learning_curves(runs, agg)
    aggregate.write_curves_csv(curves, results / "plots" / "curves.csv")
    pngs = figures.plot_figures(agg, curves, results / "figures", title=figures.describe(hp))
    pngs.append(analyse_masks(hp, runs, results))
    claims = statistics.claims(rows)
    statistics.write_claims_csv(claims, results / "plots" / "claims.csv")
    page = html.write(hp, agg, results / "figures", results / "report.html", experiment_url(hp), claims)
    print(f"lth: wrote {results / 'metrics.json'}, {len(pngs)} figures in {results / 'figures'} and {page}")
    log_summary(hp, results)


def analyse_masks(hp, runs: Path, results: Path) -> Path:
    """Per-layer sparsity and mask overlaps (lth.reporting.masks): plot data and a figure."""
    found = masks.read_masks(runs, build_model(hp), ("ticket", *render.control_kinds(hp)), hp.pruning.rounds, hp.trials)
    layers, overlaps = masks.layer_rows(found), masks.overlap_rows(found)
    masks.write_csv(layers, results / "plots" / "mask_layers.csv")
    masks.write_csv(overlaps, results / "plots" / "mask_overlap.csv")
    return figures.masks_figure(layers, overlaps, figures.describe(hp), results / "figures" / "masks.png")


if __name__ == "__main__":
    stage.run(main)
