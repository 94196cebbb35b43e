"""``fmforge prompt eval``: prompt engineering as a measurement. Every (template, shot count) is scored on the
same examples of one benchmark task (``eval --tasks``' format and scorer), so the differences between them
are paired: each row reports its metric with a 95% interval and its difference from the first row with
the interval of the paired difference (the standard error of the per-example differences), which is far
narrower than comparing two independent intervals."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fmforge.errors import FmforgeError
from fmforge.eval.benchmarks import _generation_scores, _mc_scores, check_decoder_run
from fmforge.eval.metrics import mean, mean_stderr
from fmforge.eval.results import save_result
from fmforge.eval.scorer import LMScorer
from fmforge.eval.tasks import load_tasks
from fmforge.eval.tasks_core import MULTIPLE_CHOICE, split_for_fewshot
from fmforge.prompt.embed import TextEncoder
from fmforge.prompt.shots import ShotPicker
from fmforge.prompt.templates import load_template

Z95 = 1.959964


def wilson(successes: float, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion: inside [0, 1] and sound near 0 and 1 and for small n,
    where the normal interval is not."""
    p, z2 = successes / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(values: list[float], proportion: bool = True) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of a 95% interval of the mean: Wilson's for 0/1 values (accuracy, attack success)
    when ``proportion``, the normal one (mean +- 1.96 standard errors, lm-eval's stderr) otherwise (paired
    differences); no interval under two values."""
    if not values:
        return None, None, None
    mu, se = mean(values), mean_stderr(values)
    if se is None:
        return mu, None, None
    if proportion and all(v in (0.0, 1.0) for v in values):
        return (mu, *wilson(sum(values), len(values)))
    return mu, mu - Z95 * se, mu + Z95 * se


def _contexts(task, template, docs, picker, k: int) -> list[str]:
    out = []
    for i, doc in enumerate(docs):
        shots = [{"text": s.text, "target": s.target} for s in picker.pick(i, doc, k)]
        out.append(template.render(text=doc.text, choices=doc.choices or [], description=task.description,
                                   shots=shots, target_delimiter=task.target_delimiter,
                                   fewshot_delimiter=task.fewshot_delimiter))
    return out


def _row(name: str, k: int, metric: str, values: list[float], base: list[float] | None) -> dict:
    mu, low, high = interval(values)
    row = {"template": name, "shots": k, "metric": metric, "value": mu, "low": low, "high": high,
           "n": len(values), "delta": None, "delta_low": None, "delta_high": None}
    if base is not None and len(base) == len(values):
        row["delta"], row["delta_low"], row["delta_high"] = interval([a - b for a, b in zip(values, base)],
                                                                     proportion=False)
    return row


def _fmt(value, low, high) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if low is None else f"{value:.4f} [{low:.4f}, {high:.4f}]"


def prompt_table(rows: list[dict], title: str) -> str:
    table = Table(title=title)
    for column in ("template", "shots", "metric", "value [95% CI]", "Δ vs first [95% CI]", "n"):
        table.add_column(column, justify="left" if column in ("template", "metric") else "right")
    for r in rows:
        table.add_row(r["template"], str(r["shots"]), r["metric"], _fmt(r["value"], r["low"], r["high"]),
                      _fmt(r["delta"], r["delta_low"], r["delta_high"]), str(r["n"]))
    buffer = io.StringIO()
    Console(file=buffer, width=130, highlight=False).print(table)
    return buffer.getvalue().rstrip("\n")


def prompt_eval(run_dir: str | Path, task: str, templates: list[str], shots: list[int] | None = None,
                selection: str = "random", shot_encoder: str | None = None, limit: int | None = None,
                batch_size: int = 16, device: str = "auto", seed: int = 1234, include: list[str] | None = None,
                json_out: bool = False, echo=print) -> dict:
    """Score ``run_dir`` (a decoder) on ``task`` with each template at each shot count; saves
    ``RUN_DIR/eval/prompts.json`` and returns {"task", "rows", "path"}."""
    shots = sorted(set(shots or [0]))
    if shots[0] < 0:
        raise FmforgeError(f"--shots must be >= 0 (got {shots[0]})")
    if limit is not None and limit < 1:
        raise FmforgeError(f"--limit must be at least 1 (got {limit})")
    if not templates:
        raise FmforgeError("name at least one template (--templates)")
    check_decoder_run(run_dir, "prompt eval")
    compiled = [load_template(t) for t in templates]  # every template compiles before the model loads
    (loaded,) = load_tasks([task], include)
    scored, pool = split_for_fewshot(loaded, shots[-1])  # one scored set for every shot count: paired rows
    docs = scored[:limit] if limit is not None else scored
    embed = TextEncoder(shot_encoder, device=device).encode if shot_encoder else None
    picker = ShotPicker(loaded, pool, selection, seed, embed)
    picker.prepare(docs)
    rendered = {(t.name, k): _contexts(loaded, t, docs, picker, k) for t in compiled for k in shots}
    scorer = LMScorer.from_run(run_dir, device=device, batch_size=batch_size)
    rows, base = [], {}
    for (name, k), contexts in rendered.items():
        if loaded.kind == MULTIPLE_CHOICE:
            examples, too_long = _mc_scores(scorer, loaded, docs, contexts)
            if too_long:
                raise FmforgeError(f"template {name} at {k} shots makes {too_long} prompt(s) whose choices do not "
                                   f"fit the model's {scorer.max_length}-token context: lower --shots or --limit")
        else:
            examples = _generation_scores(scorer, loaded, docs, contexts, seed)
        for metric in loaded.metrics:
            values = [ex[metric] for ex in examples]
            rows.append(_row(name, k, metric, values, base.get(metric)))
            base.setdefault(metric, values)
    path = save_result(run_dir, "prompts", "prompt_eval", {f"{r['template']}/{r['shots']}/{r['metric']}": r["value"]
                                                           for r in rows if r["value"] is not None},
                       task=loaded.name, rows=rows, selection=selection, seed=seed, limit=limit)
    result = {"task": loaded.name, "selection": selection, "rows": rows, "path": str(path)}
    if json_out:
        echo(json.dumps(result))
    else:
        echo(prompt_table(rows, f"{loaded.name}: templates x shots ({selection} shots, seed {seed}, "
                                f"chance {loaded.chance:.3f})" if loaded.chance is not None else loaded.name))
        echo(f"saved {path}")
    return result
