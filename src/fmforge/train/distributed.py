"""Process-group setup and the preflight checks every rank passes before step 0.

fmforge never starts processes itself: torchrun (or Slurm/Kubernetes through torchrun) sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous; this module only joins the group torch.distributed builds.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fmforge.device import pick_device
from fmforge.errors import FmforgeError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str, timeout_minutes: float) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); a plain single process
    otherwise. Each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(0, 1, 0, 1, pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                store=_store(rank, world, timeout), rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, local_world, device)


def _store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store, namespaced by torchrun's restart count. torchrun keeps one store across
    restarts; without a fresh namespace a restarted rank can read the address a dead peer published there
    and time out connecting to it (seen with gloo after a rank was killed)."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    return dist.PrefixStore(f"fmforge/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def run_on_main(info: DistInfo, fn):
    """Run ``fn`` on rank 0 only and hand its result, or its failure, to every rank: all ranks raise
    together instead of the others waiting forever in the next collective for a rank that failed."""
    result = error = None
    if info.is_main:
        try:
            result = fn()
        except FmforgeError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = f"rank 0 failed: {type(err).__name__}: {err}"
    if info.distributed:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise FmforgeError(error)
    return result


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":  # gloo has no AVG
            value /= info.world_size
    return value


def gather_floats(value: float, info: DistInfo) -> list[float]:
    """``value`` from every rank, in rank order (e.g. per-rank step times)."""
    if not info.distributed:
        return [value]
    mine = torch.tensor([value], dtype=torch.float64, device=info.device)
    out = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(out, mine)
    return [t.item() for t in out]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is true on one (e.g. a SIGTERM that reached a single rank)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _local_checks(info: DistInfo, run_dir: Path, checkpoint_bytes: int) -> list[str]:
    problems = []
    if info.device.type == "cuda":
        try:
            torch.ones(1, device=info.device).add_(1).item()
        except RuntimeError as err:
            problems.append(f"device {info.device} is not usable: {err}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        problems.append(f"output {run_dir} is not writable: {err.strerror or err}")
    else:
        free = shutil.disk_usage(run_dir).free
        if free < checkpoint_bytes:
            problems.append(f"{free / 1e9:.2f} GB free under {run_dir}, a checkpoint needs ~{checkpoint_bytes / 1e9:.2f} GB")
    return problems


def _write_token(run_dir: Path) -> str:
    name = f".shared_probe_{uuid.uuid4().hex}"
    (run_dir / name).write_text("fmforge")
    return name


def preflight(info: DistInfo, run_dir: Path, checkpoint_bytes: int, timeout_s: float = 60.0) -> None:
    """Before step 0: every rank can use its device, write the output and fit a checkpoint, and a collective
    round trip completes within ``timeout_s``. A failure names the rank and the check, on every rank."""
    problems = [f"rank {info.rank}: {p}" for p in _local_checks(info, run_dir, checkpoint_bytes)]
    if info.distributed:
        t = torch.ones(1, device=info.device)
        work = dist.all_reduce(t, async_op=True)
        if not work.wait(timeout=timedelta(seconds=timeout_s)) or t.item() != info.world_size:
            raise FmforgeError(f"preflight failed on rank {info.rank}: all-reduce round trip did not return "
                               f"{info.world_size} within {timeout_s:.0f}s")
        # Checkpoints are written by all ranks into one directory: it must be the same directory everywhere.
        token = run_on_main(info, lambda: _write_token(run_dir))
        if not (run_dir / token).is_file():
            problems.append(f"rank {info.rank}: {run_dir} is not shared with rank 0 (checkpoints need a "
                            "filesystem every node sees)")
        dist.barrier()
        if info.is_main:
            (run_dir / token).unlink(missing_ok=True)
        gathered: list[list[str]] = [[] for _ in range(info.world_size)]
        dist.all_gather_object(gathered, problems)
        problems = [p for rank_problems in gathered for p in rank_problems]
    if problems:
        raise FmforgeError("preflight failed: " + "; ".join(problems))
