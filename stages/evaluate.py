"""DVC stage: aggregate every round into DVC metrics, plot data, PNG figures and the HTML report."""

import json
from pathlib import Path

from lth import hparams, html_report, pipeline, report

if __name__ == "__main__":
    hp = hparams.load_or_exit()
    pipeline.check_current(hp)
    results = Path(pipeline.RESULTS_DIR)
    agg = report.aggregate(report.collect(Path(pipeline.RUNS_DIR), hp.pruning.rounds,
                                                  ("ticket", *pipeline.control_kinds(hp)), hp.trials))
    (results / "plots").mkdir(parents=True, exist_ok=True)
    (results / "metrics.json").write_text(json.dumps(report.metrics_document(agg), indent=2) + "\n")
    report.write_sparsity_csv(agg, results / "plots" / "sparsity.csv")
    curves = report.write_curves_csv(Path(pipeline.RUNS_DIR), pipeline.selected_rounds(hp.pruning.rounds),
                                     results / "plots" / "curves.csv")
    figures = report.plot_figures(agg, curves, results / "figures", title=hp.short_name)
    page = html_report.write(hp, agg, results / "figures", results / "report.html")
    print(f"lth: wrote {results / 'metrics.json'}, {len(figures)} figures in {results / 'figures'} and {page}")
