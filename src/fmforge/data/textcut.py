"""Cut plain-text files into documents, and decode their lines under a policy for undecodable bytes.

The rule (``document_bytes`` = B, default 64 KiB; the hard bound H = 4·B, at most ``max_document_bytes``):

- a file of at most H bytes is one document, as it always was;
- a larger file is cut into blocks at blank lines, and consecutive blocks are merged into documents of up
  to B bytes (a block larger than B is a document of its own);
- a block larger than H is cut at line boundaries into pieces of up to B bytes;
- a line is never cut: one longer than B is a document of its own (and one over ``max_document_bytes``
  is counted ``too_large`` and skipped).

Joined back together, a file's documents are exactly its bytes, less any dropped lines. ``B = 0`` turns the
cutting off: a file is one document, or ``too_large`` when over ``max_document_bytes``.

Undecodable bytes cost only the lines they sit in (``encoding_errors``): ``drop-line`` drops such a line,
``replace`` keeps it with U+FFFD for the bad bytes, ``latin-1-fallback`` decodes it as Latin-1; each is
counted by line.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator

DEFAULT_DOCUMENT_BYTES = 64 * 1024
HARD_BOUND_FACTOR = 4
ENCODING_ERRORS = ("drop-line", "replace", "latin-1-fallback")
TOO_LARGE = object()  # yielded by ``cut_documents`` for a whole file over the bound when cutting is off


def bounds(document_bytes: int, max_document_bytes: int) -> tuple[int, int]:
    """(target, hard bound) in bytes for ``document_bytes``; target 0 means files are never cut."""
    if document_bytes == 0:
        return 0, max_document_bytes
    hard = min(HARD_BOUND_FACTOR * document_bytes, max_document_bytes)
    return min(document_bytes, hard), hard


def cut_documents(lines: Iterable[bytes | None], target: int, hard: int) -> Iterator[list[bytes] | object]:
    """Documents (lists of lines) from a file's lines, by the module's rule. A None line (one over the
    document limit, counted by the caller) ends a block and is left out."""
    it = iter(lines)
    head: list[bytes | None] = []
    size = 0
    for line in it:
        head.append(line)
        size += len(line) if line is not None else (hard + 1 if target == 0 else 0)
        if size > hard:
            break
    else:
        whole = [x for x in head if x is not None]
        if whole:
            yield whole
        return
    if target == 0:
        for _ in it:  # read through (the caller hashes every byte), hold nothing
            pass
        yield TOO_LARGE
        return
    yield from _merge_blocks(itertools.chain(head, it), target, hard)


def _runs(lines: list[bytes], target: int) -> list[list[bytes]]:
    """Consecutive lines grouped greedily into runs of up to ``target`` bytes (a longer line alone)."""
    runs: list[list[bytes]] = [[]]
    size = 0
    for line in lines:
        if runs[-1] and size + len(line) > target:
            runs.append([])
            size = 0
        runs[-1].append(line)
        size += len(line)
    return runs


def _merge_blocks(lines: Iterable[bytes | None], target: int, hard: int) -> Iterator[list[bytes]]:
    doc: list[bytes] = []
    block: list[bytes] = []
    doc_n = block_n = 0
    oversized = False  # the block passed the hard bound: it is cut into target-sized runs

    def close_block() -> Iterator[list[bytes]]:
        """Merge the finished block into the document, or start a new one with it."""
        nonlocal doc, doc_n, block, block_n, oversized
        if oversized:
            *full, block = _runs(block, target)
            if full and doc:
                yield doc
                doc, doc_n = [], 0
            yield from full
            block_n, oversized = sum(map(len, block)), False
        if doc and doc_n + block_n > target:
            yield doc
            doc, doc_n = [], 0
        doc += block
        doc_n += block_n
        block, block_n = [], 0

    for line in lines:
        n = len(line or b"")
        if block and block_n + n > hard:  # cut at line boundaries; the last run stays open
            if doc:
                yield doc
                doc, doc_n = [], 0
            *full, block = _runs(block, target)
            yield from full
            block_n, oversized = sum(map(len, block)), True
        if line:
            block.append(line)
            block_n += n
        if (line is None or not line.strip()) and block:  # a blank line ends the block
            yield from close_block()
    if block:
        yield from close_block()
    if doc:
        yield doc


class LineDecoder:
    """Decode UTF-8 lines under an ``encoding_errors`` policy; ``dropped`` and ``repaired`` count the
    affected lines by reason."""

    def __init__(self, policy: str):
        if policy not in ENCODING_ERRORS:
            raise ValueError(policy)
        self.policy = policy
        self.dropped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()

    def line(self, data: bytes) -> str | None:
        """One line as text, or None when the policy drops it."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        if self.policy == "replace":
            self.repaired["invalid_utf8_replaced"] += 1
            return data.decode("utf-8", "replace")
        if self.policy == "latin-1-fallback":
            self.repaired["invalid_utf8_as_latin1"] += 1
            return data.decode("latin-1")
        self.dropped["invalid_utf8"] += 1
        return None

    def lines(self, lines: list[bytes]) -> tuple[str, int]:
        """Lines joined as text, and how many were dropped."""
        data = b"".join(lines)
        try:
            return data.decode("utf-8"), 0  # the common case: one call for the whole document
        except UnicodeDecodeError:
            pass
        texts = [self.line(x) for x in lines]
        return "".join(t for t in texts if t is not None), texts.count(None)
