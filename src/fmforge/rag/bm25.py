"""Okapi BM25 (Robertson et al.; Lucene's idf, k1 = 1.2, b = 0.75): the lexical baseline dense retrieval is
measured against, and half of hybrid search."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
# The most frequent English function words: they carry no topic and slow every query.
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i in is it its of on or that the their there "
    "these they this to was were what when where which who will with would you your does do did".split())


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


class BM25:
    def __init__(self, texts: list[str], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.n = len(texts)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = np.zeros(self.n, dtype=np.float32)
        for i, text in enumerate(texts):
            counts = Counter(terms(text))
            lengths[i] = sum(counts.values())
            for term, tf in counts.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(i)
                tfs.append(tf)
        norm = k1 * (1 - b + b * lengths / max(float(lengths.mean()) if self.n else 1.0, 1e-9))
        self.postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, (docs, tfs) in postings.items():
            d, tf = np.asarray(docs), np.asarray(tfs, dtype=np.float32)
            idf = math.log(1 + (self.n - len(d) + 0.5) / (len(d) + 0.5))
            self.postings[term] = (d, (idf * tf * (k1 + 1) / (tf + norm[d])).astype(np.float32))

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        for term in set(terms(query)):
            if term in self.postings:
                docs, weights = self.postings[term]
                out[docs] += weights
        return out
