"""Portable CPU numerics: the same bits on every x86-64 CPU of the last decade.

ATen, MKL and oneDNN pick vectorized kernels by CPU (AVX-512 or AVX2), and those kernels round
differently, so two machines regenerating the same experiment would get other masks. In `portable`
mode (the default) a stage caps all three at AVX2 before torch is imported; `native` lets them use
the best the CPU has. The mode is a runtime setting: it is recorded with every result (run.json, MLflow
tags), never hashed. This module must not import torch: it runs before torch starts.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import yaml

MODES = ("portable", "native")
# Each library's own switch, capped at AVX2; a variable the user set already wins.
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's dispatch (default, avx2, avx512)
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def mode(params: Path = Path("params.yaml")) -> str:
    """LTH_NUMERICS, else params.yaml's runtime.numerics, else portable (read without importing torch)."""
    value = os.environ.get("LTH_NUMERICS")
    if not value:
        try:
            doc = yaml.safe_load(params.read_text()) if params.exists() else {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            doc = None  # the params check that follows reports the file
        runtime = doc.get("runtime") if isinstance(doc, dict) else None
        value = runtime.get("numerics") if isinstance(runtime, dict) else None
    return value if value in MODES else "portable"


def pin(params: Path = Path("params.yaml")) -> str:
    """Set the portable environment for this process and its children; call before torch is imported.
    Only x86-64 has these kernel families: elsewhere (aarch64) nothing is pinned and run.json says so."""
    chosen = mode(params)
    os.environ["LTH_NUMERICS"] = chosen
    if chosen == "portable" and platform.machine().lower() in ("x86_64", "amd64"):
        for name, value in PORTABLE_ENV.items():
            os.environ.setdefault(name, value)
    return chosen
