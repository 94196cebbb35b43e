"""The one transformer block every fmforge family is built from: norm, attention, MLP, pre-norm residuals.

Encoder vs decoder is a mask and a head, not a different block: ``Attention(causal=...)`` is the only switch.
Parameter names are chosen so Hugging Face checkpoints map onto them one tensor at a time:

    attn.qkv   = q_proj, k_proj, v_proj fused, rows grouped per kv head (see ``fuse_qkv``)
                                                    (GPT-2: c_attn, stored transposed by HF's Conv1D)
    attn.proj  = o_proj                             (GPT-2: attn.c_proj)
    mlp.c_fc / mlp.c_proj                           (GPT-2 GELU MLP)
    mlp.w1 = gate_proj, mlp.w3 = up_proj, mlp.w2 = down_proj   (Llama SwiGLU)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmforge.models.config import BlockConfig


def make_norm(cfg: BlockConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


@torch.no_grad()
def init_normal_(weight: torch.Tensor, std: float, truncated: bool) -> None:
    """Fill ``weight`` from N(0, std) (truncated at 3 std if asked) drawn on the CPU generator at the
    parameter's full shape, then keep this rank's shard. The values are therefore the same whether the model
    was built whole on the CPU, on the meta device and materialized, or sharded by FSDP and tensor parallelism
    in any layout: runs at different world sizes start from identical weights. A meta tensor is left alone
    and consumes no randomness (it is initialized later, after ``to_empty``)."""
    if weight.is_meta:
        return
    full = torch.empty(weight.shape, dtype=torch.float32)
    if truncated:
        nn.init.trunc_normal_(full, std=std, a=-3 * std, b=3 * std)
    else:
        nn.init.normal_(full, std=std)
    copy_full_(weight, full)


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into ``param``, which may be a DTensor shard (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds ``full`` already, so it just slices its shard (no communication).
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def init_linear(layer: nn.Linear, std: float, truncated: bool) -> None:
    """GPT-2 draws from N(0, std); Llama/torchtitan truncates at 3 std so no weight starts as an outlier."""
    init_normal_(layer.weight, std, truncated)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------------------------------- RoPE


def rope_tables(head_dim: int, max_len: int, theta: float, device=None,
                scaling=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_len, head_dim] in fp32, in the rotate-half layout of HF Llama: frequency i
    rotates the pair (i, i + head_dim/2), so HF q/k weights load without a permutation. ``scaling`` is a
    ``RopeScaling`` (linear or Llama 3.1's frequency-dependent rescaling) or None."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is not None:
        inv_freq = _scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _scaled_frequencies(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # Llama 3.1: wavelengths longer than the original context / low_freq_factor are stretched by ``factor``,
    # shorter than original / high_freq_factor kept, and those in between blended linearly in 1/wavelength.
    old = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, *heads, head_dim] by the angles of its positions; cos/sin are [T, head_dim], or
    [B, T, head_dim] when the rows sit at different positions."""
    shape = tuple(cos.shape[:-1]) + (1,) * (x.dim() - 3) + (cos.size(-1),)
    cos, sin = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)  # the dtype cast matches HF
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------------------------------------------- attention


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """Fuse separate q/k/v projection weights [heads * head_dim, ...] (or biases) into ``attn.qkv``'s layout:
    rows grouped per kv head g as [q heads of group g, k_g, v_g] (Megatron's layout). A contiguous row
    range then holds whole groups, so tensor parallelism shards the fused matrix row-wise and each rank gets
    complete heads with their own keys and values."""
    groups = n_head // n_kv_head
    rest = q.shape[1:]
    q = q.reshape(n_kv_head, groups, -1, *rest)
    k, v = k.reshape(n_kv_head, 1, -1, *rest), v.reshape(n_kv_head, 1, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, n_head: int, n_kv_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``: q [n_head * hd, ...], k and v [n_kv_head * hd, ...]."""
    groups = n_head // n_kv_head
    rest = qkv.shape[1:]
    g = qkv.reshape(n_kv_head, groups + 2, -1, *rest)
    return (g[:, :groups].reshape(-1, *rest), g[:, groups].reshape(-1, *rest),
            g[:, groups + 1].reshape(-1, *rest))


class KVCache:
    """Keys and values of one attention layer, preallocated for ``max_len`` positions; ``length`` are filled.

    Writing at ``start_pos < length`` overwrites from there on (rolling back a rejected continuation)."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, device=None, dtype=None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_head, T, head_dim] at positions start_pos.. and return all keys/values so far."""
        end = start_pos + k.size(2)
        if start_pos > self.length or end > self.max_len:
            raise ValueError(f"KV cache: cannot write positions [{start_pos}, {end}) with {self.length} filled "
                             f"of {self.max_len}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def update_at(self, positions: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_head, T, head_dim] of token (b, t) at position positions[b, t] of row b (rows
        at different positions) and return the keys/values of every row up to the furthest position."""
        end = int(positions.max()) + 1
        if int(positions.min()) < 0 or end > self.max_len:
            raise ValueError(f"KV cache: cannot write positions up to {end} of {self.max_len}")
        rows = torch.arange(k.size(0), device=k.device)[:, None].expand_as(positions)
        self.k[rows, :, positions] = k.transpose(1, 2)  # indexed as [B, T, n_kv_head, head_dim]
        self.v[rows, :, positions] = v.transpose(1, 2)
        self.length = max(self.length, end)
        return self.k[:, :, :end], self.v[:, :, :end]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) of this one that shares its memory (writes land here)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.length = self.k[start:stop], self.v[start:stop], self.length
        return view


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (n_kv_head <= n_head), optional RoPE and KV cache.

    ``forward`` = ``project`` (q, k, v of the new tokens) then ``attend``; wrappers that add keys and values
    of their own (``virtual.PrefixAttention``) call the two halves around their addition. ``scale`` multiplies
    the scores (None: 1/sqrt(head_dim); μP sets its own, ``ModelConfig.attn_scale``)."""

    scale: float | None = None

    def __init__(self, cfg: BlockConfig, causal: bool = True):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.causal = causal
        self.dropout = cfg.dropout
        self.scale = cfg.attn_scale
        # One matmul for q, k and v: a single wide GEMM beats three narrow ones. Rows are grouped per kv
        # head (``fuse_qkv``) so tensor parallelism can shard it by rows.
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                start_pos: int = 0, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d] at positions start_pos..start_pos+T-1; ``rope`` holds cos/sin for exactly those positions.
        ``attn_mask`` (no-cache path only) is a boolean mask, True = may attend, broadcastable to
        [B, n_head, T, T], e.g. key padding for encoders; with causal=True it is and-ed with causality.
        ``start_pos`` may instead be a [B, T] tensor of each token's position (``GPT.forward``'s ``positions``):
        with a cache each row then writes and reads its own positions (``_attend_at``)."""
        return self.attend(*self.project(x, rope), start_pos, cache, attn_mask)

    def project(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, heads, T, head_dim] and k, v [B, kv heads, T, head_dim] of x, rotated when ``rope`` is given."""
        B, T, _ = x.shape
        groups = self.n_head // self.n_kv_head
        qkv = self.qkv(x)
        # Under tensor parallelism this rank computes only its share of the kv groups: count them from the
        # output rather than the config.
        n_kv = qkv.size(-1) // ((groups + 2) * self.head_dim)
        qkv = qkv.view(B, T, n_kv, groups + 2, self.head_dim)
        q, k, v = qkv[:, :, :, :groups], qkv[:, :, :, groups], qkv[:, :, :, groups + 1]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # rope's output is contiguous: flatten is free
        q = q.flatten(2, 3)  # [B, T, n_kv * groups, head_dim]; q head g*groups+j uses kv head g
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int = 0,
               cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
               causal: bool | None = None) -> torch.Tensor:
        """Attention of the queries over k, v (and whatever ``cache`` holds before them), projected out.
        ``causal=False`` with an ``attn_mask`` takes the mask as complete (a wrapper's own layout)."""
        B, _, T, _ = q.shape
        groups = self.n_head // self.n_kv_head
        is_causal = self.causal if causal is None else causal
        mask = attn_mask
        if cache is not None and isinstance(start_pos, torch.Tensor) and attn_mask is None:
            return self._attend_at(q, k, v, start_pos, cache)
        if isinstance(start_pos, torch.Tensor):
            start_pos = 0  # per-token positions only moved the encodings; without a cache attention is causal
        if cache is not None:
            if attn_mask is not None or not self.causal:
                raise ValueError("KV cache decoding is for causal attention without an extra mask")
            k, v = cache.update(start_pos, k, v)
            if start_pos > 0:
                # Queries follow a cached prefix: one token sees every key (no mask); a chunk of T tokens
                # needs the causal mask shifted by start_pos (SDPA's is_causal aligns it top-left, wrongly).
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=q.device).tril(start_pos)
        elif mask is not None and is_causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            is_causal = False

        enable_gqa = groups > 1
        if enable_gqa and mask is not None:
            # The fused kernels take GQA only without a mask (HF's rule too); otherwise SDPA would drop to
            # its math path, so expand the kv heads ourselves.
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            enable_gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa,
                                           dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.proj(y))

    def _attend_at(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """``attend`` for rows at different positions (``positions`` [B, T]): each query sees its row's cached
        keys up to its own position."""
        if not self.causal:
            raise ValueError("KV cache decoding is for causal attention without an extra mask")
        B, _, T, _ = q.shape
        keys, values = cache.update_at(positions, k, v)
        groups = q.size(1) // k.size(1)  # under tensor parallelism: this rank's heads
        if T > 1 and bool((positions == torch.arange(T, device=q.device)).all()):
            # Every row starts at 0 (a batched prefill): the keys are exactly this chunk's, plainly causal.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1, scale=self.scale)
            return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, -1)))
        k, v = keys, values
        mask = torch.arange(k.size(2), device=q.device) <= positions[:, :, None]  # [B, T, S]
        if T == 1:
            # One query per row (a decode step): a kv head's query heads stand in for the query axis, so the
            # keys are read once per kv head rather than copied per query head.
            y = F.scaled_dot_product_attention(q.reshape(B, k.size(1), groups, -1), k, v,
                                               attn_mask=mask[:, None], scale=self.scale)
            y = y.reshape(B, 1, -1)
        else:
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale)
            y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.proj(y))

    def init_weights(self, std: float, out_std: float, truncated: bool) -> None:
        init_linear(self.qkv, std, truncated)
        init_linear(self.proj, out_std, truncated)


# ---------------------------------------------------------------------------------------------------- MLPs


class GeluMLP(nn.Module):
    """GPT-2's MLP: d -> d_ff -> d with tanh-approximated GELU (what GPT-2 was trained with).
    ``gelu_approximate="none"`` is the exact erf GELU that BERT and ViT were trained with; ``"quick"`` is
    OpenAI CLIP's x * sigmoid(1.702 x)."""

    def __init__(self, cfg: BlockConfig, gelu_approximate: str = "tanh"):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.gelu_approximate = gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.gelu_approximate == "quick":
            h = h * torch.sigmoid(1.702 * h)
        else:  # one fused kernel; HF's GPT-2 spells this formula out in eight elementwise ops
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.drop(self.c_proj(h))

    def init_weights(self, std: float, out_std: float, truncated: bool) -> None:
        init_linear(self.c_fc, std, truncated)
        init_linear(self.c_proj, out_std, truncated)


class SwiGLU(nn.Module):
    """Llama's MLP: w2(silu(w1 x) * w3 x). Separate gate/up Linears: fusing them measured slower on CPU."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))

    def init_weights(self, std: float, out_std: float, truncated: bool) -> None:
        init_linear(self.w1, std, truncated)
        init_linear(self.w3, std, truncated)
        init_linear(self.w2, out_std, truncated)


# ---------------------------------------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    ``post_norm=True`` is the original Transformer/BERT order, norm1(x + attn(x)) then norm2(x + mlp(x)):
    the same parameters in another order, so BERT checkpoints run on this block unchanged."""

    def __init__(self, cfg: BlockConfig, causal: bool = True, post_norm: bool = False,
                 gelu_approximate: str = "tanh"):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, causal=causal)
        self.norm2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg, gelu_approximate)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                start_pos: int = 0, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, rope, start_pos, cache, attn_mask))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), rope, start_pos, cache, attn_mask)
        return x + self.mlp(self.norm2(x))

    def init_weights(self, std: float, out_std: float, truncated: bool) -> None:
        """``out_std`` is for the projections that write into the residual stream (attn.proj and the MLP's
        last Linear): each block adds to the stream, so scaling them down keeps its variance from growing
        with depth."""
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        self.attn.init_weights(std, out_std, truncated)
        self.mlp.init_weights(std, out_std, truncated)
