"""DVC stage: aggregate every round into DVC metrics, plot data, PNG figures and the HTML report."""

import json
from pathlib import Path

from lth.pipeline import render, stage
from lth.pipeline.workspace import RESULTS_DIR, RUNS_DIR
from lth.reporting import aggregate, figures, html


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
    (results / "plots").mkdir(parents=True, exist_ok=True)
    (results / "metrics.json").write_text(json.dumps(aggregate.metrics_document(agg), indent=2) + "\n")
    aggregate.write_sparsity_csv(agg, results / "plots" / "sparsity.csv")
    curves = aggregate.write_curves_csv(
        runs, render.selected_rounds(hp.pruning.rounds), results / "plots" / "curves.csv"
    )
    pngs = figures.plot_figures(agg, curves, results / "figures", title=hp.short_name)
    page = html.write(hp, agg, results / "figures", results / "report.html")
    print(f"lth: wrote {results / 'metrics.json'}, {len(pngs)} figures in {results / 'figures'} and {page}")


if __name__ == "__main__":
    stage.run(main)
