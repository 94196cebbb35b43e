"""Quantized Linear layers and how a quantized run directory is loaded (``runs.checked_run_model``).

A run made by ``fmforge quantize`` (``quantize.py``) keeps ``model.json`` (the architecture, unchanged) and
adds ``quantization.json``::

    {"format_version": 1, "backend": "fmforge" | "torchao", "method": "int8" | "int4",
     "group_size": 32 | null, "modules": ["blocks.0.attn.qkv", ...], "source": "/path/of/the/source/run"}

fmforge backend: each listed Linear ``X`` is stored as ``X.qweight`` + ``X.scales`` (+ ``X.bias`` as before):

- int8: ``qweight`` int8 [out, in], ``scales`` float32 [out]; w = qweight * scales[:, None] (per output
  channel, symmetric, round to nearest even, values in [-127, 127]).
- int4: ``qweight`` uint8 [out, in / 2], two weights per byte (low nibble = even column), each stored as
  q + 8 with q in [-8, 7]; ``scales`` float32 [out, in / group_size]; w = q * scale of its group.

torchao backend: the listed Linears keep their floating-point weights in the file and torchao quantizes
them as the run loads (its tensor subclasses have no portable safetensors form).

A run directory is not trusted: ``quantization.json`` is checked key by key, every listed name must be an
untied Linear of the model, and the quantized tensors' shapes follow from that Linear's shape, so the
weights header is checked against them before any memory is allocated (``runs.check_weights_fit``); the
loaded scales must be finite.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmforge.errors import FmforgeError, clip

QUANT_FILE = "quantization.json"
QUANT_FORMAT_VERSION = 1
METHODS = ("int8", "int4")
BACKENDS = ("fmforge", "torchao")
DEFAULT_GROUP_SIZE = 32
TORCHAO_HINT = "pip install 'torchao>=0.18' (or fmforge[quant])"
_SPEC_KEYS = {"format_version", "backend", "method", "group_size", "modules", "source"}
_INT8_MAX, _INT4_MAX, _INT4_MIN = 127, 7, -8


# ---------------------------------------------------------------------------------------------------- numerics


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], float32 scales [out]): symmetric per output channel, scale = max|w| / 127, so every
    weight is within scale / 2 of its dequantized value. Computed in float32 on the CPU: the same bytes on
    every machine."""
    w = weight.detach().to("cpu", torch.float32)
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scales


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [out, in / 2] two weights per byte, float32 scales [out, in / group_size]): symmetric per group
    of ``group_size`` consecutive input columns, scale = max|w| / 7, q in [-8, 7]."""
    out_f, in_f = weight.shape
    w = weight.detach().to("cpu", torch.float32).reshape(out_f, in_f // group_size, group_size)
    amax = w.abs().amax(dim=2)
    scales = torch.where(amax > 0, amax / _INT4_MAX, torch.ones_like(amax))
    q = torch.round(w / scales[..., None]).clamp_(_INT4_MIN, _INT4_MAX).to(torch.int16).reshape(out_f, in_f)
    return pack_int4(q), scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values in [-8, 7] of shape [out, in] (in even) -> uint8 [out, in / 2], column 2j in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: int8 values in [-8, 7] of shape [out, 2 * packed columns]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.size(0), -1)


def dequantize(method: str, qweight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The floating-point weight [out, in] that ``qweight`` and ``scales`` stand for."""
    if method == "int8":
        return qweight.to(dtype) * scales.to(dtype)[:, None]
    q = unpack_int4(qweight)
    groups = scales.size(1)
    w = q.to(dtype).reshape(q.size(0), groups, -1) * scales.to(dtype)[..., None]
    return w.reshape(q.size(0), -1)


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized (int8 per channel or int4 per group) and dequantized on
    the fly in the input's dtype for each matmul; the bias stays floating point. On the CPU an int8 layer
    runs PyTorch's int8 weight-only matmul kernel, which never materializes the float weight."""

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int | None = None,
                 bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        if method == "int8":
            qshape, sshape, qdtype = (out_features, in_features), (out_features,), torch.int8
        else:
            qshape, sshape, qdtype = (out_features, in_features // 2), (out_features, in_features // group_size), \
                torch.uint8
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(sshape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int | None = None) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, method, group_size, linear.bias is not None,
                device=linear.weight.device)
        if not linear.weight.is_meta:
            packed, scales = quantize_int8(linear.weight) if method == "int8" else \
                quantize_int4(linear.weight, group_size)
            q.qweight.copy_(packed)
            q.scales.copy_(scales)
            if linear.bias is not None:
                q.bias.data.copy_(linear.bias.detach())
        return q

    def weight_dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.method, self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel crashes the process for widths that are not a multiple of 8 (PyTorch 2.14, measured).
        if self.method == "int8" and self.in_features % 8 == 0 and x.device.type == "cpu" \
                and x.dtype in (torch.float32, torch.bfloat16) \
                and not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()):
            flat = x.reshape(-1, self.in_features).contiguous()
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scales.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_dequantized(x.dtype), bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        scales = state_dict.get(prefix + "scales")
        if scales is not None and not scales.is_meta and not (torch.isfinite(scales).all() and (scales > 0).all()):
            raise FmforgeError(f"{prefix}scales holds a value that is not a positive finite number: the quantized "
                               "weights are corrupt")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}{group}"


# ---------------------------------------------------------------------------------------------------- loading


def check_spec(spec: dict, source: str) -> dict:
    """``quantization.json`` validated: known keys only, a known backend and method, a group size that is
    a positive even integer for int4, and a list of module names; the first problem is a one-line error."""
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise FmforgeError(f"{source}: unknown key {clip(unknown[0])}")
    if spec.get("format_version") != QUANT_FORMAT_VERSION:
        raise FmforgeError(f"{source}: format_version {clip(spec.get('format_version'))} is not one fmforge reads "
                           f"({QUANT_FORMAT_VERSION})")
    if spec.get("backend") not in BACKENDS:
        raise FmforgeError(f"{source}: backend {clip(spec.get('backend'))} is not one of {', '.join(BACKENDS)}")
    if spec.get("method") not in METHODS:
        raise FmforgeError(f"{source}: method {clip(spec.get('method'))} is not one of {', '.join(METHODS)}")
    group = spec.get("group_size")
    if spec["method"] == "int4" and not (type(group) is int and 2 <= group <= 1 << 20 and group % 2 == 0):
        raise FmforgeError(f"{source}: group_size {clip(group)} must be an even integer >= 2 for int4")
    modules = spec.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise FmforgeError(f"{source}: modules must be a list of layer names")
    if len(set(modules)) != len(modules):
        raise FmforgeError(f"{source}: modules lists a layer twice")
    return spec


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (a head tied to its embedding)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def check_quantizable(model: nn.Module, name: str, source: str, method: str, group_size: int | None) -> nn.Linear:
    """The Linear ``name`` of ``model``, if it can be quantized with ``method``; else a one-line error."""
    try:
        layer = model.get_submodule(name) if name else None
    except AttributeError:
        layer = None
    if not isinstance(layer, nn.Linear):
        raise FmforgeError(f"{source}: {clip(name)} is not a Linear layer of the model")
    if id(layer.weight) in _shared_weights(model):
        raise FmforgeError(f"{source}: {name} shares its weight with another layer (a tied head); it cannot be "
                           "quantized on its own")
    if method == "int4" and layer.in_features % group_size:
        raise FmforgeError(f"{source}: {name} has {layer.in_features} input features, not a multiple of the int4 "
                           f"group size {group_size}; choose a --group-size that divides it")
    return layer


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def swap_quantized(model: nn.Module, spec: dict, source: str) -> nn.Module:
    """Put a ``QuantLinear`` in place of every Linear ``spec`` lists (fmforge backend), on whatever device
    the model is (the meta device when loading: the quantized tensors' shapes are then checked against the
    weights header before anything is allocated). ``spec`` is kept as ``model.quantization``."""
    spec = check_spec(spec, source)
    layers = {name: check_quantizable(model, name, source, spec["method"], spec.get("group_size"))
              for name in spec["modules"]}
    if spec["backend"] == "fmforge":
        for name, layer in layers.items():
            _replace(model, name, QuantLinear.from_linear(layer, spec["method"], spec.get("group_size")))
    model.quantization = spec
    return model


def finish_quantized(model: nn.Module) -> nn.Module:
    """After the weights are loaded: torchao-backend runs are quantized now (torchao required); fmforge
    runs already are. A model without ``quantization`` is returned as is."""
    spec = getattr(model, "quantization", None)
    if spec is not None and spec["backend"] == "torchao":
        torchao_quantize(model, spec["method"], spec.get("group_size"), set(spec["modules"]))
    return model


def torchao_config(method: str, group_size: int | None):
    """torchao's config for ``method``: int8 dynamic activation + int8 per-channel weight; int4 weight-only
    per group (``IntxWeightOnlyConfig``, which runs on any CPU)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise FmforgeError(f"the torchao backend needs torchao: {TORCHAO_HINT}") from None
    if method == "int8":
        return Int8DynamicActivationInt8WeightConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size or DEFAULT_GROUP_SIZE))


def torchao_quantize(model: nn.Module, method: str, group_size: int | None, names: set[str]) -> nn.Module:
    """Quantize the Linears ``names`` of ``model`` in place with torchao."""
    config = torchao_config(method, group_size)
    from torchao.quantization import quantize_

    with torch.no_grad():
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in names and isinstance(module, nn.Linear))
    return model
