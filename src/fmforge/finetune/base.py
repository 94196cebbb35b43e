"""Fine-tuning inside the one training loop: start from a base model's weights, then train all of them
(``finetune.method: full``, optionally freezing some), only LoRA adapters (``lora``), or only virtual
tokens (``prefix`` / ``prompt``).

The loop holds one ``start_for(cfg)`` object, ``FromScratch`` or ``FromBase``, and calls it at the points
where the start matters: ``run_config`` (the base's architecture), ``check_data`` (the base's vocabulary),
``adapt`` on the meta-device model before it is sharded (freezing and adapters must exist before FSDP
groups the parameters), ``load`` once it is materialized (a fresh run, not a resume: a checkpoint already
holds everything), and ``final_weights`` on the gathered state dict (LoRA runs save their adapters apart
and a merged model that generate/eval/export read as is).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from fmforge.config import Config, FinetuneConfig
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.finetune.lora import (
    ADAPTER_CONFIG,
    apply_lora,
    load_adapters,
    lora_modules,
    merge_lora,
    merged_state_dict,
    write_adapters,
)
from fmforge.models.blocks import copy_full_
from fmforge.models.config import ModelConfig
from fmforge.models.vit import ViTModelConfig
from fmforge.runs import checked_run_model, load_pretrained, read_model_config, save_pretrained


def is_virtual(name: str) -> bool:
    """The parameters prefix and prompt tuning add to a decoder: each attention's prefix keys and values,
    or the model's prompt embeddings."""
    return name == "prompt" or name.endswith(("attn.prefix_k", "attn.prefix_v"))


def base_model_config(cfg: Config):
    """The architecture of ``finetune.base``: a fine-tune continues that model, so its model.json decides
    (plus the virtual tokens of prefix or prompt tuning)."""

    ft = cfg.finetune
    base = Path(ft.base)
    if not (base / "model.safetensors").is_file():
        raise FmforgeError(f"finetune.base {base} holds no model (model.safetensors is missing); give a run "
                           "directory from `fmforge train` or `fmforge import hf`")
    model_cfg = read_model_config(base)
    checked_run_model(base, model_cfg)  # the weights' header fits model.json before anything is allocated
    if ft.task == "classify" and model_cfg.arch in ("vit", "mae"):
        model_cfg = image_classifier_config(model_cfg)
    if ft.method in ("prefix", "prompt"):
        if not isinstance(model_cfg, ModelConfig):
            raise FmforgeError(f"finetune.method={ft.method} tunes decoders (gpt2, llama), not {model_cfg.arch}")
        if model_cfg.prefix_tokens or model_cfg.prompt_tokens:
            raise FmforgeError(f"{base} already has virtual tokens; fine-tune its base instead")
        # The virtual tokens take the first positions: rotary tables stretch to fit, a learned table cannot.
        needed = cfg.data.seq_len + ft.virtual_tokens
        if needed > model_cfg.max_seq_len and model_cfg.pos != "rope":
            raise FmforgeError(f"data.seq_len ({cfg.data.seq_len}) + {ft.virtual_tokens} virtual tokens exceed the "
                               f"base's {model_cfg.max_seq_len} learned positions: lower data.seq_len")
        model_cfg = ModelConfig(**{**model_cfg.model_dump(), f"{ft.method}_tokens": ft.virtual_tokens,
                                   "max_seq_len": max(model_cfg.max_seq_len, needed)})
    return model_cfg


def check_tokenizer(ft: FinetuneConfig, data_dir: Path) -> None:
    """The data must be tokenized with the base model's vocabulary: same tokens, same ids."""

    base_tok, data_tok = Path(ft.base) / "tokenizer.json", Path(data_dir) / "tokenizer.json"
    if not (base_tok.is_file() and data_tok.is_file()):
        return
    vocab = [load_tokenizer(p).tokenizer.get_vocab(with_added_tokens=True) for p in (base_tok, data_tok)]
    if vocab[0] != vocab[1]:
        raise FmforgeError(f"{data_dir} was tokenized with another vocabulary than the base model "
                           f"{ft.base}: prepare it with `fmforge data prepare ... --tokenizer {ft.base}`")


def merge(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None, echo=print) -> Path:
    """``fmforge merge``: fold LoRA adapters into their base model and write the result as a run directory
    (model.safetensors + model.json + tokenizer) that generate, eval and export read."""

    adapter_dir, out = Path(adapter_dir), Path(out)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FmforgeError(f"no LoRA adapters in {adapter_dir}: {ADAPTER_CONFIG} is missing")
    base = Path(base or json.loads(config_path.read_text()).get("base") or "")
    if not base.name:
        raise FmforgeError(f"{config_path} names no base model: pass --base RUN_DIR")
    if (out / "model.safetensors").exists():
        raise FmforgeError(f"{out} already holds a model; choose another --out")
    model, _ = load_pretrained(base)
    load_adapters(model, adapter_dir)
    n = merge_lora(model)
    save_pretrained(model.state_dict(), model.cfg, out, base)
    echo(f"merged {n} LoRA adapters from {adapter_dir} into {base}; wrote {out}")
    return out


def image_classifier_config(model_cfg):
    """A ViT classifier on the base's image encoder (a ViT's, or an MAE's), its class count left to the data:
    the base's head, if any, is replaced."""

    encoder = model_cfg.encoder if model_cfg.arch == "mae" else model_cfg
    fields = {k: v for k, v in encoder.model_dump().items()
              if k in ViTModelConfig.model_fields and k not in ("arch", "size", "num_classes")}
    return ViTModelConfig(**fields)


def base_state(state: dict[str, torch.Tensor], ft: FinetuneConfig) -> dict[str, torch.Tensor]:
    """The base's tensors the fine-tuned model takes: for an image classifier, the encoder without a head
    (an MAE's ``encoder.*``, renamed)."""
    if ft.task != "classify" or not any(k.startswith(("encoder.", "patch_embed.")) for k in state):
        return state
    if any(k.startswith("encoder.") for k in state):  # MAE: keep the encoder, drop the decoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def adapt(model: nn.Module, ft: FinetuneConfig) -> str:
    """Freeze (full) or add adapters (lora) on the meta-device model; returns a one-line description."""

    if ft.method == "lora":
        wrapped = apply_lora(model, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
        what = f"LoRA r={ft.lora_rank} alpha={ft.lora_alpha:g} on {len(wrapped)} Linear layers"
    elif ft.method in ("prefix", "prompt"):
        for name, p in model.named_parameters():
            p.requires_grad_(is_virtual(name))
        what = f"{ft.method} tuning, {ft.virtual_tokens} virtual tokens"
    else:
        frozen = [n for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, f) for f in ft.freeze)]
        if ft.freeze and not frozen:
            raise FmforgeError(f"finetune.freeze {ft.freeze} matches no parameter; names look like "
                               f"{', '.join(n for n, _ in list(model.named_parameters())[:4])}")
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        what = "full fine-tune" + (f", {len(frozen)} tensors frozen" if frozen else "")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{what}: {trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters train"


@torch.no_grad()
def load_base(model: nn.Module, ft: FinetuneConfig) -> None:
    """Copy the base weights into the (possibly sharded) model; adapters keep their fresh init."""

    weights = Path(ft.base) / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise FmforgeError(f"cannot read {weights}: {err}") from None
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    state = base_state(state, ft)
    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    new_head = ("pooler.", "classifier.", "head.") if ft.task == "classify" else ()  # a classifier starts fresh
    missing = [k for k in result.missing_keys if not k.endswith((".lora_A", ".lora_B")) and not is_virtual(k)
               and not (tied and k == "lm_head.weight") and not k.startswith(new_head or ("\0",))]
    if missing or result.unexpected_keys:
        raise FmforgeError(f"{weights} does not fit the model: missing {missing[:3]}, unexpected "
                           f"{list(result.unexpected_keys)[:3]}")
    for m in lora_modules(model).values():
        m.reset_lora()
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
    if ft.method in ("prefix", "prompt"):
        init_virtual_tokens(model, ft)


@torch.no_grad()
def init_virtual_tokens(model: nn.Module, ft: FinetuneConfig, seed: int = 0) -> None:
    """Start the virtual tokens from real ones (both papers found this trains better than noise): the
    tokens of ``init_text``, repeated or cut to fit, else ``virtual_tokens`` random vocabulary ids. Prompt
    tuning takes their embeddings; prefix tuning their keys and values in every layer, as the base model
    computes them at positions 0..n-1."""

    tok = load_tokenizer(Path(ft.base) / "tokenizer.json")
    n = ft.virtual_tokens
    if ft.init_text:
        ids = tok.encode(ft.init_text)
        if not ids:
            raise FmforgeError("finetune.init_text encodes to no tokens")
        ids = (ids * (n // len(ids) + 1))[:n]
    else:
        ids = torch.randint(tok.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    with model.without_virtual_tokens() as base:
        if ft.method == "prompt":
            weight = base.tok_emb.weight  # gathered whole when FSDP shards it
            weight = weight.full_tensor() if isinstance(weight, DTensor) else weight
            copy_full_(model.prompt, weight[idx[0]].float())
        else:
            cache = base.new_cache(1, n, dtype=torch.float32)
            base(idx, 0, cache)
            for block, layer_cache in zip(model.blocks, cache):
                copy_full_(block.attn.prefix_k, layer_cache.k[0, :, :n])
                copy_full_(block.attn.prefix_v, layer_cache.v[0, :, :n])
    model.train(was_training)


def final_weights(state: dict[str, torch.Tensor], ft: FinetuneConfig, run_dir: Path, is_main: bool):
    """The weights to save as the run's model: LoRA runs also write their adapters alone, then merge them."""

    if ft.method != "lora":
        return state
    adapters = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    if is_main:
        write_adapters(adapters, run_dir, ft.lora_rank, ft.lora_alpha, base=str(ft.base))
    return merged_state_dict(state, ft.lora_alpha / ft.lora_rank)


class FromScratch:
    """How a run's weights start and what trains, when nothing is fine-tuned: random init, every parameter
    trains. ``FromBase`` is the fine-tuning counterpart; the loop calls the same five methods on either."""

    description = None

    def run_config(self, cfg: Config) -> Config:
        """The run config with the architecture this start implies."""
        return cfg

    def check_data(self, data_dir: Path) -> None:
        """Refuse data this start cannot train on."""

    def adapt(self, model: nn.Module) -> str | None:
        """Freeze or wrap the meta-device model before it is sharded; a one-line description, or None."""
        return None

    def load(self, model: nn.Module) -> None:
        """Fill the materialized model's starting weights (fresh runs only: a checkpoint holds them on resume)."""

    def final_weights(self, state: dict[str, torch.Tensor], run_dir: Path, is_main: bool) -> dict[str, torch.Tensor]:
        """The gathered state dict to save as the run's model."""
        return state


class FromBase(FromScratch):
    """Start from ``finetune.base`` (a run directory) and train what ``finetune.method`` says."""

    def __init__(self, ft: FinetuneConfig):
        self.ft = ft

    def run_config(self, cfg: Config) -> Config:
        return cfg.model_copy(update={"model": base_model_config(cfg)})

    def check_data(self, data_dir: Path) -> None:
        check_tokenizer(self.ft, data_dir)

    def adapt(self, model: nn.Module) -> str:
        return f"fine-tuning {self.ft.base}: {adapt(model, self.ft)}"

    def load(self, model: nn.Module) -> None:
        load_base(model, self.ft)

    def final_weights(self, state, run_dir, is_main):
        return final_weights(state, self.ft, run_dir, is_main)


def start_for(cfg: Config) -> FromScratch:
    """How this run's weights start: ``FromBase`` when ``finetune.base`` is set, else ``FromScratch``."""
    ft = cfg.finetune
    if ft.base:
        return FromBase(ft)
    if ft.method != "full" or ft.freeze:
        raise FmforgeError(f"finetune.{'method' if ft.method != 'full' else 'freeze'} needs finetune.base: the run "
                           "directory of the model to fine-tune")
    return FromScratch()
