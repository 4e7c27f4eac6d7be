"""Runtime settings (`runtime:` in params.yaml or LTH_* variables): they never change results' identity."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lth.hparams import runtime_settings


def configure(params: str | Path = "params.yaml") -> dict[str, Any]:
    """Pick the device and thread count; environment variables override params.yaml's runtime section."""
    settings = runtime_settings(params)
    device_name = os.environ.get("LTH_DEVICE") or settings.get("device") or "auto"
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"lth: runtime.device={device_name} but CUDA is not available; use 'auto' or 'cpu'.")
    threads = os.environ.get("LTH_THREADS") or settings.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    return {"device": torch.device(device_name), "threads": torch.get_num_threads(),
            "quiet": bool(settings.get("quiet", False))}
