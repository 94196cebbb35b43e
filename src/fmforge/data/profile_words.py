"""Word and word-pair counts of ``data profile``: counted by 64-bit hash in each chunk, merged exactly.

A word is a run of ``\\w`` characters of the lowercased text (``re.findall(r"\\w+", text.lower())``); a pair is
two consecutive words of one document. ``fastscan.count_words`` counts a chunk's words in one pass and hands
back each distinct word's text once, as UTF-8 in one buffer (``WordNames``): only the few words reported at
the end are ever decoded, and a chunk's names cross from a worker process as three arrays, not as a dict of
strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fmforge.data.fastscan import PAIR, count_words, merge_counts

MAX_NGRAM_KEYS = 1_000_000  # a counter past this is pruned to its most common half (bounded memory)


def merged(tables: list[HashCounts]) -> tuple[np.ndarray, np.ndarray]:
    """The keys and summed counts of sorted tables, merged pairwise (``fastscan.merge_counts``, linear) in a
    balanced tree."""
    pairs = [(t.keys, t.counts) for t in tables]
    while len(pairs) > 1:
        pairs = [merge_counts(*pairs[i], *pairs[i + 1]) if i + 1 < len(pairs) else pairs[i]
                 for i in range(0, len(pairs), 2)]
    return pairs[0] if pairs else (np.zeros(0, np.uint64), np.zeros(0, np.int64))


def pair_key(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The key of a word pair from its words' keys (wrapping uint64): given the first word's key, the second's
    is ``key ^ (first * PAIR)``, which is how a pair's words are found again (``TextStats.top_bigrams``)."""
    return (first * PAIR) ^ second


@dataclass
class HashCounts:
    """Exact counts of words or word pairs, keyed by 64-bit hashes (sorted, distinct); their text is looked up
    only for the few reported at the end.

    Additions queue up and are combined in one sort once MAX_NGRAM_KEYS entries are waiting; past
    MAX_NGRAM_KEYS distinct keys only the most common half stays (bounded memory; the tail is approximate).
    """

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pending: list = field(default_factory=list)

    def add(self, other: HashCounts) -> bool:
        """Queue ``other``'s counts; True when that compacted and pruned the table.

        The queue stays a stack of sorted runs, each more than twice the size of the next: the newest two merge
        while the newer is at least half the older (as a merge sort's runs do), so the merging keeps pace with
        the chunks as they arrive and only a few runs are left for the end."""
        self.pending += [other] + other.pending
        while len(self.pending) > 1 and 2 * len(self.pending[-1].keys) >= len(self.pending[-2].keys):
            newer, older = self.pending.pop(), self.pending.pop()
            self.pending.append(HashCounts(*merge_counts(older.keys, older.counts, newer.keys, newer.counts)))
        if not _due(self.pending):
            return False
        return self.compact()

    def compact(self) -> bool:
        """Combine the queued counts; True when that pruned the table."""
        if not self.pending:
            return False
        tables = [self] + self.pending
        self.pending = []
        self.keys, self.counts = merged(tables)
        if len(self.keys) > MAX_NGRAM_KEYS:
            keep = np.sort(np.argpartition(-self.counts, MAX_NGRAM_KEYS // 2)[:MAX_NGRAM_KEYS // 2])
            self.keys, self.counts = self.keys[keep], self.counts[keep]
            return True
        return False

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and counts of the ``k`` most frequent entries (ties at the cut: smaller key first)."""
        self.compact()
        if len(self.counts) > k:  # only entries at or above the k-th count need sorting
            cut = np.partition(self.counts, len(self.counts) - k)[len(self.counts) - k]
            sel = np.flatnonzero(self.counts >= cut)
        else:
            sel = np.arange(len(self.counts))
        order = sel[np.lexsort((self.keys[sel], -self.counts[sel]))][:k]
        return self.keys[order], self.counts[order]


def _due(pending: list) -> bool:
    """Whether queued tables are due to be combined (one sort per MAX_NGRAM_KEYS entries: each combination
    re-sorts the whole table, so combining as every chunk arrives would cost more than it saves)."""
    return sum(len(p.keys) for p in pending) >= MAX_NGRAM_KEYS


def _gather(offsets: np.ndarray, data: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries ``idx`` of a (``offsets``, ``data``) string table as a new table."""
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    new = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    pos = np.arange(new[-1], dtype=np.int64) - np.repeat(new[:-1] - starts, lengths)
    return new, data[pos]


@dataclass
class WordNames:
    """The text of hashed words: word ``i`` has key ``keys[i]`` and UTF-8 bytes ``data[offsets[i]:offsets[i+1]]``.

    Tables pile up as chunks merge and are combined (one entry per key, restricted to the keys still counted)
    as ``HashCounts`` tables are, so memory follows the distinct words, not the chunks.
    """

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    data: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    pending: list = field(default_factory=list)

    def add(self, other: WordNames) -> None:
        self.pending += [other] + other.pending
        if _due(self.pending):
            self.compact()

    def compact(self, keep: np.ndarray | None = None) -> None:
        """One sorted entry per key; with ``keep`` (the keys still counted), only those."""
        tables = [self] + self.pending
        self.pending = []
        shift = np.cumsum([0] + [len(t.data) for t in tables[:-1]])
        keys = np.concatenate([t.keys for t in tables])
        ends = [[shift[-1] + len(tables[-1].data)]]
        offsets = np.concatenate([t.offsets[:-1] + s for t, s in zip(tables, shift)] + ends)
        data = np.concatenate([t.data for t in tables])
        order = np.argsort(keys, kind="stable")  # sorted runs (the table so far) merge in linear time
        first = np.concatenate([[True], keys[order][1:] != keys[order][:-1]]) if len(keys) else np.zeros(0, bool)
        uniq, idx = keys[order][first], order[first]
        if keep is not None:
            wanted = np.isin(uniq, keep)
            uniq, idx = uniq[wanted], idx[wanted]
        self.keys = uniq
        self.offsets, self.data = _gather(offsets.astype(np.int64), data, idx)

    def lookup(self, keys: list[int]) -> dict[int, str]:
        """The words of ``keys`` (those known), decoded: searched in every table at once (a few keys are
        wanted, so combining the tables first would cost more)."""
        tables = [self] + self.pending
        starts = np.cumsum([0] + [len(t.keys) for t in tables])
        every = np.concatenate([t.keys for t in tables])
        want = np.unique(np.asarray(keys, dtype=np.uint64))
        if not len(want) or not len(every):
            return {}
        near = want[np.minimum(np.searchsorted(want, every), len(want) - 1)]  # a binary search in the few wanted
        hits = np.flatnonzero(near == every)
        _, first = np.unique(every[hits], return_index=True)  # a key's first entry is enough
        hits = hits[first]
        table_of = np.searchsorted(starts, hits, side="right") - 1
        out: dict[int, str] = {}
        for hit, t in zip(hits.tolist(), table_of.tolist()):
            table, i = tables[t], hit - int(starts[t])
            text = bytes(table.data[table.offsets[i]:table.offsets[i + 1]])
            out[int(table.keys[i])] = text.decode("utf-8", "surrogatepass")
        return out


def _sorted(keys: np.ndarray, counts: np.ndarray) -> HashCounts:
    order = np.argsort(keys)
    return HashCounts(keys[order], counts[order])


def chunk_words(texts: list[str]) -> tuple[HashCounts, HashCounts, WordNames]:
    """Words, word pairs and the words' text of a chunk of documents. ASCII documents are scanned as their
    bytes, lowercased on the fly; the others are lowercased by ``str.lower()`` (whose Unicode rules can change a
    text's length) and scanned as code points."""
    words, pairs, names = [], [], WordNames()
    for ascii_ in (True, False):
        docs = [t if ascii_ else t.lower() for t in texts if t.isascii() == ascii_]
        if not docs:
            continue
        big = "\n".join(docs)  # a newline is not a word character: no word spans two documents
        points = (np.frombuffer(big.encode("ascii"), dtype=np.uint8) if ascii_ else
                  np.frombuffer(big.encode("utf-32-le", "surrogatepass"), dtype=np.uint32))
        keys, counts, offsets, text, pair_keys = count_words(points, np.cumsum([len(d) + 1 for d in docs]) - 1, ascii_)
        words.append(_sorted(keys, counts))
        pairs.append(pair_keys)
        names.add(WordNames(keys, offsets, text))
    keys, counts = np.unique(np.concatenate(pairs) if pairs else np.zeros(0, np.uint64), return_counts=True)
    return HashCounts(*merged(words)), HashCounts(keys, counts.astype(np.int64)), names
