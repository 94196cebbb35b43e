"""The final artifacts of a run directory: ``model.safetensors`` + ``model.json`` (architecture) + tokenizer.

Everything that consumes a trained model (generate, eval, export, serve) loads it through here. A run
directory may come from someone else (a shared bucket, a colleague's export), so loading trusts nothing in
it: the architecture in ``model.json`` is built on the meta device and compared, tensor by tensor, with the
shapes the weights file's header declares (which safetensors checks against the file's size) before any
memory is allocated; a mismatch, or a config that cannot describe these weights at all, is a one-line error
naming the tensor or key. Tokenizer side files are copied only as regular files inside their directory.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
import torch.nn as nn
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.io.bounded import read_json_object
from fmforge.io.paths import confined, relative_name
from fmforge.models.qlinear import QUANT_FILE, finish_quantized, swap_quantized
from fmforge.models.registry import FAMILIES, build_model, family_of, parse_model_config

MODEL_FORMAT_VERSION = 1

TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")

MiB = 1 << 20
# model.json / config.json and friends: a few KB in practice.
MAX_CONFIG_BYTES = 4 * MiB
# One tokenizer side file copied into (or out of) a run directory; real ones are a few MB (Gemma's: 34 MB).
MAX_SIDE_FILE_BYTES = 256 * MiB
# A weights file listing more tensors than this is not a model fmforge builds (Llama 3 405B has ~1,100).
MAX_TENSORS = 100_000
# Every transformer block has at least this many tensors (two norms, attention in and out, the MLP's).
MIN_TENSORS_PER_BLOCK = 4
# Tables a model computes from its config (rotary cos/sin, fixed sin-cos positions) are not in the weights;
# they may take this much memory, or as much as the weights themselves when those are larger.
MIN_DERIVED_BYTES = 1 << 30
_COPY_CHUNK = 4 * MiB

# safetensors' dtype names; an unknown one reads as uint8, which no parameter accepts.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------------------------------- writing


def temporary_beside(path: Path) -> Path:
    """A fresh temporary name next to ``path`` to write and then rename onto it: whatever held that name
    before (a stale temporary, a planted symlink) is removed, so the write never goes through a link."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    return tmp


def save_pretrained(state_dict: dict[str, torch.Tensor], model_cfg, run_dir: str | Path,
                    tokenizer_dir: str | Path | None = None) -> None:
    """Write weights, architecture and tokenizer into ``run_dir``. Every file is written under a temporary
    name and renamed, so a reader never sees half a file (and a symlink in its place is replaced, never
    written through). Tokenizer files are copied only if they are regular files inside ``tokenizer_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(run_dir / "model.safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if getattr(model_cfg, "tie_embeddings", False):  # one tensor under two names: store it once, as the embedding
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(tmp), metadata={"format": "fmforge", "version": str(MODEL_FORMAT_VERSION)})
    tmp.replace(run_dir / "model.safetensors")
    arch = {"format_version": MODEL_FORMAT_VERSION, "family": family_of(model_cfg), **model_cfg.model_dump(mode="json")}
    tmp = temporary_beside(run_dir / "model.json")
    tmp.write_text(json.dumps(arch, indent=2) + "\n")
    tmp.replace(run_dir / "model.json")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != run_dir.resolve():
        for name in TOKENIZER_FILES:  # the map names bos/eos/pad roles that tokenizer.json alone may not
            copy_side_file(tokenizer_dir, name, run_dir)


def copy_side_file(src_dir: str | Path, name: str, dst_dir: str | Path, dst_name: str | None = None,
                   max_bytes: int = MAX_SIDE_FILE_BYTES) -> bool:
    """Copy ``src_dir/name`` to ``dst_dir/(dst_name or name)``; False when there is no such file. Only a
    regular file inside ``src_dir`` is copied (a symlink that leads out of it, a device or a FIFO is a
    one-line error), at most ``max_bytes`` of it; the copy is written under a temporary name and renamed."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not os.path.lexists(src_dir / relative_name(name, f"file in {src_dir}")):
        return False
    src = confined(src_dir, name, f"file in {src_dir}")
    dst = dst_dir / (dst_name or name)
    tmp = temporary_beside(dst)
    try:
        # Non-blocking: opening a FIFO for reading would otherwise wait for a writer forever.
        with os.fdopen(os.open(src, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise FmforgeError(f"{src} is not a regular file; refusing to copy it")
            with open(tmp, "xb") as out:
                copied = 0
                while chunk := f.read(_COPY_CHUNK):
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise FmforgeError(f"{src} is larger than {max_bytes:,} bytes; refusing to copy it")
                    out.write(chunk)
        tmp.replace(dst)
    except OSError as err:
        raise FmforgeError(f"cannot copy {src}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------------------------------------------- reading


def claim_outputs(out: Path, src: Path, names: tuple[str, ...], what: str, overwrite: bool) -> list[Path]:
    """The files of ``names`` already in ``out``, which ``overwrite`` replaces; without it any is a one-line
    error (as for ``fmforge export hf``). ``out`` may not be the source run ``src`` (``what``: "exported")."""
    if out.exists() and not out.is_dir():
        raise FmforgeError(f"output {out} exists and is not a directory")
    if out.exists() and out.resolve() == src.resolve():
        raise FmforgeError(f"--out {out} is the run being {what}; choose another --out")
    present = [out / name for name in names if os.path.lexists(out / name)]
    for path in present:
        if path.is_dir() and not path.is_symlink():
            raise FmforgeError(f"{path} is a directory; fmforge will not replace it")
    if present and not overwrite:
        raise FmforgeError(f"{out} already holds {', '.join(p.name for p in present[:3])}; pass --overwrite to "
                           "replace them, or choose another --out")
    return present


def read_small_json(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a file of at most ``max_bytes``; anything else is a one-line error naming it."""
    return read_json_object(path, max_bytes)


def read_model_config(run_dir: str | Path):
    """The architecture in ``RUN_DIR/model.json``: a ``ModelConfig`` for decoders, else that family's config."""
    path = Path(run_dir) / "model.json"
    if not path.is_file():
        raise FmforgeError(f"no trained model in {run_dir}: {path.name} is missing (has the run finished?)")
    arch = read_small_json(path)
    arch.pop("format_version", None)
    arch.pop("family", None)
    try:
        return parse_model_config(arch)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:])  # [0] is the family's tag
        raise FmforgeError(f"{path} does not describe a model fmforge knows: {where + ': ' if where else ''}"
                           f"{first['msg']}") from None
    except TypeError:  # an ``arch`` that is not even a string
        raise FmforgeError(f"{path} does not describe a model fmforge knows: bad arch {arch.get('arch')!r:.80}") from None


def weights_header(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor a safetensors file declares, as a meta tensor of its shape and dtype, read from the
    file's header alone (safetensors caps the header at 100 MB and checks it covers exactly the file's
    bytes, so the shapes are bounded by the file's size). No weight is read."""
    header = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if len(names) > MAX_TENSORS:
                raise FmforgeError(f"{path} lists {len(names)} tensors: more than any model fmforge builds")
            for name in names:
                info = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(info.get_dtype(), torch.uint8)
                header[name] = torch.empty(info.get_shape(), dtype=dtype, device="meta")
    except (SafetensorError, OSError) as err:
        raise FmforgeError(f"cannot read the weights in {path}: {str(err).splitlines()[0]}") from None
    return header


# ---------------------------------------------------------------------------------------------------- checking


def _layer_counts(values: dict, prefix: str = "") -> list[tuple[str, int]]:
    """Every ``*n_layer`` field of a config dump, nested towers included, with its dotted name."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _layer_counts(value, f"{prefix}{key}.")
        elif key.endswith("n_layer") and isinstance(value, int):
            out.append((f"{prefix}{key}", value))
    return out


def check_layer_counts(cfg, n_tensors: int, source: str) -> None:
    """Refuse a config with more blocks than ``n_tensors`` weights can fill, before anything is built: even
    on the meta device a million blocks cost gigabytes of Python objects."""
    counts = _layer_counts(cfg.model_dump())
    if counts and sum(n for _, n in counts) * MIN_TENSORS_PER_BLOCK > n_tensors:
        key, n = max(counts, key=lambda kv: kv[1])
        raise FmforgeError(f"{source}: {key} is {n}, but the weights hold only {n_tensors} tensors: the config "
                           "does not describe these weights")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def meta_model(cfg, weights: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The model ``cfg`` describes, built on the meta device (no memory) once its layer counts fit the
    ``weights`` (meta tensors from ``weights_header``); the tables it would compute from the config
    (rotary, sin-cos positions) must fit in ``max(MIN_DERIVED_BYTES, weights' size)``."""
    check_layer_counts(cfg, len(weights), source)
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except (RuntimeError, ValueError, OverflowError, TypeError) as err:
        raise FmforgeError(f"{source}: it describes a model that cannot be built ({str(err).splitlines()[0]})") from None
    persistent = model.state_dict()
    derived = [(name, b) for name, b in model.named_buffers() if name not in persistent]
    limit = max(MIN_DERIVED_BYTES, _nbytes(weights.values()))
    if derived and _nbytes(b for _, b in derived) > limit:
        name, big = max(derived, key=lambda nb: nb[1].numel())
        raise FmforgeError(f"{source}: the model it describes computes {name} of shape {list(big.shape)} "
                           f"({_nbytes([big]) / 2**30:.3g} GiB), far beyond its {_nbytes(weights.values()) >> 20} "
                           "MiB of weights: refusing to allocate it")
    return model


def tie_stored_names(tensors: dict, tied: bool) -> dict:
    """A tied model stores its embedding once, as ``tok_emb.weight``; older files carry it as the head."""
    if tied and "lm_head.weight" in tensors:
        tensors = dict(tensors)
        head = tensors.pop("lm_head.weight")
        tensors.setdefault("tok_emb.weight", head)
    return tensors


def check_weights_fit(model: nn.Module, weights: dict[str, torch.Tensor], source: str, tied: bool = False) -> None:
    """Every tensor ``model`` (on the meta device) saves is in ``weights`` with its shape and a compatible
    dtype (floating point for floating parameters), and nothing else is: the first problem, named. A
    ``tied`` model's head is its embedding, stored once."""
    wanted = model.state_dict()
    for name, t in wanted.items():
        if tied and name == "lm_head.weight":
            continue
        got = weights.get(name)
        if got is None:
            raise FmforgeError(f"{source}: {name} is missing from the weights")
        if tuple(got.shape) != tuple(t.shape):
            raise FmforgeError(f"{source}: {name} has shape {list(got.shape)} in the weights, but the model "
                               f"needs {list(t.shape)}")
        compatible = got.dtype.is_floating_point if t.dtype.is_floating_point else got.dtype == t.dtype
        if not compatible:
            raise FmforgeError(f"{source}: {name} is stored as {got.dtype}, which cannot hold the model's "
                               f"{t.dtype}")
    extra = sorted(set(weights) - set(wanted))
    if extra:
        raise FmforgeError(f"{source}: the weights hold {extra[0]}, which the model has no place for")


def checked_run_model(run_dir: str | Path, cfg) -> tuple[nn.Module, Path]:
    """(the model of ``run_dir`` on the meta device, its weights file), the weights' header checked against
    ``cfg`` (from ``read_model_config``) tensor by tensor; nothing allocated yet."""
    weights = Path(run_dir) / "model.safetensors"
    if not weights.is_file():
        raise FmforgeError(f"no trained model in {run_dir}: model.safetensors is missing")
    tied = bool(getattr(cfg, "tie_embeddings", False))
    header = tie_stored_names(weights_header(weights), tied)
    source = f"{weights} does not match model.json"
    model = meta_model(cfg, header, source)
    if os.path.lexists(quant := Path(run_dir) / QUANT_FILE):  # a quantized run: its Linears become QuantLinears
        swap_quantized(model, read_small_json(quant), str(quant))
    check_weights_fit(model, header, source, tied)
    return model, weights


def load_pretrained(run_dir: str | Path, device: str | torch.device = "cpu", family: str | None = None):
    """Return ``(model, tokenizer)`` from a finished run directory, model in eval mode on ``device``. The
    tokenizer is None for image-only models (ViT, MAE). ``family`` ("decoder", "vit", ...) names the kind
    of model the caller needs; another kind is a one-line error. The weights' header is checked against
    ``model.json`` before any memory is allocated."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FmforgeError(f"run directory not found: {run_dir}")
    cfg = read_model_config(run_dir)
    if family is not None and family_of(cfg) != family:
        raise FmforgeError(f"{run_dir} holds a {family_of(cfg)} model; this needs {FAMILIES[family].description}")
    model, weights = checked_run_model(run_dir, cfg)
    model.to_empty(device=device)
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise FmforgeError(f"cannot read {weights}: {err}") from None
    tied = getattr(cfg, "tie_embeddings", False)
    missing, unexpected = model.load_state_dict(tie_stored_names(tensors, tied), strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise FmforgeError(f"{weights} does not match model.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.reset_buffers()
    finish_quantized(model).eval()
    tokenizer = None
    if family_of(cfg) in ("decoder", "clip", "bert") or (run_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return model, tokenizer
