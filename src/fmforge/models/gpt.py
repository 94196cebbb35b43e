"""Decoder-only language model (GPT-2 and Llama families) on the shared blocks of ``blocks.py``.

The two families differ only in config (see ``sizes.DECODER_ARCH_DEFAULTS``): positions (learned vs rotary), norm
(LayerNorm vs RMSNorm), MLP (GELU vs SwiGLU), biases, weight tying, and the init below. ``cfg.mup`` turns on
μP (``config.MupConfig``): its init, output multiplier and attention scale live here and in ``blocks.py``, its
per-layer learning rates in ``train/optim.py`` (from ``GPT.param_kinds``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fmforge.models.blocks import Block, KVCache, init_normal_, make_norm, rope_tables
from fmforge.models.config import ModelConfig


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        """``cfg`` must be resolved (``ModelConfig.resolved``): every shape field set."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.block_config(), causal=True) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.pos == "rope":
            # Non-persistent: derived from the config, so never saved; filled by reset_buffers() (via init_weights).
            self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _apply(self, fn, recurse=True):
        # Moving between devices of different kinds (meta -> cpu in to_empty, as runs.load_pretrained does)
        # makes a new Parameter per module and silently unties the head from the embedding; tie them again.
        super()._apply(fn, recurse)
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2: N(0, init_std), residual-stream projections scaled by 1/sqrt(2 n_layer) (Radford et al. 2019).
        Llama: truncated normal, residual-stream projections of layer i scaled by 1/sqrt(2 (i + 1)) (torchtitan's
        depth init). Biases zero, norms one. With μP the blocks' weights start at init_std / sqrt(m) (fan-in
        scaling, equal at the base width); embeddings and head keep init_std. Safe to call again after
        ``to_empty``, on a sharded model too: every weight is drawn whole on the CPU generator in a fixed order
        (``init_normal_``), so the values do not depend on the device, the sharding or the world size."""
        cfg = self.cfg
        std, truncated = cfg.init_std, cfg.arch != "gpt2"
        hidden_std = std / math.sqrt(cfg.width_mult)  # exactly std without μP (m = 1)
        embeddings = [self.tok_emb, self.pos_emb] + ([] if cfg.tie_embeddings else [self.lm_head])
        for module in embeddings:
            if module is None:
                continue
            init_normal_(module.weight, std, truncated)
        for i, block in enumerate(self.blocks):
            depth = cfg.n_layer if cfg.arch == "gpt2" else i + 1
            block.init_weights(hidden_std, hidden_std / math.sqrt(2 * depth), truncated)
        self.norm_f.reset_parameters()
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the RoPE tables on the model's current device (``to_empty`` leaves them uninitialized)."""
        if self.cfg.pos == "rope":
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                   device=self.rope_cos.device, scaling=self.cfg.rope_scaling)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor, start_pos: int = 0, cache: list[KVCache] | None = None, *,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab_size] in the compute dtype for tokens idx [B, T] at positions start_pos...
        With ``cache`` (from ``new_cache``) keys/values are stored for later calls: prefill at start_pos=0,
        then feed new tokens at start_pos = tokens so far.

        Rows at different positions (sequences of different lengths batched together) pass ``positions``
        [B, T], each token's own position, instead of ``start_pos``. With a cache, token (b, t) is stored at
        position positions[b, t] of row b and attends to that row's keys up to its own position (right
        padding is harmless: a pad is overwritten before any later real token reads it). Without a cache,
        attention is causal over the T tokens and-ed with ``attn_mask`` [B, T, T] (True = may attend), which
        lets one row hold several sequences, e.g. a context and its continuations side by side."""
        return self.forward_embeddings(self.tok_emb(idx), start_pos, cache, positions=positions,
                                       attn_mask=attn_mask)

    def forward_embeddings(self, x: torch.Tensor, start_pos: int = 0, cache: list[KVCache] | None = None, *,
                           positions: torch.Tensor | None = None,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` from input embeddings x [B, T, d_model] instead of token ids (what learned prompt
        embeddings feed, ``virtual.py``)."""
        return self.lm_head(self.hidden_states(x, start_pos, cache, positions=positions, attn_mask=attn_mask))

    def hidden_states(self, x: torch.Tensor, start_pos: int = 0, cache: list[KVCache] | None = None, *,
                      positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the output head reads [B, T, d_model] (final norm applied), for embeddings x; arguments as
        ``forward``. Callers that need logits at a few positions only apply ``lm_head`` to those."""
        T = x.size(1)
        if positions is not None:
            # Per-token positions: the rows may sit at different places in their sequences.
            if positions.numel() and (int(positions.max()) >= self.cfg.max_seq_len or int(positions.min()) < 0):
                raise ValueError(f"positions must be in [0, max_seq_len {self.cfg.max_seq_len})")
            at: torch.Tensor | slice = positions
            where: torch.Tensor | int = positions
        else:
            if start_pos + T > self.cfg.max_seq_len:
                raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len {self.cfg.max_seq_len}")
            at, where = slice(start_pos, start_pos + T), start_pos
        if self.pos_emb is not None:
            index = positions if positions is not None else torch.arange(start_pos, start_pos + T, device=x.device)
            x = x + self.pos_emb(index)
        rope = (self.rope_cos[at], self.rope_sin[at]) if self.cfg.pos == "rope" else None
        mask = None if attn_mask is None else attn_mask[:, None]
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x = block(x, rope, where, layer_cache) if mask is None else block(x, rope, where, layer_cache, mask)
        x = self.norm_f(x)
        if self.cfg.mup is not None:
            x = x * (1.0 / self.cfg.width_mult)  # μP's output multiplier: logits / m (see MupConfig)
        return x

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        """One empty KV cache per layer for up to ``max_len`` positions; device/dtype default to the weights'."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        weight = self.tok_emb.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        return [KVCache(batch_size, self.cfg.n_kv_head, max_len, self.cfg.head_dim, device, dtype)
                for _ in range(self.cfg.n_layer)]

    def param_kinds(self) -> dict[str, list[nn.Parameter]]:
        """Each parameter's row of μP's table, by which ``train/optim.py`` sets its learning rate: "embedding"
        (token and position tables, a head tied to them included), "output" (an untied head), "hidden" (the
        blocks' Linear weights: both dimensions grow with the width), "vector" (norms, biases). Parameters a
        wrapper adds (prefix or prompt tokens, LoRA factors) are not listed."""
        kinds: dict[str, list[nn.Parameter]] = {"embedding": [self.tok_emb.weight], "output": [], "hidden": [],
                                                "vector": list(self.norm_f.parameters())}
        if self.pos_emb is not None:
            kinds["embedding"].append(self.pos_emb.weight)
        if not self.cfg.tie_embeddings:
            kinds["output"].append(self.lm_head.weight)
        for block in self.blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    kinds["hidden"].append(module.weight)
                    kinds["vector"] += [] if module.bias is None else [module.bias]
                elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                    kinds["vector"] += list(module.parameters(recurse=False))
        return kinds

    def block_stacks(self) -> list[nn.ModuleList]:
        """The repeated blocks that parallelism wraps one by one (``registry.block_stacks``)."""
        return [self.blocks]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights once. ``exclude_embeddings`` leaves out the token and position
        embeddings and the output head (Kaplan et al.'s "non-embedding" N)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Q T, where N counts
        every weight that multiplies activations: the non-embedding parameters plus the output head's
        d_model x vocab matmul (counted even when tied, since the head matmul runs either way). Embedding
        lookups are gathers, not matmuls, so they are left out. Used for MFU."""
        cfg = self.cfg
        n = self.num_params(exclude_embeddings=True) + cfg.d_model * cfg.vocab_size
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
