"""Documents → overlapping token windows. A chunk is ``size`` tokens of the encoder's own tokenizer, the next
one starting ``size - overlap`` tokens later, so a sentence cut at one boundary is whole in the neighbour.
Its text is the document's exact characters from its first token's start to its last token's end (the
tokenizer's offsets), so a chunk cites a span of the source, not a detokenized approximation."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from fmforge.errors import FmforgeError


@dataclass(frozen=True)
class Chunk:
    text: str
    source: str  # the file the document came from
    doc: int  # the document's position in that file (a line of a JSONL file, a row of a table)
    start: int  # character offsets of the chunk in the document
    end: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        return {**asdict(self), "sha256": self.sha256}


def check_sizes(size: int, overlap: int) -> None:
    if size < 8:
        raise FmforgeError(f"--chunk-tokens must be at least 8 (got {size})")
    if not 0 <= overlap < size:
        raise FmforgeError(f"--overlap must be in [0, {size - 1}] for {size}-token chunks (got {overlap})")


def chunk_document(text: str, offsets: list[tuple[int, int]], size: int, overlap: int, source: str,
                   doc: int) -> list[Chunk]:
    """The chunks of one document whose tokens have character ``offsets`` (a tokenizer's)."""
    spans = [(s, e) for s, e in offsets if e > s]
    if not spans:
        return []
    out, step = [], size - overlap
    for first in range(0, len(spans), step):
        window = spans[first:first + size]
        start, end = window[0][0], window[-1][1]
        out.append(Chunk(text[start:end], source, doc, start, end))
        if first + size >= len(spans):
            break
    return out


def chunk_documents(tokenizer, documents: list[tuple[str, str, int]], size: int, overlap: int) -> list[Chunk]:
    """Chunks of (text, source, doc) documents under ``tokenizer`` (a TextTokenizer), in input order."""
    check_sizes(size, overlap)
    encodings = tokenizer.tokenizer.encode_batch([text for text, _, _ in documents], add_special_tokens=False)
    chunks = []
    for (text, source, doc), enc in zip(documents, encodings):
        chunks += chunk_document(text, enc.offsets, size, overlap, source, doc)
    return chunks
