"""Side-by-side comparison of experiments, from the workspace's DVC outputs and/or the MLflow store.

An experiment is named by a params file, a set of overrides of a params file, or its hash (the full
MD5 or a prefix of 6+ hex digits, as printed by `lth locate` and in MLflow's experiment names).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lth.core import config, hparams
from lth.core.environment import BIT_IDENTITY_KEYS
from lth.lottery.layout import read_run_info, trial_dir
from lth.reporting import aggregate as report

HASH_RE = re.compile(r"^[0-9a-f]{6,32}$")
COLUMNS = ("% left", "test acc at ES", "ES iter")  # ES = early stop (minimum validation loss)


@dataclass
class Experiment:
    label: str  # what the user typed
    hash: str  # full hash, or the prefix when only a prefix is known
    params: dict[str, Any] = field(default_factory=dict)  # flat hyperparameters, when known
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per trained network
    sources: list[str] = field(default_factory=list)
    environments: list[dict[str, Any]] = field(default_factory=list)  # numeric environments of the networks


def from_params(path: str, overrides: tuple[str, ...] = (), label: str | None = None) -> Experiment:
    hp = config.load(path, overrides)
    return Experiment(label or path, hp.hash, hparams.flatten(hp.to_dict()))


def parse_spec(spec: str) -> Experiment:
    """A params file when the path exists, else an experiment hash (prefix)."""
    if Path(spec).is_file():
        return from_params(spec)
    if HASH_RE.match(spec.lower()):
        return Experiment(spec, spec.lower())
    raise config.HparamsError(
        [
            f"'{spec}' is neither an existing params file nor an experiment hash "
            "(32 hex digits, or a prefix of 6+; `lth locate` prints it)"
        ],
        "lth compare",
    )


def _matches(h: str | None, exp: Experiment) -> bool:
    return bool(h) and h.startswith(exp.hash)


def add_workspace_rows(exps: list[Experiment], runs: Path) -> None:
    rows = report.collect(runs)
    for exp in exps:
        found = [r for r in rows if _matches(r.get("hash"), exp)]
        if found:
            exp.rows = found
            exp.environments += [
                read_run_info(trial_dir(runs, r["kind"], r["round"], r["trial"])).get("environment", {}) for r in found
            ]
            exp.sources.append(f"workspace ({len(found)} networks)")
            exp.hash = found[0]["hash"]


def add_mlflow_rows(exps: list[Experiment], tracker: Any) -> None:
    """Rows for (kind, round, trial) the workspace lacks, from MLflow runs tagged with the hash."""
    from lth.tracking.store import TAG_HASH

    for exp in exps:
        if len(exp.hash) == 32:
            runs = tracker.find_runs(exp.hash)
        else:
            hashes = tracker.find_hashes(exp.hash)
            if len(hashes) > 1:
                raise config.HparamsError(
                    [
                        f"hash prefix '{exp.hash}' matches {len(hashes)} experiments "
                        f"({', '.join(sorted(hashes))}); give more digits"
                    ],
                    "lth compare",
                )
            runs = tracker.find_runs(hashes.pop()) if hashes else []
        have = {(r["kind"], r["round"], r["trial"]) for r in exp.rows}
        added = 0
        for run in runs:
            if run.info.status != "FINISHED":
                continue
            m, tags = run.data.metrics, run.data.tags
            key = (
                tags.get("lth.kind", "ticket"),
                int(tags.get("lth.round", m.get("round", 0))),
                int(tags.get("lth.trial", m.get("trial", 0))),
            )
            if key in have:
                continue
            have.add(key)
            exp.environments.append(
                {k.removeprefix("lth.env."): v for k, v in tags.items() if k.startswith("lth.env.")}
            )
            exp.rows.append(
                {
                    "kind": key[0],
                    "round": key[1],
                    "trial": key[2],
                    "hash": tags.get(TAG_HASH),
                    "percent_remaining": m.get("percent_remaining", math.nan),
                    **{k: m.get(k, math.nan) for k in report.SUMMARY_METRICS},
                }
            )
            added += 1
            if not exp.params:
                exp.params = {k: _parse_param(v) for k, v in run.data.params.items()}
        if runs:
            exp.hash = runs[0].data.tags.get(TAG_HASH, exp.hash)
        if added:
            exp.sources.append(f"MLflow ({added} networks)")


def _parse_param(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return {"True": True, "False": False}.get(v, v)


def differing_params(exps: list[Experiment]) -> list[str]:
    """Hyperparameters whose values differ between the experiments (pruning.rounds aside)."""
    known = [e.params for e in exps if e.params]
    keys = sorted({k for p in known for k in p} - {"pruning.rounds"})
    return [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in known}) > 1]


def table(exps: list[Experiment], kind: str = "ticket") -> str:
    """One line per round; for each experiment, percent remaining, mean test accuracy at early stop
    [min-max over trials when several] and mean early-stop iteration."""
    aggs = [report.aggregate([r for r in e.rows if r["kind"] == kind]).get(kind, {}) for e in exps]
    rounds = sorted({k for a in aggs for k in a})
    header = ["round"]
    for i, _ in enumerate(exps):
        header += [f"{chr(65 + i)} {c}" for c in COLUMNS]
    lines = [header]
    for k in rounds:
        line = [str(k)]
        for agg in aggs:
            e = agg.get(k)
            if e is None:
                line += ["-"] * len(COLUMNS)
                continue
            acc = e["test_accuracy_at_early_stop"]
            line += [
                f"{e['percent_remaining']:.2f}",
                f"{acc['mean']:.4f}" + (f" [{acc['min']:.4f}-{acc['max']:.4f}]" if e["trials"] > 1 else ""),
                f"{e['early_stop_iteration']['mean']:.0f}",
            ]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in lines)


def environment_note(exps: list[Experiment]) -> str:
    """Say what agreement to expect: bit identity only within one numeric environment."""
    seen = {
        json.dumps({k: str(env[k]) for k in BIT_IDENTITY_KEYS if k in env}, sort_keys=True)
        for e in exps
        for env in e.environments
        if env
    }
    if len(seen) <= 1:
        return ""
    envs = [json.loads(s) for s in seen]
    keys = [k for k in BIT_IDENTITY_KEYS if len({env.get(k) for env in envs}) > 1]
    values = "; ".join(f"{k}: {' vs '.join(sorted({str(env.get(k)) for env in envs}))}" for k in keys)
    return (
        f"\n\nnumeric environments differ ({values}): equal hyperparameters agree within the spread of trials, "
        "not bit for bit (README: Regenerating on another machine)"
    )


def legend(exps: list[Experiment]) -> str:
    diff = differing_params(exps)
    out = []
    for i, e in enumerate(exps):
        settings = ", ".join(f"{k}={e.params.get(k)}" for k in diff) if e.params else "params unknown"
        out.append(
            f"{chr(65 + i)} = {e.label}  hash {e.hash}  [{'; '.join(e.sources) or 'no results found'}]"
            + (f"\n    {settings}" if diff else "")
        )
    return "\n".join(out)


def compare(exps: list[Experiment], runs: Path = Path("runs"), use_mlflow: bool = True, kind: str = "ticket") -> str:
    """The legend (experiments, sources, differing hyperparameters) and the side-by-side table."""
    add_workspace_rows(exps, runs)
    if use_mlflow:
        from lth.tracking.store import Tracker

        add_mlflow_rows(exps, Tracker(check=True))
    missing = [e.label for e in exps if not e.rows]
    text = legend(exps) + "\n\n" + table(exps, kind) + environment_note(exps)
    if missing:
        text += (
            "\n\nno results for: " + ", ".join(missing) + " (run them with `lth run` or "
            "`dvc exp run -S ...`; `dvc exp apply` brings an experiment's outputs into the workspace)"
        )
    return text
