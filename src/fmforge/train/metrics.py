"""Throughput, MFU and memory figures, and the three places they go: metrics.jsonl, TensorBoard, terminal."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0, "A10": 125.0,
    "L40S": 362.0, "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "V100": 125.0,  # fp16 tensor cores; V100 has no bf16
    "T4": 65.0,  # fp16
}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak TFLOP/s for MFU: the override when given, else a table lookup by CUDA device name; None on CPU."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return PEAK_TFLOPS_BF16[key]
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # Resident set high-water mark of the process (KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsLogger:
    """One JSON object per logged step in ``metrics.jsonl``; the same scalars to TensorBoard; a rich progress
    bar with ETA on a terminal, plain lines otherwise."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool = True,
                 progress: str = "auto", echo=print):
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.file = open(self.path, "a", buffering=1)
        self.echo = echo
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress == "auto":
            progress = "rich" if sys.stdout.isatty() else "plain"
        self.mode = progress
        self.bar = None
        if progress == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()
        self.total_steps = total_steps
        self.t0 = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run logged past its last checkpoint: they will be logged again."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)

    def rewind(self, step: int) -> None:
        """After a rollback to ``step``: drop the lines of the abandoned steps, which will be logged again."""
        self.file.close()
        self._truncate_after(step)
        self.file = open(self.path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{'val' if key.startswith('val') else 'train'}/{key}", value, step)
        shown = {k: v for k, v in record.items() if k in ("loss", "val_loss", "val_top1", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu")}
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=text)
            if "val_loss" in record:
                self.bar.console.print(f"step {step}  {text}")
        elif self.mode == "plain":
            self.echo(f"step {step}/{self.total_steps}  {text}")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
