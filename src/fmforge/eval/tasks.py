"""The benchmark task pack: the built-in tasks (``tasks_builtin``) plus the user's own, by name.

A user task is a YAML file beside (or naming) a JSONL file, one example per line::

    # my_task.yaml
    type: multiple_choice             # or: generation
    data: my_task.jsonl               # relative to this file
    fewshot_data: my_task_train.jsonl # optional; without it, few-shot examples are held out of `data`
    prompt: "Question: {question}\\nAnswer:"   # {field} is that field of the line; {{ and }} are braces
    choices: options                  # multiple choice: the field with the list of choices, or a list
    answer: label                     # the field with the answer: a choice's index or text (multiple
                                      # choice); a string or a list of acceptable strings (generation)
    metrics: [acc, acc_norm]          # multiple choice: acc, acc_norm, acc_bytes; generation: exact_match,
                                      # f1, number_match, rouge1, rouge2, rougeL, bleu, bleu_max, rouge*_max
    # optional: name (default: the file's stem), description, target_delimiter (" "),
    # fewshot_delimiter ("\\n\\n"), until (["\\n\\n"]), max_gen_toks (256), mirrors

``--include DIR_OR_YAML`` makes every ``*.yaml`` in a directory (or one file) a task; a task name may also
be the path of a YAML file. Lines that are not JSON objects, lack a field the prompt uses, or have an answer
that fits no choice are counted and skipped, never fatal.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fmforge.errors import FmforgeError, clip
from fmforge.eval.tasks_builtin import BUILTIN, load_builtin
from fmforge.eval.tasks_core import GENERATION, MULTIPLE_CHOICE, Doc, Task, check_metrics, read_jsonl

MAX_TASK_YAML_BYTES = 1 << 20
_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TaskSpec(BaseModel):
    """A user task's YAML, validated (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["multiple_choice", "generation"]
    data: str
    prompt: str
    answer: str
    name: str | None = None
    fewshot_data: str | None = None
    choices: str | list[str] | None = None
    metrics: list[str] | None = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: list[str] = Field(default_factory=lambda: ["\n\n"])
    max_gen_toks: int = Field(256, ge=1, le=8192)
    mirrors: str = ""


def render(template: str, row: dict) -> str:
    """``template`` with each ``{field}`` replaced by that field of ``row`` (a string or number); a missing
    or non-scalar field raises KeyError / TypeError (the line is then skipped)."""
    def value(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        v = row[match.group(1)]
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise TypeError(f"field {match.group(1)} is not text")
        return str(v)
    return _FIELD.sub(value, template)


def _mc_doc(spec: TaskSpec, row: dict) -> Doc:
    choices = spec.choices if isinstance(spec.choices, list) else row[spec.choices]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError("choices must be a list of at least two strings")
    answer = row[spec.answer]
    if isinstance(answer, bool):
        answer = int(answer)
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise ValueError("answer index out of range")
        gold = answer
    elif isinstance(answer, str) and answer in choices:
        gold = choices.index(answer)
    else:
        raise ValueError("answer is neither a choice's index nor its text")
    return Doc(text=render(spec.prompt, row), target=choices[gold], choices=list(choices), gold=gold)


def _generation_doc(spec: TaskSpec, row: dict) -> Doc:
    answer = row[spec.answer]
    refs = [answer] if isinstance(answer, str | int | float) and not isinstance(answer, bool) else answer
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str | int | float) for r in refs):
        raise ValueError("answer must be a string or a list of strings")
    refs = [str(r) for r in refs if str(r).strip()]
    if not refs:
        raise ValueError("empty answer")
    return Doc(text=render(spec.prompt, row), target=refs[0], references=refs)


def _read_spec(path: Path) -> TaskSpec:
    try:
        if path.stat().st_size > MAX_TASK_YAML_BYTES:
            raise FmforgeError(f"task file {path} is larger than {MAX_TASK_YAML_BYTES:,} bytes")
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise FmforgeError(f"cannot read task file {path}: {getattr(err, 'strerror', None) or err}") from None
    except yaml.YAMLError as err:
        raise FmforgeError(f"task file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise FmforgeError(f"task file {path} must be a mapping of keys (type, data, prompt, answer, ...)")
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise FmforgeError(f"task file {path}: {where}: {first['msg']}") from None


def load_user_task(path: str | Path) -> Task:
    """A user task from its YAML file (see the module docstring for the format)."""
    path = Path(path)
    spec = _read_spec(path)
    name = spec.name or path.stem
    if spec.type == MULTIPLE_CHOICE and spec.choices is None:
        raise FmforgeError(f"task file {path}: a multiple_choice task needs 'choices' (a field or a list)")
    metrics = check_metrics(spec.type, spec.metrics or (["acc", "acc_norm"] if spec.type == MULTIPLE_CHOICE
                                                        else ["exact_match", "f1"]), f"task file {path}")
    to_doc = (lambda row: _mc_doc(spec, row)) if spec.type == MULTIPLE_CHOICE else (
        lambda row: _generation_doc(spec, row))
    skipped: Counter = Counter()
    docs = read_jsonl(path.parent / spec.data, to_doc, skipped)
    fewshot = None
    if spec.fewshot_data:
        fewshot = read_jsonl(path.parent / spec.fewshot_data, to_doc, Counter())
    if not docs:
        raise FmforgeError(f"task {name}: {path.parent / spec.data} has no usable example "
                           f"({sum(skipped.values())} malformed lines skipped)")
    return Task(name=name, kind=spec.type, docs=docs, metrics=metrics, source=str(path.parent / spec.data),
                mirrors=spec.mirrors, fewshot_docs=fewshot,
                fewshot_source=str(path.parent / spec.fewshot_data) if spec.fewshot_data else "",
                description=spec.description, target_delimiter=spec.target_delimiter,
                fewshot_delimiter=spec.fewshot_delimiter, until=list(spec.until), max_gen_toks=spec.max_gen_toks,
                skipped=dict(skipped))


def user_task_files(include: list[str] | None) -> dict[str, Path]:
    """name -> YAML file of every user task under ``include`` (directories or YAML files)."""
    found: dict[str, Path] = {}
    for entry in include or []:
        where = Path(entry)
        if where.is_dir():
            files = sorted([*where.glob("*.yaml"), *where.glob("*.yml")])
        elif where.is_file():
            files = [where]
        else:
            raise FmforgeError(f"--include {entry}: no such file or directory")
        for file in files:
            name = _read_spec(file).name or file.stem
            if name in BUILTIN:
                raise FmforgeError(f"task file {file} is named {name!r}, a built-in task: rename it")
            if name in found and found[name] != file:
                raise FmforgeError(f"two task files are named {name!r}: {found[name]} and {file}")
            found[name] = file
    return found


def known_tasks(include: list[str] | None = None) -> list[str]:
    """Built-in task names, then the user tasks found under ``include``."""
    return [*BUILTIN, *user_task_files(include)]


def load_tasks(names: list[str], include: list[str] | None = None) -> list[Task]:
    """The tasks called ``names`` (built-in, found under ``include``, or YAML paths), in order, each once."""
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise FmforgeError(f"no task named; known tasks: {', '.join(BUILTIN)}")
    user = user_task_files(include)
    tasks, seen = [], set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        if name in BUILTIN:
            tasks.append(load_builtin(name))
        elif name in user:
            tasks.append(load_user_task(user[name]))
        elif name.endswith((".yaml", ".yml")) and Path(name).is_file():
            tasks.append(load_user_task(name))
        else:
            raise FmforgeError(f"unknown task {clip(name, 60)}; known tasks: {', '.join([*BUILTIN, *user])} "
                               "(or a task YAML file; see --include)")
    return tasks


__all__ = ["GENERATION", "MULTIPLE_CHOICE", "Doc", "Task", "TaskSpec", "known_tasks", "load_tasks",
           "load_user_task", "render"]
