"""Text statistics for ``data profile``: per-chunk analysis (run in worker processes) and its merge.

A chunk of documents (raw texts, or token-id arrays of a prepared directory, decoded here) becomes a
``TextStats``: sizes, character classes and scripts, words and n-grams, bad lines, personal data, and each
document's content hash and MinHash signature. Deduplication happens at the merge, in document order, with
the same detectors as ``data prepare`` (``clean.py``), so the rates it reports are what preparing would drop.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fmforge.data.clean import ExactDeduper, MinHashDeduper, bytes_digest, normalize
from fmforge.data.fastscan import PAIR, byte_counts
from fmforge.data.pii import PiiScan
from fmforge.data.profile_words import HashCounts, WordNames, chunk_words
from fmforge.data.tokenizer import TextTokenizer

TOP_K = 30
# A binary line holds a control character (tab aside), a NUL or DEL: binary that got into the text.
_CONTROL_POINTS = np.array([*range(0, 9), 11, 12, *range(14, 32), 127])
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A garbled line holds U+FFFD (undecodable bytes replaced) or UTF-8 read as Latin-1/cp1252 (mojibake: "Ã©", "â€™").
GARBLED = re.compile(r"\ufffd|[\u00c2\u00c3][\u0080-\u00bf]|\u00e2\u20ac")
CLASS_NAMES = {"L": "letter", "N": "digit", "Z": "space", "P": "punctuation", "S": "symbol", "C": "control",
               "M": "mark"}
_ASCII_CLASS = np.array([CLASS_NAMES.get(unicodedata.category(chr(i))[0], "other") if chr(i) not in "\t\n\r"
                         else "space" for i in range(128)], dtype=object)


@dataclass
class DuplicateCount:
    """Exact and near-duplicate counts over documents fed in order, as ``data prepare`` would find them (the same
    detectors: a later copy counts, the first does not)."""

    exact: int = 0
    near: int = 0
    exact_seen: ExactDeduper = field(default_factory=ExactDeduper)
    near_seen: MinHashDeduper | None = None  # made at the first signature

    def add(self, digests: list[bytes], sigs: list[np.ndarray | None]) -> None:
        have = [i for i, sig in enumerate(sigs) if sig is not None]
        if have and self.near_seen is None:
            self.near_seen = MinHashDeduper()
        exact = [self.exact_seen.is_duplicate(digest) for digest in digests]
        self.exact += sum(exact)
        near = [i for i in have if not exact[i]]  # an exact copy is not looked at (nor remembered) as near
        if near:
            self.near += int(self.near_seen.near_duplicates(np.stack([sigs[i] for i in near])).sum())


@dataclass
class TextStats:
    """Mergeable statistics of a run of documents (in order)."""

    documents: int = 0
    chars: int = 0
    bytes: int = 0
    tokens: int = 0
    lines: int = 0
    binary_lines: int = 0
    garbled_lines: int = 0
    doc_chars: list[int] = field(default_factory=list)
    doc_tokens: list[int] = field(default_factory=list)
    char_classes: Counter = field(default_factory=Counter)
    scripts: Counter = field(default_factory=Counter)
    words: HashCounts = field(default_factory=HashCounts)
    bigrams: HashCounts = field(default_factory=HashCounts)
    names: WordNames = field(default_factory=WordNames)  # the text of the words counted above
    pii: PiiScan = field(default_factory=PiiScan)
    digests: list[bytes] = field(default_factory=list)  # of documents not yet counted into ``duplicates``
    sigs: list[np.ndarray | None] = field(default_factory=list)
    duplicates: DuplicateCount = field(default_factory=DuplicateCount)
    token_counts: np.ndarray | None = None

    def merge(self, o: TextStats) -> None:
        for name in ("documents", "chars", "bytes", "tokens", "lines", "binary_lines", "garbled_lines"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        for name in ("doc_chars", "doc_tokens", "digests", "sigs"):
            getattr(self, name).extend(getattr(o, name))
        self.count_duplicates()  # as chunks arrive: the main process waits on the workers meanwhile
        for name in ("char_classes", "scripts"):
            getattr(self, name).update(getattr(o, name))
        self.pii.merge(o.pii)
        self.token_counts = add_counts(self.token_counts, o.token_counts)
        self.names.add(o.names)
        self.bigrams.add(o.bigrams)
        if self.words.add(o.words):
            self.names.compact(self.words.keys)

    def count_duplicates(self) -> None:
        """Count the documents added since the last call into ``duplicates`` (and forget their hashes)."""
        self.duplicates.add(self.digests, self.sigs)
        self.digests, self.sigs = [], []

    def top_words(self, k: int) -> list[tuple[str, int]]:
        """The ``k`` most frequent words as (word, count), by count then text (ties at the cut: text order)."""
        return self.top_words_and_bigrams(k, words=True, bigrams=False)[0]

    def top_bigrams(self, k: int) -> list[tuple[str, int]]:
        """The ``k`` most frequent word pairs as ("first second", count), by count then text (ties at the cut:
        by key)."""
        return self.top_words_and_bigrams(k, words=False, bigrams=True)[1]

    def top_words_and_bigrams(self, k: int, words: bool = True, bigrams: bool = True) -> tuple[list, list]:
        """``top_words(k)`` and ``top_bigrams(k)``, their words' text looked up at once."""
        self.words.compact()
        word_keys, word_counts = [], []
        if words and len(self.words.keys):
            cut = np.sort(self.words.counts)[-min(k, len(self.words.counts))]
            sel = self.words.counts >= cut
            word_keys, word_counts = self.words.keys[sel].tolist(), self.words.counts[sel].tolist()
        pair_keys, pair_counts = self.bigrams.top(k) if bigrams else (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        found = self._pair_words(pair_keys, pair_counts)
        names = self.names.lookup(word_keys + [h for pair in found if pair for h in pair])
        top = sorted(((names[h], c) for h, c in zip(word_keys, word_counts)), key=lambda r: (-r[1], r[0]))[:k]
        pairs = [(f"{names[pair[0]]} {names[pair[1]]}" if pair else f"#{key:016x}", count)  # pruned: past the bound
                 for pair, key, count in zip(found, pair_keys.tolist(), pair_counts.tolist())]
        return top, sorted(pairs, key=lambda r: (-r[1], r[0]))

    def _pair_words(self, keys: np.ndarray, counts: np.ndarray) -> list[tuple[int, int] | None]:
        """The (first, second) word keys of each pair key, None when not found (pruned). Both words occur at
        least as often as the pair, so among the words counted that often, the first is the one whose
        ``pair_key`` partner is also there."""
        if not len(keys):
            return []
        sel = self.words.counts >= counts.min()  # every pair's words are among these (keys stay sorted)
        often, often_counts = self.words.keys[sel], self.words.counts[sel]
        if not len(often):
            return [None] * len(keys)
        found: list[tuple[int, int] | None] = []
        step = max(1, 2**20 // len(often))  # rows of (pairs x candidate first words) per block: bounded memory
        for at in range(0, len(keys), step):
            block, need = keys[at:at + step], counts[at:at + step, None]
            second = block[:, None] ^ (often * PAIR)[None, :]  # each candidate first word's partner
            pos = np.minimum(np.searchsorted(often, second), len(often) - 1)
            ok = (often[pos] == second) & (often_counts[None, :] >= need) & (often_counts[pos] >= need)
            first = ok.argmax(axis=1)
            found += [(int(often[j]), int(second[i, j])) if ok[i, j] else None for i, j in enumerate(first.tolist())]
        return found


def add_counts(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return b if a is None else a
    n = max(len(a), len(b))
    out = np.zeros(n, dtype=np.int64)
    out[:len(a)] += a
    out[:len(b)] += b
    return out


def script_of(ch: str) -> str:
    """A character's script, from the first word of its Unicode name (LATIN, CYRILLIC, CJK, ...)."""
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return "UNKNOWN"
    first = name.split(" ", 1)[0]
    return "CJK" if first in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL") else first


def _characters(texts: list[str], stats: TextStats) -> list[bool]:
    """Character classes (Unicode general category), scripts of letters and lines, counted by code point over
    the chunk's ASCII documents joined (as bytes) and its other documents joined (as UTF-32); returns, per
    document, whether it holds a control character (one of ``_CONTROL_POINTS``)."""
    control = [False] * len(texts)
    for ascii_ in (True, False):
        docs = [i for i, t in enumerate(texts) if t.isascii() == ascii_]
        if not docs:
            continue
        joined = "\n".join(texts[i] for i in docs)
        if ascii_:
            counts, high = byte_counts(joined.encode("ascii"))[:128], None
        else:
            points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            low = points < 128
            counts = byte_counts(points[low].astype(np.uint8).tobytes())[:128]
            high = np.unique(points[~low], return_counts=True)
        counts[10] -= len(docs) - 1  # the joins
        stats.lines += int(counts[10]) + sum(not texts[i].endswith("\n") for i in docs)
        for i in np.flatnonzero(counts).tolist():
            stats.char_classes[_ASCII_CLASS[i]] += int(counts[i])
        letters = int(counts[65:91].sum() + counts[97:123].sum())
        if letters:
            stats.scripts["LATIN"] += letters
        if high is not None:
            _unicode_classes(*high, stats)
        if counts[_CONTROL_POINTS].any():
            for i in docs:
                control[i] = _CONTROL.search(texts[i]) is not None
    return control


def _unicode_classes(points: np.ndarray, counts: np.ndarray, stats: TextStats) -> None:
    """Classes and scripts of distinct non-ASCII code points seen ``counts`` times."""
    for cp, n in zip(points.tolist(), counts.tolist()):
        ch = chr(cp)
        cat = unicodedata.category(ch)
        stats.char_classes[CLASS_NAMES.get(cat[0], "other")] += n
        if cat[0] == "L":
            stats.scripts[script_of(ch)] += n


def lines_matching(pattern: re.Pattern, text: str) -> int:
    """How many lines of ``text`` hold a match of ``pattern`` (each line counted once)."""
    starts = {text.rfind("\n", 0, m.start()) for m in pattern.finditer(text)}
    return len(starts)


def analyze_document(text: str, stats: TextStats, near: MinHashDeduper | None, control: bool) -> None:
    """What one document contributes besides its characters and words (``text`` already normalized as
    ``data prepare`` does; ``control``: it holds a control character)."""
    data = text.encode("utf-8")
    stats.documents += 1
    stats.chars += len(text)
    stats.bytes += len(data)
    stats.doc_chars.append(len(text))
    if control:
        stats.binary_lines += lines_matching(_CONTROL, text)
    if not text.isascii():
        stats.garbled_lines += lines_matching(GARBLED, text)
    stats.pii.add(text)
    stats.digests.append(bytes_digest(data))
    stats.sigs.append(near.signature(text) if near is not None else None)


def analyze_chunk(items: list, tok: TextTokenizer | None, near_duplicates: bool) -> TextStats:
    """Statistics of a chunk: raw texts (tokenized with ``tok`` when given) or token-id arrays (decoded)."""
    stats = TextStats()
    near = MinHashDeduper() if near_duplicates else None
    texts = items if all(isinstance(it, str) for it in items) else tok.decode_batch(items)
    texts = [normalize(t) for t in texts]
    ids: list = [it for it in items if not isinstance(it, str)]
    if tok is not None and not ids:
        ids = tok.encode_batch(texts)
    for text, control in zip(texts, _characters(texts, stats)):
        analyze_document(text, stats, near, control)
    stats.words, stats.bigrams, stats.names = chunk_words(texts)
    if ids:
        lengths = [len(x) for x in ids]
        stats.doc_tokens = lengths
        stats.tokens = sum(lengths)
        flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if stats.tokens else np.zeros(0, int)
        stats.token_counts = np.bincount(flat, minlength=tok.vocab_size)
    return stats


def duplicates(stats: TextStats, near_duplicates: bool) -> dict:
    """Exact and near-duplicate counts over the documents in order, as ``data prepare`` would find them."""
    stats.count_duplicates()
    dup, docs = stats.duplicates, max(1, stats.documents)
    return {"exact": dup.exact, "exact_rate": dup.exact / docs,
            "near": dup.near if near_duplicates else None,
            "near_rate": dup.near / docs if near_duplicates else None}


def histogram(values: list[int], bins: int = 30) -> dict:
    """Log-spaced histogram of positive lengths, plus percentiles: what the JSON keeps and the page plots."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"edges": [], "counts": [], "percentiles": {}}
    hi = max(2.0, float(v.max()) + 1)
    edges = np.unique(np.round(np.geomspace(1, hi, bins + 1)))
    counts, _ = np.histogram(np.clip(v, 1, None), bins=edges)
    pct = {f"p{p}": float(np.percentile(v, p)) for p in (1, 10, 50, 90, 99)}
    return {"edges": edges.tolist(), "counts": counts.tolist(), "mean": float(v.mean()), "max": int(v.max()),
            "percentiles": pct}


def _shares(counter: Counter) -> dict:
    total = max(1, sum(counter.values()))
    return {k: {"count": n, "share": n / total} for k, n in counter.most_common()}


def summarize(stats: TextStats, near_duplicates: bool, tokenizer: dict | None) -> dict:
    """The ``text`` section of profile.json."""
    top_words, top_bigrams = stats.top_words_and_bigrams(TOP_K)
    doc = {
        "documents": stats.documents, "characters": stats.chars, "bytes": stats.bytes,
        "tokens": stats.tokens if stats.doc_tokens else None,
        "bytes_per_token": stats.bytes / stats.tokens if stats.tokens else None,
        "tokenizer": tokenizer,
        "document_chars": histogram(stats.doc_chars),
        "document_tokens": histogram(stats.doc_tokens) if stats.doc_tokens else None,
        "character_classes": _shares(stats.char_classes),
        "scripts": _shares(stats.scripts),
        "duplicates": duplicates(stats, near_duplicates),
        "lines": {"total": stats.lines, "binary": stats.binary_lines, "garbled": stats.garbled_lines,
                  "bad_share": (stats.binary_lines + stats.garbled_lines) / max(1, stats.lines)},
        "top_words": top_words,
        "top_bigrams": top_bigrams,
        "pii": stats.pii.to_dict(),
    }
    return doc
