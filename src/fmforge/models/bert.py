"""BERT (Devlin et al. 2019): a bidirectional encoder on the shared ``Block`` — no causal mask, a key-padding
mask instead — with a masked-LM head tied to the token embedding and a classifier on the [CLS] position.

BERT predates pre-norm, so its blocks run with ``post_norm=True`` (same parameters, original order) and
the exact erf GELU; with those two switches Hugging Face BERT checkpoints load tensor for tensor
(``hf_bert_state_dict``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from fmforge.models.blocks import Block, fuse_qkv, init_linear, init_normal_
from fmforge.models.config import BlockConfig, Section, encoder_block_config
from fmforge.models.sizes import BERT_SIZES, apply_size, lookup_size


class BertConfig(Section):
    vocab_size: PositiveInt = 30522  # bert-base-uncased WordPiece
    max_seq_len: PositiveInt = 512
    type_vocab_size: PositiveInt = 2  # sentence A / sentence B
    d_model: PositiveInt = 768
    n_layer: PositiveInt = 12
    n_head: PositiveInt = 12
    d_ff: PositiveInt | None = None
    num_labels: NonNegativeInt = 0  # > 0 adds BERT's pooler and a classifier on [CLS]
    norm_eps: PositiveFloat = 1e-12
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    init_std: PositiveFloat = 0.02

    @model_validator(mode="after")
    def _check(self) -> BertConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self

    @classmethod
    def from_size(cls, name: str, **overrides) -> BertConfig:
        return cls(**{**lookup_size(BERT_SIZES, name, "BERT"), **overrides})

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> BertConfig:
        """From a Hugging Face ``config.json`` of a BertModel."""
        fields = dict(vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
                      type_vocab_size=hf["type_vocab_size"], d_model=hf["hidden_size"],
                      n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                      d_ff=hf["intermediate_size"], norm_eps=hf["layer_norm_eps"],
                      dropout=hf["hidden_dropout_prob"], init_std=hf["initializer_range"])
        return cls(**{**fields, **overrides})

    def block_config(self) -> BlockConfig:
        return encoder_block_config(self, self.d_model, self.n_head, self.d_ff)


class BertModelConfig(BertConfig):
    """The ``model:`` section of a masked-LM pretraining run on prepared text, named by ``size`` (a key of
    ``BERT_SIZES``). The vocabulary comes from the data's tokenizer (padded to ``vocab_multiple`` rows)
    unless set. ``mask_prob`` of the tokens are selected for prediction, 80/10/10 masked/random/kept."""

    arch: Literal["bert"] = "bert"
    size: str | None = None
    mask_prob: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    vocab_multiple: PositiveInt = 64

    @model_validator(mode="before")
    @classmethod
    def _size_defaults(cls, data):
        return apply_size(data, BERT_SIZES, "BERT")


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        bcfg = cfg.block_config()
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(bcfg, causal=False, post_norm=True, gelu_approximate="none")
                                    for _ in range(cfg.n_layer))
        # Masked-LM head: a transform, then the token embedding read backwards (tied: no separate matrix,
        # so nothing to re-tie after to_empty) plus a per-token bias.
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.num_labels:
            self.pooler = nn.Linear(d, d)
            self.classifier = nn.Linear(d, cfg.num_labels)
        else:
            self.pooler = self.classifier = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT's init: N(0, 0.02) for every matrix and embedding (no depth scaling), biases zero, norms one."""
        std = self.cfg.init_std
        for emb in (self.tok_emb, self.pos_emb, self.type_emb):
            init_normal_(emb.weight, std, truncated=False)
        self.emb_norm.reset_parameters()
        for block in self.blocks:
            block.init_weights(std, std, truncated=False)
        init_linear(self.mlm_dense, std, truncated=False)
        self.mlm_norm.reset_parameters()
        nn.init.zeros_(self.mlm_bias)
        for layer in (self.pooler, self.classifier):
            if layer is not None:
                init_linear(layer, std, truncated=False)

    def reset_buffers(self) -> None:
        """No derived buffers; here so every family materializes from the meta device the same way."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, mlm_select: torch.Tensor | None = None,
                classify: bool = False) -> torch.Tensor:
        """Final hidden states [B, T, d]. ``attention_mask`` [B, T] is 1 for real tokens and 0 for padding:
        no token attends to padding (padded positions still get outputs, which the heads ignore).
        With ``mlm_select`` (bool [B, T]) the masked-LM logits of just those positions [n, vocab] instead:
        the pretraining path; with ``classify`` the class logits [B, num_labels] from [CLS]. Both heads run
        inside ``forward`` so DDP and FSDP see them."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequences of {T} tokens exceed max_seq_len {self.cfg.max_seq_len}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(T, device=input_ids.device))
        x = self.drop(self.emb_norm(x + self.type_emb(token_type_ids)))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T keys]
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        if classify:
            return self.cls_logits(x)
        return x if mlm_select is None else self.mlm_logits(x[mlm_select])

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for hidden states [..., d]; pass only the masked positions to save the big matmul."""
        x = self.mlm_norm(F.gelu(self.mlm_dense(hidden)))
        return F.linear(x, self.tok_emb.weight, self.mlm_bias)

    def cls_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_labels] from the [CLS] position, through BERT's tanh pooler."""
        if self.classifier is None:
            raise ValueError("this BERT has no classifier: build it with num_labels > 0")
        return self.classifier(self.drop(torch.tanh(self.pooler(hidden[:, 0]))))

    def block_stacks(self) -> list[nn.ModuleList]:
        """The repeated blocks that parallelism wraps one by one (``registry.block_stacks``)."""
        return [self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def hf_bert_state_dict(hf: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face BertModel / BertFor* state dict onto ``Bert``'s names. Separate q/k/v become the
    fused ``attn.qkv``; the MLM head and pooler are taken when present (load with strict=False otherwise)."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    out = {
        "tok_emb.weight": hf["embeddings.word_embeddings.weight"],
        "pos_emb.weight": hf["embeddings.position_embeddings.weight"],
        "type_emb.weight": hf["embeddings.token_type_embeddings.weight"],
        "emb_norm.weight": hf["embeddings.LayerNorm.weight"],
        "emb_norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg.n_layer):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (hf[f"{src}attention.self.{name}.{kind}"] for name in ("query", "key", "value"))
            out[f"{dst}attn.qkv.{kind}"] = fuse_qkv(q, k, v, cfg.n_head, cfg.n_head)
            out[f"{dst}attn.proj.{kind}"] = hf[f"{src}attention.output.dense.{kind}"]
            out[f"{dst}norm1.{kind}"] = hf[f"{src}attention.output.LayerNorm.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = hf[f"{src}intermediate.dense.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = hf[f"{src}output.dense.{kind}"]
            out[f"{dst}norm2.{kind}"] = hf[f"{src}output.LayerNorm.{kind}"]
    optional = {"cls.predictions.transform.dense.weight": "mlm_dense.weight",
                "cls.predictions.transform.dense.bias": "mlm_dense.bias",
                "cls.predictions.transform.LayerNorm.weight": "mlm_norm.weight",
                "cls.predictions.transform.LayerNorm.bias": "mlm_norm.bias",
                "cls.predictions.bias": "mlm_bias"}
    if cfg.num_labels:
        optional.update({"pooler.dense.weight": "pooler.weight", "pooler.dense.bias": "pooler.bias"})
    out.update({dst: hf[src] for src, dst in optional.items() if src in hf})
    return out
