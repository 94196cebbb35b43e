"""Indexing throughput and query latency of ``fmforge rag``, exact cosine search against FAISS, on CPU.

    python benchmarks/rag_throughput.py DOCS... --encoder RUN_DIR [--queries FILE.jsonl] [--threads 2]

Indexes DOCS into a fresh temporary index (chunks/s of encoding, the bulk of indexing), then times ``n``
dense queries end to end (encode + search) and the search alone, with exact search and with a FAISS HNSW
graph (``pip install 'fmforge[rag]'``), reporting p50/p99 and the ratio faiss/exact measured in the same run,
and how often FAISS's top hit is the exact one. Queries: the ``question`` (or ``text``) field of a JSONL
file, default the chunks' own first sentences. BoolQ's passages and questions: see rag_boolq.py, which runs
this measurement on them.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fmforge.prompt.embed import TextEncoder
from fmforge.rag.index import build_index, load_index
from fmforge.rag.search import Retriever


def percentiles(call, items) -> dict:
    times = []
    for item in items:
        t = time.perf_counter()
        call(item)
        times.append(time.perf_counter() - t)
    times.sort()
    return {"p50_ms": 1000 * times[len(times) // 2], "p99_ms": 1000 * times[max(0, int(len(times) * 0.99) - 1)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="+")
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--queries")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--chunk-tokens", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        stats = build_index(args.docs, args.encoder, Path(tmp) / "idx", chunk_tokens=args.chunk_tokens,
                            device="cpu", echo=print)
        index = load_index(Path(tmp) / "idx")
    if args.queries:
        rows = [json.loads(line) for line in open(args.queries, encoding="utf-8")]
        queries = [r.get("question") or r.get("text") for r in rows][: args.n]
    else:
        queries = [c.text.split(".")[0] for c in index.chunks[: args.n]]
    enc = TextEncoder(args.encoder, device="cpu")
    start = time.perf_counter()
    exact = Retriever(index, enc)
    built = {"exact": time.perf_counter() - start}
    start = time.perf_counter()
    approx = Retriever(index, enc, backend="faiss")
    built["faiss"] = time.perf_counter() - start
    vectors = enc.encode(queries)
    result = {"chunks": stats["n_chunks"], "chunks_per_s": stats["chunks_per_s"], "build_s": built}
    for name, r in (("exact", exact), ("faiss", approx)):
        result[name] = {"query": percentiles(lambda q, r=r: r.search(q, 20), queries),
                        "search_only": percentiles(lambda v, r=r: r.dense(v[None], 20), vectors)}
    result["faiss/exact search p50"] = result["faiss"]["search_only"]["p50_ms"] / result["exact"]["search_only"]["p50_ms"]
    result["faiss top-1 = exact top-1"] = sum(exact.dense(v[None], 1)[0][0][0] == approx.dense(v[None], 1)[0][0][0]
                                              for v in vectors) / len(vectors)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
