"""``fmforge export onnx``: a finished run as an ONNX model that onnxruntime (or any ONNX runtime) serves.

Exported with torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``; needs the optional extra
``fmforge[onnx]``: onnx, onnxscript, onnxruntime), batch and sequence length dynamic:

- decoders (gpt2, llama): ``input_ids`` int64 [batch, sequence] -> ``logits`` [batch, sequence, vocab]
  (the whole sequence, no KV cache);
- BERT: ``input_ids``, ``attention_mask`` (1 = token, 0 = padding), ``token_type_ids``, all int64
  [batch, sequence] -> ``last_hidden_state`` [batch, sequence, d_model], plus ``logits`` [batch, labels]
  when the model has a classifier;
- ViT: ``pixel_values`` float32 [batch, channels, size, size] (normalized as in training) -> ``logits``
  [batch, classes] (``features`` [batch, d_model] for a model without a head).

``--out`` receives ``model.onnx`` (weights inside it below 1 GiB, else beside it in ``model.onnx.data``),
the run's ``model.json`` and tokenizer files. Files already there that the export writes are refused
unless ``overwrite``. The exported graph is checked with onnxruntime against PyTorch on the example input
before the files are moved into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn

from fmforge.errors import FmforgeError
from fmforge.models.registry import family_of
from fmforge.runs import TOKENIZER_FILES, claim_outputs, copy_side_file, load_pretrained, read_model_config

ONNX_HINT = "pip install onnx onnxscript onnxruntime (or fmforge[onnx])"
ONNX_OUTPUTS = ("model.onnx", "model.onnx.data", "model.json", *TOKENIZER_FILES)
EXTERNAL_DATA_BYTES = 1 << 30
PARITY_TOLERANCE = 1e-4
_MAX_BATCH = 1 << 16


class DecoderLogits(nn.Module):
    """A decoder's full-sequence logits, without the cache arguments of its ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


class BertOutputs(nn.Module):
    """BERT's hidden states, and its classifier's logits when it has one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        hidden = self.model(input_ids, attention_mask, token_type_ids)
        if self.model.classifier is None:
            return hidden
        return hidden, self.model.cls_logits(hidden)


class ImageOutputs(nn.Module):
    """A ViT's logits (or pooled features) under the input name image models use, ``pixel_values``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


def _require_onnx():
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise FmforgeError(f"ONNX export needs onnx, onnxscript and onnxruntime: {ONNX_HINT}") from None
    return onnxruntime


def export_spec(model: nn.Module, cfg):
    """(module to export, example inputs by name, dynamic shapes by name, output names) for ``cfg``'s family."""
    family = family_of(cfg)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    if family in ("decoder", "bert"):
        max_len = model.cfg.max_seq_len - getattr(model, "virtual", 0)
        seq = torch.export.Dim("sequence", min=1, max=max_len)
        ids = torch.randint(0, cfg.vocab_size, (2, min(max_len, 7)), generator=torch.Generator().manual_seed(0))
        dims = {0: batch, 1: seq}
        if family == "decoder":
            return DecoderLogits(model), {"input_ids": ids}, {"input_ids": dims}, ["logits"]
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # padding in the example: the mask is a real input, not folded into a constant
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        outputs = ["last_hidden_state"] + (["logits"] if model.classifier is not None else [])
        return BertOutputs(model), inputs, {name: dims for name in inputs}, outputs
    if family == "vit":
        size = cfg.image_size
        images = torch.randn(2, cfg.channels, size, size, generator=torch.Generator().manual_seed(0))
        return ImageOutputs(model), {"pixel_values": images}, {"pixel_values": {0: batch}}, \
            ["logits" if model.head is not None else "features"]
    raise FmforgeError(f"ONNX export covers decoders, BERT and ViT; this run holds a {family} model")


def _claim_outputs(out: Path, src: Path, overwrite: bool) -> list[Path]:
    return claim_outputs(out, src, ONNX_OUTPUTS, "exported", overwrite)


def run_onnx(path: str | Path, inputs: dict[str, torch.Tensor]) -> list:
    """Outputs (numpy arrays) of the ONNX model at ``path`` on ``inputs``, with onnxruntime on the CPU."""
    ort = _require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: t.numpy() for name, t in inputs.items()})


def _check_parity(module: nn.Module, path: Path, inputs: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between onnxruntime's outputs and PyTorch's on ``inputs``."""
    with torch.no_grad():
        expected = module(**inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = run_onnx(path, inputs)
    return max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))


def export_onnx(run_dir: str | Path, out: str | Path, overwrite: bool = False, opset: int | None = None,
                echo=print) -> Path:
    """The ``fmforge export onnx`` verb: write ``run_dir``'s model as ``out/model.onnx`` (dynamic batch and
    sequence; see the module docstring for inputs and outputs), checked against PyTorch with onnxruntime
    (largest difference <= 1e-4) before anything in ``out`` is replaced."""
    run_dir, out = Path(run_dir), Path(out)
    _require_onnx()
    if not run_dir.is_dir():
        raise FmforgeError(f"run directory not found: {run_dir}")
    cfg = read_model_config(run_dir)
    replaced = _claim_outputs(out, run_dir, overwrite)
    model, _ = load_pretrained(run_dir, "cpu")
    module, inputs, dynamic, output_names = export_spec(model, cfg)
    module.eval()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".onnx-export.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        try:
            program = torch.onnx.export(module, (), kwargs=inputs, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=list(inputs), output_names=output_names, opset_version=opset,
                                        external_data=weights > EXTERNAL_DATA_BYTES, verbose=False)
        except Exception as err:  # the exporter raises many kinds; any is "this model did not export"
            detail = (str(err.__cause__ or err).strip().splitlines() or [type(err).__name__])[0]
            raise FmforgeError(f"torch.onnx.export failed on {run_dir}: {detail[:300]}") from None
        program.save(str(staging / "model.onnx"), external_data=weights > EXTERNAL_DATA_BYTES)
        diff = _check_parity(module, staging / "model.onnx", inputs)
        if not diff <= PARITY_TOLERANCE:
            raise FmforgeError(f"the exported ONNX model differs from PyTorch by {diff:.3g} (> {PARITY_TOLERANCE})")
        for path in replaced:  # asked for: the old files go only now, once the new ones are ready
            path.unlink()
        for name in ("model.onnx", "model.onnx.data"):
            if (staging / name).exists():
                (staging / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    copy_side_file(run_dir, "model.json", out)
    for name in TOKENIZER_FILES:
        copy_side_file(run_dir, name, out)
    echo(f"exported {run_dir} ({family_of(cfg)}) to {out / 'model.onnx'}: inputs {', '.join(inputs)}; outputs "
         f"{', '.join(output_names)}; onnxruntime matches PyTorch within {diff:.2g}")
    return out / "model.onnx"
