"""The final artifacts of a run directory: ``model.safetensors`` + ``model.json`` (architecture) + tokenizer.

Everything that consumes a trained model (generate, eval, export, serve) loads it through here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.models.registry import FAMILIES, build_model, family_of, parse_model_config

MODEL_FORMAT_VERSION = 1


TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")


def save_pretrained(state_dict: dict[str, torch.Tensor], model_cfg, run_dir: str | Path,
                    tokenizer_dir: str | Path | None = None) -> None:
    """Write weights, architecture and tokenizer into ``run_dir``. Weights and architecture are written
    under a temporary name and renamed, so a reader never sees half a file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "model.safetensors.tmp"
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if getattr(model_cfg, "tie_embeddings", False):  # one tensor under two names: store it once, as the embedding
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(tmp), metadata={"format": "fmforge", "version": str(MODEL_FORMAT_VERSION)})
    tmp.replace(run_dir / "model.safetensors")
    arch = {"format_version": MODEL_FORMAT_VERSION, "family": family_of(model_cfg), **model_cfg.model_dump(mode="json")}
    (run_dir / "model.json.tmp").write_text(json.dumps(arch, indent=2) + "\n")
    (run_dir / "model.json.tmp").replace(run_dir / "model.json")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != run_dir.resolve():
        for name in TOKENIZER_FILES:  # the map names bos/eos/pad roles that tokenizer.json alone may not
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, run_dir / name)


def read_model_config(run_dir: str | Path):
    """The architecture in ``RUN_DIR/model.json``: a ``ModelConfig`` for decoders, else that family's config."""
    path = Path(run_dir) / "model.json"
    if not path.is_file():
        raise FmforgeError(f"no trained model in {run_dir}: {path.name} is missing (has the run finished?)")
    try:
        arch = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise FmforgeError(f"{path} is not valid JSON") from None
    arch.pop("format_version", None)
    arch.pop("family", None)
    try:
        return parse_model_config(arch)
    except ValidationError as err:
        raise FmforgeError(f"{path} does not describe a model fmforge knows: {str(err).splitlines()[0]}") from None


def load_pretrained(run_dir: str | Path, device: str | torch.device = "cpu", family: str | None = None):
    """Return ``(model, tokenizer)`` from a finished run directory, model in eval mode on ``device``. The
    tokenizer is None for image-only models (ViT, MAE). ``family`` ("decoder", "vit", ...) names the kind
    of model the caller needs; another kind is a one-line error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FmforgeError(f"run directory not found: {run_dir}")
    cfg = read_model_config(run_dir)
    if family is not None and family_of(cfg) != family:
        raise FmforgeError(f"{run_dir} holds a {family_of(cfg)} model; this needs {FAMILIES[family].description}")
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise FmforgeError(f"no trained model in {run_dir}: model.safetensors is missing")
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device=device)
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise FmforgeError(f"cannot read {weights}: {err}") from None
    tied = getattr(cfg, "tie_embeddings", False)
    if tied:  # stored once; older files may carry it under the head's name
        tensors.setdefault("tok_emb.weight", tensors.get("lm_head.weight"))
        tensors.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if v is not None}, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise FmforgeError(f"{weights} does not match model.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.reset_buffers()
    model.eval()
    tokenizer = None
    if family_of(cfg) in ("decoder", "clip", "bert") or (run_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return model, tokenizer
