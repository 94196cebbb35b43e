"""``fmforge eval RUN_DIR --tasks ...``: benchmark accuracy of a trained decoder, scored as
lm-evaluation-harness scores it.

Multiple choice: each choice's log-likelihood given the prompt (``LMScorer.loglikelihood``, batched with the
KV cache); ``acc`` takes the most likely choice, ``acc_norm`` divides each log-likelihood by the choice's
length in characters and ``acc_bytes`` by its UTF-8 bytes (lm-eval 0.4's definitions). Yes/no questions are
two-choice ("no"/"yes"). Generation: greedy ``generate_until`` with the task's stop strings, then the task's
per-example metrics (exact match, token F1, ROUGE, BLEU, number match). Every metric is a mean over
examples and comes with lm-eval's standard error of that mean; multiple-choice tasks also report the
accuracy of a uniform random guess (``chance``) and every task the number of examples scored (``n``).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fmforge.errors import FmforgeError
from fmforge.eval.metrics import mean, mean_stderr
from fmforge.eval.results import save_result
from fmforge.eval.scorer import LMScorer
from fmforge.eval.tasks import load_tasks
from fmforge.eval.tasks_core import (
    GENERATION_METRICS,
    MULTIPLE_CHOICE,
    Task,
    build_context,
    fewshot_examples,
    split_for_fewshot,
)
from fmforge.runs import family_of, read_model_config

RESULT_NAME = "benchmarks"


def check_decoder_run(run_dir: str | Path, what: str = "benchmark tasks") -> None:
    """One-line refusals before any model is loaded: not a run, not a decoder (BERT, ViT, MAE, CLIP have
    no next-token likelihood to score choices or generate with), or no tokenizer."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FmforgeError(f"run directory not found: {run_dir}")
    family = family_of(read_model_config(run_dir))
    if family != "decoder":
        raise FmforgeError(f"{what} need a decoder (causal language model); {run_dir} holds a {family} "
                           f"model: use `fmforge eval {run_dir}` without --tasks/--prompts for its own metrics")
    if not (run_dir / "tokenizer.json").is_file():
        raise FmforgeError(f"{run_dir} has no tokenizer.json: {what} need the tokenizer the model was "
                           "trained with")


def _best(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the first, as np.argmax


def _mc_scores(scorer: LMScorer, task: Task, docs: list, contexts: list[str]) -> tuple[list[dict], int]:
    """(one record per scored doc, how many docs were left out because a choice alone is longer than the
    model's context: lm-eval refuses such a request outright; here the doc is counted and skipped)."""
    encoded = scorer.encode_pairs([(ctx, task.target_delimiter + choice)
                                   for ctx, doc in zip(contexts, docs) for choice in doc.choices])
    groups, at = [], 0
    for doc in docs:
        pairs = encoded[at:at + len(doc.choices)]
        at += len(doc.choices)
        if all(len(cont) <= scorer.max_length for _, cont in pairs):
            groups.append((doc, pairs))
    results = scorer.loglikelihood_tokens([pair for _, pairs in groups for pair in pairs])
    out, at = [], 0
    for doc, _ in groups:
        lls = [lp for lp, _ in results[at:at + len(doc.choices)]]
        at += len(doc.choices)
        chars = [max(1, len(c)) for c in doc.choices]
        nbytes = [max(1, len(c.encode("utf-8"))) for c in doc.choices]
        pred = _best(lls)
        scores = {"acc": float(pred == doc.gold),
                  "acc_norm": float(_best([lp / n for lp, n in zip(lls, chars)]) == doc.gold),
                  "acc_bytes": float(_best([lp / n for lp, n in zip(lls, nbytes)]) == doc.gold)}
        out.append({"loglikelihoods": lls, "pred": pred, "gold": doc.gold, **{m: scores[m] for m in task.metrics}})
    return out, len(docs) - len(groups)


def _generation_scores(scorer: LMScorer, task: Task, docs: list, contexts: list[str], seed: int) -> list[dict]:
    kwargs = {"until": list(task.until), "max_gen_toks": task.max_gen_toks, "temperature": 0.0, "seed": seed}
    generations = scorer.generate_until([(ctx, dict(kwargs)) for ctx in contexts])
    out = []
    for doc, text in zip(docs, generations):
        out.append({"generation": text, "references": doc.references,
                    **{m: float(GENERATION_METRICS[m](text, doc.references)) for m in task.metrics}})
    return out


def score_task(scorer: LMScorer, task: Task, *, num_fewshot: int = 0, limit: int | None = None,
               seed: int = 1234) -> dict:
    """Score one task; returns its summary (metrics with ``_stderr``, n, chance, provenance) and, under
    ``examples``, what each scored example got (choice log-likelihoods, or the generation and its scores)."""
    scored, pool = split_for_fewshot(task, num_fewshot)
    shots = 0 if task.fixed_fewshot else num_fewshot
    docs = scored[:limit] if limit is not None else scored
    contexts = [build_context(task, doc, fewshot_examples(task, pool, i, shots, seed)) for i, doc in enumerate(docs)]
    start = time.perf_counter()
    if task.kind == MULTIPLE_CHOICE:
        examples, too_long = _mc_scores(scorer, task, docs, contexts)
    else:
        examples, too_long = _generation_scores(scorer, task, docs, contexts, seed), 0
    seconds = time.perf_counter() - start
    metrics: dict[str, float | None] = {}
    for name in task.metrics:
        values = [ex[name] for ex in examples]
        metrics[name] = mean(values) if values else None
        metrics[f"{name}_stderr"] = mean_stderr(values)
    return {
        "kind": task.kind, "mirrors": task.mirrors, "source": task.source, "n": len(examples),
        "too_long": too_long,
        "n_available": len(task.docs), "skipped": task.skipped, "num_fewshot": shots,
        "fewshot_source": (task.fixed_fewshot or task.fewshot_source or
                           ("held out of the scored file" if shots else "")),
        "chance": task.chance, "metrics": metrics, "seconds": seconds,
        "examples_per_s": len(docs) / seconds if seconds > 0 else None, "notes": task.notes,
        "examples": examples,
    }


def flat_metrics(details: dict) -> dict[str, float]:
    """``TASK/METRIC`` -> number for every task (plus ``TASK/n`` and ``TASK/chance``): what gates compare."""
    flat: dict[str, float] = {}
    for name, d in details.items():
        for metric, value in d["metrics"].items():
            if value is not None:
                flat[f"{name}/{metric}"] = value
        flat[f"{name}/n"] = d["n"]
        if d["chance"] is not None:
            flat[f"{name}/chance"] = d["chance"]
    return flat


def benchmark_table(details: dict) -> str:
    """The results as a rich table, rendered to text."""
    table = Table(title="benchmarks")
    for column in ("task", "metric", "value", "± stderr", "chance", "n", "shots"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, d in details.items():
        first = True
        for metric in (m for m in d["metrics"] if not m.endswith("_stderr")):
            value, err = d["metrics"][metric], d["metrics"].get(f"{metric}_stderr")
            table.add_row(name if first else "", metric, "-" if value is None else f"{value:.4f}",
                          "-" if err is None else f"{err:.4f}",
                          f"{d['chance']:.4f}" if first and d["chance"] is not None else "",
                          str(d["n"]) if first else "", str(d["num_fewshot"]) if first else "")
            first = False
    buffer = io.StringIO()
    Console(file=buffer, width=110, highlight=False).print(table)
    return buffer.getvalue().rstrip("\n")


def run_benchmarks(run_dir: str | Path, tasks: list[str], *, num_fewshot: int = 0, limit: int | None = None,
                   batch_size: int = 16, device: str = "auto", seed: int = 1234, include: list[str] | None = None,
                   json_out: bool = False, echo=print) -> dict:
    """Score the decoder of ``run_dir`` on ``tasks`` (built-in names, user tasks under ``include``, or task
    YAML paths) and save ``RUN_DIR/eval/benchmarks.json``. ``limit`` scores the first N examples of each
    task; few-shot examples are drawn with ``seed`` from data that is never scored. Returns {"run_dir",
    "num_fewshot", "limit", "seed", "tasks": {name: summary}, "metrics": flat, "path"}."""
    if limit is not None and limit < 1:
        raise FmforgeError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise FmforgeError(f"--batch-size must be at least 1 (got {batch_size})")
    if num_fewshot < 0:
        raise FmforgeError(f"--num-fewshot must be >= 0 (got {num_fewshot})")
    check_decoder_run(run_dir)
    loaded = load_tasks(tasks, include)  # every task read (and its errors raised) before the model loads
    for task in loaded:
        split_for_fewshot(task, num_fewshot)
    scorer = LMScorer.from_run(run_dir, device=device, batch_size=batch_size)
    details = {}
    for task in loaded:
        summary = score_task(scorer, task, num_fewshot=num_fewshot, limit=limit, seed=seed)
        summary.pop("examples")
        details[task.name] = summary
        for reason, count in task.skipped.items():
            echo(f"{task.name}: skipped {count} malformed line(s) of {task.source}: {reason}")
        if summary["too_long"]:
            echo(f"{task.name}: skipped {summary['too_long']} example(s) with a choice longer than the model's "
                 f"{scorer.max_length}-token context")
    flat = flat_metrics(details)
    path = save_result(run_dir, RESULT_NAME, "benchmark", flat, tasks=details, num_fewshot=num_fewshot,
                       limit=limit, seed=seed)
    result = {"run_dir": str(run_dir), "num_fewshot": num_fewshot, "limit": limit, "seed": seed,
              "tasks": details, "metrics": flat, "path": str(path)}
    if json_out:
        echo(json.dumps(result, default=float))
    else:
        echo(benchmark_table(details))
        echo(f"saved {path}")
    return result
