"""The server's retrieval option: ground a chat request in an index before the model sees it. The server
keeps one ``Retriever`` per index (``open_retriever``) and calls ``ground_messages`` on the request's
messages; the reply carries the returned citations."""

from __future__ import annotations

from fmforge.errors import FmforgeError
from fmforge.rag.grounding import citations, grounded_prompt
from fmforge.rag.search import Retriever

MAX_K = 50


def ground_messages(retriever: Retriever, messages: list[dict], k: int = 4, hybrid: bool = False,
                    seed: int | str = 0) -> tuple[list[dict], list[dict]]:
    """(messages with the last user turn replaced by its spotlighted grounded prompt, the citations of the
    passages inserted). The input list is not changed; earlier turns pass through as they are."""
    if not 1 <= k <= MAX_K:
        raise FmforgeError(f"retrieval k must be in [1, {MAX_K}] (got {k})")
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
    if last is None or not isinstance(messages[last].get("content"), str) or not messages[last]["content"].strip():
        raise FmforgeError("retrieval needs a user message with text to search for")
    question = messages[last]["content"]
    mode = "hybrid" if hybrid else "dense"
    hits = retriever.search(question, k, mode)
    grounded = [dict(m) for m in messages]
    grounded[last] = {**messages[last], "content": grounded_prompt(question, hits, seed)}
    return grounded, citations(hits)
