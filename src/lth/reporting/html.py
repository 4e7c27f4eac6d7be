"""A one-page, self-contained HTML report of one experiment (results/report.html).

The figures are embedded as base64 PNGs so that the single file can be mailed or attached to an MLflow
run. Its head says when and from what it was written: the date, the git commit checked out, the experiment
hash and a link to the experiment in the MLflow UI.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lth.core import hparams as hparams_mod
from lth.core.hparams import Hparams
from lth.lottery.trial import git_commit
from lth.reporting.aggregate import BAND, DENSE_NOTE, LABELS, best_round, with_dense
from lth.reporting.figures import describe
from lth.reporting.statistics import ALPHA, MARGIN, TEST, Claim

FIGURES = (
    (
        "accuracy.png",
        f"Test accuracy at early stop (and the ticket's at the end of training) against the percent of "
        f"weights remaining; lines are means, shaded bands span {BAND}.",
    ),
    ("early_stop.png", "Early-stopping iteration (minimum validation loss) against the percent of weights remaining."),
    (
        "learning_curves.png",
        "Test accuracy during training at the key sparsities and the sparsest round: the winning ticket against "
        "its controls and the dense network.",
    ),
    (
        "masks.png",
        "Masks of the winning ticket: each layer's percent of weights remaining by round, and the Jaccard overlap "
        "of the kept weights across trials, with the previous round and with a random mask of the same sparsity "
        "(the random-pruning control's, or the expectation for random masks).",
    ),
)

STAGES = {"masks.png": "masks"}  # the stage that draws a figure, when it is not the evaluate stage

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
.missing { color: #a33; } .canonical code { word-break: break-all; } .note { color: #555; font-size: 0.85em; }
td.dense { color: #777; }
"""
SHARED = "&dagger;"  # marks a control's round 0: the dense network


def _cell(entry: dict[str, Any] | None, metric: str, fmt: str) -> str:
    if entry is None:
        return "<td>&ndash;</td>"
    m = entry[metric]
    text = fmt.format(m["mean"])
    if entry["trials"] > 1:
        text += f' <span class="range">[{fmt.format(m["ci_low"])}, {fmt.format(m["ci_high"])}]</span>'
    return f"<td>{text}</td>"


def key_table(agg: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Per round: percent remaining, then for the ticket and each control the test accuracy at early stop
    (mean [95% confidence interval] over trials) and the early-stopping iteration. A control's round 0 repeats the dense
    network, marked and explained under the table."""
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
            e = with_dense(agg, kind).get(k)
            cell = [_cell(e, "test_accuracy_at_early_stop", "{:.4f}"), _cell(e, "early_stop_iteration", "{:.0f}")]
            if k not in agg[kind] and e is not None:
                cell = [c.replace("<td>", '<td class="dense">').replace("</td>", f" {SHARED}</td>") for c in cell]
            cells += cell
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = (
        f'<p class="note">{SHARED} At round 0 every control is {html.escape(DENSE_NOTE)}.</p>' if len(kinds) > 1 else ""
    )
    ci = '<p class="note">In brackets: the 95% confidence interval of the mean over trials.</p>'
    return f'<table id="key-table">{head1}{head2}{"".join(rows)}</table>{note}{ci}'


def _number(value: float | None, fmt: str) -> str:
    return "&ndash;" if value is None else fmt.format(value)


def claims_table(claims: list[Claim]) -> str:
    """One row per claim and sparsity: mean paired difference with its 95% CI, effect size, p-value, verdict."""
    if not claims:
        return "<p>No claims to test: the experiment has no pruned round yet.</p>"
    head = (
        "<tr><th>claim</th><th>round</th><th>% weights remaining</th><th>pairs</th>"
        "<th>mean difference [95% CI]</th><th>effect size d<sub>z</sub></th><th>p</th><th>holds</th></tr>"
    )
    rows = []
    for c in claims:
        r = c.row()
        fmt = "{:+.0f}" if "faster" in c.name else "{:+.4f}"
        verdict = {True: "yes", False: "no", None: "n/a (one trial)"}[r["holds"]]
        rows.append(
            f'<tr><td class="key">{html.escape(c.name)}</td><td>{c.round}</td><td>{c.percent_remaining:.2f}</td>'
            f"<td>{r['pairs']}</td><td>{_number(r['mean_difference'], fmt)} [{_number(r['ci_low'], fmt)}, "
            f"{_number(r['ci_high'], fmt)}]</td><td>{_number(r['effect_size'], '{:.2f}')}</td>"
            f"<td>{_number(r['p_value'], '{:.3g}')}</td><td>{verdict}</td></tr>"
        )
    how = (
        f"Differences are the ticket's minus the other's (iterations: the other's minus the ticket's), paired by "
        f'trial; test: {TEST}; a claim holds at p &lt; {ALPHA}. "At least as accurate" is non-inferiority with '
        f"a margin of {100 * MARGIN:g} percentage points."
    )
    return f'<table id="claims">{head}{"".join(rows)}</table><p class="note">{how}</p>'


def hparams_table(hp: Hparams) -> str:
    rows = "".join(
        f'<tr><td class="key">{html.escape(k)}</td><td class="key">{html.escape(json.dumps(v))}</td></tr>'
        for k, v in hparams_mod.flatten(hp.to_dict()).items()
    )
    return f'<table id="hparams"><tr><th>key</th><th>value</th></tr>{rows}</table>'


def figure(path: Path, caption: str, stage: str = "evaluate") -> str:
    if not path.exists():
        return f'<p class="missing">{html.escape(path.name)} is missing: run the {stage} stage (`dvc repro`).</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


INSTABILITY_CAPTION = (
    "Left: the error barrier against the percent of weights remaining. Right: the test error along the linear "
    "path from the round's network (alpha 0) to its copy (alpha 1). Lines are means; shaded bands span " + BAND + "."
)


def instability_section(inst: dict[int, dict[str, Any]], figures_dir: Path) -> str:
    """The instability analysis: what it measures, a table per analysed round (mean [95% CI] over trials) and
    the figure; nothing when no round is analysed."""
    if not inst:
        return ""
    head = (
        "<tr><th>round</th><th>% weights remaining</th><th>trials</th><th>error barrier</th>"
        "<th>test error of the round's network</th><th>test error of its copy</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{k}</td><td>{e['percent_remaining']:.2f}</td><td>{e['trials']}</td>"
        + "".join(_cell(e, m, "{:.4f}") for m in ("error_barrier", "error_a", "error_b"))
        + "</tr>"
        for k, e in sorted(inst.items())
    )
    how = (
        "Each analysed round's network (copy A) is compared with a copy trained again from the same starting "
        "point (its rewind weights and mask) with another data order (copy B); the test error is evaluated along "
        "(1 - alpha) A + alpha B. The error barrier is the highest test error along the path minus the mean of "
        "the two ends' (Frankle et al. 2020, Linear Mode Connectivity and the Lottery Ticket Hypothesis): about 0 "
        "means the round is stable (linearly mode connected). In brackets: the 95% confidence interval of the "
        "mean over trials."
    )
    return (
        f'<h2>Instability</h2><table id="instability">{head}{rows}</table><p class="note">{html.escape(how)}</p>'
        + figure(Path(figures_dir) / "instability.png", INSTABILITY_CAPTION, "evaluate")
    )


def provenance(hp: Hparams, mlflow_url: str | None) -> str:
    """When and from what the report was written: date, git commit, experiment hash, MLflow experiment."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit()
    if mlflow_url:
        mlflow = f'<a id="mlflow" href="{html.escape(mlflow_url)}">the experiment in MLflow</a>'
    else:
        mlflow = '<span id="mlflow">no MLflow experiment of this hash was found (`lth sync-mlflow` logs it)</span>'

    return (
        f'<p class="meta">Written <span id="date">{date}</span> at git commit '
        f'<code id="commit">{html.escape(commit[:12]) if commit else "none (not a git repository)"}</code>; '
        f'experiment hash (MD5 of the canonical hyperparameters) <code id="hash">{hp.hash}</code>; {mlflow}.</p>'
    )


def best_ticket(agg: dict[str, dict[int, dict[str, Any]]]) -> str:
    k, t = best_round(agg), agg.get("ticket", {})
    if k is None or 0 not in t:
        return ""
    return (
        f"<p>Best ticket: round {k}, {t[k]['percent_remaining']:.2f}% of weights remaining, test accuracy "
        f"{t[k]['test_accuracy_at_early_stop']['mean']:.4f} at early stop "
        f"(dense network: {t[0]['test_accuracy_at_early_stop']['mean']:.4f}).</p>"
    )


def render(
    hp: Hparams,
    agg: dict[str, dict[int, dict[str, Any]]],
    figures_dir: Path,
    mlflow_url: str | None = None,
    claims: list[Claim] | None = None,
    instability: dict[int, dict[str, Any]] | None = None,
) -> str:
    figs = "".join(figure(Path(figures_dir) / name, caption, STAGES.get(name, "evaluate")) for name, caption in FIGURES)
    title = html.escape(hp.short_name)
    described = "<br>".join(html.escape(line) for line in describe(hp).splitlines())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lth report: {title}</title><style>{STYLE}</style></head>
<body>
<h1>Lottery ticket experiment {title}</h1>
<p>{described}<br>{hp.pruning.rounds} pruning rounds.</p>
{provenance(hp, mlflow_url)}
{best_ticket(agg)}
<h2>Results</h2>
{key_table(agg)}
<h2>Claims</h2>
{claims_table(claims or [])}
<h2>Figures</h2>
{figs}
{instability_section(instability or {}, figures_dir)}
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


def write(
    hp: Hparams,
    agg: dict[str, dict[int, dict[str, Any]]],
    figures_dir: Path,
    out: Path,
    mlflow_url: str | None = None,
    claims: list[Claim] | None = None,
    instability: dict[int, dict[str, Any]] | None = None,
) -> Path:
    """Write the report to `out`; `mlflow_url`: the experiment's page in the MLflow UI, when known
    (`lth.tracking.store.experiment_url`); `claims`: the claims table (`lth.reporting.statistics.claims`);
    `instability`: the instability analysis (`lth.reporting.aggregate.aggregate_instability`)."""
    page = render(hp, agg, figures_dir, mlflow_url, claims, instability)
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
    from lth.reporting.statistics import claims
    from lth.tracking.store import experiment_url

    agg = report.aggregate(rows)
    found = [r for r in report.collect_instability(runs, hp.instability.rounds, hp.trials) if r.get("hash") == hp.hash]
    inst = report.aggregate_instability(found)
    return write(hp, agg, results / "figures", out or results / "report.html", experiment_url(hp), claims(rows), inst)
