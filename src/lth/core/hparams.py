"""Hyperparameters: small frozen dataclasses, and the identity of an experiment.

An experiment is fully described by `Hparams`. Its identity (`hash`) is the MD5 of a canonical form,
sorted JSON of dotted keys, built by open_lth's rule: a field is hashed only when it differs from its
default, so adding a field whose default keeps the old behaviour re-keys nothing. The fields that
existed when lth first published hashes (`HASH_FORMAT_1`) are hashed at every value, which keeps those
hashes, and the results recorded under them, valid.

The hash names the IMP trajectory (data, model, training, pruning, trials). It leaves out
`pruning.rounds` (more rounds extend a trajectory) and `instability.*` (an analysis of trained rounds) and
holds `controls.*` at their defaults: a control (random reinit, random pruning) is a branch of a trained
trajectory, identified by the trajectory hash and its kind, so switching one on never re-keys the ticket.
Reading and validating params files is `lth.core.config`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints


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
class InstabilityHparams:
    """Linear mode connectivity (Frankle et al. 2020): analysis of trained rounds, never part of the hash."""

    rounds: list[int] = field(default_factory=list)  # ticket rounds to analyse (empty: none)
    points: int = 30  # evenly spaced interpolation points between the two trained copies, ends included


@dataclass(frozen=True)
class Hparams:
    dataset: DatasetHparams = field(default_factory=DatasetHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    training: TrainingHparams = field(default_factory=TrainingHparams)
    pruning: PruningHparams = field(default_factory=PruningHparams)
    controls: ControlHparams = field(default_factory=ControlHparams)
    trials: int = 1
    instability: InstabilityHparams = field(default_factory=InstabilityHparams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical(self) -> str:
        """The IMP trajectory's identity as one string: sorted JSON of the hashed fields (see the module
        docstring). Controls are branches of the trajectory: their switches are held at their defaults."""
        trajectory = dataclasses.replace(self, controls=ControlHparams())
        flat = flatten(trajectory.to_dict())
        hashed = {k: v for k, v in flat.items() if k not in UNHASHED and (k in HASH_FORMAT_1 or v != DEFAULTS[k])}
        return json.dumps(hashed, sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """MD5 of the canonical form: the identity of the IMP trajectory (the experiment)."""
        return hashlib.md5(self.canonical().encode()).hexdigest()

    def round_hash(self, round_index: int, trial: int, kind: str = "ticket") -> str:
        """Identity of one trained network: trajectory, round, trial and branch (the ticket or a control)."""
        key = f"{self.canonical()}|round={round_index}|trial={trial}|kind={kind}"
        return hashlib.md5(key.encode()).hexdigest()

    @property
    def short_name(self) -> str:
        return f"{self.model.name}-{self.dataset.name}-{self.hash[:8]}"


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


# Never hashed: more rounds extend a trajectory; the instability analysis only adds outputs beside it.
UNHASHED = frozenset({"pruning.rounds", "instability.rounds", "instability.points"})
# Every field of hash format 1 (lth up to 2026-11): hashed at any value, so the hashes of that time hold.
HASH_FORMAT_1 = frozenset(
    [f"dataset.{k}" for k in ("name", "validation_size", "split_seed", "augment")]
    + [f"model.{k}" for k in ("name", "dropout", "hidden")]
    + [
        f"training.{k}"
        for k in (
            "optimizer",
            "lr",
            "momentum",
            "weight_decay",
            "batch_size",
            "iterations",
            "warmup_iterations",
            "lr_milestones",
            "lr_gamma",
            "eval_every",
            "test_every",
            "seed",
        )
    ]
    + [
        f"pruning.{k}"
        for k in ("strategy", "schedule", "conv_rate", "fc_rate", "output_rate", "exclude", "rewind_iteration")
    ]
    + ["controls.random_reinit", "controls.random_pruning", "trials"]  # controls: always at their defaults
)
DEFAULTS = flatten(Hparams().to_dict())
