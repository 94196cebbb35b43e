"""The evaluation verbs as a user types them: benchmarks, generations, report, human evaluation; bad input is
one line and exit status 2."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_eval_tasks_and_prompts_save_results_that_the_report_shows(chat_base, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def ", "reference": "def main():"}) + "\n"
                       + "not json\n")
    run = run_cli("eval", chat_base, "--tasks", "boolq,piqa", "--limit", "4", "--prompts", prompts,
                  "--max-new-tokens", "8", "--generations-out", tmp_path / "gen.jsonl", "--batch-size", "4")
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads((chat_base / "eval" / "benchmarks.json").read_text())
    assert saved["kind"] == "benchmark" and saved["metrics"]["boolq/n"] == 4 and saved["metrics"]["piqa/chance"] == 0.5
    generated = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(generated) == 1 and "rougeL" in json.dumps(generated[0])
    page = tmp_path / "report.html"
    shown = run_cli("report", chat_base, "--out", page)
    assert shown.returncode == 0, shown.stderr[-2000:]
    html = page.read_text()
    assert "boolq" in html and "piqa" in html and "<script" not in html


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["eval", "{run}", "--tasks", "nosuchtask"], "nosuchtask"),
    (["eval", "{run}", "--limit", "3"], "apply with --tasks, --lm-eval or --prompts"),
    (["report", "{tmp}", "--out", "{tmp}/r.html"], "config.yaml"),
    (["eval", "human", "report", "{tmp}/ratings.jsonl", "--key", "{tmp}/key.json"], "key file not found"),
])
def test_evaluation_verbs_answer_bad_input_with_one_line_and_exit_2(chat_base, tmp_path, args, message):
    run = run_cli(*[a.format(run=chat_base, tmp=tmp_path) for a in args])
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert message in run.stderr
