"""``fmforge eval``: perplexity for decoders, the family's own metrics and probes for everything else."""

from __future__ import annotations

from fmforge.errors import FmforgeError
from fmforge.eval.perplexity import evaluate
from fmforge.eval.results import save_result
from fmforge.eval.runs import evaluate_run
from fmforge.runs import family_of, read_model_config


def eval_command(run_dir: str, *, data: str | None = None, max_batches: int | None = None,
                 batch_size: int | None = None, zero_shot: str | None = None, class_names: list[str] | None = None,
                 templates: list[str] | None = None, probe_samples: int = 10000, random_baseline: bool = False,
                 device: str = "auto", json_out: bool = False) -> None:
    """``fmforge eval``: perplexity for decoders, the family's own metrics and probes for everything else."""
    if family_of(read_model_config(run_dir)) == "decoder":
        if zero_shot or class_names or templates or random_baseline:
            raise FmforgeError("--zero-shot, --class-names, --template and --random-baseline apply to image runs")
        result = evaluate(run_dir, data_dir=data, max_batches=max_batches, batch_size=batch_size or 8, device=device,
                          json_out=json_out)
        _save(run_dir, "perplexity", result)
        return
    result = evaluate_run(run_dir, data_dir=data, zero_shot=zero_shot, class_names=class_names,
                          templates=templates, batch_size=batch_size or 64, max_batches=max_batches,
                          probe_samples=probe_samples, random_baseline=random_baseline, device=device,
                          json_out=json_out)
    _save(run_dir, "vision" if result.get("family") != "bert" else "mlm", result)


def _save(run_dir: str, kind: str, result: dict) -> None:
    """Keep the numbers in RUN_DIR/eval/KIND.json for reports and pipeline gates."""
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    save_result(run_dir, kind, kind, metrics, data_dir=result.get("data_dir"))
