"""Params documents (params.yaml, presets, `-S key=value` overrides) read and validated into `Hparams`.

`load()` validates the whole document before any compute starts and reports every problem at once,
one line each, as an `HparamsError`. The `runtime` section is validated here too; what it resolves to
is `lth.pipeline.settings`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from lth.core import registry
from lth.core.datasets import DATASETS
from lth.core.hparams import Hparams, flatten, section_fields


class HparamsError(ValueError):
    """Every problem found in a params document, one per line."""

    def __init__(self, problems: list[str], source: str = "params"):
        self.problems = problems
        text = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{text}")


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(sorted(candidates))})"


def _coerce(key: str, value: Any, t: Any, problems: list[str]) -> Any:
    """Check one leaf value against its annotated type; accept ints for floats."""
    origin = get_origin(t)
    if origin is list:
        (inner,) = get_args(t)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list of {inner.__name__}, got {value!r}")
            return value
        return [_coerce(f"{key}[{i}]", v, inner, problems) for i, v in enumerate(value)]
    if t is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):
            problems.append(f"{key}: expected a finite number, got {value}")
        return float(value)
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if t is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


class _ParamsLoader(yaml.SafeLoader):
    """YAML as people write params: `1e-3` is a number (YAML 1.1 reads it as a string), and a key given
    twice is an error (YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (remove one of them)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ParamsLoader)  # a SafeLoader subclass: no code runs


def parse_override(text: str) -> tuple[str, Any]:
    """`training.lr=3e-4` -> ("training.lr", 0.0003); values are parsed as YAML."""
    if "=" not in text:
        raise HparamsError([f"override '{text}' is not of the form key=value (e.g. training.lr=3e-4)"])
    key, raw = text.split("=", 1)
    if not key.strip():
        raise HparamsError([f"override '{text}' names no key (e.g. training.lr=3e-4)"])
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise HparamsError([f"override '{text}': the value is not valid YAML ({getattr(e, 'problem', e)})"]) from None
    # YAML 1.1 reads '3e-4' as a string; numbers without a dot are common on the command line.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            d[p] = nxt
        d = nxt
    d[parts[-1]] = value


# Keys that params.yaml may hold beside the hyperparameters: they never change results.
RUNTIME_SECTIONS = ("runtime",)
# The runtime section's keys and types: validated like the hyperparameters, never part of the hash.
# A new runtime setting must be added here (a misspelled setting is an error, not silently ignored).
RUNTIME_KEYS: dict[str, Any] = {
    "device": str,
    "threads": int,
    "workers": int,
    "quiet": bool,
    "checkpoint_seconds": float,
    "sparse": str | bool,
    "numerics": str,
    "deterministic": bool,
    "processes_per_node": int,
    "nodes": int,
    "rdzv_endpoint": str,
}


def _check_sections(doc: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Top-level shape: known sections are mappings (an empty one is allowed), unknown names are errors.
    Returns the hyperparameter part of the document."""
    sections = [f.name for f in fields(Hparams) if dataclasses.is_dataclass(get_type_hints(Hparams)[f.name])]
    top_keys = [f.name for f in fields(Hparams)] + list(RUNTIME_SECTIONS)
    out: dict[str, Any] = {}
    for name, value in doc.items():
        if name in sections or name in RUNTIME_SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.append(f"{name}: expected a section of keys ({name}.<key>: value), got {value!r}")
                continue
        elif name not in top_keys:
            problems.append(f"{name}: unknown section{_closest(str(name), top_keys)}")
            continue
        if name in RUNTIME_SECTIONS:
            for key, v in value.items():
                if key not in RUNTIME_KEYS:
                    problems.append(f"{name}.{key}: unknown runtime setting{_closest(str(key), list(RUNTIME_KEYS))}")
                elif v is not None:
                    v = _coerce(f"{name}.{key}", v, RUNTIME_KEYS[key], problems)
                    if key in ("threads", "workers", "checkpoint_seconds") and isinstance(v, (int, float)) and v < 0:
                        problems.append(f"{name}.{key}: must be 0 or more, got {v}")
                    if key == "sparse" and v not in (True, False, "auto", "on", "off"):
                        problems.append(f"{name}.{key}: expected auto, on or off, got {v!r}")
                    if key == "numerics" and v not in ("portable", "native"):
                        problems.append(f"{name}.{key}: expected portable or native, got {v!r}")
                    if key == "device" and isinstance(v, str) and v.split(":")[0] not in ("auto", "cpu", "cuda"):
                        problems.append(f"{name}.{key}: expected auto, cpu or cuda (cuda:N), got {v!r}")
                    if key in ("processes_per_node", "nodes") and isinstance(v, int) and v < 1:
                        problems.append(f"{name}.{key}: must be 1 or more (1 = no distributed training), got {v}")
            continue
        out[name] = value
    return out


def from_dict(doc: dict[str, Any], source: str = "params") -> Hparams:
    """Build and validate Hparams from a nested dict; raises HparamsError listing every problem."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise HparamsError([f"expected a mapping of sections, got {type(doc).__name__}"], source)
    known = section_fields()
    values: dict[str, Any] = {}
    for key, value in flatten(_check_sections(doc, problems)).items():
        if key not in known:
            section = key.split(".")[0] + "."
            problems.append(f"{key}: unknown key{_closest(key, [k for k in known if k.startswith(section)])}")
            continue
        values[key] = _coerce(key, value, known[key], problems)
    if problems:
        raise HparamsError(problems, source)

    def build(cls: type, prefix: str) -> Any:
        hints = get_type_hints(cls)
        kwargs = {}
        for f in fields(cls):
            k = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = build(hints[f.name], k + ".")
            elif k in values:
                kwargs[f.name] = values[k]
        return cls(**kwargs)

    hp = build(Hparams, "")
    problems.extend(registry.check(hp))
    problems.extend(_check_ranges(hp))
    problems.extend(_check_processes(doc.get("runtime"), hp))
    problems.extend(_check_instability(hp, set(values)))
    if problems:
        raise HparamsError(problems, source)
    return hp


def _check_ranges(hp: Hparams) -> list[str]:
    p: list[str] = []
    t, pr = hp.training, hp.pruning
    for key, v in (
        ("training.iterations", t.iterations),
        ("training.batch_size", t.batch_size),
        ("training.eval_every", t.eval_every),
        ("training.test_every", t.test_every),
        ("trials", hp.trials),
    ):
        if isinstance(v, int) and v <= 0:
            p.append(f"{key}: must be a positive integer, got {v}")
    if t.lr <= 0:
        p.append(f"training.lr: must be positive, got {t.lr}")
    for key, seed in (("training.seed", t.seed), ("dataset.split_seed", hp.dataset.split_seed)):
        if not 0 <= seed < 2**31:  # seeds are combined (seed * 1_000_003 + epoch) in 64-bit generators
            p.append(f"{key}: must be in [0, 2^31), got {seed}")
    if t.eval_every > t.iterations > 0:
        p.append(
            f"training.eval_every={t.eval_every} exceeds training.iterations={t.iterations}: early stopping "
            "would only see the end of training; lower it (the paper: 100)"
        )
    dataset = DATASETS.get(hp.dataset.name)
    if dataset is not None and hp.dataset.validation_size >= dataset.train_size:
        p.append(
            f"dataset.validation_size: must be less than the training set of {hp.dataset.name} "
            f"({dataset.train_size} examples), got {hp.dataset.validation_size}"
        )
    elif dataset is not None and t.batch_size > dataset.train_size - hp.dataset.validation_size:
        p.append(
            f"training.batch_size={t.batch_size} exceeds the training split of {hp.dataset.name} "
            f"({dataset.train_size - hp.dataset.validation_size} examples after dataset.validation_size)"
        )
    if dataset is not None and hp.dataset.augment and not dataset.augmentable:
        augmentable = ", ".join(name for name, d in DATASETS.items() if d.augmentable)
        p.append(
            f"dataset.augment: random flips and pad-and-crop are for natural images ({augmentable}), "
            f"not {hp.dataset.name}: set it to false"
        )
    if not 0 <= t.momentum < 1:
        p.append(f"training.momentum: must be in [0, 1), got {t.momentum}")
    if t.weight_decay < 0:
        p.append(f"training.weight_decay: must be 0 or more, got {t.weight_decay}")
    if t.lr_gamma <= 0:
        p.append(f"training.lr_gamma: must be positive, got {t.lr_gamma}")
    bad = [m for m in t.lr_milestones if not 0 < m < t.iterations] if t.iterations > 0 else []
    if bad or list(t.lr_milestones) != sorted(set(t.lr_milestones)):
        p.append(
            f"training.lr_milestones: must be increasing iterations in (0, training.iterations={t.iterations}), "
            f"got {list(t.lr_milestones)}"
        )
    for key in ("conv_rate", "fc_rate", "output_rate"):
        v = getattr(pr, key)
        if not 0 <= v < 1:
            p.append(f"pruning.{key}: must be in (0, 1), or 0 to leave that kind of layer dense; got {v}")
    if not 0 <= hp.model.dropout < 1:
        p.append(f"model.dropout: must be in [0, 1), got {hp.model.dropout}")
    if pr.strategy not in ("layerwise", "global"):
        p.append(f"pruning.strategy: unknown '{pr.strategy}' (valid: layerwise, global)")
    if pr.schedule not in ("iterative", "oneshot"):
        p.append(f"pruning.schedule: unknown '{pr.schedule}' (valid: iterative, oneshot)")
    if pr.rounds < 0:
        p.append(f"pruning.rounds: must be 0 or more, got {pr.rounds}")
    if pr.rewind_iteration < 0 or 0 < t.iterations <= pr.rewind_iteration:  # (iterations <= 0 is reported above)
        p.append(
            f"pruning.rewind_iteration: must be in [0, training.iterations={t.iterations}), got {pr.rewind_iteration}"
        )
    if t.warmup_iterations < 0 or t.warmup_iterations > t.iterations:
        p.append(f"training.warmup_iterations: must be in [0, training.iterations], got {t.warmup_iterations}")
    if hp.dataset.validation_size < 1:
        p.append(f"dataset.validation_size: must be a positive integer, got {hp.dataset.validation_size}")
    return p


def _check_processes(section: Any, hp: Hparams) -> list[str]:
    """Distributed training (lth.core.distributed): each process takes an equal slice of every batch, and more
    than one node needs a rendezvous endpoint that every node can reach."""
    section = section if isinstance(section, dict) else {}
    per_node, nodes = section.get("processes_per_node") or 1, section.get("nodes") or 1
    if not (isinstance(per_node, int) and isinstance(nodes, int) and per_node >= 1 and nodes >= 1):
        return []  # reported with the runtime section
    p, world = [], per_node * nodes
    if hp.training.batch_size % world:
        p.append(
            f"training.batch_size={hp.training.batch_size} does not divide among runtime.processes_per_node x "
            f"runtime.nodes = {world} processes; pick a batch size that is a multiple of {world}, or fewer processes"
        )
    if nodes > 1 and not section.get("rdzv_endpoint"):
        p.append(
            f"runtime.rdzv_endpoint: runtime.nodes={nodes} needs HOST:PORT of the first node (see docs/distributed.md)"
        )
    return p


def _check_instability(hp: Hparams, present: set[str]) -> list[str]:
    """The instability analysis: rounds that the experiment trains, each once; enough points for a curve, and
    written in the document (`present`: its keys) when rounds are analysed, since their DVC stages track it."""
    p, rounds, last = [], hp.instability.rounds, hp.pruning.rounds
    bad = [r for r in rounds if not 0 <= r <= last]
    if bad:
        p.append(
            f"instability.rounds: {bad} not among the experiment's rounds 0 to pruning.rounds={last}; "
            "pick trained rounds (or raise pruning.rounds)"
        )
    twice = sorted({r for r in rounds if rounds.count(r) > 1})
    if twice:
        p.append(f"instability.rounds: {twice} listed more than once; list each round once")
    if hp.instability.points < 3:
        points = hp.instability.points
        p.append(f"instability.points: must be 3 or more (the two ends and a point between), got {points}")
    if rounds and "instability.points" not in present:
        p.append("instability.points: missing; the instability stages track it: add `points: 30` (the default)")
    return p


def load(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Hparams:
    """Read a params file, apply `key=value` overrides, validate everything, return Hparams."""
    path = Path(path)
    if not path.exists():
        raise HparamsError([f"{path}: file not found (run from the project root, or pass --params PATH)"])
    try:
        doc = read_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HparamsError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise HparamsError([f"{path}: not valid YAML: {getattr(e, 'problem', None) or e}{where}"]) from None
    if doc is None:
        raise HparamsError([f"{path} is empty: select an experiment with `lth preset NAME` (`lth preset --list`)"])
    problems = []
    for o in overrides:
        try:
            key, value = parse_override(o)
        except HparamsError as e:
            problems.extend(e.problems)
            continue
        _set_dotted(doc, key, value)
    try:  # malformed overrides and the document's problems are reported together
        hp = from_dict(doc, str(path))
    except HparamsError as e:
        raise HparamsError(problems + e.problems, str(path)) from None
    if problems:
        raise HparamsError(problems, str(path))
    return hp


def runtime_section(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The `runtime` section of a params file (device, threads, workers...), validated by `load`; never hashed."""
    path = Path(path)
    if not path.exists():
        return {}
    doc = yaml.safe_load(path.read_text()) or {}
    return dict(doc.get("runtime") or {}) if isinstance(doc, dict) else {}
