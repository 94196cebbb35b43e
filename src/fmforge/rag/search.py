"""``fmforge rag query``: the k chunks of an index nearest a question. Dense search is exact cosine (one
matrix-vector product over the unit embeddings) by default, or a FAISS HNSW graph (``pip install
'fmforge[rag]'``) for indexes large enough that a full scan is the bottleneck; BM25 is the lexical baseline;
hybrid fuses the dense and BM25 rankings by reciprocal rank fusion (Cormack et al. 2009, k = 60), which needs
no score calibration between the two."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmforge.errors import FmforgeError
from fmforge.prompt.embed import TextEncoder
from fmforge.rag.bm25 import BM25
from fmforge.rag.chunking import Chunk
from fmforge.rag.index import Index, check_encoder, load_index

MODES = ("dense", "bm25", "hybrid")
BACKENDS = ("exact", "faiss")
RRF_K = 60
FUSION_DEPTH = 100  # how deep each ranking reaches into hybrid's fusion
HNSW_NEIGHBOURS, HNSW_EF_SEARCH = 32, 128


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    index: int  # the chunk's row in the index
    score: float

    def to_json(self) -> dict:
        return {"index": self.index, "score": self.score, **self.chunk.to_json()}


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise FmforgeError("--backend faiss needs faiss-cpu: pip install 'fmforge[rag]'") from None
    return faiss


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (ties by index)."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


class Retriever:
    def __init__(self, index: Index, encoder: TextEncoder | None, backend: str = "exact"):
        if backend not in BACKENDS:
            raise FmforgeError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        if encoder is not None:
            check_encoder(index, encoder)
        self.index, self.encoder, self.backend = index, encoder, backend
        self._bm25: BM25 | None = None
        self._matrix = torch.from_numpy(np.array(index.embeddings, dtype=np.float32, copy=True))
        self._faiss = None
        if backend == "faiss" and len(index.chunks):
            faiss = import_faiss()
            self._faiss = faiss.IndexHNSWFlat(index.embeddings.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            self._faiss.hnsw.efSearch = HNSW_EF_SEARCH
            self._faiss.add(index.embeddings)

    @property
    def bm25(self) -> BM25:
        if self._bm25 is None:  # built on first use: dense-only queries never pay for it
            self._bm25 = BM25([c.text for c in self.index.chunks])
        return self._bm25

    def dense(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """(row, cosine) of the k nearest chunks of each query vector, best first."""
        if self._faiss is not None:
            scores, rows = self._faiss.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
            return [[(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]
        # In torch, not numpy: numpy's BLAS keeps its own thread pool, which fights torch's (just used to
        # encode the query) for the cores and stalled a 3,000-chunk search from 0.1 ms to ~100 ms.
        with torch.inference_mode():
            sims = (torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
                    @ self._matrix.T).numpy()
        return [[(int(r), float(row[r])) for r in top_k(row, k)] for row in sims]

    def lexical(self, query: str, k: int) -> list[tuple[int, float]]:
        scores = self.bm25.scores(query)
        return [(int(r), float(scores[r])) for r in top_k(scores, k)]

    def search_many(self, queries: list[str], k: int = 5, mode: str = "dense") -> list[list[Hit]]:
        if mode not in MODES:
            raise FmforgeError(f"search mode must be one of {', '.join(MODES)} (got {mode!r})")
        if k < 1:
            raise FmforgeError(f"-k must be at least 1 (got {k})")
        if not self.index.chunks:
            return [[] for _ in queries]
        if mode != "bm25" and self.encoder is None:
            raise FmforgeError("dense and hybrid search need the index's encoder")
        depth = max(k, FUSION_DEPTH) if mode == "hybrid" else k
        dense = self.dense(self.encoder.encode(queries), depth) if mode != "bm25" else None
        out = []
        for qi, query in enumerate(queries):
            if mode == "dense":
                ranked = dense[qi]
            elif mode == "bm25":
                ranked = self.lexical(query, k)
            else:
                fused: dict[int, float] = {}
                for ranking in (dense[qi], self.lexical(query, depth)):
                    for rank, (row, _) in enumerate(ranking):
                        fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank + 1)
                ranked = sorted(fused.items(), key=lambda rs: (-rs[1], rs[0]))[:k]
            out.append([Hit(self.index.chunks[r], r, s) for r, s in ranked[:k]])
        return out

    def search(self, query: str, k: int = 5, mode: str = "dense") -> list[Hit]:
        return self.search_many([query], k, mode)[0]


def open_retriever(index_path: str | Path, encoder: str | None = None, mode: str = "dense",
                   backend: str = "exact", device: str = "auto") -> Retriever:
    """The index at ``index_path`` with its encoder (the run it was built with, or ``encoder``: checked by
    hash); BM25-only search loads no model."""
    index = load_index(index_path)
    enc = None
    if mode != "bm25":
        run = encoder or index.encoder.get("run_dir")
        if not isinstance(run, str) or not Path(run).is_dir():
            raise FmforgeError(f"the encoder this index was built with ({run}) is not here: pass --encoder RUN_DIR")
        enc = TextEncoder(run, device=device)
    return Retriever(index, enc, backend)


def rag_query(index: str, question: str, k: int = 5, hybrid: bool = False, bm25: bool = False,
              encoder: str | None = None, backend: str = "exact", device: str = "auto", json_out: bool = False,
              echo=print) -> list[dict]:
    """The ``k`` chunks of ``index`` nearest ``question``, printed with source, offsets and score."""
    if hybrid and bm25:
        raise FmforgeError("--hybrid and --bm25 exclude each other")
    mode = "hybrid" if hybrid else "bm25" if bm25 else "dense"
    hits = open_retriever(index, encoder, mode, backend, device).search(question, k, mode)
    rows = [h.to_json() for h in hits]
    if json_out:
        echo(json.dumps(rows, ensure_ascii=False))
    else:
        for rank, h in enumerate(hits, 1):
            text = " ".join(h.chunk.text.split())
            echo(f"[{rank}] {h.score:.4f}  {h.chunk.source}#{h.chunk.doc}:{h.chunk.start}-{h.chunk.end}\n    "
                 f"{text[:300]}{'...' if len(text) > 300 else ''}")
    return rows
