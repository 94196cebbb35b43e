"""THE dispatch table: one entry per model family. Every other module asks here instead of testing
``model.arch`` itself: which config class a ``model:`` section is, which ``nn.Module`` it builds, which
objective pretrains it, its named sizes and its Hugging Face converter.

Objectives and converters live in layers above ``models/``, so an entry names them and those layers bind
the names (``objectives.OBJECTIVES``, ``interop.hf.convert.CONVERTERS``). Adding a family = a model file,
an objective file and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch.nn as nn
from pydantic import Discriminator, Tag, TypeAdapter

from fmforge.models.bert import Bert, BertModelConfig
from fmforge.models.clip import CLIP, CLIPModelConfig
from fmforge.models.config import ModelConfig
from fmforge.models.dit import DiT, DiTModelConfig
from fmforge.models.gpt import GPT
from fmforge.models.sizes import BERT_SIZES, CLIP_SIZES, DECODER_SIZES, DIT_SIZES, MAE_SIZES, VIT_SIZES
from fmforge.models.virtual import VirtualTokenGPT, has_virtual_tokens
from fmforge.models.vit import MAE, MAEModelConfig, ViT, ViTModelConfig


@dataclass(frozen=True)
class Family:
    name: str  # what model.json records as "family"
    archs: tuple[str, ...]  # the ``model.arch`` values that select it
    config: type  # the pydantic ``model:`` section
    model: type[nn.Module]  # built from that config
    objective: str  # key of ``objectives.OBJECTIVES``: how ``fmforge train`` pretrains it
    sizes: dict[str, dict]  # named shapes (``models/sizes.py``)
    hf: str | None  # key of ``interop.hf.convert.CONVERTERS``; None: no Hugging Face equivalent
    description: str  # for messages: "a language model (gpt2/llama)"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("decoder", ("gpt2", "llama"), ModelConfig, GPT, "clm", DECODER_SIZES, "decoder",
           "a language model (gpt2/llama)"),
    Family("bert", ("bert",), BertModelConfig, Bert, "mlm", BERT_SIZES, "encoders", "a bert model"),
    Family("vit", ("vit",), ViTModelConfig, ViT, "image_classify", VIT_SIZES, "encoders", "a vit model"),
    Family("mae", ("mae",), MAEModelConfig, MAE, "mae", MAE_SIZES, None, "a mae model"),
    Family("clip", ("clip",), CLIPModelConfig, CLIP, "contrastive", CLIP_SIZES, "encoders", "a clip model"),
    Family("dit", ("dit",), DiTModelConfig, DiT, "diffusion", DIT_SIZES, "diffusers",
           "a diffusion transformer (dit)"),
)}
ARCHS: tuple[str, ...] = tuple(a for f in FAMILIES.values() for a in f.archs)
_BY_ARCH = {a: f for f in FAMILIES.values() for a in f.archs}


def _family_tag(value: Any) -> str:
    arch = value.get("arch", "llama") if isinstance(value, dict) else getattr(value, "arch", None)
    return _BY_ARCH[arch].name if arch in _BY_ARCH else str(arch)


# A run's ``model:`` section: one of the families' configs, chosen by ``arch`` (default llama).
AnyModelConfig = Annotated[
    Annotated[ModelConfig, Tag("decoder")] | Annotated[BertModelConfig, Tag("bert")]
    | Annotated[ViTModelConfig, Tag("vit")] | Annotated[MAEModelConfig, Tag("mae")]
    | Annotated[CLIPModelConfig, Tag("clip")] | Annotated[DiTModelConfig, Tag("dit")],
    Discriminator(_family_tag),
]
_MODEL_CONFIG = TypeAdapter(AnyModelConfig)


def family(model_cfg) -> Family:
    """The family of a model config (or of a bare ``arch`` string)."""
    arch = model_cfg if isinstance(model_cfg, str) else model_cfg.arch
    return _BY_ARCH[arch]


def family_of(model_cfg) -> str:
    """"decoder" for the causal LMs (gpt2, llama), else the config's arch: vit, mae, clip, bert."""
    return family(model_cfg).name


def is_decoder(model_cfg) -> bool:
    return family_of(model_cfg) == "decoder"


def parse_model_config(values: dict):
    """A ``model:`` mapping validated into its family's config (raises pydantic's ValidationError)."""
    return _MODEL_CONFIG.validate_python(values)


def build_model(cfg) -> nn.Module:
    """The model a ``model:`` config describes. A decoder config is resolved first (a no-op when it already
    is), so one without vocab_size/max_seq_len fails naming the missing field; one with virtual tokens
    (prefix or prompt tuning) is built with them (``virtual.py``)."""
    if isinstance(cfg, ModelConfig):
        cfg = cfg.resolved()
        if has_virtual_tokens(cfg):
            return VirtualTokenGPT(cfg)
    return family(cfg).model(cfg)


def block_stacks(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of repeated blocks, as it declares them (``block_stacks()``), which per-block
    activation checkpointing, compile and FSDP wrap. A model that declares none gets a clear error rather
    than silently losing those."""
    declare = getattr(model, "block_stacks", None)
    if declare is None:
        raise TypeError(f"{type(model).__name__} does not declare its repeated blocks (block_stacks())")
    return list(declare())
