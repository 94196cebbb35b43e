"""``fmforge quantize``: a smaller run directory from a finished one, that every verb loads as is.

Weight-only quantization of the Linear layers (``qlinear.py`` has the formats):

- ``--method int8`` (fmforge backend): symmetric per output channel, int8 weights + one float32 scale per
  row (~4x smaller Linears than float32);
- ``--method int4`` (fmforge backend): symmetric per group of ``--group-size`` input columns (default 32),
  two weights per byte + one float32 scale per group (~6.4x smaller at group 32);
- ``--backend torchao``: torchao's int8 dynamic activation + int8 weight, or its int4 weight-only per
  group (``IntxWeightOnlyConfig``); the file keeps floating-point weights and torchao quantizes as the run
  loads.

By default the Linears inside the transformer blocks are quantized (attention and MLP: nearly all of a
model's matmul weights); ``include_head`` adds every other Linear (an untied output head, BERT's MLM
transform and pooler, a classifier). Embeddings are never quantized, nor is a head tied to them.

The fmforge backend is deterministic: quantization runs in float32 on the CPU with round-to-nearest-even,
so the same source run gives the same bytes on every machine. ``eval.quantization.quantization_report`` measures the
perplexity change against the source run, whose path ``quantization.json`` keeps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from fmforge.errors import FmforgeError
from fmforge.models.qlinear import (
    BACKENDS,
    DEFAULT_GROUP_SIZE,
    METHODS,
    QUANT_FILE,
    QUANT_FORMAT_VERSION,
    check_quantizable,
    swap_quantized,
    torchao_config,
    torchao_quantize,
)
from fmforge.models.registry import block_stacks
from fmforge.runs import (
    TOKENIZER_FILES,
    claim_outputs,
    copy_side_file,
    load_pretrained,
    read_model_config,
    save_pretrained,
    temporary_beside,
)

QUANTIZE_OUTPUTS = ("model.safetensors", "model.json", QUANT_FILE, "config.yaml", *TOKENIZER_FILES)


def quantizable_layers(model: nn.Module, include_head: bool = False) -> list[str]:
    """Names of the Linears to quantize: those inside the model's block stacks, and with ``include_head``
    every other Linear whose weight is its own (a head tied to the embedding is left alone)."""
    in_blocks = {id(m) for stack in block_stacks(model) for m in stack.modules()}
    shared: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if id(module) in in_blocks or (include_head and shared[id(module.weight)] == 1):
            names.append(name)
    return names


def _check_args(method: str, backend: str, group_size: int | None) -> int | None:
    if method not in METHODS:
        raise FmforgeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if backend not in BACKENDS:
        raise FmforgeError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if method == "int8":
        if group_size is not None:
            raise FmforgeError("--group-size applies to int4 only (int8 has one scale per output channel)")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size < 2 or group_size % 2:
        raise FmforgeError(f"--group-size must be an even number >= 2, got {group_size}")
    return group_size


def _claim_outputs(out: Path, src: Path, overwrite: bool) -> list[Path]:
    return claim_outputs(out, src, QUANTIZE_OUTPUTS, "quantized", overwrite)


def quantize(run_dir: str | Path, out: str | Path, method: str = "int8", group_size: int | None = None,
             backend: str = "fmforge", include_head: bool = False, overwrite: bool = False, echo=print) -> Path:
    """The ``fmforge quantize`` verb: write ``out``, a run directory holding ``run_dir``'s model with its
    Linear layers quantized (``method`` int8 or int4 with ``group_size``, ``backend`` fmforge or torchao),
    plus its architecture, tokenizer and config.yaml, and ``quantization.json`` naming the quantized layers
    and the source run. Files already in ``out`` are refused unless ``overwrite``."""
    run_dir, out = Path(run_dir), Path(out)
    group_size = _check_args(method, backend, group_size)
    if not run_dir.is_dir():
        raise FmforgeError(f"run directory not found: {run_dir}")
    if os.path.lexists(run_dir / QUANT_FILE):
        raise FmforgeError(f"{run_dir} is already quantized; quantize its source run instead")
    replaced = _claim_outputs(out, run_dir, overwrite)
    cfg = read_model_config(run_dir)
    if backend == "torchao":
        torchao_config(method, group_size)  # torchao missing: fail before any work
    model, _ = load_pretrained(run_dir, "cpu")
    names = quantizable_layers(model, include_head)
    if not names:
        raise FmforgeError(f"{run_dir} has no Linear layers to quantize")
    for name in names:
        check_quantizable(model, name, f"{run_dir}", method, group_size)
    spec = {"format_version": QUANT_FORMAT_VERSION, "backend": backend, "method": method,
            "group_size": group_size, "modules": names, "source": str(run_dir.resolve())}
    before = _nbytes(model)
    if backend == "fmforge":
        swap_quantized(model, spec, f"{run_dir}")
        state = model.state_dict()
    else:  # the file keeps float weights; quantize once here so a layer torchao cannot take fails now
        state = dict(model.state_dict())
        torchao_quantize(model, method, group_size, set(names))
    out.mkdir(parents=True, exist_ok=True)
    for path in replaced:  # asked for: the old files go only now, once the new ones are ready to write
        path.unlink()
    save_pretrained(state, cfg, out, tokenizer_dir=run_dir)
    copy_side_file(run_dir, "config.yaml", out)
    tmp = temporary_beside(out / QUANT_FILE)
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    tmp.replace(out / QUANT_FILE)
    after = (out / "model.safetensors").stat().st_size
    echo(f"quantized {len(names)} Linear layers of {run_dir} to {method} ({backend}) into {out}: weights "
         f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
    return out


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
