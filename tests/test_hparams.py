"""Validation of params (every problem at once, with the fix) and the experiment hash."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import field
from pathlib import Path

import pytest
import yaml

from lth.core import config, hparams, registry
from lth.core.config import HparamsError, from_dict
from lth.core.hparams import Hparams, TrainingHparams
from tests.helpers import ROOT, Project

# The default experiment's hash since hash format 1 (lth 0.1, commit 4dfd8e8): results recorded under it
# (DVC outputs, MLflow experiments, exported tickets) stay findable.
DEFAULT_HASH = "e9058de26e23c708d0159ec02f7ad05f"
# The hashes of the presets without controls, as hash format 1 (src/lth/hparams.py at 4dfd8e8) computes them.
FORMAT_1_HASHES = {
    "conv2": "8a643bc60149cd4599ee81c032e07ee2",
    "conv2_dropout": "e442883726feb831ea7eec3c0a886a93",
    "conv4": "3ad104251df3b5ecbccbe6db95d703dd",
    "conv4_dropout": "ce3c025b1ee1d924abe19241b51b2918",
    "conv6": "ca854b6cf0826c9bb40e8572339a2888",
    "conv6_dropout": "61992e1c21e23c90b5b2fa534df1cbf7",
    "lenet": DEFAULT_HASH,
    "lenet_oneshot": "757ca244cba6e9cc73b79035254474c3",
    "resnet20": "31d6649181b46b9f0b866958a6fdb48c",
    "resnet20_rewind": "967737fda0517a6914132fc4b02b6983",
    "resnet20_warmup": "9b46a8d821fb514e3c2a58c5f15456a7",
    "vgg16": "97360f406e2f1291f64eb44684206708",
    "vgg19": "ab137327ab9eefb637151b37b37bc9ac",
    "vgg19_rewind": "780cb27f895c76e1260ca6d4bb944936",
    "xor": "be3a4e65e6114e6feb0a44b24a8e302c",
}
# Every hyperparameter at its default, as a params document.
DEFAULT_DOC = {**Hparams().to_dict(), "runtime": {"device": "auto", "threads": 0}}


def problems(doc: dict) -> list[str]:
    with pytest.raises(HparamsError) as e:
        from_dict(doc)
    lines = str(e.value).splitlines()
    assert lines[0].startswith(f"{len(e.value.problems)} problem(s)")
    assert lines[1:] == [f"  - {p}" for p in e.value.problems]  # one line per problem
    return e.value.problems


def only(doc: dict) -> str:
    found = problems(doc)
    assert len(found) == 1, found
    return found[0]


# ----------------------------------------------------------------------------------------- validation


def test_unknown_names_list_the_valid_ones() -> None:
    found = problems(
        {"model": {"name": "lenet_301"}, "dataset": {"name": "mnistt"}, "training": {"optimizer": "adamw"}}
    )
    by_key = {p.split(":")[0]: p for p in found}
    assert set(by_key) == {"model.name", "dataset.name", "training.optimizer"}
    assert all(name in by_key["model.name"] for name in registry.MODELS)
    assert "'lenet_301'" in by_key["model.name"]
    assert all(name in by_key["dataset.name"] for name in registry.DATASETS)
    assert all(name in by_key["training.optimizer"] for name in registry.OPTIMIZERS)


def test_model_and_dataset_must_fit_together() -> None:
    assert "set dataset.name: xor" in only({"model": {"name": "xor"}})


@pytest.mark.parametrize("key", ["conv_rate", "fc_rate", "output_rate"])
@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_pruning_rates_outside_the_unit_interval(key: str, rate: float) -> None:
    p = only({"pruning": {key: rate}})
    assert p.startswith(f"pruning.{key}: must be in (0, 1)") and str(rate) in p


def test_rate_zero_leaves_a_kind_dense() -> None:
    assert from_dict({"pruning": {"conv_rate": 0}}).pruning.conv_rate == 0.0


@pytest.mark.parametrize("rewind", [300, 301, -1])
def test_rewind_iteration_must_be_inside_training(rewind: int) -> None:
    p = only({"training": {"iterations": 300}, "pruning": {"rewind_iteration": rewind}})
    assert p.startswith("pruning.rewind_iteration: must be in [0, training.iterations=300)")


@pytest.mark.parametrize("key", ["iterations", "batch_size", "eval_every", "test_every"])
@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_counts(key: str, value: int) -> None:
    assert f"training.{key}: must be a positive integer, got {value}" in problems({"training": {key: value}})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("training.lr", "fast", "training.lr: expected a number, got 'fast'"),
        ("training.iterations", 1.5, "training.iterations: expected an integer, got 1.5"),
        ("training.batch_size", True, "training.batch_size: expected an integer, got True"),  # bool is not an int
        ("training.lr", False, "training.lr: expected a number, got False"),
        ("dataset.augment", "yes", "dataset.augment: expected true or false, got 'yes'"),
        ("model.name", 5, "model.name: expected a string, got 5"),
        ("training.lr_milestones", 1000, "training.lr_milestones: expected a list of int, got 1000"),
        ("training.lr_milestones", [100, "x"], "training.lr_milestones[1]: expected an integer, got 'x'"),
        ("pruning.exclude", "layers.0", "pruning.exclude: expected a list of str, got 'layers.0'"),
        ("trials", None, "trials: expected an integer, got None"),
    ],
)
def test_wrong_types(key: str, value: object, expected: str) -> None:
    doc: dict = {}
    config._set_dotted(doc, key, value)
    assert only(doc) == expected


def test_integral_floats_and_ints_are_accepted_where_they_mean_the_same() -> None:
    hp = from_dict({"training": {"iterations": 300.0, "lr": 1}})
    assert hp.training.iterations == 300 and isinstance(hp.training.iterations, int)
    assert hp.training.lr == 1.0 and isinstance(hp.training.lr, float)


def test_list_fields_are_checked_against_training_and_the_model() -> None:
    p = only({"training": {"iterations": 1000, "lr_milestones": [800, 500]}})
    assert p.startswith("training.lr_milestones: must be increasing iterations in (0, training.iterations=1000)")
    assert only({"training": {"iterations": 1000, "lr_milestones": [1000]}}).startswith("training.lr_milestones")
    p = only({"pruning": {"exclude": ["layers.0", "fc9"]}})
    assert p.startswith("pruning.exclude: fc9: not prunable layers of lenet_300_100")
    assert "layers.0, layers.1, layers.2" in p
    assert from_dict({"pruning": {"exclude": ["layers.2.weight"]}}).pruning.exclude == ["layers.2.weight"]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"training": {"itterations": 5}}, "training.itterations: unknown key (did you mean 'training.iterations'?)"),
        ({"pruning": {"fc_rte": 0.2}}, "pruning.fc_rate"),
        ({"trainig": {"lr": 0.1}}, "trainig: unknown section (did you mean 'training'?)"),
        ({"trial": 2}, "trial: unknown section (did you mean 'trials'?)"),
        (
            {"runtime": {"checkpoint_second": 5}},
            "runtime.checkpoint_second: unknown runtime setting (did you mean 'checkpoint_seconds'?)",
        ),
    ],
)
def test_misspelled_keys_get_a_suggestion(doc: dict, expected: str) -> None:
    assert expected in only(doc)


def test_unknown_section_without_a_close_match_lists_the_sections() -> None:
    p = only({"zzz": {"a": 1}})
    assert p.startswith("zzz: unknown section (valid keys: ")
    assert all(s in p for s in ("controls", "dataset", "model", "pruning", "runtime", "training", "trials"))


def test_section_shapes() -> None:
    assert only({"training": 5}) == "training: expected a section of keys (training.<key>: value), got 5"
    assert from_dict({"training": None, "runtime": None}) == Hparams()  # an empty section is fine


def test_runtime_settings_are_validated() -> None:
    found = problems({"runtime": {"threads": True, "checkpoint_seconds": -1, "device": 3}})
    assert found == [
        "runtime.threads: expected an integer, got True",
        "runtime.checkpoint_seconds: must be 0 or more, got -1.0",
        "runtime.device: expected a string, got 3",
    ]


def test_every_problem_is_reported_at_once_one_line_each() -> None:
    found = problems({"training": {"lr": "x", "itterations": 5, "batch_size": True}, "model": {"nme": "a"}, "foo": 1})
    assert len(found) == 5
    assert {p.split(":")[0] for p in found} == {
        "training.lr",
        "training.itterations",
        "training.batch_size",
        "model.nme",
        "foo",
    }
    found = problems(
        {
            "training": {"iterations": 0, "batch_size": -1, "optimizer": "rmsprop"},
            "trials": 0,
            "pruning": {"fc_rate": 2},
        }
    )
    assert {p.split(":")[0] for p in found} == {
        "training.iterations",
        "training.batch_size",
        "training.optimizer",
        "trials",
        "pruning.fc_rate",
    }


def write_params(tmp_path: Path, doc: dict | None = None) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(DEFAULT_DOC if doc is None else doc))
    return path


def test_overrides(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    hp = config.load(path, ["training.lr=3e-4", "training.lr_milestones=[10, 20]", "controls.random_reinit=true"])
    assert hp.training.lr == 3e-4 and hp.training.lr_milestones == [10, 20] and hp.controls.random_reinit
    with pytest.raises(HparamsError) as e:
        config.load(path, ["training.lr", "training.lrr=0.1", "training.iterations=abc", "pruning.fc_rate=1"])
    assert sorted(e.value.problems) == [
        "override 'training.lr' is not of the form key=value (e.g. training.lr=3e-4)",
        "training.iterations: expected an integer, got 'abc'",
        "training.lrr: unknown key (did you mean 'training.lr'?)",
    ]  # fc_rate's range is checked once types are right
    assert str(path) in str(e.value)


def test_params_file_problems(tmp_path: Path) -> None:
    with pytest.raises(HparamsError, match="file not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [lr: 1\n")
    with pytest.raises(HparamsError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(HparamsError, match="expected a mapping of sections"):
        config.load(bad)


# ---------------------------------------------------------------------------------------------- hash


def test_same_params_same_hash(tmp_path: Path) -> None:
    a = config.load(write_params(tmp_path))
    doc = DEFAULT_DOC
    reordered = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(doc.items())}
    assert from_dict(reordered).hash == a.hash == Hparams().hash  # params.yaml holds the defaults
    assert from_dict({"training": {"lr": 0.0012, "iterations": 50000.0}}).hash == a.hash
    assert len(a.hash) == 32 and a.canonical() == Hparams().canonical()


def changed_values() -> dict[str, object]:
    """A different valid value for every hyperparameter (pruning.rounds is not part of the hash)."""
    d = hparams.flatten(Hparams().to_dict())
    out: dict[str, object] = {}
    for key, value in d.items():
        if isinstance(value, bool):
            out[key] = not value
        elif isinstance(value, int):
            out[key] = value + 1
        elif isinstance(value, float):
            out[key] = value + 0.05
        elif isinstance(value, list):
            out[key] = {"training.lr_milestones": [100], "pruning.exclude": ["layers.0"], "instability.rounds": [1]}[
                key
            ]
    out.update(
        {
            "dataset.name": "xor",
            "model.name": "xor",
            "training.optimizer": "sgd",
            "pruning.strategy": "global",
            "pruning.schedule": "oneshot",
        }
    )
    assert set(out) == set(d)
    return out


def replace(hp: Hparams, key: str, value: object) -> Hparams:
    if "." not in key:
        return dataclasses.replace(hp, **{key: value})
    section, name = key.split(".")
    return dataclasses.replace(hp, **{section: dataclasses.replace(getattr(hp, section), **{name: value})})


def test_every_hyperparameter_changes_the_hash_except_rounds_and_controls() -> None:
    """pruning.rounds extends a trajectory; controls.* switch on branches of it, told apart by their kind in
    round_hash; instability.* analyses trained rounds: none re-keys the experiment."""
    base = Hparams()
    for key, value in changed_values().items():
        other = replace(base, key, value)
        if key == "pruning.rounds" or key.startswith(("controls.", "instability.")):
            assert other.hash == base.hash, key
            assert other.round_hash(1, 0) == base.round_hash(1, 0), key
        else:
            assert other.hash != base.hash, key
            assert other.round_hash(1, 0) != base.round_hash(1, 0), key


def test_the_default_experiment_keeps_its_hash_of_format_1() -> None:
    assert Hparams().hash == DEFAULT_HASH
    assert config.load(ROOT / "params.yaml").hash == DEFAULT_HASH
    assert config.load(ROOT / "presets" / "lenet.yaml").hash == DEFAULT_HASH
    assert Hparams().short_name == f"lenet_300_100-mnist-{DEFAULT_HASH[:8]}"


@pytest.mark.parametrize("preset", list(FORMAT_1_HASHES))
def test_presets_keep_their_hashes_of_format_1(preset: str) -> None:
    assert config.load(ROOT / "presets" / f"{preset}.yaml").hash == FORMAT_1_HASHES[preset]


def test_a_preset_with_controls_is_the_experiment_of_its_ticket() -> None:
    """lenet_reinit is the lenet experiment with both controls switched on: one trajectory, one hash."""
    reinit = config.load(ROOT / "presets" / "lenet_reinit.yaml")
    assert reinit.controls.random_reinit and reinit.controls.random_pruning
    assert reinit.hash == DEFAULT_HASH


def test_switching_on_a_control_keeps_the_hash_and_branches_by_kind() -> None:
    ticket_only = from_dict({})
    with_reinit = from_dict({"controls": {"random_reinit": True}})
    assert with_reinit.controls.random_reinit
    assert with_reinit.hash == ticket_only.hash == DEFAULT_HASH
    assert with_reinit.canonical() == ticket_only.canonical()
    # The ticket's networks are the same ones with or without the control...
    assert with_reinit.round_hash(1, 0, "ticket") == ticket_only.round_hash(1, 0, "ticket")
    # ... and the control's networks are others, told apart by their kind.
    kinds = {with_reinit.round_hash(1, 0, kind) for kind in ("ticket", "reinit", "random_pruning")}
    assert len(kinds) == 3


def with_new_training_field(
    monkeypatch: pytest.MonkeyPatch, name: str, default: object
) -> tuple[type, Callable[..., Hparams]]:
    """Hparams as if TrainingHparams gained the field `name` with `default`: the replacement dataclasses,
    and the module's DEFAULTS recomputed from them, as the module computes them at import."""
    training_cls = dataclasses.make_dataclass(
        "TrainingHparams", [(name, type(default), field(default=default))], bases=(TrainingHparams,), frozen=True
    )
    hparams_cls = dataclasses.make_dataclass(
        "Hparams", [("training", training_cls, field(default_factory=training_cls))], bases=(Hparams,), frozen=True
    )
    monkeypatch.setattr(hparams, "DEFAULTS", hparams.flatten(hparams_cls().to_dict()))

    def convert(hp: Hparams, **training: object) -> Hparams:
        """`hp` in the new classes, with changes to its training section."""
        sections = {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)}
        sections["training"] = training_cls(**{**dataclasses.asdict(hp.training), **training})
        return hparams_cls(**sections)

    return hparams_cls, convert


@pytest.mark.parametrize("preset", ["lenet", "xor", "resnet20_rewind", "vgg19"])
def test_a_new_field_with_its_default_leaves_every_hash_unchanged(monkeypatch: pytest.MonkeyPatch, preset: str) -> None:
    old = config.load(ROOT / "presets" / f"{preset}.yaml")
    old_hashes = (old.hash, old.round_hash(2, 1, "ticket"), old.round_hash(2, 1, "reinit"))
    new_cls, convert = with_new_training_field(monkeypatch, "label_smoothing", 0.0)
    assert hparams.DEFAULTS["training.label_smoothing"] == 0.0
    new = convert(old)
    assert new.to_dict()["training"]["label_smoothing"] == 0.0  # the field is really there
    assert (new.hash, new.round_hash(2, 1, "ticket"), new.round_hash(2, 1, "reinit")) == old_hashes
    assert new_cls().hash == DEFAULT_HASH
    # Set to anything else, the new field is hashed: it is another experiment.
    smoothed = convert(old, label_smoothing=0.1)
    assert '"training.label_smoothing":0.1' in smoothed.canonical()
    assert smoothed.hash != old.hash
    # A new field is hashed only when it differs from its default; a field of format 1 always is.
    assert "training.label_smoothing" not in new.canonical() and '"training.lr":' in new.canonical()


def test_round_hash_separates_rounds_trials_and_kinds() -> None:
    hp = Hparams()
    hashes = {hp.round_hash(k, t, kind) for k in (0, 1) for t in (0, 1) for kind in ("ticket", "reinit")}
    assert len(hashes) == 8


def test_runtime_section_never_changes_the_hash() -> None:
    base = from_dict({})
    rt = from_dict({"runtime": {"device": "cpu", "threads": 2, "quiet": True, "checkpoint_seconds": 5}})
    assert rt.hash == base.hash and rt.round_hash(3, 0) == base.round_hash(3, 0)


# ------------------------------------------------------------- commands fail before any work starts

BAD = {"training": {"lr": "fast", "itterations": 10}, "trials": True}


@pytest.fixture
def bad_project(workdir: Callable[..., Project]) -> Project:
    return workdir(BAD)


@pytest.mark.parametrize(
    "cmd",
    [
        ["-m", "lth.cli", "run"],
        ["-m", "lth.cli", "pipeline"],
        ["stages/prepare.py"],
        ["stages/train_round.py", "--round", "0"],
    ],
)
def test_commands_fail_with_the_problems_before_any_work(bad_project: Project, cmd: list[str]) -> None:
    root = bad_project.root
    proc = bad_project.python(*cmd, check=False, timeout=300)
    assert proc.returncode != 0
    assert "3 problem(s) in params.yaml" in proc.stderr
    assert "  - training.lr: expected a number, got 'fast'" in proc.stderr
    assert "  - training.itterations: unknown key (did you mean 'training.iterations'?)" in proc.stderr
    assert "  - trials: expected an integer, got True" in proc.stderr
    assert not any((root / d).exists() for d in ("runs", "data", "ckpt", "dvc.yaml", "mlflow.db"))
