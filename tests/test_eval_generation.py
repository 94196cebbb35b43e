"""Generation evaluation: prompts in, seeded generations scored against references out."""

import json
import shutil

import pytest

from fmforge.deploy.generate import generate
from fmforge.errors import FmforgeError
from fmforge.eval.generation import aggregate, evaluate_prompts, prompt_seed, read_prompts
from fmforge.eval.results import load_results
from fmforge.models.registry import family_of, parse_model_config

PROMPTS = [
    {"prompt": "def add(a, b):", "reference": "return a + b", "id": "add"},
    {"prompt": "import", "references": ["import os", "import sys"]},
    "{not json",
    {"prompt": ""},
    {"prompt": "x", "references": "not a list"},
    {"prompt": "y", "reference": 3},
    ["a list"],
    {"prompt": "class Point:"},
]


def write_prompts(path):
    path.write_text("\n".join(p if isinstance(p, str) else json.dumps(p) for p in PROMPTS) + "\n\n")
    return path


def test_read_prompts_counts_and_skips_malformed_lines(tmp_path):
    items, skipped = read_prompts(write_prompts(tmp_path / "p.jsonl"))
    assert [i["id"] for i in items] == ["add", 2, 8]  # the line number when there is no id
    assert items[1]["references"] == ["import os", "import sys"] and items[2]["references"] == []
    assert skipped == {"not JSON": 1, "no prompt": 1, "references must be a list": 1,
                       "references must be strings": 1, "not a JSON object": 1}
    with pytest.raises(FmforgeError, match="prompts file not found"):
        read_prompts(tmp_path / "missing.jsonl")


def test_aggregate_means_stderrs_and_corpus_bleu():
    records = [
        {"generation": "paris", "references": ["Paris"], "scores": {"exact_match": 1.0, "f1": 1.0, "rougeL": 1.0}},
        {"generation": "london", "references": ["Rome"], "scores": {"exact_match": 0.0, "f1": 0.0, "rougeL": 0.0}},
        {"generation": "unscored", "references": []},
    ]
    out = aggregate(records)
    assert out["n"] == 3 and out["n_scored"] == 2
    assert out["exact_match"] == 0.5 and out["exact_match_stderr"] == pytest.approx(0.5)  # sd sqrt(.5) / sqrt(2)
    assert 0 <= out["bleu"] <= 100 and out["bleu_stderr"] >= 0
    assert aggregate([{"generation": "a", "references": []}]) == {"n": 1, "n_scored": 0}


def test_prompt_seeds_differ_per_prompt_and_are_stable():
    assert prompt_seed(0, "a") == prompt_seed(0, "a") != prompt_seed(0, "b") != prompt_seed(1, "b")
    assert 0 <= prompt_seed(5, "x") < 2 ** 63


def test_bad_options_and_encoders_are_one_line_errors(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "vit"
    run.mkdir()
    cfg = parse_model_config({"arch": "vit", "size": "vit-nano"})
    (run / "model.json").write_text(json.dumps({"format_version": 1, "family": family_of(cfg),
                                                **cfg.model_dump(mode="json")}))
    with pytest.raises(FmforgeError, match="holds a vit model"):
        evaluate_prompts(run, prompts)
    for kwargs, match in (({"max_new_tokens": 0}, "max-new-tokens"), ({"temperature": -1}, "temperature"),
                          ({"top_k": 0}, "top-k"), ({"top_p": 1.5}, "top-p")):
        with pytest.raises(FmforgeError, match=match):
            evaluate_prompts(run, prompts, **kwargs)


@pytest.mark.slow
def test_generations_are_written_scored_and_saved(chat_base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chat_base, run, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    prompts = write_prompts(tmp_path / "p.jsonl")
    lines = []
    result = evaluate_prompts(run, prompts, max_new_tokens=12, device="cpu", echo=lines.append)
    records = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["add", 2, 8]
    assert set(records[0]["scores"]) == {"exact_match", "f1", "rougeL", "bleu"} and "scores" not in records[2]
    # greedy generation is fmforge generate's at temperature 0 (both feed [bos] + prompt and stop at eos)
    for record in records:
        assert record["prompt"] + record["generation"] == generate(run, record["prompt"], max_new_tokens=12,
                                                                    temperature=0, device="cpu")
    metrics = result["metrics"]
    assert metrics["n"] == 3 and metrics["n_scored"] == 2
    assert 0 <= metrics["rougeL"] <= 1 and 0 <= metrics["f1"] <= 1 and 0 <= metrics["bleu"] <= 100
    assert result["skipped"]["not JSON"] == 1 and any("skipped 1 line(s)" in line for line in lines)
    saved = [d for d in load_results(run) if d["kind"] == "generation"]
    assert saved[0]["metrics"] == metrics and saved[0]["settings"]["temperature"] == 0.0

    # sampling is seeded: same seed, same texts; the output file can be anywhere
    out = tmp_path / "sampled.jsonl"
    first = evaluate_prompts(run, prompts, out=str(out), max_new_tokens=12, temperature=1.0, top_k=50, seed=7,
                             device="cpu", echo=lambda _m: None)
    texts = out.read_text()
    evaluate_prompts(run, prompts, out=str(out), max_new_tokens=12, temperature=1.0, top_k=50, seed=7,
                     device="cpu", echo=lambda _m: None)
    assert out.read_text() == texts and first["generations"] == str(out)
