"""Portable numerics: stages pin ATen, MKL and oneDNN to AVX2 before torch starts, every trained network records
its numeric environment, and an emulated AVX2-only machine regenerates the same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lth.pipeline.numerics import PORTABLE_ENV
from tests.helpers import Project, output_digests

PINNED = [*PORTABLE_ENV, "LTH_NUMERICS"]
PORTABLE = {**PORTABLE_ENV, "LTH_NUMERICS": "portable"}
NATIVE = {**dict.fromkeys(PORTABLE_ENV), "LTH_NUMERICS": "native"}


def _pinned_env(env: dict[str, str], params_text: str | None, tmp_path: Path) -> dict[str, str | None]:
    """What pin() leaves in the environment of a fresh process (before torch is imported)."""
    if params_text is not None:
        (tmp_path / "params.yaml").write_text(params_text)
    code = (
        "import json, os, sys; from lth.pipeline import numerics; numerics.pin(); "
        "print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in PINNED}
    proc = subprocess.run(
        [sys.executable, "-c", code, *PINNED], env={**clean, **env}, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "env, params_text, expected",
    [
        ({}, None, PORTABLE),  # the default
        ({}, "runtime: {numerics: native}\n", NATIVE),
        ({"LTH_NUMERICS": "native"}, "runtime: {numerics: portable}\n", NATIVE),  # the variable wins
        ({"ATEN_CPU_CAPABILITY": "default"}, None, {**PORTABLE, "ATEN_CPU_CAPABILITY": "default"}),  # yours wins
        ({}, "runtime: [not, a, mapping]\n", PORTABLE),  # the params check reports the file, later
        ({}, "\xff\xfe bad", PORTABLE),
    ],
)
def test_pin(env: dict[str, str], params_text: str | None, expected: dict[str, str | None], tmp_path: Path) -> None:
    assert _pinned_env(env, params_text, tmp_path) == expected


def test_stage_uses_the_pinned_capability(trained_project: Callable[..., Project], xor_params) -> None:
    """run.json of a trained network records the environment; in portable mode ATen ran its AVX2 kernels."""
    p = trained_project(xor_params())
    info = json.loads((p.root / "runs/ticket/round_01/trial_0/run.json").read_text())
    env = info["environment"]
    assert env["numerics"] == "portable" and env["engine"] == "dense" and env["device"] == "cpu"
    assert env["cpu_capability"] in ("AVX2", "DEFAULT")  # never AVX512 when pinned
    assert set(info["seconds"]) == {"train", "eval"}


@pytest.mark.slow  # over a minute on 2 cores: run with -m slow
def test_emulated_avx2_machine_gives_the_same_bits(make_project: Callable[..., Project], lenet_params) -> None:
    """The same tiny LeNet experiment in two fresh projects, one under an emulated AVX2-only machine (the
    variables the issue names, set by the test): identical masks, weights, curves and metrics. On an
    AVX-512 machine this is the cross-CPU check; on an AVX2 one it checks that pinning changes nothing."""
    params = lenet_params({"pruning.rounds": 1, "training.iterations": 200})
    native_cpu, emulated = make_project(params), make_project(params)
    native_cpu.env.pop("ATEN_CPU_CAPABILITY", None)
    emulated.env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    for p in (native_cpu, emulated):
        p.dvc("repro")
    digests = output_digests(native_cpu.root)
    assert len(digests) == 8  # 2 rounds x (mask, final weights, metrics, curve)
    assert output_digests(emulated.root) == digests


@pytest.mark.parametrize(
    "envs, expected",
    [
        ([{"cpu_capability": "AVX2", "numerics": "portable"}] * 2, ""),
        ([{"cpu_capability": "AVX2"}, {"cpu_capability": "AVX512"}], "cpu_capability: AVX2 vs AVX512"),
        ([{"threads": 1, "engine": "dense"}, {"threads": 1, "engine": "sparse"}], "engine: dense vs sparse"),
        ([{}, {"cpu_capability": "AVX2"}], ""),  # a round recorded before run.json: nothing to compare
    ],
)
def test_compare_names_differing_environments(envs: list[dict], expected: str) -> None:
    from lth.reporting.compare import Experiment, environment_note

    note = environment_note(
        [Experiment("A", "a" * 32, environments=[envs[0]]), Experiment("B", "b" * 32, environments=[envs[1]])]
    )
    assert (expected in note and "not bit for bit" in note) if expected else note == ""
