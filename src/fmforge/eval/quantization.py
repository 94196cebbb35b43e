"""What quantization cost: a quantized run's perplexity next to its source run's (``fmforge eval``)."""

from __future__ import annotations

import os
from pathlib import Path

from fmforge.eval.perplexity import evaluate
from fmforge.models.qlinear import QUANT_FILE, check_spec
from fmforge.runs import read_small_json


def read_quantization(run_dir: str | Path) -> dict | None:
    """The checked ``quantization.json`` of ``run_dir``; None for a run that is not quantized."""
    path = Path(run_dir) / QUANT_FILE
    if not os.path.lexists(path):
        return None
    return check_spec(read_small_json(path), str(path))


def quantization_report(run_dir: str | Path, result: dict | None = None, data_dir: str | Path | None = None,
                        max_batches: int | None = None, batch_size: int = 8, device: str = "auto") -> dict | None:
    """For a quantized decoder run: its perplexity next to its source run's on the same data, as
    ``{"method", "backend", "source", "perplexity", "source_perplexity", "perplexity_change"}`` (the change
    relative: 0.01 = 1% worse); ``source_perplexity`` and the change are None when the source run is gone.
    ``result`` is ``evaluate``'s result for ``run_dir`` if already computed. None for a run that is not
    quantized."""
    spec = read_quantization(run_dir)
    if spec is None:
        return None
    kw = dict(max_batches=max_batches, batch_size=batch_size, device=device, echo=lambda _msg: None)
    if result is None:
        result = evaluate(run_dir, data_dir=data_dir, **kw)
    report = {"method": spec["method"], "backend": spec["backend"], "source": spec.get("source"),
              "perplexity": result["perplexity"], "source_perplexity": None, "perplexity_change": None}
    source = spec.get("source")
    if isinstance(source, str) and (Path(source) / "model.safetensors").is_file():
        base = evaluate(source, data_dir=result["data_dir"], **kw)
        report["source_perplexity"] = base["perplexity"]
        report["perplexity_change"] = result["perplexity"] / base["perplexity"] - 1
    return report


def format_report(report: dict) -> str:
    """One line for ``fmforge eval``'s output."""
    head = f"quantized {report['method']} ({report['backend']}): perplexity {report['perplexity']:.3f}"
    if report["source_perplexity"] is None:
        return f"{head}; source run {report['source']} not found, no comparison"
    return (f"{head} vs {report['source_perplexity']:.3f} for the source run "
            f"({report['perplexity_change'] * 100:+.2f}%)")
