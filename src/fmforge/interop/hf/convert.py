"""``fmforge import hf`` / ``fmforge export hf``: Hugging Face model directories <-> fmforge run directories.

A Hugging Face directory is ``config.json`` + weights (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin``) + tokenizer files (+ ``preprocessor_config.json``
for image models). An fmforge run directory is ``model.safetensors`` + ``model.json`` + tokenizer files
(``runs.py``), plus a ``config.yaml`` whose ``model`` section and image normalization ``fmforge eval`` and
fine-tuning start from.

The per-family mappings live in ``hf_decoder.py`` (Llama 2/3, Mistral, Qwen2, GPT-2) and
``hf_encoders.py`` (BERT, ViT, CLIP); this module moves files and checks them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmforge.config import build_config, save_config
from fmforge.data.image_loader import IMAGENET_MEAN, IMAGENET_STD
from fmforge.data.tokenizer import load_tokenizer, read_json_object
from fmforge.errors import FmforgeError
from fmforge.interop.hf import decoder as hf_decoder
from fmforge.interop.hf import encoders as hf_encoders
from fmforge.models import build_model
from fmforge.runs import family_of, read_model_config, save_pretrained


def _family(model_type: str):
    """The mapping module for an HF ``model_type``."""

    if model_type in hf_decoder.HF_DECODER_TYPES:
        return hf_decoder
    if model_type in hf_encoders.HF_ENCODER_TYPES:
        return hf_encoders
    known = sorted(set(hf_decoder.HF_DECODER_TYPES) | set(hf_encoders.HF_ENCODER_TYPES))
    raise FmforgeError(f"unsupported architecture: model_type {model_type!r}; fmforge converts {', '.join(known)}")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory: one safetensors file, a sharded set (via its index), or a
    ``pytorch_model.bin`` (loaded with ``weights_only``: no code from the file runs)."""
    single, index, bin_file = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json", \
        hf_dir / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(read_json_object(index).get("weight_map", {}).values()))
            if not shards:
                raise FmforgeError(f"{index} lists no weight files")
            tensors: dict[str, torch.Tensor] = {}
            for name in shards:
                if not (hf_dir / name).is_file():
                    raise FmforgeError(f"{index} names {name}, which is missing")
                tensors.update(load_file(str(hf_dir / name)))
            return tensors
        if bin_file.is_file():
            return torch.load(bin_file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise FmforgeError(f"cannot read the weights in {hf_dir}: {str(err).splitlines()[0]}") from None
    raise FmforgeError(f"no weights in {hf_dir}: expected model.safetensors, model.safetensors.index.json or "
                       "pytorch_model.bin")


def import_hf(hf_dir: str | Path, out: str | Path, echo=print):
    """Convert a local Hugging Face model directory into an fmforge run directory; returns the model config.
    The converted weights are loaded into the fmforge model before anything is written (strict: every
    tensor used, none missing)."""

    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise FmforgeError(f"Hugging Face model directory not found: {hf_dir}")
    if not (hf_dir / "config.json").is_file():
        raise FmforgeError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    if (out / "model.safetensors").exists():
        raise FmforgeError(f"{out} already holds a model; choose another --out")
    hf_cfg = read_json_object(hf_dir / "config.json")
    family = _family(str(hf_cfg.get("model_type")))
    cfg = family.config_from_hf(hf_cfg)
    state = family.state_from_hf(read_hf_weights(hf_dir), cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    tied = getattr(cfg, "tie_embeddings", False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise FmforgeError(f"converted weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer_dir = hf_dir if (hf_dir / "tokenizer.json").is_file() else None
    if tokenizer_dir is None and family.__name__.endswith("hf_decoder"):
        echo(f"warning: {hf_dir} has no tokenizer.json (fmforge reads 'fast' tokenizers); generate and eval "
             "need one in the run directory")
    save_pretrained(state, cfg, out, tokenizer_dir)  # with tokenizer_config.json: its special tokens
    raw = {"model": cfg.model_dump(mode="json"), "train": {"out_dir": str(out)}}
    pre = hf_dir / "preprocessor_config.json"
    if pre.is_file():  # the normalization the image model was trained with
        proc = read_json_object(pre)
        if proc.get("image_mean") and proc.get("image_std"):
            raw["data"] = {"mean": list(proc["image_mean"]), "std": list(proc["image_std"])}
    save_config(build_config(raw), out / "config.yaml")
    n = sum(t.numel() for t in state.values())
    echo(f"imported {hf_dir} ({hf_cfg.get('model_type')}, {n / 1e6:.2f}M parameters) into {out}")
    return cfg


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _tokenizer_config(run_dir: Path, max_len: int | None):
    """(the run's tokenizer, an HF ``tokenizer_config.json`` for it) so ``AutoTokenizer`` loads it as a fast
    tokenizer with the same special tokens; None without a tokenizer."""

    if not (run_dir / "tokenizer.json").is_file():
        return None
    tok = load_tokenizer(run_dir / "tokenizer.json")
    # Keep what the run's own config holds (a chat template from SFT, an imported model's tokenizer class).
    existing = run_dir / "tokenizer_config.json"
    out = read_json_object(existing) if existing.is_file() else {}
    out.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    out.update(tok.special_tokens_map())
    for role, name in (("mask_token", "[MASK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"),
                       ("unk_token", "[UNK]")):
        if tok.tokenizer.token_to_id(name) is not None:
            out[role] = name
    if max_len:
        out["model_max_length"] = max_len
    return tok, out


def export_hf(run_dir: str | Path, out: str | Path, echo=print) -> Path:
    """Write a finished fmforge run as a Hugging Face directory that ``AutoModel*.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load: config.json, model.safetensors, tokenizer files and, for image
    models, preprocessor_config.json."""

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FmforgeError(f"run directory not found: {run_dir}")
    cfg = read_model_config(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise FmforgeError(f"no trained model in {run_dir}: model.safetensors is missing")
    if (out / "config.json").exists():
        raise FmforgeError(f"{out} already holds a Hugging Face model; choose another --out")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise FmforgeError(f"cannot read {weights}: {err}") from None
    if getattr(cfg, "prefix_tokens", 0) or getattr(cfg, "prompt_tokens", 0):
        raise FmforgeError(f"{run_dir} has prefix/prompt-tuned virtual tokens, which transformers models have no "
                           "place for; export its base model instead")
    family = _family("gpt2" if family_of(cfg) == "decoder" else cfg.arch)
    hf_cfg = family.config_to_hf(cfg)
    hf_state = family.state_to_hf(state, cfg)
    max_len = getattr(cfg, "max_seq_len", None) or getattr(getattr(cfg, "text", None), "context_length", None)
    tokenizer = _tokenizer_config(run_dir, max_len)
    if tokenizer is not None:
        tok, tok_cfg = tokenizer
        for role, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
            if tid is not None:  # transformers' generation defaults read these
                hf_cfg.setdefault(f"{role}_token_id", tid)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})  # transformers refuses safetensors files without format=pt
    _write_json(out / "config.json", hf_cfg)
    if tokenizer is not None:
        if family_of(cfg) == "clip":
            _save_caption_tokenizer(tok, out / "tokenizer.json")
        else:
            shutil.copyfile(run_dir / "tokenizer.json", out / "tokenizer.json")
        _write_json(out / "tokenizer_config.json", tok_cfg)
    vision = getattr(cfg, "vision", None) or (cfg if family_of(cfg) == "vit" else None)
    if vision is not None:
        _write_json(out / "preprocessor_config.json", _preprocessor(run_dir, vision, cfg.arch))
    echo(f"exported {run_dir} ({family_of(cfg)}) to {out}")
    return out


def _save_caption_tokenizer(tok, path: Path) -> None:
    """CLIP's text tower pools at the end-of-text token, which fmforge appends to every caption
    (``train.tasks.CaptionTokens``); the exported tokenizer appends it too, so ``AutoTokenizer`` output fed
    to the ``CLIPModel`` gives the same embeddings."""
    from tokenizers.processors import TemplateProcessing

    eos = tok.tokenizer.id_to_token(tok.eos_id)
    tok.tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.eos_id)])
    tok.save(path)


def _preprocessor(run_dir: Path, vision, arch: str) -> dict:
    """The image processor config: the run's normalization (ImageNet's when it used the default) at its size."""

    mean_std = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        data = (yaml.safe_load(cfg_path.read_text()) or {}).get("data") or {}
        if data.get("mean") and data.get("std"):
            mean_std = {"image_mean": data["mean"], "image_std": data["std"]}
    size = vision.image_size
    kind = "CLIPImageProcessor" if arch == "clip" else "ViTImageProcessor"
    return {"image_processor_type": kind, "do_resize": True, "do_normalize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, **mean_std,
            "size": {"height": size, "width": size} if kind == "ViTImageProcessor" else {"shortest_edge": size},
            **({"do_center_crop": True, "crop_size": {"height": size, "width": size}} if kind == "CLIPImageProcessor" else {})}
