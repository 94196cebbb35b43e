"""One place that turns a user's device string into a ``torch.device``, and its precision into autocast."""

from __future__ import annotations

import contextlib

import torch

from fmforge.errors import FmforgeError


def pick_device(name: str) -> torch.device:
    """``auto`` → cuda when visible, else cpu; ``cpu``, ``cuda`` and ``cuda:N`` are checked, not trusted."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FmforgeError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FmforgeError(f"device {name!r} requested but no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FmforgeError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise FmforgeError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast (weights and optimizer stay fp32) or plain fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
