"""Parallelism applied from outside the model, in torchtitan's order: activation checkpointing → compile
(per block) → data parallel (DDP, FSDP2 full shard, or HSDP). The model file never knows.

Tensor parallelism (DTensor plans) is not applied yet: the fused qkv projection needs a head-aligned
sharding plan first (see the project notes).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from fmforge.config import ParallelConfig
from fmforge.errors import FmforgeError
from fmforge.train.distributed import DistInfo


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """``full``: recompute every block in the backward pass; ``selective``: every second block (half the
    activation memory saved for half the recompute)."""
    if mode == "none":
        return
    for i, block in enumerate(model.blocks):
        if mode == "full" or i % 2 == 0:
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model: nn.Module) -> None:
    """Compile each block on its own: one graph reused n_layer times compiles fast and composes with FSDP's
    per-block hooks."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block)


def apply_data_parallel(model: nn.Module, pcfg: ParallelConfig, info: DistInfo, bf16: bool) -> nn.Module:
    if not info.distributed:
        return model
    if pcfg.dp == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer broadcast: the only buffers are RoPE tables, identical on every rank by construction.
        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                   broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if pcfg.dp == "hsdp":
        shard = pcfg.dp_shard or info.local_world_size
        if info.world_size % shard:
            raise FmforgeError(f"parallel.dp_shard ({shard}) must divide the world size ({info.world_size})")
        mesh = init_device_mesh(info.device.type, (info.world_size // shard, shard),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    # bf16 compute and all-gathers, fp32 gradient reduction: the standard FSDP recipe.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def parallelize(model: nn.Module, pcfg: ParallelConfig, info: DistInfo, compile: bool, bf16: bool) -> nn.Module:
    """Returns the module to call for forward/backward (a DDP wrapper, or ``model`` itself, sharded in place)."""
    apply_activation_checkpointing(model, pcfg.ac)
    if compile:
        apply_compile(model)
    return apply_data_parallel(model, pcfg, info, bf16)


def uses_fsdp(pcfg: ParallelConfig, info: DistInfo) -> bool:
    return info.distributed and pcfg.dp in ("fsdp", "hsdp")
