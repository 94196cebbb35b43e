"""Learned virtual tokens in front of every sequence of a decoder, as wrappers around the plain model:
prefix tuning (Li & Liang 2021) learns each layer's keys and values for them (``PrefixAttention`` replaces
each block's attention, keeping its parameter names); prompt tuning (Lester et al. 2021) learns their input
embeddings (``VirtualTokenGPT.prompt``). They take positions 0..n-1 and the text starts after them.

``gpt.py`` and ``blocks.py`` know nothing of them. A decoder whose config sets ``prefix_tokens`` or
``prompt_tokens`` (``fmforge finetune`` with method prefix/prompt writes them into model.json) is built as a
``VirtualTokenGPT`` by the registry, so a tuned model loads, generates and resumes like any other.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from fmforge.models.blocks import Attention, KVCache, init_normal_
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT


class PrefixAttention(Attention):
    """A block's attention plus this layer's learned keys and values of the virtual tokens: every position
    attends to all of them, causally after. With a KV cache they are its first entries, written when the
    cache is still empty. They live here, not on the model, so FSDP gathers them with their block."""

    def __init__(self, attn: Attention, n_tokens: int):
        nn.Module.__init__(self)
        self.n_head, self.n_kv_head, self.head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
        self.causal, self.dropout = attn.causal, attn.dropout
        self.qkv, self.proj, self.resid_drop = attn.qkv, attn.proj, attn.resid_drop  # same names, same tensors
        shape = (attn.n_kv_head, n_tokens, attn.head_dim)
        device = attn.qkv.weight.device
        self.prefix_k = nn.Parameter(torch.empty(shape, device=device))
        self.prefix_v = nn.Parameter(torch.empty(shape, device=device))
        self.enabled = True  # False: attend like the plain attention (``VirtualTokenGPT.without_virtual_tokens``)

    def forward(self, x: torch.Tensor, rope=None, start_pos: int = 0, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        if not self.enabled:
            return self.attend(q, k, v, start_pos, cache, attn_mask)
        B, P = x.size(0), self.prefix_k.size(1)
        prefix_k = self.prefix_k.to(k.dtype).expand(B, -1, -1, -1)
        prefix_v = self.prefix_v.to(v.dtype).expand(B, -1, -1, -1)
        if cache is not None:
            if cache.length == 0:
                cache.update(0, prefix_k.to(cache.k.dtype), prefix_v.to(cache.v.dtype))
            return self.attend(q, k, v, start_pos, cache, attn_mask)
        T = x.size(1)
        mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)  # all of the prefix, causal after
        return self.attend(q, torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2), start_pos,
                           attn_mask=mask, causal=False)

    def init_weights(self, std: float, out_std: float, truncated: bool) -> None:
        super().init_weights(std, out_std, truncated)
        for virtual in (self.prefix_k, self.prefix_v):  # usually replaced by an init from text (finetune)
            init_normal_(virtual, std, truncated)


class VirtualTokenGPT(GPT):
    """A decoder with ``cfg.prefix_tokens`` or ``cfg.prompt_tokens`` learned virtual tokens in front of every
    sequence (positions 0..n-1; the text follows). Same parameter names as the plain decoder, plus
    ``blocks.N.attn.prefix_k/prefix_v`` or ``prompt``."""

    def __init__(self, cfg: ModelConfig):
        cfg = cfg.resolved()
        if cfg.prefix_tokens and cfg.prompt_tokens:
            raise ValueError("prefix_tokens and prompt_tokens exclude each other")
        super().__init__(cfg)
        self.virtual = cfg.prefix_tokens or cfg.prompt_tokens
        self._plain = False
        self.prompt = None
        if cfg.prefix_tokens:
            for block in self.blocks:
                block.attn = PrefixAttention(block.attn, cfg.prefix_tokens)
        else:
            self.prompt = nn.Parameter(torch.empty(cfg.prompt_tokens, cfg.d_model, device=self.tok_emb.weight.device))
        self._init_virtual()

    @torch.no_grad()
    def _init_virtual(self) -> None:
        std, truncated = self.cfg.init_std, self.cfg.arch != "gpt2"
        for block in self.blocks:
            if isinstance(block.attn, PrefixAttention):
                for virtual in (block.attn.prefix_k, block.attn.prefix_v):
                    init_normal_(virtual, std, truncated)
        if self.prompt is not None:  # usually replaced by an init from text (finetune.base.init_virtual_tokens)
            init_normal_(self.prompt, std, truncated)

    def init_weights(self) -> None:
        super().init_weights()  # prefix keys/values included (PrefixAttention.init_weights)
        if getattr(self, "prompt", None) is not None:
            init_normal_(self.prompt, self.cfg.init_std, self.cfg.arch != "gpt2")

    def forward(self, idx: torch.Tensor, start_pos: int = 0, cache: list[KVCache] | None = None) -> torch.Tensor:
        """As ``GPT.forward``, ``start_pos`` counting text tokens: the virtual tokens come first."""
        P = 0 if self._plain else self.virtual
        if start_pos + P + idx.size(1) > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + idx.size(1)} exceed max_seq_len {self.cfg.max_seq_len}"
                             + (f" less {P} virtual tokens" if P else ""))
        if P and self.prompt is not None and start_pos == 0:  # the learned embeddings go in front
            x = self.tok_emb(idx)
            x = torch.cat([self.prompt.to(x.dtype).expand(x.size(0), -1, -1), x], dim=1)
            return self.forward_embeddings(x, 0, cache)[:, P:]
        return super().forward(idx, start_pos + P, cache)

    @contextlib.contextmanager
    def without_virtual_tokens(self):
        """Run as the plain base model (no prefix, no prompt) inside the block: what initializing virtual
        tokens from real text needs. Flags, not a change of parameters, so FSDP's bookkeeping is untouched."""
        prefixed = [b.attn for b in self.blocks if isinstance(getattr(b, "attn", None), PrefixAttention)]
        self._plain = True
        for attn in prefixed:
            attn.enabled = False
        try:
            yield self
        finally:
            self._plain = False
            for attn in prefixed:
                attn.enabled = True

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        """One empty KV cache per layer for up to ``max_len`` positions of text plus the virtual tokens."""
        return super().new_cache(batch_size, max_len + (0 if self._plain else self.virtual), device, dtype)


def has_virtual_tokens(cfg) -> bool:
    return isinstance(cfg, ModelConfig) and bool(cfg.prefix_tokens or cfg.prompt_tokens)
