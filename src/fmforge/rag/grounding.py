"""Retrieved passages as untrusted data in a prompt: numbered, each with its source, inside random boundary
tags (spotlighting), with the instruction repeated after them (the sandwich), so a passage that says
"ignore your instructions" is marked as data. Shared by ``rag ask`` and the server's retrieval option."""

from __future__ import annotations

import re

from fmforge.prompt.defences import Defences, guard
from fmforge.rag.search import Hit

INSTRUCTION = ("Answer the question using only the numbered passages below. Cite each passage you use by its "
               "number in brackets, like [1]. If the passages do not hold the answer, say so.")
DEFENCES = Defences("delimit", sandwich=True)
_CITE = re.compile(r"\[(\d{1,3})\]")


def passages_text(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{i}] ({h.chunk.source}#{h.chunk.doc}) {' '.join(h.chunk.text.split())}"
                       for i, h in enumerate(hits, 1))


def grounded_prompt(question: str, hits: list[Hit], seed: int | str = 0) -> str:
    """The spotlighted prompt: instruction, passages as data, instruction again, then the question."""
    instruction = f"{INSTRUCTION}\nQuestion: {question.strip()}"
    return guard(instruction, passages_text(hits), DEFENCES, seed, answer_prefix="Answer:").prompt


def citations(hits: list[Hit], answer: str | None = None) -> list[dict]:
    """One record per passage given to the model: number, source, document, offsets, score, and whether
    ``answer`` cites it by number."""
    cited = {int(n) for n in _CITE.findall(answer or "")}
    return [{"n": i, "source": h.chunk.source, "doc": h.chunk.doc, "start": h.chunk.start, "end": h.chunk.end,
             "score": h.score, "cited": i in cited, "text": h.chunk.text} for i, h in enumerate(hits, 1)]
