"""Hyperparameters: small frozen dataclasses with one canonical form that is hashed.

An experiment is fully described by `Hparams`. Its canonical form is sorted JSON of every field;
the MD5 of that string is the experiment's identity (as in open_lth). `pruning.rounds` is left out
of the experiment hash so that adding rounds extends an experiment instead of starting a new one.

`load()` reads params.yaml plus `key=value` overrides and validates the whole document before any
compute starts, reporting every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


@dataclass(frozen=True)
class DatasetHparams:
    name: str = "mnist"
    validation_size: int = 5000  # held out of the training set, for early stopping
    split_seed: int = 0  # seed of the train/validation split
    augment: bool = False  # random flips and 4-pixel pad-and-crop (CIFAR-10 only)


@dataclass(frozen=True)
class ModelHparams:
    name: str = "lenet_300_100"
    dropout: float = 0.0  # dropout probability of the fully connected layers (Conv-2/4/6 variants)
    hidden: int = 4  # width of the hidden layer (XOR only)


@dataclass(frozen=True)
class TrainingHparams:
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 60
    iterations: int = 50000
    warmup_iterations: int = 0  # linear lr warmup from 0 over this many iterations
    lr_milestones: list[int] = field(default_factory=list)  # iterations where lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    eval_every: int = 100  # validation loss/accuracy interval (the paper: 100)
    test_every: int = 1000  # test-accuracy learning-curve interval
    seed: int = 0  # seed of initialization and data order; trial t uses seed + t


@dataclass(frozen=True)
class PruningHparams:
    strategy: str = "layerwise"  # layerwise | global (global pools the layers of each kind)
    schedule: str = "iterative"  # iterative | oneshot (oneshot prunes the dense weights to round k's sparsity)
    conv_rate: float = 0.1  # fraction of remaining weights pruned per round, by layer kind
    fc_rate: float = 0.2
    output_rate: float = 0.1
    exclude: list[str] = field(default_factory=list)  # layer names never pruned
    rewind_iteration: int = 0  # 0 = rewind to initialization; k > 0 = late resetting
    rounds: int = 20


@dataclass(frozen=True)
class ControlHparams:
    random_reinit: bool = False  # the ticket's mask with freshly drawn weights
    random_pruning: bool = False  # a random mask with the ticket's per-layer sparsity


@dataclass(frozen=True)
class Hparams:
    dataset: DatasetHparams = field(default_factory=DatasetHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    pruning: PruningHparams = field(default_factory=PruningHparams)
    controls: ControlHparams = field(default_factory=ControlHparams)
    trials: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical(self, exclude: tuple[str, ...] = ("pruning.rounds",)) -> str:
        """One string per experiment: sorted JSON of every field, without `exclude` (dotted keys)."""
        flat = {k: v for k, v in flatten(self.to_dict()).items() if k not in exclude}
        return json.dumps(flat, sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """MD5 of the canonical form: the experiment's identity."""
        return hashlib.md5(self.canonical().encode()).hexdigest()

    def round_hash(self, round_index: int, trial: int, kind: str = "ticket") -> str:
        """Identity of one trained network: experiment, round, trial and kind (ticket or a control)."""
        key = f"{self.canonical()}|round={round_index}|trial={trial}|kind={kind}"
        return hashlib.md5(key.encode()).hexdigest()

    @property
    def short_name(self) -> str:
        return f"{self.model.name}-{self.dataset.name}-{self.hash[:8]}"


class HparamsError(ValueError):
    """Every problem found in a params document, one per line."""

    def __init__(self, problems: list[str], source: str = "params"):
        self.problems = problems
        text = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{text}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def section_fields(cls: type = Hparams, prefix: str = "") -> dict[str, Any]:
    """All leaf keys (dotted) with their dataclass field types."""
    out: dict[str, Any] = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(section_fields(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


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


def parse_override(text: str) -> tuple[str, Any]:
    """`training.lr=3e-4` -> ("training.lr", 0.0003); values are parsed as YAML."""
    if "=" not in text:
        raise HparamsError([f"override '{text}' is not of the form key=value (e.g. training.lr=3e-4)"])
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
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
RUNTIME_KEYS: dict[str, Any] = {"device": str, "threads": int, "workers": int, "quiet": bool,
                                "checkpoint_seconds": float, "sparse": str | bool}


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
                    if key in ("threads", "workers", "checkpoint_seconds") and isinstance(v, (int, float)) \
                            and v < 0:
                        problems.append(f"{name}.{key}: must be 0 or more, got {v}")
                    if key == "sparse" and v not in (True, False, "auto", "on", "off"):
                        problems.append(f"{name}.{key}: expected auto, on or off, got {v!r}")
            continue
        out[name] = value
    return out


def from_dict(doc: dict[str, Any], source: str = "params") -> Hparams:
    """Build and validate Hparams from a nested dict; raises HparamsError listing every problem."""
    from lth import registry  # late import: registry imports models and datasets

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
    if problems:
        raise HparamsError(problems, source)
    return hp


def _check_ranges(hp: Hparams) -> list[str]:
    p: list[str] = []
    t, pr = hp.training, hp.pruning
    for key, v in (("training.iterations", t.iterations), ("training.batch_size", t.batch_size),
                   ("training.eval_every", t.eval_every), ("training.test_every", t.test_every),
                   ("trials", hp.trials)):
        if isinstance(v, int) and v <= 0:
            p.append(f"{key}: must be a positive integer, got {v}")
    if t.lr <= 0:
        p.append(f"training.lr: must be positive, got {t.lr}")
    if not 0 <= t.momentum < 1:
        p.append(f"training.momentum: must be in [0, 1), got {t.momentum}")
    if t.weight_decay < 0:
        p.append(f"training.weight_decay: must be 0 or more, got {t.weight_decay}")
    if t.lr_gamma <= 0:
        p.append(f"training.lr_gamma: must be positive, got {t.lr_gamma}")
    bad = [m for m in t.lr_milestones if not 0 < m < t.iterations] if t.iterations > 0 else []
    if bad or list(t.lr_milestones) != sorted(set(t.lr_milestones)):
        p.append(f"training.lr_milestones: must be increasing iterations in (0, training.iterations={t.iterations}), "
                 f"got {list(t.lr_milestones)}")
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
        p.append(f"pruning.rewind_iteration: must be in [0, training.iterations={t.iterations}), "
                 f"got {pr.rewind_iteration}")
    if t.warmup_iterations < 0 or t.warmup_iterations > t.iterations:
        p.append(f"training.warmup_iterations: must be in [0, training.iterations], got {t.warmup_iterations}")
    if hp.dataset.validation_size < 1:
        p.append(f"dataset.validation_size: must be a positive integer, got {hp.dataset.validation_size}")
    return p


def load(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Hparams:
    """Read a params file, apply `key=value` overrides, validate everything, return Hparams."""
    path = Path(path)
    if not path.exists():
        raise HparamsError([f"{path}: file not found (run from the project root, or pass --params PATH)"])
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HparamsError([f"{path}: not valid YAML: {e}"]) from e
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


def load_or_exit(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Hparams:
    """`load` for scripts (the DVC stages): every problem printed, one per line, exit status 1, no traceback."""
    try:
        return load(path, overrides)
    except HparamsError as e:
        raise SystemExit(f"lth: {e}") from None


def runtime_settings(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The `runtime` section of params.yaml (threads, device, progress): never part of the hash."""
    path = Path(path)
    if not path.exists():
        return {}
    doc = yaml.safe_load(path.read_text()) or {}
    return dict(doc.get("runtime") or {})


def to_yaml(hp: Hparams) -> str:
    return yaml.safe_dump(hp.to_dict(), sort_keys=False, default_flow_style=None)
