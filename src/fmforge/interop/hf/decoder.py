"""Hugging Face <-> fmforge for decoder language models: Llama 2/3/3.1, Mistral, Qwen2 and GPT-2.

Both directions share one table of rules (``_rules``): an fmforge tensor, the HF tensors it is made of, and
the two conversions between them. The only real transformations are the fused ``attn.qkv`` (``fuse_qkv``) and
GPT-2's Conv1D layout ([in, out], the transpose of ``nn.Linear``); RoPE uses HF Llama's rotate-half layout, so
q/k weights move without a permutation. The HF shapes a config expects are derived from the fmforge model itself
(built on the meta device, then mapped through the same rules), so the shape checks cannot drift from the
mapping.

Exported configs carry the rotary settings both as ``rope_theta``/``rope_scaling`` (what transformers 4,
vLLM and llama.cpp's converter read) and as ``rope_parameters`` (transformers 5); imports read either form.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from pydantic import ValidationError

from fmforge.errors import FmforgeError
from fmforge.models.blocks import fuse_qkv, split_qkv
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT

HF_DECODER_TYPES = ("llama", "mistral", "qwen2", "gpt2")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh-approximated GELU fmforge's MLP computes
# Buffers some HF checkpoints store beside the weights; they are recomputed from the config, not learned.
HF_BUFFERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)attn\.(bias|masked_bias)$")


# ---------------------------------------------------------------------------------------------------- configs


def config_from_hf(hf: dict) -> ModelConfig:
    """The fmforge model an HF ``config.json`` (parsed) describes, every field explicit. Raises FmforgeError
    naming the key for anything fmforge cannot compute exactly."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        values = _gpt2_values(hf)
    elif model_type in LLAMA_FAMILY:
        values = _llama_values(hf, model_type)
    else:
        raise FmforgeError(f"config.json: model_type {model_type!r} is not a decoder fmforge converts "
                           f"({', '.join(HF_DECODER_TYPES)})")
    try:
        cfg = ModelConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(map(str, first["loc"]))
        raise FmforgeError(f"config.json: invalid model.{field}: {first['msg']}") from None
    return cfg.resolved()


def _required(hf: dict, key: str):
    if hf.get(key) is None:
        raise FmforgeError(f"config.json: {key} is missing")
    return hf[key]


def _llama_values(hf: dict, model_type: str) -> dict:
    d_model, n_head = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise FmforgeError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported; {model_type} "
                           "models need silu (the SwiGLU MLP)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_head != d_model:
        raise FmforgeError(f"config.json: head_dim ({head_dim}) must equal hidden_size / num_attention_heads "
                           f"({d_model} / {n_head}); fmforge derives the head size from them")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise FmforgeError("config.json: use_sliding_window true is not supported (fmforge attends to every "
                           "earlier position)")
    bias, qkv_bias = _llama_biases(hf, model_type)
    max_seq_len = _required(hf, "max_position_embeddings")
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if window and window < max_seq_len:
        # Mistral attends to the last ``sliding_window`` positions only; fmforge attends to all. Within
        # sliding_window positions the two are the same computation, so capping the length keeps it exact.
        max_seq_len = window
    rope_theta, rope_scaling = _rope_from_hf(hf)
    return dict(arch="llama", n_layer=_required(hf, "num_hidden_layers"), n_head=n_head,
                n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d_model,
                d_ff=_required(hf, "intermediate_size"), vocab_size=_required(hf, "vocab_size"),
                max_seq_len=max_seq_len, norm="rmsnorm", mlp="swiglu", pos="rope", bias=bias, qkv_bias=qkv_bias,
                tie_embeddings=hf.get("tie_word_embeddings", False), rope_theta=rope_theta,
                rope_scaling=rope_scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
                init_std=hf.get("initializer_range", 0.02), dropout=0.0)


def _llama_biases(hf: dict, model_type: str) -> tuple[bool, bool]:
    """(bias, qkv_bias): Qwen2 has biases on q/k/v only, Mistral none, Llama a switch for attention and one
    for the MLP, which fmforge can follow only when they agree."""
    if model_type == "qwen2":
        return False, True
    if model_type == "mistral":
        return False, False
    attention, mlp = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention != mlp:
        raise FmforgeError(f"config.json: attention_bias ({attention}) differs from mlp_bias ({mlp}); fmforge "
                           "has one bias switch for both")
    return attention, attention


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers 4's ``rope_theta`` + ``rope_scaling`` or
    transformers 5's ``rope_parameters``; ``rope_scaling`` wins when both are given, as in transformers."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key) or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise FmforgeError(f"config.json: {key} type {kind!r} is not supported (fmforge computes default, "
                           "linear and llama3 rotary scaling)")
    scaling = {"type": kind, **{k: params[k] for k in ROPE_SCALING_KEYS if k in params}}
    if kind == "llama3":  # transformers' own fallback when the config leaves the pretraining length out
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, scaling


def _gpt2_values(hf: dict) -> dict:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise FmforgeError(f"config.json: activation_function {activation!r} is not supported; fmforge's GPT-2 "
                           f"MLP computes {' / '.join(GPT2_ACTIVATIONS)}")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False)):
        if hf.get(key, supported) != supported:
            raise FmforgeError(f"config.json: {key} {hf[key]} is not supported (fmforge's attention is "
                               "plain scaled dot-product self-attention)")
    d_model, n_head = _required(hf, "n_embd"), _required(hf, "n_head")
    # rope_theta is unused with learned positions; set to the arch default so the config is complete.
    return dict(arch="gpt2", n_layer=_required(hf, "n_layer"), n_head=n_head, n_kv_head=n_head, d_model=d_model,
                d_ff=hf.get("n_inner") or 4 * d_model, vocab_size=_required(hf, "vocab_size"),
                max_seq_len=_required(hf, "n_positions"), norm="layernorm", mlp="gelu", pos="learned", bias=True,
                qkv_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), rope_theta=10000.0,
                rope_scaling=None, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                init_std=hf.get("initializer_range", 0.02), dropout=0.0)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF ``config.json`` for ``cfg`` (resolved): LlamaForCausalLM, Qwen2ForCausalLM (biases on q/k/v
    only) or GPT2LMHeadModel. Raises FmforgeError naming the field that has no equivalent there."""
    if cfg.arch == "gpt2":
        return _gpt2_hf_config(cfg)
    _require_fields(cfg, "Llama", norm="rmsnorm", mlp="swiglu", pos="rope")
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
              "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
              "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
              "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, **_rope_to_hf(cfg),
              **_DTYPE}
    if qkv_bias == cfg.bias:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "attention_bias": cfg.bias, "mlp_bias": cfg.bias}
    if cfg.bias:
        raise FmforgeError("model.qkv_bias: false with model.bias true (biases everywhere but q/k/v) has no "
                           "Hugging Face equivalent")
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common, "use_sliding_window": False}


# transformers 5 reads "dtype"; "torch_dtype" is its name in transformers 4 and in most tools.
_DTYPE = {"dtype": "float32", "torch_dtype": "float32"}


def _require_fields(cfg: ModelConfig, family: str, **wanted) -> None:
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise FmforgeError(f"model.{field}: {getattr(cfg, field)!r} has no {family} equivalent "
                               f"({family} needs {value!r})")


def _rope_to_hf(cfg: ModelConfig) -> dict:
    scaling = cfg.rope_scaling
    if scaling is None:
        hf_scaling, kind = None, "default"
    else:
        keys = ROPE_SCALING_KEYS if scaling.type == "llama3" else ("factor",)
        hf_scaling, kind = {"rope_type": scaling.type, **{k: getattr(scaling, k) for k in keys}}, scaling.type
    parameters = {"rope_type": kind, "rope_theta": cfg.rope_theta, **(hf_scaling or {})}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": hf_scaling, "rope_parameters": parameters}


def _gpt2_hf_config(cfg: ModelConfig) -> dict:
    _require_fields(cfg, "GPT-2", pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
                    n_kv_head=cfg.n_head)
    if cfg.qkv_bias is False:
        raise FmforgeError("model.qkv_bias: False has no GPT-2 equivalent (GPT-2 needs biases on q/k/v)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": cfg.init_std,
            # HF's default is 0.1 everywhere: a fine-tune of the export would otherwise train with dropout
            # the model never had.
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True, **_DTYPE}


# ---------------------------------------------------------------------------------------------------- weights


class _Rule(NamedTuple):
    """One fmforge tensor made of the HF tensors ``hf``; ``to_fm(*hf_tensors)`` and ``to_hf(fm_tensor)``."""

    fm: str
    hf: tuple[str, ...]
    to_fm: Callable[..., torch.Tensor]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _copy(fm: str, hf: str) -> _Rule:
    return _Rule(fm, (hf,), lambda t: t, lambda t: (t,))


def _conv1d(fm: str, hf: str) -> _Rule:
    """GPT-2's Conv1D stores weights [in, out]: the transpose of nn.Linear's."""
    return _Rule(fm, (hf,), lambda t: t.t(), lambda t: (t.t(),))


def _qkv(fm: str, hf: tuple[str, str, str], n_head: int, n_kv_head: int) -> _Rule:
    return _Rule(fm, hf, lambda q, k, v: fuse_qkv(q, k, v, n_head, n_kv_head),
                 lambda t: split_qkv(t, n_head, n_kv_head))


def _c_attn(fm: str, hf: str, n_head: int, transposed: bool) -> _Rule:
    """GPT-2's c_attn: q, k, v concatenated along the output dim (weights in Conv1D layout)."""
    def to_fm(t):
        return fuse_qkv(*(t.t() if transposed else t).chunk(3, dim=0), n_head, n_head)

    def to_hf(t):
        fused = torch.cat(split_qkv(t, n_head, n_head), dim=0)
        return (fused.t() if transposed else fused,)

    return _Rule(fm, (hf,), to_fm, to_hf)


def _rules(cfg: ModelConfig) -> list[_Rule]:
    return _gpt2_rules(cfg) if cfg.arch == "gpt2" else _llama_rules(cfg)


def _llama_rules(cfg: ModelConfig) -> list[_Rule]:
    rules = [_copy("tok_emb.weight", "model.embed_tokens.weight"), _copy("norm_f.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        rules.append(_copy("lm_head.weight", "lm_head.weight"))
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    for i in range(cfg.n_layer):
        fm, hf = f"blocks.{i}.", f"model.layers.{i}."
        rules += [_copy(fm + "norm1.weight", hf + "input_layernorm.weight"),
                  _copy(fm + "norm2.weight", hf + "post_attention_layernorm.weight")]
        for kind in ("weight", "bias") if qkv_bias else ("weight",):
            names = tuple(f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv")
            rules.append(_qkv(f"{fm}attn.qkv.{kind}", names, cfg.n_head, cfg.n_kv_head))
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            rules += [_copy(f"{fm}attn.proj.{kind}", f"{hf}self_attn.o_proj.{kind}"),
                      _copy(f"{fm}mlp.w1.{kind}", f"{hf}mlp.gate_proj.{kind}"),
                      _copy(f"{fm}mlp.w3.{kind}", f"{hf}mlp.up_proj.{kind}"),
                      _copy(f"{fm}mlp.w2.{kind}", f"{hf}mlp.down_proj.{kind}")]
    return rules


def _gpt2_rules(cfg: ModelConfig) -> list[_Rule]:
    rules = [_copy("tok_emb.weight", "transformer.wte.weight"), _copy("pos_emb.weight", "transformer.wpe.weight"),
             _copy("norm_f.weight", "transformer.ln_f.weight"), _copy("norm_f.bias", "transformer.ln_f.bias")]
    if not cfg.tie_embeddings:
        rules.append(_copy("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layer):
        fm, hf = f"blocks.{i}.", f"transformer.h.{i}."
        rules += [_c_attn(fm + "attn.qkv.weight", hf + "attn.c_attn.weight", cfg.n_head, transposed=True),
                  _c_attn(fm + "attn.qkv.bias", hf + "attn.c_attn.bias", cfg.n_head, transposed=False),
                  _conv1d(fm + "attn.proj.weight", hf + "attn.c_proj.weight"),
                  _copy(fm + "attn.proj.bias", hf + "attn.c_proj.bias"),
                  _conv1d(fm + "mlp.c_fc.weight", hf + "mlp.c_fc.weight"),
                  _copy(fm + "mlp.c_fc.bias", hf + "mlp.c_fc.bias"),
                  _conv1d(fm + "mlp.c_proj.weight", hf + "mlp.c_proj.weight"),
                  _copy(fm + "mlp.c_proj.bias", hf + "mlp.c_proj.bias")]
        for n in (1, 2):
            rules += [_copy(f"{fm}norm{n}.{kind}", f"{hf}ln_{n}.{kind}") for kind in ("weight", "bias")]
    return rules


def _fm_shapes(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The fmforge model's tensors for ``cfg`` on the meta device: shapes without memory."""

    with torch.device("meta"):
        return GPT(cfg).state_dict()


def _check(sd: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Every expected tensor present with its shape, nothing else: the first problem, named."""
    for name, shape in expected.items():
        if name not in sd:
            raise FmforgeError(f"{source} weights: {name} is missing")
        if tuple(sd[name].shape) != tuple(shape):
            raise FmforgeError(f"{source} weights: {name} has shape {list(sd[name].shape)}, "
                               f"expected {list(shape)}")
    extra = [name for name in sd if name not in expected]
    if extra:
        raise FmforgeError(f"{source} weights: unexpected tensor {extra[0]} (the model config has no place "
                           "for it)")


def _with_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A base-model checkpoint (GPT2Model, LlamaModel: no ``transformer.``/``model.`` prefix) under the
    ForCausalLM names the rules use."""
    if any(name.startswith(prefix) for name in sd):
        return sd
    return {name if name.startswith("lm_head.") else prefix + name: t for name, t in sd.items()}


def state_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF decoder state dict under fmforge's names for ``cfg`` (from ``config_from_hf``); no
    ``lm_head.weight`` when tied. Raises FmforgeError naming the first missing, misshapen or unexpected key."""
    rules = _rules(cfg)
    sd = _with_prefix(hf_sd, "transformer." if cfg.arch == "gpt2" else "model.")
    sd = {name: t for name, t in sd.items()
          if not HF_BUFFERS.search(name) and not (cfg.tie_embeddings and name == "lm_head.weight")}
    fm = _fm_shapes(cfg)
    expected = {name: t.shape for r in rules for name, t in zip(r.hf, r.to_hf(fm[r.fm]))}
    _check(sd, expected, "Hugging Face")
    return {r.fm: r.to_fm(*(sd[name] for name in r.hf)).contiguous() for r in rules}


def state_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An fmforge decoder state dict under HF's names for ``config_to_hf(cfg)``; contiguous tensors, and
    ``lm_head.weight`` only when not tied. Raises FmforgeError naming the first missing or misshapen key."""
    rules = _rules(cfg)
    if cfg.tie_embeddings:  # a live model's state dict lists the tied head; saved files leave it out
        sd = {name: t for name, t in sd.items() if name != "lm_head.weight"}
    fm = _fm_shapes(cfg)
    _check(sd, {r.fm: fm[r.fm].shape for r in rules}, "fmforge")
    return {name: t.contiguous() for r in rules for name, t in zip(r.hf, r.to_hf(sd[r.fm]))}
