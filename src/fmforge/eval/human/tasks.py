"""The task-set format shared by export, the rating server and the report (no torch needed to read it).

A task set is a JSONL file, one item per line: ``{"id", "prompt", "outputs": [{"label": "A", "text"}, ...]}``.
Items are shuffled and, within each item, the models' outputs are put in a random order under the labels
A, B, C, ... (seeded, so a task set is reproducible). Which model wrote which label is in the key,
``TASKS.key.json``, never in the task file: raters (and the rating server) see only labels. The task set's
identity is the SHA-256 of the task file's bytes; every rating and the key carry it, so ratings of one task
set can never be scored with another set's key.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from fmforge.errors import FmforgeError, clip

KEY_FORMAT = "fmforge-human-key"
KEY_VERSION = 1
LABELS = "ABCDEFGH"  # a rater can compare (and rank) at most this many outputs at once
MAX_TASKS_BYTES = 256 << 20
MAX_KEY_BYTES = 256 << 20


def key_path_for(tasks: str | Path) -> Path:
    """``TASKS.key.json`` beside ``TASKS.jsonl`` (the suffix replaced; any other name gets it appended)."""
    tasks = Path(tasks)
    stem = tasks.name[:-len(".jsonl")] if tasks.name.endswith(".jsonl") else tasks.name
    return tasks.with_name(f"{stem}.key.json")


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as err:
        raise FmforgeError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(raw) > limit:
        raise FmforgeError(f"{what} {path} is larger than {limit:,} bytes")
    return raw


def ratings_path_for(tasks: str | Path) -> Path:
    """``TASKS.ratings.jsonl`` beside ``TASKS.jsonl``: the default ratings file."""
    tasks = Path(tasks)
    stem = tasks.name[:-len(".jsonl")] if tasks.name.endswith(".jsonl") else tasks.name
    return tasks.with_name(f"{stem}.ratings.jsonl")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_task_set(prompts: list[dict], generations: list[list[str]], models: list[dict], out: str | Path, *,
                   seed: int = 0, generation: dict | None = None) -> dict:
    """Blind and write a task set: ``prompts`` (``[{"id", "prompt"}]``), ``generations[m][i]`` = model m's
    output for prompt i, ``models`` = ``[{"name", "run_dir"}]``. Items are shuffled and each item's outputs
    labelled A, B, ... in a random order, from ``seed``; the task file ``out`` and its key are written
    atomically. Returns ``{"tasks", "key", "items", "models", "task_set"}``."""
    out = Path(out)
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    lines, key_items = [], {}
    for i in order:
        perm = list(range(len(models)))
        rng.shuffle(perm)
        outputs = [{"label": LABELS[pos], "text": generations[m][i]} for pos, m in enumerate(perm)]
        lines.append(json.dumps({"id": prompts[i]["id"], "prompt": prompts[i]["prompt"], "outputs": outputs},
                                ensure_ascii=False) + "\n")
        key_items[prompts[i]["id"]] = {LABELS[pos]: models[m]["name"] for pos, m in enumerate(perm)}
    data = "".join(lines).encode("utf-8")
    task_set = hashlib.sha256(data).hexdigest()
    key = {"format": KEY_FORMAT, "version": KEY_VERSION, "task_set": task_set, "tasks": out.name, "seed": seed,
           "generation": generation or {}, "models": models, "items": key_items}
    key_path = key_path_for(out)
    _write_atomic(out, data)
    _write_atomic(key_path, (json.dumps(key, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return {"tasks": str(out), "key": str(key_path), "items": len(prompts), "models": [m["name"] for m in models],
            "task_set": task_set}


def _check_item(rec, number: int, path: Path) -> dict:
    where = f"{path} line {number}"
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(rec.get("prompt"), str):
        raise FmforgeError(f"{where} is not a task item (needs \"id\", \"prompt\" and \"outputs\")")
    outputs = rec.get("outputs")
    if not isinstance(outputs, list) or not 1 <= len(outputs) <= len(LABELS):
        raise FmforgeError(f"{where}: \"outputs\" must list 1 to {len(LABELS)} outputs")
    for pos, o in enumerate(outputs):
        if not isinstance(o, dict) or o.get("label") != LABELS[pos] or not isinstance(o.get("text"), str):
            raise FmforgeError(f"{where}: output {pos + 1} must be {{\"label\": \"{LABELS[pos]}\", \"text\": ...}}")
    return {"id": rec["id"], "prompt": rec["prompt"],
            "outputs": [{"label": o["label"], "text": o["text"]} for o in outputs]}


def read_tasks(path: str | Path) -> tuple[list[dict], str]:
    """(the items of a task set, its SHA-256). A malformed task file is a one-line error naming the line:
    task files are written by ``export_human_tasks``, so a bad one is a wrong file, not a bad record."""
    path = Path(path)
    raw = read_bounded(path, MAX_TASKS_BYTES, "task file")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise FmforgeError(f"task file {path} is not UTF-8 text") from None
    items, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            raise FmforgeError(f"{path} line {number} is not JSON: is this a task file from "
                               "`fmforge eval human export`?") from None
        item = _check_item(rec, number, path)
        if item["id"] in seen:
            raise FmforgeError(f"{path} line {number}: item id {clip(item['id'])} appears twice")
        seen.add(item["id"])
        items.append(item)
    if not items:
        raise FmforgeError(f"task file {path} holds no items")
    return items, hashlib.sha256(raw).hexdigest()


def _bad_key(path) -> FmforgeError:
    return FmforgeError(f"{path} is not a key file written by `fmforge eval human export`")


def read_key(path: str | Path) -> dict:
    """The key of a task set, checked: model names and, per item, which model wrote which label."""
    path = Path(path)
    if not path.is_file():
        raise FmforgeError(f"key file not found: {path}")
    try:
        key = json.loads(read_bounded(path, MAX_KEY_BYTES, "key file").decode("utf-8"))
    except (ValueError, RecursionError):
        raise _bad_key(path) from None
    if not isinstance(key, dict):
        raise _bad_key(path)
    models, items = key.get("models"), key.get("items")
    if key.get("format") != KEY_FORMAT or not isinstance(key.get("task_set"), str) or not isinstance(models, list) \
            or not models or not isinstance(items, dict) or not items:
        raise _bad_key(path)
    if not all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in models):
        raise _bad_key(path)
    names = [m["name"] for m in models]
    for mapping in items.values():
        if not isinstance(mapping, dict) or sorted(mapping) != list(LABELS[:len(mapping)]) \
                or sorted(mapping.values()) != sorted(names):
            raise _bad_key(path)
    return key


