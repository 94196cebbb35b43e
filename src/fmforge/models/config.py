"""Schema building blocks shared by every model family: ``Section`` (strict pydantic base), the decoder's
``ModelConfig`` and ``BlockConfig``, the shape of the one block every family composes. Kept apart from ``fmforge.config`` so model files can import them while ``fmforge.config``
imports every family's run config (a run's ``model:`` section is a union discriminated on ``arch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_serializer,
)

from fmforge.errors import FmforgeError
from fmforge.models.sizes import DECODER_ARCH_DEFAULTS, DECODER_SIZES

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScaling(Section):
    """Rotary-frequency rescaling for long contexts, as Hugging Face configs spell it: ``linear`` divides every
    frequency by ``factor`` (position interpolation); ``llama3`` divides only the low frequencies, with a
    smooth blend between ``low_freq_factor`` and ``high_freq_factor`` (Llama 3.1+)."""

    type: Literal["linear", "llama3"]
    factor: PositiveFloat
    low_freq_factor: PositiveFloat = 1.0
    high_freq_factor: PositiveFloat = 4.0
    original_max_position_embeddings: PositiveInt = 8192


class MupConfig(Section):
    """μP (Yang et al. 2022, "Tensor Programs V") relative to a base width, so hyperparameters tuned at
    ``base_width`` transfer to any ``d_model``. With m = d_model / base_width: hidden (matrix-like) weights
    start at std init_std / sqrt(m) and train at lr / m (weight decay x m, so lr x wd per step is kept);
    embeddings, norms and biases keep init_std and lr; the logits are multiplied by 1 / m (the output
    multiplier) with the head's init_std and lr unchanged, i.e. an effective head of init std and update
    size ∝ 1/m, μP's output row for Adam. A tied head is the embedding (init_std, lr, no decay) read out
    through the same 1/m, as the ``mup`` package's MuSharedReadout does. Attention scores are scaled by
    sqrt(base_head_dim) / head_dim (μP's 1/d, equal to SP's 1/sqrt(d) at the base). d_ff and the heads'
    total width are taken to grow with d_model (one multiplier m). At d_model = base_width (and head_dim =
    base_head_dim) the model is exactly the standard one."""

    base_width: PositiveInt
    # The head dimension at the base width; None: base_width / n_head (the head count stays fixed as the
    # width grows). Set it to the head dimension when widths grow by adding heads of a fixed size.
    base_head_dim: PositiveFloat | None = None


class ModelConfig(Section):
    """Decoder-only transformer. ``arch`` picks the family defaults, ``size`` a named shape; any field set
    explicitly wins. ``None`` means "take it from arch/size/tokenizer/data" and is filled by ``resolved``."""

    arch: Literal["gpt2", "llama"] = "llama"
    size: str | None = None
    n_layer: PositiveInt | None = None
    n_head: PositiveInt | None = None
    n_kv_head: PositiveInt | None = None
    d_model: PositiveInt | None = None
    d_ff: PositiveInt | None = None
    vocab_size: PositiveInt | None = None
    max_seq_len: PositiveInt | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu"] | None = None
    pos: Literal["learned", "rope"] | None = None
    bias: bool | None = None
    qkv_bias: bool | None = None  # biases on the q/k/v projection only (Qwen2); None: same as ``bias``
    tie_embeddings: bool | None = None
    rope_theta: PositiveFloat | None = None
    rope_scaling: RopeScaling | None = None
    norm_eps: PositiveFloat = 1e-5
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    init_std: PositiveFloat = 0.02
    # Pad the embedding/head to a multiple of this many rows: matmuls on 50257 rows are slow, 50304 fast.
    vocab_multiple: PositiveInt = 64
    # Learned virtual tokens in front of every sequence (set by `fmforge finetune` with method prefix/prompt):
    # prefix tuning (Li & Liang 2021) learns each layer's keys and values for them; prompt tuning (Lester et
    # al. 2021) learns their input embeddings. They take positions 0..n-1; the text starts after them.
    prefix_tokens: NonNegativeInt = 0
    prompt_tokens: NonNegativeInt = 0
    mup: MupConfig | None = None  # μP width scaling (``MupConfig``); None: standard parametrization

    @model_serializer(mode="wrap")
    def _omit_unset_mup(self, handler):
        # Without μP the dump is what it was before the field existed, so saved model.json files, configs
        # and checkpoint metadata written earlier still compare equal.
        data = handler(self)
        if self.mup is None:
            data.pop("mup", None)
        return data

    def resolved(self, vocab_size: int | None = None, seq_len: int | None = None) -> ModelConfig:
        """Every field filled: explicit value > named size > arch default. ``vocab_size``/``seq_len`` come
        from the tokenizer and data when the config leaves them open."""
        values = self.model_dump()
        if self.size is not None:
            if self.size not in DECODER_SIZES:
                raise FmforgeError(f"model.size: unknown size {self.size!r}; known: {', '.join(sorted(DECODER_SIZES))}")
            for key, val in DECODER_SIZES[self.size].items():
                if values.get(key) is None:
                    values[key] = val
        for key, val in DECODER_ARCH_DEFAULTS[self.arch].items():
            if values.get(key) is None:
                values[key] = val
        if values["vocab_size"] is not None and vocab_size is not None and values["vocab_size"] < vocab_size:
            raise FmforgeError(f"model.vocab_size ({values['vocab_size']}) is smaller than the tokenizer's "
                               f"vocabulary ({vocab_size})")
        if values["vocab_size"] is None:
            if vocab_size is None:
                raise FmforgeError("model.vocab_size: not set and no tokenizer to take it from")
            m = self.vocab_multiple
            values["vocab_size"] = (vocab_size + m - 1) // m * m
        if values["max_seq_len"] is None:
            values["max_seq_len"] = seq_len
        for key in ("n_layer", "n_head", "d_model", "max_seq_len"):
            if values[key] is None:
                raise FmforgeError(f"model.{key}: not set (give it, or a model.size that sets it)")
        if values["n_kv_head"] is None:
            values["n_kv_head"] = values["n_head"]
        if values["d_model"] % values["n_head"]:
            raise FmforgeError(f"model.d_model ({values['d_model']}) must be divisible by model.n_head ({values['n_head']})")
        if values["n_head"] % values["n_kv_head"]:
            raise FmforgeError(f"model.n_head ({values['n_head']}) must be divisible by model.n_kv_head ({values['n_kv_head']})")
        if values["pos"] == "rope" and (values["d_model"] // values["n_head"]) % 2:
            raise FmforgeError("model: rotary embeddings need an even head dimension (d_model / n_head)")
        if values["prefix_tokens"] and values["prompt_tokens"]:
            raise FmforgeError("model: prefix_tokens and prompt_tokens exclude each other (prefix or prompt tuning)")
        if values.get("mup") is not None and values["prefix_tokens"]:
            raise FmforgeError("model.mup: not supported with prefix tuning (prefix_tokens)")
        if values["d_ff"] is None:
            values["d_ff"] = default_d_ff(values["d_model"], values["mlp"])
        if seq_len is not None and seq_len > values["max_seq_len"]:
            raise FmforgeError(f"data.seq_len ({seq_len}) exceeds model.max_seq_len ({values['max_seq_len']})")
        return ModelConfig(**values)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def width_mult(self) -> float:
        """μP's width multiplier m = d_model / mup.base_width; 1 without μP."""
        return 1.0 if self.mup is None else self.d_model / self.mup.base_width

    @property
    def attn_scale(self) -> float | None:
        """μP's attention-score scale sqrt(base_head_dim) / head_dim; None (SDPA's 1/sqrt(head_dim)) without."""
        if self.mup is None:
            return None
        base_head_dim = self.mup.base_head_dim or self.mup.base_width / self.n_head
        return math.sqrt(base_head_dim) / self.head_dim

    def block_config(self) -> BlockConfig:
        """What each of the decoder's blocks reads (the config must be resolved)."""
        return BlockConfig(d_model=self.d_model, n_head=self.n_head, n_kv_head=self.n_kv_head, d_ff=self.d_ff,
                           norm=self.norm, mlp=self.mlp, bias=self.bias, qkv_bias=self.qkv_bias,
                           norm_eps=self.norm_eps, dropout=self.dropout, attn_scale=self.attn_scale)


@dataclass(frozen=True)
class BlockConfig:
    """The shape of one shared transformer block (``blocks.Block``), which every family composes: decoders
    take it from their resolved ``ModelConfig``, encoders from ``encoder_block_config``."""

    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu
    bias: bool = True
    qkv_bias: bool | None = None  # None: same as ``bias``
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_scale: float | None = None  # attention-score scale; None: 1/sqrt(head_dim)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def encoder_block_config(src, d_model: int, n_head: int, d_ff: int | None) -> BlockConfig:
    """The block of an encoder tower of this shape, norm/MLP/bias/eps/dropout from ``src`` (a family config;
    one without norm/mlp/bias fields means LayerNorm, GELU, biases)."""
    mlp = getattr(src, "mlp", "gelu")
    return BlockConfig(d_model=d_model, n_head=n_head, n_kv_head=n_head, d_ff=d_ff or default_d_ff(d_model, mlp),
                       norm=getattr(src, "norm", "layernorm"), mlp=mlp, bias=getattr(src, "bias", True),
                       norm_eps=src.norm_eps, dropout=src.dropout)


def default_d_ff(d_model: int, mlp: str) -> int:
    """GPT-2: 4d. Llama's SwiGLU: 2/3 of 4d (same weights as a 4d GELU MLP), rounded up to a multiple of 64."""
    if mlp == "swiglu":
        return (int(8 * d_model / 3) + 63) // 64 * 64
    return 4 * d_model
