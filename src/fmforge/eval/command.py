"""``fmforge eval``: perplexity for decoders, the family's own metrics and probes for everything else."""

from __future__ import annotations

import json

from fmforge.errors import FmforgeError
from fmforge.eval.benchmarks import run_benchmarks
from fmforge.eval.diffusion import evaluate_diffusion
from fmforge.eval.generation import evaluate_prompts
from fmforge.eval.harness import run_lm_eval
from fmforge.eval.perplexity import evaluate
from fmforge.eval.quantization import format_report, quantization_report
from fmforge.eval.results import save_result
from fmforge.eval.runs import evaluate_run
from fmforge.runs import family_of, read_model_config


def eval_command(run_dir: str, *, data: str | None = None, max_batches: int | None = None,
                 batch_size: int | None = None, zero_shot: str | None = None, class_names: list[str] | None = None,
                 templates: list[str] | None = None, probe_samples: int = 10000, random_baseline: bool = False,
                 device: str = "auto", json_out: bool = False, tasks: list[str] | None = None,
                 num_fewshot: int | None = None, limit: int | None = None, seed: int | None = None,
                 include_path: list[str] | None = None, lm_eval: list[str] | None = None,
                 apply_chat_template: bool = False, prompts: str | None = None, generations_out: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, stop: list[str] | None = None, classifier: str | None = None,
                 clip: str | None = None, steps: int = 50, guidance: float = 2.0) -> None:
    """``fmforge eval``: benchmark tasks (``tasks``), lm-evaluation-harness tasks (``lm_eval``) and generation
    scoring (``prompts``) when asked; otherwise perplexity for decoders, the family's own metrics and probes
    for everything else. Every result is also kept in RUN_DIR/eval/."""
    if family_of(read_model_config(run_dir)) == "dit":
        if not classifier:
            raise FmforgeError("fmforge eval of a diffusion run needs --classifier VIT_RUN: an fmforge image "
                               "classifier trained on the same data, whose features the scores are measured in")
        result = evaluate_diffusion(run_dir, classifier=classifier, clip=clip, data_dir=data, class_names=class_names,
                                    samples=limit, steps=steps, guidance=guidance, seed=seed or 0,
                                    batch_size=batch_size or 256, device=device, json_out=json_out)
        _save(run_dir, "diffusion", result)
        return
    if classifier or clip:
        raise FmforgeError("--classifier and --clip apply to diffusion runs (model.arch=dit)")
    if tasks or lm_eval or prompts:
        _asked(run_dir, tasks=tasks, lm_eval=lm_eval, prompts=prompts, batch_size=batch_size or 16, device=device,
               json_out=json_out, num_fewshot=num_fewshot, limit=limit, seed=seed, include_path=include_path or [],
               apply_chat_template=apply_chat_template, generations_out=generations_out,
               sampling={"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                         "top_p": top_p, "stop": stop or None})
        return
    if num_fewshot is not None or limit is not None or include_path or generations_out or stop:
        raise FmforgeError("--num-fewshot, --limit, --include-path, --generations-out and --stop apply with "
                           "--tasks, --lm-eval or --prompts")
    if family_of(read_model_config(run_dir)) == "decoder":
        if zero_shot or class_names or templates or random_baseline:
            raise FmforgeError("--zero-shot, --class-names, --template and --random-baseline apply to image runs")
        result = evaluate(run_dir, data_dir=data, max_batches=max_batches, batch_size=batch_size or 8, device=device,
                          json_out=json_out)
        _save(run_dir, "perplexity", result)
        report = quantization_report(run_dir, result=result, data_dir=data, max_batches=max_batches,
                                     batch_size=batch_size or 8, device=device)
        if report is not None:
            print(format_report(report))
            save_result(run_dir, "quantization", "quantization",
                        {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                        method=report["method"], backend=report["backend"], source=report["source"])
        return
    result = evaluate_run(run_dir, data_dir=data, zero_shot=zero_shot, class_names=class_names,
                          templates=templates, batch_size=batch_size or 64, max_batches=max_batches,
                          probe_samples=probe_samples, random_baseline=random_baseline, device=device,
                          json_out=json_out)
    _save(run_dir, "vision" if result.get("family") != "bert" else "mlm", result)


def _asked(run_dir: str, *, tasks, lm_eval, prompts, batch_size: int, device: str, json_out: bool, num_fewshot,
          limit, seed, include_path: list[str], apply_chat_template: bool, generations_out, sampling: dict) -> None:
    """The evaluations named on the command line, in order: benchmark tasks, lm-eval tasks, generations."""
    if tasks:
        run_benchmarks(run_dir, tasks, num_fewshot=num_fewshot or 0, limit=limit, batch_size=batch_size,
                       device=device, seed=1234 if seed is None else seed, include=include_path, json_out=json_out)
    if lm_eval:
        if len(include_path) > 1:
            raise FmforgeError("--lm-eval takes one --include-path (a directory of task YAMLs)")
        results = run_lm_eval(run_dir, lm_eval, include_path=include_path[0] if include_path else None,
                              num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
                              apply_chat_template=apply_chat_template)
        print(json.dumps(results, indent=1) if json_out else _lm_eval_table(results))
    if prompts:
        evaluate_prompts(run_dir, prompts, out=generations_out, seed=seed or 0, batch_size=batch_size,
                         device=device, json_out=json_out, **sampling)


def _lm_eval_table(results: dict) -> str:
    lines = [f"{'lm-eval task':28} {'metric':18} {'value':>9}"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                lines.append(f"{task:28} {name:18} {value:>9.4f}")
    return "\n".join(lines)


def _save(run_dir: str, kind: str, result: dict) -> None:
    """Keep the numbers in RUN_DIR/eval/KIND.json for reports and pipeline gates."""
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    save_result(run_dir, kind, kind, metrics, data_dir=result.get("data_dir"))
