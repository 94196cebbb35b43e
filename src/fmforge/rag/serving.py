"""The server's retrieval option: ground a chat request in an index before the model sees it.
``fmforge serve RUN_DIR --index NAME=INDEX_DIR`` (``serve_command``) opens one ``Retriever`` per index and
hands the server a grounding function per name; a chat request with ``"retrieval": {"index": NAME, "k": 4,
"hybrid": false}`` has its last user message replaced by ``ground_messages``' spotlighted prompt, and the
reply carries the citations. Requests name an index, never a path."""

from __future__ import annotations

import threading

from fmforge.deploy.serve import serve
from fmforge.errors import FmforgeError
from fmforge.rag.grounding import citations, grounded_prompt
from fmforge.rag.search import Retriever, open_retriever

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


def _locked(retriever: Retriever):
    """``ground_messages`` on ``retriever`` for the server's worker threads, one search at a time (the BM25
    table is built on first use)."""
    lock = threading.Lock()

    def ground(messages: list[dict], k: int, hybrid: bool, seed: int | str):
        with lock:
            return ground_messages(retriever, messages, k, hybrid, seed)
    return ground


def parse_indexes(items: list[str] | None) -> dict[str, str]:
    """``NAME=INDEX_DIR`` words -> {name: directory}; a bad word or a repeated name is a one-line error."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or not name.replace("-", "").replace("_", "").isalnum():
            raise FmforgeError(f"--index takes NAME=INDEX_DIR with a name of letters, digits, - and _ (got {item!r})")
        if name in out:
            raise FmforgeError(f"--index: the name {name!r} is given twice")
        out[name] = path
    return out


def serve_command(run_dirs: list[str], *, index: list[str] | None = None, device: str = "auto", **kwargs) -> None:
    """``fmforge serve``: the server of ``deploy.serve``, with each ``--index NAME=DIR`` open for chat
    requests' ``retrieval`` field."""
    indexes = parse_indexes(index)
    grounders = {name: _locked(open_retriever(path, device=device)) for name, path in indexes.items()}
    serve(run_dirs, device=device, grounders=grounders or None, **kwargs)

