"""Model shapes for a parameter budget: count parameters and FLOPs of a config without building it, and
propose a concrete (layers, width, heads, context) that ``fmforge train`` accepts.

The counts are exact for fmforge's own models (tests check them against ``GPT.num_params`` and
``GPT.flops_per_token``), so a plan's numbers are the numbers the trainer will report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fmforge.errors import FmforgeError
from fmforge.models.config import ModelConfig, default_d_ff
from fmforge.models.sizes import DECODER_ARCH_DEFAULTS as ARCH_DEFAULTS


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int


def _counts(arch: dict, s: Shape, vocab_size: int, seq_len: int) -> tuple[int, int]:
    """(total, non-embedding) parameters of a GPT with family defaults ``arch``; mirrors models/blocks.py."""
    d, hd, bias = s.d_model, s.d_model // s.n_head, arch["bias"]
    qkv_out = (s.n_head + 2 * s.n_kv_head) * hd
    attn = d * qkv_out + s.n_head * hd * d + (qkv_out + d if bias else 0)
    if arch["mlp"] == "swiglu":
        mlp = 3 * d * s.d_ff + (2 * s.d_ff + d if bias else 0)
    else:
        mlp = 2 * d * s.d_ff + (s.d_ff + d if bias else 0)
    norm = d * (2 if arch["norm"] == "layernorm" and bias else 1)
    non_embedding = s.n_layer * (attn + mlp + 2 * norm) + norm
    embedding = vocab_size * d * (1 if arch["tie_embeddings"] else 2)
    if arch["pos"] == "learned":
        embedding += seq_len * d
    return non_embedding + embedding, non_embedding


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameter counts of a resolved model config, tied weights once. Non-embedding
    leaves out token/position embeddings and the output head (Kaplan et al. 2020's N)."""
    arch = {k: getattr(cfg, k) for k in ("bias", "mlp", "norm", "tie_embeddings", "pos")}
    shape = Shape(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff)
    return _counts(arch, shape, cfg.vocab_size, cfg.max_seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, the trainer's MFU formula (PaLM appendix B): 6 x (non-embedding weights +
    the head's d x vocab matmul) + the attention term 12 L d T."""
    _, non_embedding = count_params(cfg)
    return 6.0 * (non_embedding + cfg.d_model * cfg.vocab_size) + 12.0 * cfg.n_layer * cfg.d_model * seq_len


def head_dim_for(d_model: int) -> int:
    """16 for toy widths, 64 up to 1024 (GPT-2/3), 128 beyond (Llama)."""
    return 16 if d_model < 128 else 64 if d_model < 1024 else 128


def kv_heads_for(arch: str, n_head: int) -> int:
    """GPT-2 is multi-head; Llama-style models use grouped-query attention with up to 8 KV heads (Llama 3),
    a quarter of the query heads when that is fewer."""
    if arch != "llama" or n_head < 8:
        return n_head
    kv = min(8, n_head // 4)
    while n_head % kv:
        kv -= 1
    return kv


def target_aspect(n_params: float) -> float:
    """Width / depth that published models use at this size: 32 for toys, 64 around 1e8 (GPT-2 124M:
    768/12), 128 from 1e10 (GPT-3 13B, Llama 7B/13B). Kaplan et al. 2020 (fig. 5) found loss within a few
    percent over aspect ratios 20-200, so this matters for speed more than for loss."""
    x = min(max((math.log10(max(n_params, 1.0)) - 6.0) / 4.0, 0.0), 1.0)
    return 32.0 * 4.0 ** x


def _widths() -> list[int]:
    """Toy widths in steps of 16; then an even number of 64-wide heads; from 1024 on, multiples of 1024
    (head counts divisible by 8, so grouped-query attention splits evenly, as in Llama 3 8B/70B). Depth
    takes up the slack, so the parameter budget is still met closely."""
    return [*range(16, 128, 16), *range(128, 1024, 128), *range(1024, 32769, 1024)]


def propose_model(n_params: float, arch: str = "llama", vocab_size: int = 50304, seq_len: int = 2048,
                  count: str = "non_embedding") -> dict:
    """A shape whose parameter count (``count``: "non_embedding" or "total") is near ``n_params``, with a
    width/depth ratio like published models of that size. Returns ``model`` config fields."""
    if arch not in ARCH_DEFAULTS:
        raise FmforgeError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCH_DEFAULTS))}")
    if not n_params > 0 or not math.isfinite(n_params):
        raise FmforgeError(f"model size must be a positive number of parameters, got {n_params}")
    if count not in ("non_embedding", "total"):
        raise FmforgeError(f"count must be 'non_embedding' or 'total', got {count!r}")
    defaults = ARCH_DEFAULTS[arch]
    aspect = target_aspect(n_params)
    best, best_score = None, math.inf
    for d in _widths():
        hd = head_dim_for(d)
        if d % hd:
            continue
        n_head = d // hd
        shape0 = Shape(1, d, n_head, kv_heads_for(arch, n_head), default_d_ff(d, defaults["mlp"]))
        total1, non_emb1 = _counts(defaults, shape0, vocab_size, seq_len)
        per_layer = _counts(defaults, replace(shape0, n_layer=2), vocab_size, seq_len)[1] - non_emb1
        fixed = (total1 if count == "total" else non_emb1) - per_layer
        # Depth that hits the budget at this width, then its neighbours.
        ideal = (n_params - fixed) / per_layer
        for n_layer in {max(1, math.floor(ideal)), max(1, math.ceil(ideal))}:
            if n_layer > 256:
                continue
            got = fixed + n_layer * per_layer
            if got <= 0:
                continue
            score = abs(math.log(got / n_params)) + 0.3 * abs(math.log(d / n_layer / aspect))
            if score < best_score:
                best, best_score = Shape(n_layer, d, n_head, shape0.n_kv_head, shape0.d_ff), score
    if best is None or best_score > math.log(2.0):
        hint = (f": the embeddings of a {vocab_size}-token vocabulary alone exceed it; use a smaller vocabulary"
                if count == "total" else "")
        raise FmforgeError(f"no {arch} shape within 2x of {n_params:.3g} {count.replace('_', '-')} parameters{hint}")
    return {"arch": arch, "size": None, "n_layer": best.n_layer, "n_head": best.n_head,
            "n_kv_head": best.n_kv_head, "d_model": best.d_model, "max_seq_len": seq_len}


def resolve_proposal(fields: dict, vocab_size: int) -> ModelConfig:
    """The full config ``fmforge train`` will build from proposed fields (vocabulary padded the same way)."""
    return ModelConfig(**fields).resolved(vocab_size=vocab_size)
