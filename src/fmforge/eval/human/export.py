"""``fmforge eval human export``: every run's answers to a prompt file, blinded into a task set for raters.

Generation is fmforge's own (``deploy.generate.sample`` on the run's model, the prompt fed as [bos] +
tokens, stopped at eos): usable prompt i is sampled with seed ``seed + i``, the same for every run, so
an output can be reproduced with ``fmforge generate RUN --prompt P --seed SEED+i``. The task-set format
(and the key kept apart from it) is described in ``tasks.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from fmforge.deploy.generate import _check_sampling_args, sample
from fmforge.device import pick_device
from fmforge.errors import FmforgeError, clip
from fmforge.eval.human.tasks import LABELS, read_bounded, write_task_set
from fmforge.runs import load_pretrained

MAX_PROMPTS_BYTES = 64 << 20
MAX_PROMPT_CHARS = 100_000
MAX_ID_CHARS = 200


def read_prompts(path: str | Path) -> tuple[list[dict], Counter]:
    """The prompts of a JSONL file (``{"prompt": str, "id"?: str | int}`` per line) as ``[{"id", "prompt"}]``
    and the count of skipped lines by reason. A line without an id gets ``p<line number>``."""
    path = Path(path)
    raw = read_bounded(path, MAX_PROMPTS_BYTES, "prompts file")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise FmforgeError(f"prompts file {path} is not UTF-8 text") from None
    prompts, skipped, seen = [], Counter(), set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            skipped["not JSON"] += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            skipped["no prompt text"] += 1
            continue
        if len(rec["prompt"]) > MAX_PROMPT_CHARS:
            skipped[f"prompt over {MAX_PROMPT_CHARS:,} characters"] += 1
            continue
        raw_id = rec.get("id", f"p{number}")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip() \
                or len(str(raw_id)) > MAX_ID_CHARS:
            skipped["bad id"] += 1
            continue
        item_id = str(raw_id)
        if item_id in seen:
            skipped["duplicate id"] += 1
            continue
        seen.add(item_id)
        prompts.append({"id": item_id, "prompt": rec["prompt"]})
    if not prompts:
        raise FmforgeError(f"prompts file {path} holds no usable prompt (one JSON object per line with \"prompt\")")
    return prompts, skipped


def _model_names(runs: list[Path]) -> list[str]:
    resolved = [r.resolve() for r in runs]
    if len(set(resolved)) != len(resolved):
        raise FmforgeError("the same run directory is listed twice in --runs")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # two runs both called "final": name them by their paths
        names = [str(r) for r in runs]
    return names


def _generate_all(run_dir: Path, prompts: list[dict], seed: int, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, dev: torch.device) -> list[str]:
    """The continuation of every prompt by one run's model: exactly what ``fmforge generate RUN --prompt P
    --seed SEED+i`` appends to prompt i (same [bos] + tokens layout, eos stop and sampling)."""
    model, tok = load_pretrained(run_dir, dev, family="decoder")
    generator = torch.Generator(device=dev)
    texts = []
    for i, p in enumerate(prompts):
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(p["prompt"]))
        generator.manual_seed(seed + i)
        try:
            new = sample(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
        except FmforgeError as err:
            raise FmforgeError(f"prompt {clip(p['id'])} with {run_dir}: {err}") from None
        texts.append(tok.decode(new))
    return texts


def export_human_tasks(runs: str | Sequence[str | Path], prompts: str | Path, out: str | Path, *, seed: int = 0,
                       max_new_tokens: int = 128, temperature: float = 0.7, top_k: int | None = None,
                       top_p: float | None = None, device: str = "auto", echo=print) -> dict:
    """Generate every run's answer to every prompt and write the blinded task set ``out`` (JSONL) and its
    key ``out``'s ``.key.json``. ``runs``: decoder run directories (a list, or one comma-separated string);
    ``seed`` fixes item order, label order and sampling (prompt i is sampled with seed ``seed + i``, the
    same for every run). Returns ``{"tasks", "key", "items", "models", "task_set", "skipped"}``."""
    run_list = [Path(r) for r in (runs.split(",") if isinstance(runs, str) else runs) if str(r).strip()]
    if not run_list:
        raise FmforgeError("--runs names no run directory")
    if len(run_list) > len(LABELS):
        raise FmforgeError(f"at most {len(LABELS)} runs can be compared at once (got {len(run_list)})")
    for r in run_list:
        if not r.is_dir():
            raise FmforgeError(f"run directory not found: {r}")
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    names = _model_names(run_list)
    out = Path(out)
    if not out.parent.is_dir():
        raise FmforgeError(f"output folder does not exist: {out.parent}")
    items, skipped = read_prompts(prompts)
    dev = pick_device(device)
    generations = []
    for name, run in zip(names, run_list):
        echo(f"generating {len(items)} answers with {name}")
        generations.append(_generate_all(run, items, seed, max_new_tokens, temperature, top_k, top_p, dev))
    models = [{"name": n, "run_dir": str(r.resolve())} for n, r in zip(names, run_list)]
    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    res = write_task_set(items, generations, models, out, seed=seed, generation=generation)
    for reason, n in sorted(skipped.items()):
        echo(f"skipped {n} prompt line(s): {reason}")
    echo(f"wrote {res['items']} items for {len(models)} model(s) to {out} (task set {res['task_set'][:12]}); "
         f"the key is {res['key']}: keep it from the raters")
    return {**res, "skipped": dict(skipped)}
