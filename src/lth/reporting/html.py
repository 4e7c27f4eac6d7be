"""A one-page, self-contained HTML report of one experiment (results/report.html).

The figures are embedded as base64 PNGs so that the single file can be mailed or attached to an MLflow
run. The content is deterministic (no timestamps), so an unchanged experiment gives an identical file.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from lth.core import hparams as hparams_mod
from lth.core.hparams import Hparams
from lth.reporting.aggregate import LABELS

FIGURES = (
    (
        "accuracy.png",
        "Test accuracy at early stop (and at the end of training) against the percent of "
        "weights remaining; error bars span min to max over trials.",
    ),
    ("early_stop.png", "Early-stopping iteration (minimum validation loss) against the percent of weights remaining."),
    ("learning_curves.png", "Test accuracy during training for selected rounds of the winning ticket."),
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; } code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f3f7; } td.key { text-align: left; font-family: monospace; }
tr:nth-child(even) td { background: #fafafa; }
.range { color: #777; font-size: 0.85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.missing { color: #a33; } .canonical code { word-break: break-all; }
"""


def _cell(entry: dict[str, Any] | None, metric: str, fmt: str) -> str:
    if entry is None:
        return "<td>&ndash;</td>"
    m = entry[metric]
    text = fmt.format(m["mean"])
    if entry["trials"] > 1:
        text += f' <span class="range">[{fmt.format(m["min"])}&ndash;{fmt.format(m["max"])}]</span>'
    return f"<td>{text}</td>"


def key_table(agg: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Per round: percent remaining, then for the ticket and each control the test accuracy at early stop
    (mean [min-max] over trials) and the early-stopping iteration."""
    kinds = list(agg)
    head1 = (
        '<tr><th rowspan="2">round</th><th rowspan="2">% weights remaining</th>'
        + "".join(f'<th colspan="2">{html.escape(LABELS.get(k, k))}</th>' for k in kinds)
        + "</tr>"
    )
    head2 = "<tr>" + "<th>test accuracy at early stop</th><th>early-stop iteration</th>" * len(kinds) + "</tr>"
    rows = []
    for k in sorted(agg.get("ticket", {})):
        cells = [f"<td>{k}</td>", f"<td>{agg['ticket'][k]['percent_remaining']:.2f}</td>"]
        for kind in kinds:
            # Controls start at round 1: at round 0 they are the dense network, the ticket's round 0.
            e = agg[kind].get(k) or (agg["ticket"].get(0) if k == 0 else None)
            cells += [_cell(e, "test_accuracy_at_early_stop", "{:.4f}"), _cell(e, "early_stop_iteration", "{:.0f}")]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="key-table">{head1}{head2}{"".join(rows)}</table>'


def hparams_table(hp: Hparams) -> str:
    rows = "".join(
        f'<tr><td class="key">{html.escape(k)}</td><td class="key">{html.escape(json.dumps(v))}</td></tr>'
        for k, v in hparams_mod.flatten(hp.to_dict()).items()
    )
    return f'<table id="hparams"><tr><th>key</th><th>value</th></tr>{rows}</table>'


def figure(path: Path, caption: str) -> str:
    if not path.exists():
        return f'<p class="missing">{html.escape(path.name)} is missing: run the evaluate stage (`dvc repro`).</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render(hp: Hparams, agg: dict[str, dict[int, dict[str, Any]]], figures_dir: Path) -> str:
    trials = max((e["trials"] for rounds in agg.values() for e in rounds.values()), default=0)
    best = ""
    if agg.get("ticket"):
        t = agg["ticket"]
        k = max(t, key=lambda r: t[r]["test_accuracy_at_early_stop"]["mean"])
        best = (
            f"<p>Best ticket: round {k}, {t[k]['percent_remaining']:.2f}% of weights remaining, test accuracy "
            f"{t[k]['test_accuracy_at_early_stop']['mean']:.4f} at early stop "
            f"(dense network: {t[min(t)]['test_accuracy_at_early_stop']['mean']:.4f}).</p>"
        )
    figs = "".join(figure(Path(figures_dir) / name, caption) for name, caption in FIGURES)
    title = html.escape(hp.short_name)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lth report: {title}</title><style>{STYLE}</style></head>
<body>
<h1>Lottery ticket experiment {title}</h1>
<p class="meta">model <code>{html.escape(hp.model.name)}</code> on <code>{html.escape(hp.dataset.name)}</code>,
{hp.pruning.rounds} pruning rounds ({html.escape(hp.pruning.strategy)}, {html.escape(hp.pruning.schedule)}),
{trials} trial(s) per round. Experiment hash (MD5 of the canonical hyperparameters):
<code id="hash">{hp.hash}</code>.</p>
{best}
<h2>Results</h2>
{key_table(agg)}
<h2>Figures</h2>
{figs}
<h2>Hyperparameters</h2>
{hparams_table(hp)}
<p class="meta canonical">Canonical form (hashed): <code>{html.escape(hp.canonical())}</code></p>
</body></html>
"""


class ReportError(ValueError):
    """The report cannot be written where asked; the message names the file and the fix."""


TITLE = "<title>lth report:"  # in the first line of every report: how an earlier report is recognized


def is_report(path: Path) -> bool:
    """Whether `path` is a regular file holding an earlier report (so that replacing it loses nothing)."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and TITLE.encode() in f.read(512)
    except OSError:
        return False


def write(hp: Hparams, agg: dict[str, dict[int, dict[str, Any]]], figures_dir: Path, out: Path) -> Path:
    page = render(hp, agg, figures_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page)
    except OSError as e:
        raise ReportError(
            f"cannot write the report to {out} ({e.strerror or e}): free space or fix the permissions there, "
            "or write it elsewhere (`lth report -o PATH`)."
        ) from None
    return out


def from_workspace(hp: Hparams, runs: Path, results: Path, out: Path | None = None, force: bool = False) -> Path:
    """The report of the rounds in `runs` for `hp` (what the evaluate stage writes), figures from `results`.
    An `out` that exists and is no earlier report is refused unless `force` (it may be a file of the user's)."""
    from lth.pipeline import render as pipeline
    from lth.reporting import aggregate as report

    if out is not None and out.exists() and not force and not is_report(out):
        raise ReportError(
            f"{out} exists and is not an lth report; choose another --out, or pass --force to replace it."
        )

    rows = [
        r
        for r in report.collect(runs, hp.pruning.rounds, ("ticket", *pipeline.control_kinds(hp)), hp.trials)
        if r.get("hash") == hp.hash
    ]
    if not rows:
        raise FileNotFoundError(
            f"no trained rounds of experiment {hp.short_name} in {runs}: run `lth run` first "
            "(or `dvc exp apply NAME` to bring an experiment's outputs into the workspace)"
        )
    return write(hp, report.aggregate(rows), results / "figures", out or results / "report.html")
