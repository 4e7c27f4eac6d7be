"""DVC stage: analyse the ticket's masks (per-layer sparsity by round, Jaccard overlaps across trials, with the
previous round and with a random mask of the same sparsity), write the plot data and the figure, then log
them to the ticket's trajectories in MLflow."""

from pathlib import Path

from lth.core.registry import build_model
from lth.pipeline import render, stage
from lth.pipeline.workspace import RESULTS_DIR, RUNS_DIR
from lth.reporting import figures, masks
from lth.tracking.writer import log_mask_analysis


def main() -> None:
    hp = stage.load().hp
    render.check_current(hp)
    kinds = ("ticket", "random_pruning") if hp.controls.random_pruning else ("ticket",)
    found = masks.read_masks(Path(RUNS_DIR), build_model(hp), kinds, hp.pruning.rounds, hp.trials)
    if not found:
        raise FileNotFoundError(f"no masks of the ticket under {RUNS_DIR}/ticket: run `lth run` (or `dvc repro`).")
    layers, overlaps = masks.layer_rows(found), masks.overlap_rows(found)
    plots = [Path(render.PLOTS) / name for name in render.MASK_PLOT_DATA]
    for rows, path in zip((layers, overlaps, masks.trajectory_rows(found)), plots, strict=True):
        masks.write_csv(rows, path)
    figure = figures.masks_figure(layers, overlaps, figures.describe(hp), Path(render.FIGURES) / render.MASK_FIGURE)
    print(f"lth: wrote {', '.join(map(str, plots))} and {figure}")
    log_mask_analysis(hp, Path(RESULTS_DIR), [*plots, figure])


if __name__ == "__main__":
    stage.run(main)
