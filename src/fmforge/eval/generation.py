"""``fmforge eval RUN_DIR --prompts FILE.jsonl``: generate for each prompt and score against references.

The prompts file has one JSON object per line: ``{"prompt": "...", "reference": "..."}`` or ``"references":
[...]`` (any one may match; both keys may be given, or neither: then the line is generated but not scored),
and an optional ``"id"`` (default: the line number). Lines that are not JSON objects, have no non-empty
``prompt`` or have references that are not strings are counted and skipped.

Generation is ``LMScorer.generate_until``: ``[bos] + prompt``, up to ``max_new_tokens``, ended by eos or a
``stop`` string; greedy at temperature 0, else sampled with top-k / top-p from a generator seeded with
(``seed``, prompt): each prompt's text depends only on the model, the prompt and the seed, and two prompts
never share a random stream. A prompt longer than the
model's context keeps its last tokens. Every generation is written with its scores to a JSONL file (default
``RUN_DIR/eval/generations.jsonl``); the aggregates go to ``RUN_DIR/eval/generation.json``:

- ``exact_match``, ``f1`` (SQuAD), ``rougeL`` (rouge-score, stemmed): per-prompt best over the references,
  averaged, with the standard error of the mean;
- ``bleu``: sacrebleu's corpus BLEU over the scored prompts, with a bootstrap standard error (200 resamples
  of the prompts, seeded); each line of the JSONL carries its sentence BLEU.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.eval.benchmarks import check_decoder_run
from fmforge.eval.metrics import (
    bootstrap_stderr,
    corpus_bleu,
    exact_match,
    mean,
    mean_stderr,
    rouge_l,
    sentence_bleu,
    token_f1,
)
from fmforge.eval.results import EVAL_DIR, save_result
from fmforge.eval.scorer import LMScorer

RESULT_NAME = "generation"
PER_PROMPT_METRICS = ("exact_match", "f1", "rougeL")
BOOTSTRAP_ITERS = 200


def _prompt_item(row: dict, line_no: int) -> dict:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("no prompt")
    refs = []
    if "reference" in row:
        refs.append(row["reference"])
    if "references" in row:
        if not isinstance(row["references"], list):
            raise ValueError("references must be a list")
        refs.extend(row["references"])
    if not all(isinstance(r, str) for r in refs):
        raise ValueError("references must be strings")
    item_id = row.get("id", line_no)
    if not isinstance(item_id, str | int) or isinstance(item_id, bool):
        raise ValueError("id must be a string or an integer")
    return {"id": item_id, "prompt": prompt, "references": [r for r in refs if r.strip()]}


def read_prompts(path: str | Path) -> tuple[list[dict], dict[str, int]]:
    """(prompt items, skipped lines by reason) of a prompts JSONL file."""
    path = Path(path)
    items, skipped = [], Counter()
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    skipped["not JSON"] += 1
                    continue
                if not isinstance(row, dict):
                    skipped["not a JSON object"] += 1
                    continue
                try:
                    items.append(_prompt_item(row, line_no))
                except ValueError as err:
                    skipped[str(err)] += 1
    except FileNotFoundError:
        raise FmforgeError(f"prompts file not found: {path}") from None
    except UnicodeDecodeError:
        raise FmforgeError(f"prompts file {path} is not UTF-8 text") from None
    except OSError as err:
        raise FmforgeError(f"cannot read prompts file {path}: {err.strerror or err}") from None
    return items, dict(skipped)


def prompt_seed(seed: int, prompt: str) -> int:
    """The sampling seed of one prompt: a hash of (seed, prompt), so prompts draw independent streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()[:8], "little") >> 1


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 1:
        raise FmforgeError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise FmforgeError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
    if top_k is not None and top_k < 1:
        raise FmforgeError(f"--top-k must be at least 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise FmforgeError(f"--top-p must be in (0, 1] (got {top_p})")


def score_generation(generation: str, references: list[str]) -> dict[str, float]:
    """exact_match, f1, rougeL (best over the references) and sentence BLEU of one generation."""
    return {"exact_match": exact_match(generation, references), "f1": token_f1(generation, references),
            "rougeL": rouge_l(generation, references), "bleu": sentence_bleu(generation, references)}


def aggregate(records: list[dict], seed: int = 0) -> dict[str, float]:
    """Means and standard errors over the records that have references, corpus BLEU and its bootstrap."""
    scored = [r for r in records if r.get("scores")]
    out: dict[str, float] = {"n": len(records), "n_scored": len(scored)}
    if not scored:
        return out
    for name in PER_PROMPT_METRICS:
        values = [r["scores"][name] for r in scored]
        out[name] = mean(values)
        err = mean_stderr(values)
        if err is not None:
            out[f"{name}_stderr"] = err
    pairs = [(r["generation"], r["references"]) for r in scored]

    def bleu_of(sample):
        return corpus_bleu([g for g, _ in sample], [refs for _, refs in sample])

    out["bleu"] = bleu_of(pairs)
    err = bootstrap_stderr(bleu_of, pairs, iters=BOOTSTRAP_ITERS, seed=seed)
    if err is not None:
        out["bleu_stderr"] = err
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def evaluate_prompts(run_dir: str | Path, prompts_file: str | Path, *, out: str | None = None,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int = 0, stop: list[str] | None = None,
                     batch_size: int = 16, device: str = "auto", json_out: bool = False, echo=print) -> dict:
    """Generate for every prompt of ``prompts_file`` with the decoder of ``run_dir``, score the ones with
    references, write each generation with its scores to ``out`` (JSONL) and save the aggregates as
    ``RUN_DIR/eval/generation.json``. Returns {"metrics", "generations" (the JSONL's path), "skipped", ...}."""
    _check_options(max_new_tokens, temperature, top_k, top_p)
    check_decoder_run(run_dir, "generation evaluation")
    items, skipped = read_prompts(prompts_file)
    if not items:
        raise FmforgeError(f"{prompts_file} has no usable prompt ({sum(skipped.values())} malformed line(s) "
                           "skipped); each line needs {\"prompt\": ...}")
    if any(item["references"] for item in items):
        score_generation("a", ["a"])  # a missing rouge-score / sacrebleu fails now, not after generating
    out_path = Path(out) if out else Path(run_dir) / EVAL_DIR / "generations.jsonl"
    scorer = LMScorer.from_run(run_dir, device=device, batch_size=batch_size)
    options = {"until": list(stop or []), "max_gen_toks": max_new_tokens, "temperature": temperature,
               "top_k": top_k, "top_p": top_p}
    generations = scorer.generate_until([(item["prompt"], {**options, "seed": prompt_seed(seed, item["prompt"])})
                                         for item in items])
    records = []
    for item, text in zip(items, generations):
        record = {**item, "generation": text}
        if item["references"]:
            record["scores"] = score_generation(text, item["references"])
        records.append(record)
    _write_jsonl(out_path, records)
    metrics = aggregate(records, seed=seed)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "seed": seed, "stop": list(stop or [])}
    path = save_result(run_dir, RESULT_NAME, "generation", metrics, prompts_file=str(prompts_file),
                       generations=str(out_path), skipped=skipped, settings=settings)
    result = {"run_dir": str(run_dir), "metrics": metrics, "generations": str(out_path), "skipped": skipped,
              "settings": settings, "path": str(path)}
    if json_out:
        echo(json.dumps(result))
        return result
    for reason, count in skipped.items():
        echo(f"skipped {count} line(s) of {prompts_file}: {reason}")
    echo(f"generated for {metrics['n']} prompt(s), {metrics['n_scored']} with references")
    for name in (*PER_PROMPT_METRICS, "bleu"):
        if name in metrics:
            err = metrics.get(f"{name}_stderr")
            echo(f"  {name:<12} {metrics[name]:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
    echo(f"generations: {out_path}")
    echo(f"saved {path}")
    return result
