"""LoRA (Hu et al. 2021): train a low-rank update B·A beside each frozen weight matrix, W' = W + (alpha/r)·B·A.

``LoRALinear`` is an ``nn.Linear`` that keeps its ``weight``/``bias`` under their usual names and adds
``lora_A`` [r, in] and ``lora_B`` [out, r]; B starts at zero, so a freshly wrapped model computes exactly
what the base did. Only the adapters train; they are saved on their own (``adapter_model.safetensors`` +
``adapter_config.json``, a few MB for a model of GBs) and ``merge_lora`` folds them into the base weights.
Target modules are chosen by glob patterns over module names (``blocks.*.attn.qkv``, ``*.mlp.*``).
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmforge.config import FinetuneConfig
from fmforge.errors import FmforgeError
from fmforge.models.blocks import copy_full_

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Attention and MLP projections of the shared block: every family's matmuls, none of its embeddings or heads.
DEFAULT_TARGETS = tuple(FinetuneConfig().lora_targets)


class LoRALinear(nn.Linear):
    """A Linear with a trainable rank-``rank`` update; the base ``weight`` and ``bias`` stay frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: no copy, names unchanged
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout)
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A as nn.Linear initializes a weight (Kaiming-uniform), B zero: the update starts at exactly zero.
        A is drawn whole on the CPU generator and copied in, so sharded (FSDP) and whole models start equal."""
        if self.lora_A.is_meta:
            return
        full = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        copy_full_(self.lora_A, full)
        self.lora_B.zero_()

    def delta(self) -> torch.Tensor:
        """The update this adapter adds to ``weight``: (alpha / r) · B · A, of rank at most r."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls instead of materializing B·A: cheaper whenever r << min(in, out).
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return F.linear(x, self.weight, self.bias) + update

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets=DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter of ``model`` and put a LoRA adapter on each Linear whose module name matches
    one of ``targets`` (glob patterns). Returns the wrapped names; no match is an error naming the patterns."""
    if rank < 1:
        raise FmforgeError(f"LoRA rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and _matches(name, targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise FmforgeError(f"no Linear layer matches the LoRA targets {list(targets)}; names look like: "
                           f"{', '.join(linears)}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors, under their full names (``blocks.0.attn.qkv.lora_A`` ...)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    return out


def save_adapters(model: nn.Module, out_dir: str | Path, base: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (rank, alpha, modules, base) into
    ``out_dir``."""
    mods = lora_modules(model)
    if not mods:
        raise FmforgeError("the model has no LoRA adapters to save")
    first = next(iter(mods.values()))
    return write_adapters(adapter_state_dict(model), out_dir, first.rank, first.alpha, base)


def write_adapters(tensors: dict[str, torch.Tensor], out_dir: str | Path, rank: int, alpha: float,
                   base: str | None = None) -> Path:
    """The adapter files from adapter tensors named ``MODULE.lora_A`` / ``MODULE.lora_B``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / ADAPTER_WEIGHTS)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    config = {"method": "lora", "rank": rank, "alpha": alpha, "modules": modules, "base": base}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir / ADAPTER_WEIGHTS


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Wrap ``model``'s modules as the adapter config says and load the adapter weights into them."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise FmforgeError(f"no LoRA adapters in {adapter_dir}: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise FmforgeError(f"cannot read the adapters in {adapter_dir}: {err}") from None
    names = set(config.get("modules", []))
    apply_lora(model, int(config["rank"]), float(config["alpha"]),
               targets=[n for n in names] or DEFAULT_TARGETS)
    mods = lora_modules(model)
    if set(mods) != names:
        missing = sorted(names - set(mods))[:3]
        raise FmforgeError(f"the adapters in {adapter_dir} do not fit this model: no module {', '.join(missing)}")
    for name, m in mods.items():
        for part in ("lora_A", "lora_B"):
            t = tensors.get(f"{name}.{part}")
            target = getattr(m, part)
            if t is None or t.shape != target.shape:
                got = "missing" if t is None else f"shape {list(t.shape)}"
                raise FmforgeError(f"adapter tensor {name}.{part} is {got}, expected {list(target.shape)}")
            with torch.no_grad():
                target.copy_(t)
    return config


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W += alpha/r · B·A) and turn the module back into a plain
    Linear with the same parameter names. The merged model computes what the adapted one did, with no
    extra matmuls. Returns how many modules were merged."""
    mods = lora_modules(model)
    for name, m in mods.items():
        m.weight += m.delta().to(m.weight.dtype)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        plain.weight.requires_grad_(True)
        if plain.bias is not None:
            plain.bias.requires_grad_(True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return len(mods)


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A full state dict with adapters (``X.lora_A`` / ``X.lora_B`` beside ``X.weight``) folded into plain
    weights: what ``merge_lora`` does to a module, done on tensors (e.g. a gathered FSDP state dict)."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in [k for k in state if k.endswith(".lora_A")]:
        prefix = key[: -len(".lora_A")]
        a, b = state[key], state[prefix + ".lora_B"]
        weight = out[prefix + ".weight"]
        out[prefix + ".weight"] = (weight.float() + (b.float() @ a.float()) * scaling).to(weight.dtype)
    return out
