"""Parallelism applied from outside the model, in torchtitan's order: tensor parallel (DTensor plans) →
activation checkpointing → compile (per block) → data parallel (DDP, FSDP2 full shard, or HSDP). The model
file never knows.

The model is built on the meta device, parallelized, and only then materialized (``to_empty`` + the model's
own ``init_weights``), so each rank allocates only its shards: a model bigger than one device can be built.

Ranks form a mesh ``(dp, tp)`` with tp innermost (tensor parallelism talks on every matmul, so it stays
within a node); HSDP splits dp into ``(replicate, shard)``. Ranks that differ only in their tp coordinate
see the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor

from fmforge.config import ModelConfig, ParallelConfig
from fmforge.errors import FmforgeError
from fmforge.models.registry import block_stacks
from fmforge.train.distributed import DistInfo


@dataclass
class Layout:
    """Where this rank sits: ``dp_rank`` of ``dp_size`` data-parallel replicas, each ``tp`` ranks wide."""

    dp_rank: int
    dp_size: int
    tp: int
    mesh: object | None  # DeviceMesh with dims ("dp", "tp") or ("replicate", "shard", "tp"); None: 1 process


def build_layout(pcfg: ParallelConfig, mcfg: ModelConfig, info: DistInfo) -> Layout:
    """Check the parallel config against the world size and model shape; build the device mesh."""
    tp = pcfg.tp
    if info.world_size % tp:
        raise FmforgeError(f"parallel.tp ({tp}) must divide the number of processes ({info.world_size})")
    if tp > 1 and not isinstance(mcfg, ModelConfig):
        raise FmforgeError(f"parallel.tp > 1 is implemented for decoder models (gpt2, llama), not model.arch="
                           f"{mcfg.arch}: use data parallelism (parallel.dp ddp or fsdp) for it")
    if tp > 1:
        if mcfg.n_kv_head % tp:
            raise FmforgeError(f"parallel.tp ({tp}) must divide model.n_kv_head ({mcfg.n_kv_head}): each rank "
                               "holds whole key/value groups")
        if mcfg.d_ff % tp:
            raise FmforgeError(f"parallel.tp ({tp}) must divide model.d_ff ({mcfg.d_ff})")
        if pcfg.dp == "ddp" and info.world_size > tp:
            raise FmforgeError("parallel.tp > 1 composes with parallel.dp=fsdp or hsdp, not ddp (DDP does not "
                               "take DTensor parameters)")
    dp_size = info.world_size // tp
    if not info.distributed:
        return Layout(0, 1, 1, None)
    from torch.distributed.device_mesh import init_device_mesh

    if pcfg.dp == "hsdp" and dp_size > 1:
        shard = pcfg.dp_shard or max(1, info.local_world_size // tp)
        if dp_size % shard:
            raise FmforgeError(f"parallel.dp_shard ({shard}) must divide the data-parallel size ({dp_size})")
        mesh = init_device_mesh(info.device.type, (dp_size // shard, shard, tp),
                                mesh_dim_names=("replicate", "shard", "tp"))
    else:
        mesh = init_device_mesh(info.device.type, (dp_size, tp), mesh_dim_names=("dp", "tp"))
    return Layout(info.rank // tp, dp_size, tp, mesh)


def apply_tensor_parallel(model: nn.Module, layout: Layout) -> None:
    """Megatron-style plan on each block: the fused qkv projection and the MLP's up/gate projections are
    split by output rows (column-wise), the attention output and the MLP's down projection by input rows
    (row-wise, one all-reduce each). Heads and MLP channels stay local in between. Embeddings, norms and
    the output head are replicated."""
    if layout.tp == 1:
        return
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh = layout.mesh["tp"]
    for block in model.blocks:
        plan = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel()}
        if hasattr(block.mlp, "w1"):  # SwiGLU
            plan.update({"mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(), "mlp.w2": RowwiseParallel()})
        else:
            plan.update({"mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()})
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(stacks: list[nn.ModuleList], mode: str) -> None:
    """``full``: recompute every block in the backward pass; ``selective``: every second block (half the
    activation memory saved for half the recompute)."""
    if mode == "none":
        return
    for blocks in stacks:
        for i, block in enumerate(blocks):
            if mode == "full" or i % 2 == 0:
                blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(stacks: list[nn.ModuleList]) -> None:
    """Compile each block on its own: one graph reused n_layer times compiles fast and composes with FSDP's
    per-block hooks."""
    for blocks in stacks:
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(block)


def apply_fsdp(model: nn.Module, stacks: list[nn.ModuleList], pcfg: ParallelConfig, layout: Layout,
               bf16: bool) -> None:
    """FSDP2 ``fully_shard`` per block, then the root (embeddings, final norm, heads). HSDP shards within
    the ``shard`` mesh dimension and replicates across ``replicate``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if pcfg.dp == "hsdp" and layout.dp_size > 1:
        mesh = layout.mesh["replicate", "shard"]
    else:
        mesh = layout.mesh["dp"]
    # bf16 compute and all-gathers, fp32 gradient reduction: the standard FSDP recipe.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for blocks in stacks:
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def uses_fsdp(pcfg: ParallelConfig, layout: Layout) -> bool:
    return layout.dp_size > 1 and pcfg.dp in ("fsdp", "hsdp")


def parallelize(model: nn.Module, pcfg: ParallelConfig, layout: Layout, compile: bool, bf16: bool) -> None:
    """Shard ``model`` in place (it may still be on the meta device): TP → AC → compile → FSDP/HSDP."""
    stacks = block_stacks(model)
    apply_tensor_parallel(model, layout)
    apply_activation_checkpointing(stacks, pcfg.ac)
    if compile:
        apply_compile(stacks)
    if uses_fsdp(pcfg, layout):
        apply_fsdp(model, stacks, pcfg, layout, bf16)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model's (sharded) parameters on ``device`` and run its init. Draws the same
    random numbers as building the model whole on the CPU (see ``blocks.init_normal_``)."""
    model.to_empty(device=device)
    model.init_weights()


def wrap_ddp(model: nn.Module, pcfg: ParallelConfig, layout: Layout, info: DistInfo) -> nn.Module:
    """The module to call for forward/backward: a DDP wrapper for dp=ddp, else ``model`` itself."""
    if layout.dp_size == 1 or pcfg.dp != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # No buffer broadcast: the only buffers are RoPE tables, identical on every rank by construction.
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               broadcast_buffers=False)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient norm over every parameter, clipped to ``max_norm`` (inf: measure only). Handles a mix
    of plain tensors and DTensors on different meshes (tensor parallel blocks sharded on (dp, tp), replicated
    embeddings on dp only), which ``torch.nn.utils.clip_grad_norm_`` cannot combine: the norm of each group
    is reduced over its own mesh, then the groups are combined."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else g.device
        groups.setdefault(key, []).append(g)
    norms = []
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm(members, 2.0, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        # Scale the local shards: DTensor arithmetic would refuse a plain-tensor factor.
        locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        for group in _by_device(locals_).values():
            torch._foreach_mul_(group, coef.to(group[0].device))
    return total


def _by_device(tensors: list[torch.Tensor]) -> dict:
    out: dict = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out
