"""Deterministic few-shot selection: ``first`` (the first k of the pool), ``random`` (a draw seeded by the
seed, the task and the example's position, as ``eval --tasks`` draws), ``nearest`` (the k pool examples whose
embeddings are closest in cosine to the example's, most similar last, i.e. nearest the question). Nearest
search embeds every candidate once, so it looks among the first ``NEAREST_POOL`` examples of the pool
(BoolQ's few-shot split alone has ~12,000 passages)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fmforge.errors import FmforgeError
from fmforge.eval.tasks_core import Doc, Task, fewshot_examples

SELECTIONS = ("first", "random", "nearest")
NEAREST_POOL = 1000


class ShotPicker:
    def __init__(self, task: Task, pool: list[Doc], how: str, seed: int = 1234,
                 embed: Callable[[list[str]], np.ndarray] | None = None):
        if how not in SELECTIONS:
            raise FmforgeError(f"shot selection must be one of {', '.join(SELECTIONS)} (got {how!r})")
        if how == "nearest" and embed is None:
            raise FmforgeError("nearest-example shots need an encoder to embed with (--shot-encoder RUN_DIR)")
        if how == "nearest":
            pool = pool[:NEAREST_POOL]
        self.task, self.pool, self.how, self.seed, self.embed = task, pool, how, seed, embed
        self._pool_vectors = embed([d.text for d in pool]) if how == "nearest" and pool else None
        self._doc_vectors: dict[int, np.ndarray] = {}

    def prepare(self, docs: list[Doc]) -> None:
        """Embed the scored docs once (nearest only)."""
        if self._pool_vectors is not None:
            vectors = self.embed([d.text for d in docs])
            self._doc_vectors = {i: v for i, v in enumerate(vectors)}

    def pick(self, position: int, doc: Doc, k: int) -> list[Doc]:
        if k == 0 or not self.pool:
            return []
        if self.how == "first":
            return self.pool[:k]
        if self.how == "random":
            return fewshot_examples(self.task, self.pool, position, k, self.seed)
        query = self._doc_vectors.get(position)
        if query is None:
            query = self.embed([doc.text])[0]
        scores = self._pool_vectors @ query
        best = sorted(range(len(self.pool)), key=lambda i: (-scores[i], i))[:k]
        return [self.pool[i] for i in reversed(best)]
