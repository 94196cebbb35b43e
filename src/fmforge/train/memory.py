"""Per-device memory estimate for a training setup: parameters, gradients, optimizer state, activations.

Printed before training and set beside the measured peak after the first steps, so a user sees whether a
bigger micro-batch, FSDP or activation checkpointing is what the next run needs. Activation sizes follow
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2) with the
attention-score term dropped, since SDPA's fused kernels never materialize the scores.
"""

from __future__ import annotations

from fmforge.config import ModelConfig

GB = 1e9


def estimate_memory(model: ModelConfig, n_params: int, seq_len: int, micro_batch: int, world_size: int = 1,
                    dp: str = "ddp", ac: str = "none", bf16: bool = True, tp: int = 1) -> dict[str, float]:
    """Bytes per device, in GB, by component. Weights and AdamW moments are fp32 (mixed precision keeps
    fp32 masters); FSDP/HSDP shard weights, gradients and moments over the data-parallel ranks (here: all of
    them, HSDP's replication is not modelled); tensor parallelism splits the blocks' weights ``tp`` ways
    (embeddings and head stay whole)."""
    dp_size = world_size // tp
    shard = dp_size if dp in ("fsdp", "hsdp") and dp_size > 1 else 1
    replicated = model.vocab_size * model.d_model * (1 if model.tie_embeddings else 2)
    if model.pos == "learned":
        replicated += model.max_seq_len * model.d_model
    per_device_params = (n_params - replicated) / tp + replicated
    act_bytes = 2 if bf16 else 4
    s, b, h, L = seq_len, micro_batch, model.d_model, model.n_layer
    # Per layer, 16-bit activations: s·b·h·(10 + 24/tp) bytes (norms and residuals whole, qkv, attention
    # output and MLP split by tensor parallelism; Korthikanti et al. table 2); scale for fp32.
    per_layer = (10 + 24 / tp) * s * b * h * act_bytes / 2
    stored_layers = {"none": L, "full": 0, "selective": L // 2}[ac]
    # Checkpointed layers keep only their input (s·b·h) and one layer is rebuilt at a time in the backward.
    activations = stored_layers * per_layer + (L - stored_layers) * s * b * h * act_bytes
    if stored_layers < L:
        activations += per_layer
    # Logits in the compute dtype plus the loss's fp32 chunk (see objectives/clm.py).
    logits = s * b * model.vocab_size * act_bytes * 2
    out = {
        "params": 4 * per_device_params / shard,
        "grads": 4 * per_device_params / shard,
        "optimizer": 8 * per_device_params / shard,
        "activations": activations + logits,
    }
    if shard > 1 and bf16:  # one block's bf16 weights all-gathered at a time, plus the next one prefetched
        out["params"] += 2 * 2 * (per_device_params / L)
    out["total"] = sum(out.values())
    return {k: v / GB for k, v in out.items()}


def describe(est: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.3g}" for k, v in est.items() if k != "total")
    return f"memory estimate per device: {est['total']:.3g} GB ({parts})"
