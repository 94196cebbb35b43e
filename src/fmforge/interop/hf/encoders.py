"""Hugging Face <-> fmforge conversion of the encoder families: BERT, ViT and CLIP (config.json and weights).

Each family is written down once, as a table from fmforge module names to the Hugging Face modules that hold
the same tensors (``_bert_modules``, ``_vit_modules``, ``_clip_modules``). Expanded over the parameters of the
fmforge model a config builds (on the meta device, so it costs nothing), one table converts in both
directions and checks the name and shape of every tensor on the way, in and out.

Hugging Face names are those of checkpoint files: what ``save_pretrained`` writes and the Hub serves.
transformers 5 renames ViT's modules in memory (``layers.0.attention.q_proj``) but still saves, and loads,
the checkpoint names used here.

Converted: BertModel, BertForMaskedLM, BertForPreTraining (its next-sentence head dropped) and
BertForSequenceClassification, with the erf GELU and absolute positions; ViTModel and
ViTForImageClassification (the pooler, which fmforge's ViT lacks, dropped); CLIPModel. Exported: BERT as
BertForMaskedLM, or BertForSequenceClassification when it has labels; ViT as ViTForImageClassification, or
ViTModel without classes; CLIP as CLIPModel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import ValidationError

from fmforge.errors import FmforgeError
from fmforge.models import build_model
from fmforge.models.bert import BertModelConfig
from fmforge.models.blocks import fuse_qkv, split_qkv
from fmforge.models.clip import CLIPModelConfig
from fmforge.models.vit import ViTModelConfig

HF_ENCODER_TYPES = {"bert": "bert", "vit": "vit", "clip": "clip"}  # config.json model_type -> fmforge arch

# transformers' activation names -> the GELU variants fmforge's blocks run (VisionConfig/TextConfig.gelu)
HF_GELU = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "quick_gelu": "quick"}
GELU_HF = {"exact": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}

# transformers' defaults for the keys fmforge reads: older save_pretrained wrote only the values that
# differed from them, so many Hub configs (CLIP's towers above all) leave these out.
BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                     max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12)
VIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    hidden_act="gelu", hidden_dropout_prob=0.0, initializer_range=0.02, layer_norm_eps=1e-12,
                    image_size=224, patch_size=16, num_channels=3, qkv_bias=True)
CLIP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)
CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02, eos_token_id=49407)
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02)

# HF CLIP reads a caption at argmax(input_ids) when the text eos_token_id is 2 (configs from before
# transformers PR #24773), else at the first eos_token_id.
CLIP_LEGACY_EOS = 2


# ---------------------------------------------------------------------------------------------------- tensors


class _Same(NamedTuple):
    """One Hugging Face tensor holding one fmforge tensor; HF leaves out ``squeeze`` leading singleton
    dimensions (CLIP's class embedding is [d] where ours is [1, 1, d])."""

    name: str
    squeeze: int = 0

    def hf_shapes(self, shape: torch.Size) -> dict[str, torch.Size]:
        return {self.name: shape[self.squeeze:]}

    def to_hf(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: t.reshape(t.shape[self.squeeze:])}

    def from_hf(self, hf: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        return hf[self.name].reshape(shape)


class _QKV(NamedTuple):
    """Hugging Face's separate query, key and value projections: our fused ``attn.qkv`` (``fuse_qkv``)."""

    names: tuple[str, str, str]
    n_head: int

    def hf_shapes(self, shape: torch.Size) -> dict[str, torch.Size]:
        return dict.fromkeys(self.names, torch.Size((shape[0] // 3, *shape[1:])))

    def to_hf(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, split_qkv(t, self.n_head, self.n_head)))

    def from_hf(self, hf: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        return fuse_qkv(*(hf[name] for name in self.names), self.n_head, self.n_head)


def _layers(ours: str, hf: str, n_layer: int, n_head: int, names: dict) -> dict:
    """Every block's modules: ``names`` maps one of our blocks' modules to one HF layer's (q/k/v as a triple)."""
    out = {}
    for i in range(n_layer):
        for mine, theirs in names.items():
            if isinstance(theirs, tuple):
                out[f"{ours}.{i}.{mine}"] = _QKV(tuple(f"{hf}.{i}.{name}" for name in theirs), n_head)
            else:
                out[f"{ours}.{i}.{mine}"] = f"{hf}.{i}.{theirs}"
    return out


def _entries(modules: dict, shapes: dict[str, torch.Size]) -> dict:
    """One conversion entry per tensor of our model that ``modules`` maps: either the tensor itself is mapped
    (a bare parameter such as ``cls_token``) or its module is, the parameter name carried over. Which
    parameters exist (biases, a head) is read from our model, so the tables need not repeat the config."""
    out = {}
    for key in shapes:
        module, _, param = key.rpartition(".")
        target = modules.get(key, modules.get(module))
        if target is None:
            continue
        if key in modules:
            out[key] = target if isinstance(target, _Same) else _Same(target)
        elif isinstance(target, _QKV):
            out[key] = target._replace(names=tuple(f"{name}.{param}" for name in target.names))
        else:
            out[key] = _Same(f"{target}.{param}")
    return out


def _check(tensors: dict[str, torch.Tensor], wanted: dict[str, torch.Size], source: str) -> None:
    """Every wanted tensor is there with its shape; the first one that is not is named."""
    for name, shape in wanted.items():
        if name not in tensors:
            raise FmforgeError(f"{source} weights: {name} is missing")
        if tensors[name].shape != shape:
            raise FmforgeError(f"{source} weights: {name} has shape {list(tensors[name].shape)}, "
                               f"expected {list(shape)}")


def _from_hf(hf_sd: dict[str, torch.Tensor], modules: dict, shapes: dict[str, torch.Size]) -> dict:
    """Our tensors out of an HF checkpoint, every HF tensor checked before any is converted."""
    entries = _entries(modules, shapes)
    _check(hf_sd, {n: s for key, e in entries.items() for n, s in e.hf_shapes(shapes[key]).items()}, "Hugging Face")
    return {key: e.from_hf(hf_sd, shapes[key]) for key, e in entries.items()}


def _to_hf(sd: dict[str, torch.Tensor], modules: dict, shapes: dict[str, torch.Size]) -> dict:
    """HF tensors out of our state dict, every one of ours checked first (a run's weights against its config)."""
    entries = _entries(modules, shapes)
    _check(sd, {key: shapes[key] for key in entries}, "fmforge")
    out = {}
    for key, e in entries.items():
        out.update(e.to_hf(sd[key]))
    return {name: t.contiguous() for name, t in out.items()}


def _shapes(cfg) -> dict[str, torch.Size]:
    """The shape of every tensor in the state dict of the model ``cfg`` builds, built on the meta device."""

    with torch.device("meta"):
        return {key: t.shape for key, t in build_model(cfg).state_dict().items()}


def _base(hf_sd: dict[str, torch.Tensor], prefix: str) -> str:
    """The base model's prefix in a task checkpoint (``bert.``, ``vit.``); none in a bare model's."""
    return prefix if any(key.startswith(prefix) for key in hf_sd) else ""


# ---------------------------------------------------------------------------------------------------- tables

BERT_LAYER = {"attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
              "attn.proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
              "mlp.c_fc": "intermediate.dense", "mlp.c_proj": "output.dense", "norm2": "output.LayerNorm"}
# The decoder matrix is the word embedding (tied) and its bias is cls.predictions.bias, so neither is stored.
BERT_MLM = {"mlm_dense": "cls.predictions.transform.dense", "mlm_norm": "cls.predictions.transform.LayerNorm",
            "mlm_bias": "cls.predictions.bias"}
VIT_LAYER = {"attn.qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
             "attn.proj": "attention.output.dense", "norm1": "layernorm_before",
             "mlp.c_fc": "intermediate.dense", "mlp.c_proj": "output.dense", "norm2": "layernorm_after"}
CLIP_LAYER = {"attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "mlp.c_fc": "mlp.fc1",
              "mlp.c_proj": "mlp.fc2", "norm2": "layer_norm2"}


def _bert_modules(cfg: BertModelConfig, base: str, mlm: bool) -> dict:
    emb = base + "embeddings."
    modules = {"tok_emb": emb + "word_embeddings", "pos_emb": emb + "position_embeddings",
               "type_emb": emb + "token_type_embeddings", "emb_norm": emb + "LayerNorm",
               **_layers("blocks", base + "encoder.layer", cfg.n_layer, cfg.n_head, BERT_LAYER)}
    if mlm:
        modules.update(BERT_MLM)
    if cfg.num_labels:
        modules.update(pooler=base + "pooler.dense", classifier="classifier")
    return modules


def _vit_modules(cfg: ViTModelConfig, base: str) -> dict:
    emb = base + "embeddings."
    return {"cls_token": emb + "cls_token", "pos_emb": emb + "position_embeddings",
            "patch_embed": emb + "patch_embeddings.projection",
            **_layers("blocks", base + "encoder.layer", cfg.n_layer, cfg.n_head, VIT_LAYER),
            "norm": base + "layernorm", "head": "classifier"}


def _clip_modules(cfg: CLIPModelConfig) -> dict:
    # HF applies post_layernorm to the [CLS] output only; ours normalizes every token and then pools [CLS]:
    # the same numbers where they are used.
    vis, txt = cfg.vision, cfg.text
    return {"visual.cls_token": _Same("vision_model.embeddings.class_embedding", squeeze=2),
            "visual.pos_emb": _Same("vision_model.embeddings.position_embedding.weight", squeeze=1),
            "visual.patch_embed": "vision_model.embeddings.patch_embedding",
            "visual.norm_pre": "vision_model.pre_layrnorm",  # sic: transformers' spelling
            **_layers("visual.blocks", "vision_model.encoder.layers", vis.n_layer, vis.n_head, CLIP_LAYER),
            "visual.norm": "vision_model.post_layernorm",
            "text.tok_emb": "text_model.embeddings.token_embedding",
            "text.pos_emb": "text_model.embeddings.position_embedding",
            **_layers("text.blocks", "text_model.encoder.layers", txt.n_layer, txt.n_head, CLIP_LAYER),
            "text.norm": "text_model.final_layer_norm",
            "image_proj": "visual_projection", "text_proj": "text_projection",
            "logit_scale": _Same("logit_scale", squeeze=1)}  # HF's is 0-d, ours [1] (FSDP shards no scalars)


def _fresh_mlm_head(cfg: BertModelConfig) -> dict[str, torch.Tensor]:
    """BERT's initialization of a masked-LM head for checkpoints without one (BertModel, a classifier), as
    transformers initializes it when such a checkpoint loads into BertForMaskedLM; drawn from a fixed seed
    so that importing the same checkpoint twice gives the same run directory."""
    d, gen = cfg.d_model, torch.Generator().manual_seed(0)
    return {"mlm_dense.weight": torch.randn(d, d, generator=gen) * cfg.init_std, "mlm_dense.bias": torch.zeros(d),
            "mlm_norm.weight": torch.ones(d), "mlm_norm.bias": torch.zeros(d),
            "mlm_bias": torch.zeros(cfg.vocab_size)}


# ---------------------------------------------------------------------------------------------------- weights


def state_from_hf(hf_sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint's tensors under fmforge's names, for the model ``cfg`` (from
    ``config_from_hf``) builds; every tensor that model has is there, so it loads strictly. Tensors fmforge
    has no place for (BERT's and ViT's pooler when unused, next-sentence heads) are left out."""
    shapes = _shapes(cfg)
    arch = _arch(cfg)
    if arch == "bert":
        mlm = any(key.startswith("cls.predictions.") for key in hf_sd)
        state = _from_hf(hf_sd, _bert_modules(cfg, _base(hf_sd, "bert."), mlm), shapes)
        return state if mlm else {**state, **_fresh_mlm_head(cfg)}
    if arch == "vit":
        return _from_hf(hf_sd, _vit_modules(cfg, _base(hf_sd, "vit.")), shapes)
    return _from_hf(hf_sd, _clip_modules(cfg), shapes)


def state_to_hf(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """fmforge weights under the names of the Hugging Face class ``config_to_hf(cfg)`` names, contiguous
    (ready for safetensors). A BERT with labels exports as a sequence classifier, without its MLM head."""
    _check_exportable(cfg)
    shapes = _shapes(cfg)
    arch = _arch(cfg)
    if arch == "bert":
        return _to_hf(sd, _bert_modules(cfg, "bert.", mlm=not cfg.num_labels), shapes)
    if arch == "vit":
        return _to_hf(sd, _vit_modules(cfg, "vit." if cfg.num_classes else ""), shapes)
    return _to_hf(sd, _clip_modules(cfg), shapes)


def _arch(cfg) -> str:
    arch = getattr(cfg, "arch", None)
    if arch not in HF_ENCODER_TYPES.values():
        raise FmforgeError(f"model.arch {arch!r} has no Hugging Face encoder mapping; fmforge converts "
                           f"{', '.join(HF_ENCODER_TYPES.values())}")
    return arch


# ---------------------------------------------------------------------------------------------------- config in


def config_from_hf(hf: dict):
    """The fmforge run config (``model:`` section) of a Hugging Face ``config.json``, every field explicit so
    that nothing is later refilled from a size or from data. The head comes from ``architectures``: a
    classifier's class count is the length of ``id2label``; without ``architectures``, the bare encoder."""
    model_type = hf.get("model_type")
    if model_type not in HF_ENCODER_TYPES:
        raise FmforgeError(f"unsupported model_type {model_type!r}; fmforge converts {', '.join(HF_ENCODER_TYPES)}")
    return {"bert": _bert_config, "vit": _vit_config, "clip": _clip_config}[model_type](hf)


def _architecture(hf: dict) -> str | None:
    return (hf.get("architectures") or [None])[0]


def _num_labels(hf: dict) -> int:
    # save_pretrained leaves id2label out when it is the default two labels
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


def _gelu(act, key: str) -> str:
    if act not in HF_GELU:
        raise FmforgeError(f"{key} {act!r} is not supported; fmforge runs {', '.join(HF_GELU)}")
    return HF_GELU[act]


def _explicit(cls, **fields):
    """``cls(**fields)`` with every field, nested ones included, marked as set; a config the fmforge model
    cannot take is a one-line error."""
    try:
        cfg = cls(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise FmforgeError(f"config.json does not fit fmforge's {fields['arch']}: "
                           f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None
    return cls(**cfg.model_dump())


def _bert_config(hf: dict) -> BertModelConfig:
    hf = {**BERT_DEFAULTS, **hf}
    if hf["hidden_act"] != "gelu":
        raise FmforgeError(f"hidden_act {hf['hidden_act']!r} is not supported: fmforge's BERT runs the exact "
                           "erf GELU ('gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise FmforgeError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported: "
                           "fmforge's BERT has absolute position embeddings")
    if hf.get("is_decoder"):
        raise FmforgeError("is_decoder=true is not supported: fmforge's BERT is a bidirectional encoder")
    arch = _architecture(hf)
    if arch in ("BertForMaskedLM", "BertForPreTraining") and not hf.get("tie_word_embeddings", True):
        raise FmforgeError("tie_word_embeddings=false is not supported: fmforge's BERT reads its MLM logits "
                           "off the word embeddings")
    return _explicit(BertModelConfig, arch="bert", vocab_size=hf["vocab_size"],
                     max_seq_len=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
                     d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                     d_ff=hf["intermediate_size"],
                     num_labels=_num_labels(hf) if arch == "BertForSequenceClassification" else 0,
                     norm_eps=hf["layer_norm_eps"], dropout=hf["hidden_dropout_prob"],
                     init_std=hf["initializer_range"])


def _vit_config(hf: dict) -> ViTModelConfig:
    hf = {**VIT_DEFAULTS, **hf}
    if not hf["qkv_bias"]:
        raise FmforgeError("qkv_bias=false is not supported: fmforge's ViT has biases on every projection")
    classes = _num_labels(hf) if _architecture(hf) == "ViTForImageClassification" else 0
    return _explicit(ViTModelConfig, arch="vit", image_size=hf["image_size"], patch_size=hf["patch_size"],
                     channels=hf["num_channels"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                     n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"], pooling="cls",
                     num_classes=classes, pos="learned", norm="layernorm", mlp="gelu",
                     gelu=_gelu(hf["hidden_act"], "hidden_act"), bias=True, patch_bias=True, ln_pre=False,
                     norm_eps=hf["layer_norm_eps"], dropout=hf["hidden_dropout_prob"],
                     init_std=hf["initializer_range"])


def _clip_config(hf: dict) -> CLIPModelConfig:
    # *_config_dict: the legacy spelling, which transformers lets override *_config
    text = {**CLIP_TEXT_DEFAULTS, **(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
    vision = {**CLIP_VISION_DEFAULTS, **(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
    top = {**CLIP_DEFAULTS, **hf}
    eos = text["eos_token_id"]
    pool = dict(pool="argmax") if eos == CLIP_LEGACY_EOS else dict(pool="eot", eot_token_id=eos)
    return _explicit(
        CLIPModelConfig, arch="clip", embed_dim=top["projection_dim"],
        init_logit_scale=top["logit_scale_init_value"],
        vision=dict(image_size=vision["image_size"], patch_size=vision["patch_size"], channels=vision["num_channels"],
                    d_model=vision["hidden_size"], n_layer=vision["num_hidden_layers"],
                    n_head=vision["num_attention_heads"], d_ff=vision["intermediate_size"], pooling="cls",
                    num_classes=0, pos="learned", norm="layernorm", mlp="gelu",
                    gelu=_gelu(vision["hidden_act"], "vision_config.hidden_act"), bias=True, patch_bias=False,
                    ln_pre=True, norm_eps=vision["layer_norm_eps"], dropout=vision["attention_dropout"],
                    init_std=vision["initializer_range"]),
        text=dict(vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
                  d_model=text["hidden_size"], n_layer=text["num_hidden_layers"], n_head=text["num_attention_heads"],
                  d_ff=text["intermediate_size"], **pool, norm="layernorm", mlp="gelu",
                  gelu=_gelu(text["hidden_act"], "text_config.hidden_act"), bias=True,
                  norm_eps=text["layer_norm_eps"], dropout=text["attention_dropout"],
                  init_std=text["initializer_range"]))


# ---------------------------------------------------------------------------------------------------- config out


def config_to_hf(cfg) -> dict:
    """The Hugging Face ``config.json`` of an fmforge encoder config; settings transformers' classes cannot
    express (SigLIP's bias, mean pooling, RMSNorm, ...) are a one-line error naming the field."""
    _check_exportable(cfg)
    return {"bert": _bert_to_hf, "vit": _vit_to_hf, "clip": _clip_to_hf}[_arch(cfg)](cfg)


def _labels(n: int) -> dict:
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(n)}, "label2id": {f"LABEL_{i}": i for i in range(n)}}


def _bert_to_hf(cfg: BertModelConfig) -> dict:
    head = {"architectures": ["BertForSequenceClassification"], **_labels(cfg.num_labels)} if cfg.num_labels \
        else {"architectures": ["BertForMaskedLM"]}
    return {**head, "model_type": "bert", "torch_dtype": "float32", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.block_config().d_ff, "hidden_act": "gelu",
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
            "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute", "tie_word_embeddings": True}


def _vit_to_hf(cfg: ViTModelConfig) -> dict:
    head = {"architectures": ["ViTForImageClassification"], **_labels(cfg.num_classes)} if cfg.num_classes \
        else {"architectures": ["ViTModel"]}
    return {**head, "model_type": "vit", "torch_dtype": "float32", "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.block_config().d_ff, "hidden_act": GELU_HF[cfg.gelu],
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "num_channels": cfg.channels, "qkv_bias": True}


def _tower_to_hf(sub, embed_dim: int) -> dict:
    """The keys CLIP's text_config and vision_config share."""
    return {"hidden_size": sub.d_model, "intermediate_size": sub.block_config().d_ff, "num_hidden_layers": sub.n_layer,
            "num_attention_heads": sub.n_head, "hidden_act": GELU_HF[sub.gelu], "layer_norm_eps": sub.norm_eps,
            "attention_dropout": sub.dropout, "initializer_range": sub.init_std, "projection_dim": embed_dim}


def _clip_to_hf(cfg: CLIPModelConfig) -> dict:
    vis, txt = cfg.vision, cfg.text
    eos = CLIP_LEGACY_EOS if txt.pool == "argmax" else txt.eot_token_id
    return {"architectures": ["CLIPModel"], "model_type": "clip", "torch_dtype": "float32",
            "projection_dim": cfg.embed_dim, "logit_scale_init_value": cfg.init_logit_scale,
            "text_config": {"model_type": "clip_text_model", **_tower_to_hf(txt, cfg.embed_dim),
                            "vocab_size": txt.vocab_size, "max_position_embeddings": txt.context_length,
                            "eos_token_id": eos, "bos_token_id": None, "pad_token_id": txt.pad_token_id},
            "vision_config": {"model_type": "clip_vision_model", **_tower_to_hf(vis, cfg.embed_dim),
                              "num_channels": vis.channels, "image_size": vis.image_size,
                              "patch_size": vis.patch_size}}


# What transformers' ViT and CLIP towers are built of, whatever their config says.
_HF_BLOCK = dict(norm="layernorm", mlp="gelu", bias=True)
_HF_VISION = dict(_HF_BLOCK, pooling="cls", pos="learned")


def _check_exportable(cfg) -> None:
    arch = _arch(cfg)
    if arch == "vit":
        _require(cfg, "model.", "ViT", **_HF_VISION, patch_bias=True, ln_pre=False)
    elif arch == "clip":
        _require(cfg, "model.", "CLIP", init_logit_bias=None)
        _require(cfg.vision, "model.vision.", "CLIP", **_HF_VISION, patch_bias=False, ln_pre=True)
        _require(cfg.text, "model.text.", "CLIP", **_HF_BLOCK)
        if cfg.text.pool == "last":
            raise FmforgeError("model.text.pool='last' cannot be exported: Hugging Face CLIP pools at argmax "
                               "or at the first eos_token_id (use pool 'argmax' or 'eot')")
        if cfg.text.pool == "eot" and cfg.text.eot_token_id == CLIP_LEGACY_EOS:
            raise FmforgeError(f"model.text.eot_token_id={CLIP_LEGACY_EOS} cannot be exported with pool 'eot': "
                               "Hugging Face CLIP reads that id as the legacy argmax pooling")


def _require(section, where: str, family: str, **wanted) -> None:
    for field, value in wanted.items():
        if getattr(section, field) != value:
            raise FmforgeError(f"{where}{field}={getattr(section, field)!r} cannot be exported: Hugging Face "
                               f"{family} needs {value!r}")
