"""Retrieval quality the BEIR way: each question has one relevant document; its rank among the documents
retrieved (a document ranks where its best chunk ranks) gives recall@k (the share of questions whose
document is in the top k) and MRR (the mean of 1 / rank, 0 when it is not retrieved at all within the
depth searched)."""

from __future__ import annotations

from fmforge.rag.search import Hit


def document_ranking(hits: list[Hit], key=lambda h: (h.chunk.source, h.chunk.doc)) -> list:
    """The documents of ``hits`` (best first) in the order their best chunk appears, each once."""
    seen, out = set(), []
    for h in hits:
        k = key(h)
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


def rank_of(gold, ranking: list) -> int | None:
    """1-based rank of ``gold`` in ``ranking``, None if absent."""
    try:
        return ranking.index(gold) + 1
    except ValueError:
        return None


def retrieval_metrics(ranks: list[int | None], ks: tuple[int, ...] = (1, 5, 20)) -> dict[str, float]:
    n = len(ranks)
    if n == 0:
        return {}
    out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in ks}
    out["mrr"] = sum(1.0 / r for r in ranks if r is not None) / n
    out["n"] = n
    return out
