"""Accelerators a plan can price: dense bf16 peak, memory, an indicative hourly price, and turning FLOPs into
wall time and money at a model-FLOPs utilization (MFU).

Peaks are the vendors' dense (no sparsity) bf16 figures. Prices are indicative on-demand USD per device-hour
(late 2025 list prices of the large clouds and GPU clouds, which differ by 2x or more): override them with
``--price NAME=USD``. MFU defaults to 40%, what well-tuned dense pretraining reaches on H100-class parts
(PaLM reported 46% on TPU v4, Llama 3 38-43% on H100); measure yours with ``--mfu-from RUN_DIR``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fmforge.errors import FmforgeError

DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float  # dense bf16, per device
    memory_gb: float  # per device
    usd_per_hour: float  # per device
    note: str = ""


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a100-40gb", 312.0, 40.0, 1.29, "NVIDIA A100 SXM 40GB"),
    Hardware("a100-80gb", 312.0, 80.0, 1.79, "NVIDIA A100 SXM 80GB"),
    Hardware("h100", 989.0, 80.0, 2.99, "NVIDIA H100 SXM 80GB"),
    Hardware("h200", 989.0, 141.0, 3.79, "NVIDIA H200 SXM 141GB"),
    Hardware("b200", 2250.0, 180.0, 5.99, "NVIDIA B200 180GB"),
    Hardware("l4", 121.0, 24.0, 0.80, "NVIDIA L4 24GB"),
    Hardware("trn1", 190.0, 32.0, 1.34, "AWS Trainium (trn1, per chip)"),
    Hardware("trn2", 667.0, 96.0, 2.90, "AWS Trainium2 (trn2, per chip)"),
    Hardware("cpu", 0.0, 0.0, 0.10, "this machine's CPU: peak measured with a matmul at plan time"),
)}
ALIASES = {"a100": "a100-80gb", "a10040gb": "a100-40gb", "a10080gb": "a100-80gb", "h100sxm": "h100",
           "trainium": "trn1", "trainium1": "trn1", "trainium2": "trn2"}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def get_hardware(name: str, prices: dict[str, float] | None = None) -> Hardware:
    """Look a device up by name (case, dashes and spaces ignored); apply price overrides; measure the CPU."""
    table = {_key(k): k for k in HARDWARE}
    key = table.get(_key(name)) or ALIASES.get(_key(name))
    if key is None:
        raise FmforgeError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")
    hw = HARDWARE[key]
    if hw.name == "cpu":
        hw = replace(hw, peak_tflops=measure_cpu_tflops(), memory_gb=_ram_gb())
    for pname, usd in (prices or {}).items():
        if table.get(_key(pname)) == hw.name or ALIASES.get(_key(pname)) == hw.name:
            hw = replace(hw, usd_per_hour=usd)
    return hw


def parse_prices(items: list[str]) -> dict[str, float]:
    """``["h100=2.5", "b200=6"]`` → {"h100": 2.5, "b200": 6.0}; names are checked against the table."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            usd = float(value)
        except ValueError:
            usd = -1.0
        if not sep or usd < 0:
            raise FmforgeError(f"bad --price {item!r}: expected NAME=USD_PER_HOUR, e.g. h100=2.5")
        get_hardware(name) if _key(name) != "cpu" else None  # unknown names fail here
        out[name] = usd
    return out


def measure_cpu_tflops(seconds: float = 0.5) -> float:
    """Dense matmul rate of this CPU (fp32 and bf16, whichever is faster) with torch's current threads: a
    practical peak to state MFU against."""
    import torch

    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b  # warm up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            a @ b
            n += 1
        best = max(best, 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e12)
    return best


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def mfu_from_run(run_dir: str | Path) -> float:
    """Median MFU logged in a run's metrics.jsonl (the trainer logs it where the device peak is known)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FmforgeError(f"--mfu-from: no metrics.jsonl in {run_dir}")
    values = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record.get("mfu"), int | float):
            values.append(float(record["mfu"]))
    # The first logged window includes compilation and warm-up: leave it out when there are others.
    values = values[1:] if len(values) > 1 else values
    if not values:
        raise FmforgeError(f"--mfu-from: {path} has no mfu values (on CPU, set train.peak_tflops to log them)")
    return statistics.median(values)


def time_and_cost(flops: float, hw: Hardware, devices: int, mfu: float) -> tuple[float, float]:
    """Wall-clock hours and USD to run ``flops`` on ``devices`` of ``hw`` at ``mfu``."""
    hours = flops / (devices * hw.peak_tflops * 1e12 * mfu) / 3600.0
    return hours, hours * devices * hw.usd_per_hour


def flops_from_budget(hw: Hardware, devices: int, mfu: float, hours: float | None = None,
                      usd: float | None = None) -> float:
    """Useful training FLOPs bought by ``hours`` of ``devices`` devices, or by ``usd``."""
    if usd is not None:
        hours = usd / (devices * hw.usd_per_hour)
    return devices * hw.peak_tflops * 1e12 * mfu * hours * 3600.0
