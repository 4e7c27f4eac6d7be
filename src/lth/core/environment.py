"""The numeric environment of a trained network: what decides its last bits besides the hyperparameters.

Recorded in each trial's run.json and as MLflow tags, so a collaborator who regenerates a result can
tell a CPU or library difference from a bug (`lth verify` compares them).
"""

from __future__ import annotations

import os
import platform
import re
from typing import Any

import torch

# The keys that must agree for two runs to be expected bit-identical.
BIT_IDENTITY_KEYS = (
    "torch",
    "cpu_capability",
    "mkl",
    "onednn",
    "numerics",
    "threads",
    "device",
    "cuda",
    "cudnn",
    "deterministic",
    "engine",
)


def _config_version(pattern: str) -> str:
    match = re.search(pattern, torch.__config__.show())
    return match.group(1) if match else "none"


def numeric_environment(device: torch.device, engine: str = "dense") -> dict[str, Any]:
    """torch build, CPU capability in use, MKL and oneDNN versions, numerics mode, threads, device, CUDA and
    cuDNN versions, the deterministic-algorithms flag and the kernel path (dense or sparse)."""
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "torch_git": torch.version.git_version[:12],
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": _config_version(r"Math Kernel Library Version ([\w.\-]+)"),
        "onednn": _config_version(r"MKL-DNN v([\w.]+)"),
        "numerics": os.environ.get("LTH_NUMERICS", "native"),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else "none",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "none",
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "engine": engine,
    }


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: recorded -> current` for each key that decides the bits and differs."""
    return [
        f"{k}: {recorded.get(k)} -> {current.get(k)}"
        for k in BIT_IDENTITY_KEYS
        if k in recorded and recorded.get(k) != current.get(k)
    ]


def make_deterministic() -> None:
    """runtime.deterministic: deterministic algorithms everywhere (CUDA: cuBLAS workspace, cuDNN flags)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
