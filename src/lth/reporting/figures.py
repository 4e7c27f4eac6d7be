"""The paper's figures as PNG: accuracy and early-stopping iteration against sparsity, learning curves.

Every line is the mean over trials with a shaded band around it (`aggregate.band`: the 95% CI of the mean); colours and
line styles are fixed per kind, so a kind looks the same in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lth.core.hparams import Hparams
from lth.reporting.aggregate import BAND, DENSE_LABEL, DENSE_NOTE, LABELS, Aggregate, band, with_dense

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STYLE = {  # kind -> (colour, line style); the interactive plots' category10 colours, in the same order
    "dense": ("0.45", "-"),
    "ticket": ("C0", "-"),
    "reinit": ("C1", "--"),
    "random_pruning": ("C2", "-."),
}
ZOOM_FROM = 0.1  # learning curves: the y axis fits the points after this fraction of training


def describe(hp: Hparams) -> str:
    """The experiment in three lines, for titles: network, dataset and trials; training; pruning."""
    from lth.core.registry import build_model

    t, p = hp.training, hp.pruning
    kinds = set(build_model(hp).layer_kinds().values())
    rates = [(k, r) for k, r in (("conv", p.conv_rate), ("fc", p.fc_rate), ("output", p.output_rate)) if k in kinds]
    train = [f"{t.optimizer} lr {t.lr:g}" + (f" momentum {t.momentum:g}" if t.optimizer == "sgd" else "")]
    train += [f"batch {t.batch_size}", f"{t.iterations:,} iterations"]
    train += [f"warmup {t.warmup_iterations:,}"] * bool(t.warmup_iterations)
    train += [f"dropout {hp.model.dropout:g}"] * bool(hp.model.dropout)
    prune = f"{p.strategy} {p.schedule} pruning " + ", ".join(f"{k} {100 * r:g}%" for k, r in rates)
    reset = f"rewind to iteration {p.rewind_iteration:,}" if p.rewind_iteration else "reset to initialization"
    trials = f"{hp.trials} trial" + "s" * (hp.trials != 1)
    return f"{hp.model.name} on {hp.dataset.name}, {trials}\n{', '.join(train)}\n{prune} per round, {reset}"


def percent_axis(ax: Axes, percents: list[float]) -> None:
    """Log x axis of percent remaining, reversed (sparser to the right), as in the paper; ticks at the rounds'
    own sparsities (at most ~10 of them) instead of 10^2, 9x10^1, ..."""
    from matplotlib.ticker import FixedLocator, NullLocator

    pcts = sorted(set(percents), reverse=True)
    ticks = pcts[:: max(1, math.ceil(len(pcts) / 10))]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:.3g}" for t in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("percent of weights remaining (log scale)")


def band_line(ax: Axes, xs: list[float], values: list[dict[str, float]], kind: str, label: str, **kw: Any) -> None:
    """The mean as a line, the band (`aggregate.band`) shaded around it in the same colour."""
    colour, style = STYLE[kind]
    low, high = zip(*(band(v) for v in values), strict=True) if values else ((), ())
    ax.fill_between(xs, low, high, color=colour, alpha=0.18, linewidth=0)
    ax.plot(xs, [v["mean"] for v in values], linestyle=kw.pop("linestyle", style), color=colour, label=label, **kw)


def save_figure(fig: Figure, path: Path, notes: Sequence[str] = (), top: float = 0.0) -> Path:
    """Lay out the axes between `top` inches kept free at the top (a figure title and legend) and the notes
    (what lines and bands are) at the bottom, then write the PNG (and its folder)."""
    import matplotlib.pyplot as plt

    height = fig.get_figheight()
    if notes:
        fig.text(0.01, 0.06 / height, "\n".join(notes), fontsize=7, color="0.3", va="bottom")
    fig.tight_layout(rect=(0, (0.12 + 0.13 * len(notes)) / height if notes else 0, 1, 1 - top / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


SPARSITY_FIGURES = [  # (file, what, [(metric, legend suffix, line style or None: the kind's)], y label)
    (
        "accuracy.png",
        "Test accuracy at early stop",
        [("test_accuracy_at_early_stop", "", None), ("test_accuracy_final", ", end of training", ":")],
        "test accuracy",
    ),
    ("early_stop.png", "Early-stopping iteration", [("early_stop_iteration", "", None)], "early-stopping iteration"),
]


def _sparsity_figure(agg: Aggregate, what: str, metrics: list, ylabel: str, title: str, path: Path) -> Path:
    """One metric family against percent remaining: a line per kind (and metric), its band shaded."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=120)
    for kind in agg:
        rounds = with_dense(agg, kind)  # a control starts at the dense network
        ks = sorted(rounds)
        for metric, suffix, style in metrics:
            if kind == "ticket" or metric != "test_accuracy_final":
                xs = [rounds[k]["percent_remaining"] for k in ks]
                extra = {} if style is None else {"linestyle": style}
                band_line(
                    ax, xs, [rounds[k][metric] for k in ks], kind, LABELS[kind] + suffix, marker="o", ms=3, **extra
                )
    percent_axis(ax, [e["percent_remaining"] for e in agg.get("ticket", {}).values()])
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{what}\n{title}".strip(), fontsize=9)
    notes = [f"Lines: mean over trials; shaded: {BAND}."]
    notes += [f"At 100% every control is {DENSE_NOTE}."] * any(kind != "ticket" for kind in agg)
    return save_figure(fig, path, notes)


def zoom(curves: list[dict[str, Any]]) -> tuple[float, float] | None:
    """y limits that fit every band after the first ZOOM_FROM of training (the paper zooms in), or None when
    they would not zoom in by half at least (the curves fill the axis anyway)."""
    last = max((p["iteration"] for c in curves for p in c["points"]), default=0)
    everything = [band(p["test_accuracy"]) for c in curves for p in c["points"]]
    shown = [band(p["test_accuracy"]) for c in curves for p in c["points"] if p["iteration"] >= ZOOM_FROM * last]
    if not shown:
        return None
    low, high = min(lo for lo, _ in shown), max(hi for _, hi in shown)
    full = max(hi for _, hi in everything) - min(lo for lo, _ in everything)
    if high - low > full / 2:
        return None
    pad = max(0.1 * (high - low), 0.002)
    return low - pad, high + pad


def _heading(fig: Figure, heading: str, top: float, handles: dict[str, Any]) -> None:
    """The figure's title and, under it, one legend for every panel, in the `top` inches kept free."""
    height = fig.get_figheight()
    fig.suptitle(heading, fontsize=9, y=1 - 0.05 / height, va="top")
    at = (0.5, 1 - (top - 0.22) / height)
    legend = {"ncols": len(handles), "fontsize": 8, "frameon": False}
    fig.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=at, **legend)


def _curves_figure(curves: list[dict[str, Any]], title: str, path: Path) -> Path:
    """One panel per drawn sparsity: the ticket against its controls and the dense network during training."""
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(c["panel"] for c in curves))
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    heading = f"Test accuracy during training\n{title}".strip()
    top = 0.25 + 0.16 * len(heading.splitlines())  # inches for the heading and the legend under it
    size = (3.6 * cols + 1, 3.1 * rows + top + 0.5)
    fig, axes = plt.subplots(rows, cols, figsize=size, dpi=120, sharey=True, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for c in (c for c in curves if c["panel"] == panel):
            its = [p["iteration"] for p in c["points"]]
            band_line(ax, its, [p["test_accuracy"] for p in c["points"]], c["kind"], c["label"], linewidth=1.2)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("training iteration")
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    _heading(fig, heading, top, {h.get_label(): h for ax in axes.flat for h in ax.get_lines()})
    notes = [f"Lines: mean over trials; shaded: {BAND}. {DENSE_LABEL.capitalize()}: the ticket's round 0."]
    limits = zoom(curves)
    if limits:
        axes[0, 0].set_ylim(*limits)  # shared by every panel
        notes.append(f"The y axis is zoomed to the curves after the first {ZOOM_FROM:.0%} of training.")
    return save_figure(fig, path, notes, 0.1)


def plot_figures(agg: Aggregate, curves: list[dict[str, Any]], out: Path, title: str = "") -> list[Path]:
    """The paper's figures as PNG: accuracy and early-stop iteration against percent remaining (log x axis,
    reversed) and the learning curves (`aggregate.learning_curves`). `title`: the experiment (`describe`)."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _sparsity_figure(agg, what, metrics, ylabel, title, out / name)
        for name, what, metrics, ylabel in SPARSITY_FIGURES
    ]
    if curves:
        paths.append(_curves_figure(curves, title, out / "learning_curves.png"))
    return paths


def masks_figure(layers: list[dict[str, Any]], overlaps: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Mask analysis (`lth.reporting.masks`): each layer's percent remaining by round, and the Jaccard overlap
    of the ticket's masks across trials, with the previous round and with a random mask of its sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=120)
    for layer in dict.fromkeys(r["layer"] for r in layers):
        points = [r for r in layers if r["layer"] == layer]
        left.plot([r["round"] for r in points], [r["percent_remaining"] for r in points], marker="o", ms=3, label=layer)
    left.set(yscale="log", xlabel="round", ylabel="percent of the layer's weights remaining")
    left.legend(fontsize=7)
    for key, label in (
        ("across_trials", "across trials"),
        ("with_previous_round", "with the previous round"),
        ("with_random_mask", "with a random mask of the same sparsity"),
    ):
        points = [r for r in overlaps if r[key] is not None]
        right.plot([r["round"] for r in points], [r[key] for r in points], marker="o", ms=3, label=label)
    right.set(xlabel="round", ylabel="Jaccard overlap of kept weights", ylim=(0, 1.02))
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Masks of the winning ticket\n{title}".strip(), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, ["Lines: mean over trials (overlap across trials: over pairs of trials)."], 0.35)


def instability_figure(inst: dict[int, dict[str, Any]], title: str, path: Path) -> Path:
    """The instability analysis (`aggregate.aggregate_instability`): the error barrier against percent remaining,
    and the test error along the linear path between the two copies of each analysed round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lth.reporting.aggregate import instability_label

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=120)
    rounds = sorted(inst, key=lambda k: -inst[k]["percent_remaining"])
    xs = [inst[k]["percent_remaining"] for k in rounds]
    band_line(left, xs, [inst[k]["error_barrier"] for k in rounds], "ticket", LABELS["ticket"], marker="o", ms=4)
    percent_axis(left, xs)
    left.set_ylabel("error barrier (test error)")
    colours = plt.get_cmap("viridis")
    for i, k in enumerate(rounds):
        colour = colours(i / max(1, len(rounds) - 1))
        alphas = [p["alpha"] for p in inst[k]["curve"]]
        low, high = zip(*(band(p["test_error"]) for p in inst[k]["curve"]), strict=True)
        right.fill_between(alphas, low, high, color=colour, alpha=0.18, linewidth=0)
        means = [p["test_error"]["mean"] for p in inst[k]["curve"]]
        right.plot(alphas, means, color=colour, marker="o", ms=2, label=instability_label(k, inst[k]))
    right.set(xlabel="alpha: (1 - alpha) x the round's network + alpha x its copy", ylabel="test error")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    heading = "Instability: linear interpolation between two copies trained with other data orders"
    fig.suptitle(f"{heading}\n{title}".strip(), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = [
        f"Lines: mean over trials; shaded: {BAND}.",
        "Error barrier: the highest test error along the path minus the mean of its two ends' (Frankle et al. 2020).",
    ]
    return save_figure(fig, path, notes, 0.5)
