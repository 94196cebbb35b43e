"""``fmforge import hf`` / ``fmforge export hf``: Hugging Face model directories <-> fmforge run directories.

A Hugging Face directory is ``config.json`` + weights (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin``) + tokenizer files (+ ``preprocessor_config.json``
for image models). An fmforge run directory is ``model.safetensors`` + ``model.json`` + tokenizer files
(``runs.py``), plus a ``config.yaml`` whose ``model`` section and image normalization ``fmforge eval`` and
fine-tuning start from.

The per-family mappings live in ``decoder.py`` (Llama 2/3, Mistral, Qwen2, GPT-2) and ``encoders.py``
(BERT, ViT, CLIP); this module moves files and checks them. A downloaded directory is not trusted: shard
names from the index stay inside it, the config is checked against the weights' headers before any memory
is allocated, tokenizer files are copied only as regular files inside it, and nothing already in ``--out``
is replaced without ``overwrite``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers.processors import ByteLevel, Sequence, TemplateProcessing

from fmforge.config import build_config, save_config
from fmforge.data.image_loader import IMAGENET_MEAN, IMAGENET_STD
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.interop.hf import decoder as hf_decoder
from fmforge.interop.hf import encoders as hf_encoders
from fmforge.interop.hf.diffusers_dit import export_diffusers
from fmforge.io.paths import confined, relative_name
from fmforge.models.qlinear import QUANT_FILE
from fmforge.runs import (
    MAX_CONFIG_BYTES,
    MAX_SIDE_FILE_BYTES,
    MAX_TENSORS,
    TOKENIZER_FILES,
    check_weights_fit,
    checked_run_model,
    copy_side_file,
    family_of,
    meta_model,
    read_model_config,
    read_small_json,
    save_pretrained,
    temporary_beside,
    tie_stored_names,
    weights_header,
)

# What each verb writes into --out: any of these already there is refused unless ``overwrite``.
IMPORT_OUTPUTS = ("model.safetensors", "model.json", "config.yaml", *TOKENIZER_FILES)
EXPORT_OUTPUTS = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "preprocessor_config.json")


def _family(model_type: str):
    """The mapping module for an HF ``model_type``."""

    if model_type in hf_decoder.HF_DECODER_TYPES:
        return hf_decoder
    if model_type in hf_encoders.HF_ENCODER_TYPES:
        return hf_encoders
    known = sorted(set(hf_decoder.HF_DECODER_TYPES) | set(hf_encoders.HF_ENCODER_TYPES))
    raise FmforgeError(f"unsupported architecture: model_type {model_type!r}; fmforge converts {', '.join(known)}")


def _weight_files(hf_dir: Path) -> list[Path]:
    """The weight files of an HF directory: one safetensors file, the shards its index names (each a plain
    name inside the directory), or ``pytorch_model.bin``."""
    single, index, bin_file = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json", \
        hf_dir / "pytorch_model.bin"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_small_json(index, MAX_SIDE_FILE_BYTES).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FmforgeError(f"{index} lists no weight files")
        if len(weight_map) > MAX_TENSORS:
            raise FmforgeError(f"{index} lists {len(weight_map)} tensors: more than any model fmforge builds")
        names = sorted({relative_name(name, f"{index} weight_map") for name in weight_map.values()})
        shards = [confined(hf_dir, name, f"{index} weight_map") for name in names]
        for name, shard in zip(names, shards):
            if not shard.is_file():
                raise FmforgeError(f"{index} names {name}, which is missing")
        return shards
    if bin_file.is_file():
        return [bin_file]
    raise FmforgeError(f"no weights in {hf_dir}: expected model.safetensors, model.safetensors.index.json or "
                       "pytorch_model.bin")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict, loaded with ``weights_only`` (no code from the file runs)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise FmforgeError(f"cannot read the weights in {path.parent}: {str(err).splitlines()[0]}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise FmforgeError(f"{path} does not hold a state dict (names to tensors)")
    return tensors


def read_hf_header(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor the weight files declare, as meta tensors of their shapes and dtypes, read from the
    safetensors headers alone (a ``pytorch_model.bin`` has no header: it is loaded, bounded by its size)."""
    if files[0].name == "pytorch_model.bin":
        return {name: t.to("meta") for name, t in _load_bin(files[0]).items()}
    header: dict[str, torch.Tensor] = {}
    for shard in files:
        for name, t in weights_header(shard).items():
            if name in header:
                raise FmforgeError(f"{shard.parent}: tensor {name} is in two weight files")
            header[name] = t
        if len(header) > MAX_TENSORS:
            raise FmforgeError(f"{shard.parent} holds more than {MAX_TENSORS} tensors: more than any model "
                               "fmforge builds")
    return header


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory: one safetensors file, a sharded set (via its index, every shard
    confined to the directory), or a ``pytorch_model.bin`` (loaded with ``weights_only``)."""
    files = _weight_files(hf_dir)
    if files[0].name == "pytorch_model.bin":
        return _load_bin(files[0])
    tensors: dict[str, torch.Tensor] = {}
    try:
        for shard in files:
            tensors.update(load_file(str(shard)))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise FmforgeError(f"cannot read the weights in {hf_dir}: {str(err).splitlines()[0]}") from None
    return tensors


def _claim_outputs(out: Path, names: tuple[str, ...], src: Path, overwrite: bool, what: str) -> list[Path]:
    """The paths among ``out/names`` that already exist, which ``overwrite`` will replace; without it, any
    is a one-line error (fmforge replaces nothing it did not make unless asked). A directory is never
    replaced, nor is ``src`` written into."""
    if out.exists() and not out.is_dir():
        raise FmforgeError(f"output {out} exists and is not a directory")
    if out.exists() and out.resolve() == src.resolve():
        raise FmforgeError(f"--out {out} is the directory being converted; choose another --out")
    present = [out / name for name in names if os.path.lexists(out / name)]
    for path in present:
        if path.is_dir() and not path.is_symlink():
            raise FmforgeError(f"{path} is a directory; fmforge will not replace it")
    if present and not overwrite:
        if present[0].name == names[0]:
            raise FmforgeError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another --out")
        raise FmforgeError(f"{out} already holds {', '.join(p.name for p in present[:3])}, which fmforge would "
                           "write; pass --overwrite to replace them, or choose another --out")
    return present


def _check_side_files(src_dir: Path) -> None:
    """Fail before writing anything if a tokenizer file of ``src_dir`` could not be copied (a symlink out of
    the directory, not a regular file, too large); ``copy_side_file`` checks again as it copies."""
    for name in TOKENIZER_FILES:
        if os.path.lexists(src_dir / name):
            path = confined(src_dir, name, f"tokenizer file in {src_dir}")
            if not path.is_file():
                raise FmforgeError(f"{path} is not a regular file; refusing to copy it")
            if path.stat().st_size > MAX_SIDE_FILE_BYTES:
                raise FmforgeError(f"{path} is larger than {MAX_SIDE_FILE_BYTES:,} bytes; refusing to copy it")


def _checked_hf_model(hf_dir: Path, family, cfg):
    """The fmforge model for ``cfg`` on the meta device, the HF weights' headers mapped through the
    family's conversion and checked against it tensor by tensor before any weight is read or memory
    allocated; a mismatch or an absurd size is a one-line error naming the tensor or key."""
    source = f"{hf_dir / 'config.json'} does not fit its weights"
    header = read_hf_header(_weight_files(hf_dir))
    model = meta_model(cfg, header, source)  # first: the mapping below builds the model and loops over layers
    expected = family.state_from_hf(header, cfg)  # on meta tensors: names and shapes only
    check_weights_fit(model, expected, source, bool(getattr(cfg, "tie_embeddings", False)))
    return model


def _hf_config(hf_dir: Path):
    """(the parsed config.json, its family's mapping module, the fmforge model config)."""
    path = hf_dir / "config.json"
    hf_cfg = read_small_json(path, MAX_CONFIG_BYTES)
    family = _family(str(hf_cfg.get("model_type")))
    try:
        cfg = family.config_from_hf(hf_cfg)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as err:  # a value of the wrong kind
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise FmforgeError(f"{path}: malformed value: {detail}") from None
    return hf_cfg, family, cfg


def import_hf(hf_dir: str | Path, out: str | Path, echo=print, overwrite: bool = False):
    """Convert a local Hugging Face model directory into an fmforge run directory; returns the model config.
    The weights' headers are checked against config.json before anything is read or allocated, and the
    converted weights are loaded into the fmforge model before anything is written (strict: every tensor
    used, none missing). Files already in ``out`` that the import writes are refused unless ``overwrite``."""

    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise FmforgeError(f"Hugging Face model directory not found: {hf_dir}")
    if not (hf_dir / "config.json").is_file():
        raise FmforgeError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    replaced = _claim_outputs(out, IMPORT_OUTPUTS, hf_dir, overwrite, "a model")
    hf_cfg, family, cfg = _hf_config(hf_dir)
    model = _checked_hf_model(hf_dir, family, cfg)
    _check_side_files(hf_dir)
    state = family.state_from_hf(read_hf_weights(hf_dir), cfg)
    model.to_empty(device="cpu")
    tied = getattr(cfg, "tie_embeddings", False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise FmforgeError(f"converted weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tokenizer_dir = hf_dir if (hf_dir / "tokenizer.json").is_file() else None
    if tokenizer_dir is None and family is hf_decoder:
        echo(f"warning: {hf_dir} has no tokenizer.json (fmforge reads 'fast' tokenizers); generate and eval "
             "need one in the run directory")
    raw = {"model": cfg.model_dump(mode="json"), "train": {"out_dir": str(out)}}
    pre = hf_dir / "preprocessor_config.json"
    if pre.is_file():  # the normalization the image model was trained with
        proc = read_small_json(pre, MAX_CONFIG_BYTES)
        if isinstance(proc.get("image_mean"), list) and isinstance(proc.get("image_std"), list):
            raw["data"] = {"mean": proc["image_mean"], "std": proc["image_std"]}
    run_cfg = build_config(raw)
    for path in replaced:  # asked for: the old files go only now, once the new ones are ready to write
        path.unlink()
    save_pretrained(state, cfg, out, tokenizer_dir)  # with tokenizer_config.json: its special tokens
    save_config(run_cfg, out / "config.yaml")
    n = sum(t.numel() for t in state.values())
    echo(f"imported {hf_dir} ({hf_cfg.get('model_type')}, {n / 1e6:.2f}M parameters) into {out}")
    return cfg


def _write_json(path: Path, obj: dict) -> None:
    tmp = temporary_beside(path)
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _tokenizer_config(run_dir: Path, max_len: int | None):
    """(the run's tokenizer, an HF ``tokenizer_config.json`` for it) so ``AutoTokenizer`` loads it as a fast
    tokenizer with the same special tokens; None without a tokenizer."""

    if not (run_dir / "tokenizer.json").is_file():
        return None
    _check_side_files(run_dir)
    tok = load_tokenizer(run_dir / "tokenizer.json")
    # Keep what the run's own config holds (a chat template from SFT, an imported model's tokenizer class).
    existing = run_dir / "tokenizer_config.json"
    out = read_small_json(existing, MAX_SIDE_FILE_BYTES) if existing.is_file() else {}
    out.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    out.update(tok.special_tokens_map())
    for role, name in (("mask_token", "[MASK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"),
                       ("unk_token", "[UNK]")):
        if tok.tokenizer.token_to_id(name) is not None:
            out[role] = name
    if max_len:
        out["model_max_length"] = max_len
    return tok, out


def _bos_adding(tok_cfg: dict) -> dict:
    """``tokenizer_config.json`` for a decoder that prompts with [bos] + text: transformers 5 rebuilds the
    post-processor from ``add_bos_token``; older versions read the one ``_save_bos_tokenizer`` writes."""
    return {**tok_cfg, "add_bos_token": True, "add_eos_token": False}


def _save_bos_tokenizer(tok, path: Path) -> None:
    """fmforge trains on and prompts with [bos] + text (``deploy.generate``, ``eval.scorer``); the exported
    tokenizer prepends bos too, so ``AutoTokenizer(text)`` gives exactly the ids fmforge feeds the model
    and transformers' ``generate`` continues a prompt as ``fmforge generate`` does. A byte-level
    post-processor (offset trimming) is kept in front of the template."""
    bos = tok.tokenizer.id_to_token(tok.bos_id)
    template = TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                  special_tokens=[(bos, tok.bos_id)])
    existing = tok.tokenizer.post_processor
    tok.tokenizer.post_processor = Sequence([existing, template]) if isinstance(existing, ByteLevel) else template
    tmp = temporary_beside(path)
    tok.save(tmp)
    tmp.replace(path)


def export_hf(run_dir: str | Path, out: str | Path, echo=print, overwrite: bool = False) -> Path:
    """Write a finished fmforge run as a Hugging Face directory that ``AutoModel*.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load: config.json, model.safetensors, tokenizer files and, for image
    models, preprocessor_config.json. Files already in ``out`` that the export writes are refused unless
    ``overwrite``; the weights' header is checked against model.json before they are read."""

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FmforgeError(f"run directory not found: {run_dir}")
    if (run_dir / QUANT_FILE).is_file():
        raise FmforgeError(f"{run_dir} is a quantized run (fmforge quantize), which transformers cannot load; "
                           "export the run it was quantized from instead")
    cfg = read_model_config(run_dir)
    if family_of(cfg) == "dit":  # a diffusers directory, not a transformers one
        return export_diffusers(run_dir, out, echo, overwrite)
    replaced = _claim_outputs(out, EXPORT_OUTPUTS, run_dir, overwrite, "a Hugging Face model")
    if getattr(cfg, "prefix_tokens", 0) or getattr(cfg, "prompt_tokens", 0):
        raise FmforgeError(f"{run_dir} has prefix/prompt-tuned virtual tokens, which transformers models have no "
                           "place for; export its base model instead")
    if getattr(cfg, "mup", None) is not None:
        raise FmforgeError(f"{run_dir} is a muP model (model.mup): its output multiplier and attention scale have "
                           "no place in a transformers config; export is not supported for it")
    _, weights = checked_run_model(run_dir, cfg)
    try:
        state = tie_stored_names(load_file(str(weights)), bool(getattr(cfg, "tie_embeddings", False)))
    except (SafetensorError, OSError) as err:
        raise FmforgeError(f"cannot read {weights}: {err}") from None
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
    vision = getattr(cfg, "vision", None) or (cfg if family_of(cfg) == "vit" else None)
    preprocessor = _preprocessor(run_dir, vision, cfg.arch) if vision is not None else None
    out.mkdir(parents=True, exist_ok=True)
    for path in replaced:  # asked for: the old files go only now, once the new ones are ready to write
        path.unlink()
    tmp = temporary_beside(out / "model.safetensors")
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp),
              metadata={"format": "pt"})  # transformers refuses safetensors files without format=pt
    tmp.replace(out / "model.safetensors")
    _write_json(out / "config.json", hf_cfg)
    if tokenizer is not None:
        if family_of(cfg) == "clip":
            _save_caption_tokenizer(tok, out / "tokenizer.json")
        elif family_of(cfg) == "decoder" and tok.bos_id is not None:
            _save_bos_tokenizer(tok, out / "tokenizer.json")
            tok_cfg = _bos_adding(tok_cfg)
        else:
            copy_side_file(run_dir, "tokenizer.json", out)
        _write_json(out / "tokenizer_config.json", tok_cfg)
    if preprocessor is not None:
        _write_json(out / "preprocessor_config.json", preprocessor)
    echo(f"exported {run_dir} ({family_of(cfg)}) to {out}")
    return out


def _save_caption_tokenizer(tok, path: Path) -> None:
    """CLIP's text tower pools at the end-of-text token, which fmforge appends to every caption
    (``train.tasks.CaptionTokens``); the exported tokenizer appends it too, so ``AutoTokenizer`` output fed
    to the ``CLIPModel`` gives the same embeddings."""
    eos = tok.tokenizer.id_to_token(tok.eos_id)
    tok.tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.eos_id)])
    tmp = temporary_beside(path)
    tok.save(tmp)
    tmp.replace(path)


def _preprocessor(run_dir: Path, vision, arch: str) -> dict:
    """The image processor config: the run's normalization (ImageNet's when it used the default) at its size."""

    mean_std = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file() and cfg_path.stat().st_size <= MAX_CONFIG_BYTES:
        try:
            doc = yaml.safe_load(cfg_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            doc = None
        data = (doc.get("data") if isinstance(doc, dict) else None) or {}
        if isinstance(data, dict) and data.get("mean") and data.get("std"):
            mean_std = {"image_mean": data["mean"], "image_std": data["std"]}
    size = vision.image_size
    kind = "CLIPImageProcessor" if arch == "clip" else "ViTImageProcessor"
    return {"image_processor_type": kind, "do_resize": True, "do_normalize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, **mean_std,
            "size": {"height": size, "width": size} if kind == "ViTImageProcessor" else {"shortest_edge": size},
            **({"do_center_crop": True, "crop_size": {"height": size, "width": size}} if kind == "CLIPImageProcessor" else {})}
