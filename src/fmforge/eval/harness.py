"""lm-evaluation-harness on fmforge runs: any harness task, built-in or a local YAML, scored by ``LMScorer``.

``run_lm_eval(RUN_DIR, ["piqa_local"], include_path="my_tasks/")`` (``fmforge eval RUN_DIR --lm-eval TASKS
--include-path DIR``) runs ``lm_eval.simple_evaluate`` on the run's model and saves the metrics in
``RUN_DIR/eval/lm_eval.json``. From Python the model class is lm-eval's own: ``register()`` makes
``lm_eval.simple_evaluate(model="fmforge", model_args="run_dir=RUN_DIR")`` work, and
``fmforge_lm_class()(run_dir=...)`` is an ``lm_eval.api.model.LM`` instance to pass as ``model=``.

The harness is optional (``pip install 'fmforge[eval]'``); it is imported only here, inside functions.
Runs are offline by default (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` default to 1): local YAML tasks
over local files work anywhere; the harness's built-in tasks download their data from the Hugging Face Hub,
so they need ``HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0`` and a network.

Chat template, when asked (``apply_chat_template=True``): the format fmforge's chat SFT trains on
(``data/chat.py``): ``{system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{reply}<eos>``, where each
earlier reply is closed by the eos token itself, as in training.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path

from fmforge.data.chat import CHAT_TEMPLATE
from fmforge.errors import FmforgeError
from fmforge.eval.results import save_result
from fmforge.eval.scorer import LMScorer

INSTALL_HINT = "pip install 'fmforge[eval]'"
MODEL_NAME = "fmforge"
RESULT_NAME = "lm_eval"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_CLASS: list = []  # the registered lm-eval model class, built once per process


class HarnessModel:
    """Everything of the lm-eval model class that does not need lm-eval itself (``fmforge_lm_class`` mixes
    in ``lm_eval.api.model.LM``). Arguments arrive from lm-eval's ``model_args`` as strings."""

    def __init__(self, run_dir: str | None = None, device: str | None = "auto", batch_size: int | str = 16,
                 max_batch_size: int | str | None = None, scorer: LMScorer | None = None):
        super().__init__()
        if scorer is None:
            if run_dir is None:
                raise FmforgeError(f"the {MODEL_NAME} lm-eval model needs run_dir=RUN_DIR")
            scorer = LMScorer.from_run(run_dir, device=device or "auto", batch_size=_batch_size(batch_size))
        self.scorer = scorer
        self._device = scorer.device

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}-{self.scorer.tokenizer.sha256[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return CHAT_TEMPLATE if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation in fmforge's chat format; from now on the eos text in a context is the eos id."""
        self.scorer.eos_in_text = True
        eos = self.scorer.tokenizer.tokenizer.id_to_token(self.scorer.eos_id)
        text = ""
        for n, message in enumerate(chat_history):
            role, content = message.get("role"), message.get("content", "")
            if role == "system":
                text += f"{content}\n\n"
            elif role == "user":
                text += f"### User:\n{content}\n\n### Assistant:\n"
            else:  # an assistant turn; the last one is left open when it is a prefill to continue
                last_open = n == len(chat_history) - 1 and not add_generation_prompt
                text += content + ("" if last_open else eos)
        return text

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [tuple(r.args) for r in requests]
        results = self.scorer.loglikelihood(args)
        for arg, result in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", arg, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        results = self.scorer.loglikelihood_rolling(texts)
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [(r.args[0], dict(r.args[1] or {})) for r in requests]
        results = self.scorer.generate_until(args)
        for (context, kwargs), result in zip(args, results):
            self.cache_hook.add_partial("generate_until", (context, kwargs), result)
        return results


def _batch_size(value) -> int:
    """lm-eval passes "16", 16, or "auto"/"auto:N" (no memory probing here: the default then)."""
    if isinstance(value, str) and value.startswith("auto"):
        return 16
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise FmforgeError(f"batch size must be a whole number (got {value!r:.40})") from None
    if size < 1:
        raise FmforgeError(f"batch size must be at least 1 (got {size})")
    return size


def _require_lm_eval():
    """The ``lm_eval`` package, offline unless the environment says otherwise; missing: a one-line error."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.api.registry
        import lm_eval.tasks
    except ImportError:
        raise FmforgeError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None
    return lm_eval


def fmforge_lm_class():
    """The lm-eval model class for fmforge runs (an ``lm_eval.api.model.LM``), registered as "fmforge"."""
    if not _CLASS:
        lm_eval = _require_lm_eval()

        class FmforgeLM(HarnessModel, lm_eval.api.model.LM):
            """fmforge run directories in lm-evaluation-harness (model_args: run_dir=RUN_DIR)."""

        lm_eval.api.registry.register_model(MODEL_NAME)(FmforgeLM)
        _CLASS.append(FmforgeLM)
    return _CLASS[0]


def register() -> None:
    """Make ``lm_eval.simple_evaluate(model="fmforge", model_args="run_dir=RUN_DIR")`` available."""
    fmforge_lm_class()


def _known(manager, task: str) -> bool:
    return task in manager.all_tasks or bool(manager.match_tasks([task]))


def _task_manager(lm_eval, tasks: list[str], include_path: str | None):
    """lm-eval's task index: of ``include_path`` alone when it holds every task (indexing the ~15,000
    built-in task files takes tens of seconds), else of the built-in tasks too; unknown names are an error."""
    if include_path is not None:
        local = lm_eval.tasks.TaskManager(include_path=str(include_path), include_defaults=False)
        if all(_known(local, task) for task in tasks):
            return local
    manager = lm_eval.tasks.TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    for task in tasks:
        if not _known(manager, task):
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise FmforgeError(f"unknown lm-eval task {task!r} ({len(known):,} known: `lm_eval ls tasks` lists "
                               f"them; a local YAML task needs --include-path DIR){hint}")
    return manager


def evaluate_with_lm_eval(lm, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                          limit: int | None = None, apply_chat_template: bool = False,
                          log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` of any ``lm`` (an fmforge model from ``fmforge_lm_class``, or lm-eval's
    own ``HFLM``) on ``tasks``, offline; its raw output (``results``, ``n-samples``, ``samples`` when
    ``log_samples``...)."""
    lm_eval = _require_lm_eval()
    if not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise FmforgeError("name at least one lm-eval task (--lm-eval TASK[,TASK])")
    if include_path is not None and not Path(include_path).is_dir():
        raise FmforgeError(f"--include-path {include_path}: no such directory")
    if limit is not None and limit < 1:
        raise FmforgeError(f"--limit must be at least 1 (got {limit})")
    if num_fewshot is not None and num_fewshot < 0:
        raise FmforgeError(f"--num-fewshot must be at least 0 (got {num_fewshot})")
    manager = _task_manager(lm_eval, tasks, include_path)
    if isinstance(lm, HarnessModel):  # eos text stands for the eos id only inside chat transcripts
        lm.scorer.eos_in_text = bool(apply_chat_template)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples,
                                      apply_chat_template=apply_chat_template)
    except (ConnectionError, FileNotFoundError) as err:  # datasets' offline / not-found errors
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise FmforgeError(f"lm-eval could not load a task's data ({detail}); built-in tasks download from the "
                           "Hugging Face Hub (set HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 on a machine with "
                           "network), or run a local YAML task with --include-path DIR") from None
    if out is None:
        raise FmforgeError("lm-eval returned no results")
    return out


def task_metrics(out: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's raw output: numbers only, the default filter's ",none" dropped
    (another filter stays as "metric,filter"), and ``n_samples`` (examples scored) where lm-eval counts it."""
    metrics: dict[str, dict[str, float]] = {}
    for task, values in out.get("results", {}).items():
        clean = {}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if key == "sample_len":  # lm-eval's count, kept below as n_samples
                continue
            clean[key.removesuffix(",none")] = float(value)
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            clean["n_samples"] = float(n)
        metrics[task] = clean
    return metrics


def run_lm_eval(run_dir: str | Path, tasks: list[str], *, include_path: str | None = None,
                num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 16,
                device: str = "auto", apply_chat_template: bool = False) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness ``tasks`` on the decoder of ``run_dir``; return {task: {metric: value}}
    and save them, flattened as "task/metric", in ``RUN_DIR/eval/lm_eval.json``."""
    fmforge_lm = fmforge_lm_class()  # the missing-extra error comes before any work
    if batch_size < 1:
        raise FmforgeError(f"--batch-size must be at least 1 (got {batch_size})")
    lm = fmforge_lm(run_dir=str(run_dir), device=device, batch_size=batch_size)
    out = evaluate_with_lm_eval(lm, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                                apply_chat_template=apply_chat_template)
    metrics = task_metrics(out)
    flat = {f"{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}
    save_result(run_dir, RESULT_NAME, "lm_eval", flat, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                apply_chat_template=apply_chat_template, versions=dict(out.get("versions", {})),
                configs={t: {"num_fewshot": c.get("num_fewshot"), "output_type": c.get("output_type")}
                         for t, c in out.get("configs", {}).items()})
    return metrics


def lm_eval_command(run_dir: str, tasks: str, *, include_path: str | None = None, num_fewshot: int | None = None,
                    limit: int | None = None, batch_size: int | None = None, device: str = "auto",
                    apply_chat_template: bool = False, json_out: bool = False, echo=print) -> dict:
    """``fmforge eval RUN_DIR --lm-eval TASK[,TASK]``: run, save, print a table (or JSON)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    metrics = run_lm_eval(run_dir, names, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                          batch_size=batch_size or 16, device=device, apply_chat_template=apply_chat_template)
    if json_out:
        echo(json.dumps(metrics))
        return metrics
    echo(f"lm-evaluation-harness on {run_dir}")
    for task, values in metrics.items():
        n = values.get("n_samples")
        echo(f"  {task}" + (f" ({int(n)} examples)" if n is not None else ""))
        for name, value in values.items():
            if name == "n_samples" or "_stderr" in name:
                continue
            stderr = values.get(name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr")
            shown = f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
            echo(f"    {name:<24} {shown}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    return metrics
