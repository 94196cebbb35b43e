"""Compiled inner loops (numba) for the data scans that pure numpy cannot do in one pass.

Each kernel computes exactly what a slower reference in plain Python/numpy computes (the tests compare them):

- ``word_hashes``: the CRC-32 of every word of a UTF-8 text as ``str.split()`` splits it, the input of
  ``clean.shingles``;
- ``shingle_hashes``: those CRCs combined into the hashes of word n-grams (``clean.shingles`` before it
  sorts and drops repeats);
- ``minhash_min``: per permutation, the minimum of ``(a*x + b) mod 2^61-1`` over 32-bit shingles, exactly
  (split multiplication, no float estimate), which is ``clean.MinHashDeduper.signature_of`` before its cast;
- ``merge_counts``: two sorted count tables as one (the merge step of a merge sort, equal keys summed);
- ``digit_runs``: the spans where personal data with digits can be (``pii._digit_windows``);
- ``byte_counts``: how often each byte value occurs (``np.bincount`` without its copy to 64-bit integers);
- ``count_words``: the ``\\w+`` words of a code-point array, where a word is a maximal run of characters that
  Python's ``re`` ``\\w`` matches (``str.isalnum()`` or ``_``), as ``re.findall(r"\\w+", text)`` finds them:
  each distinct word's 64-bit FNV-1a hash, count and text, and the keys of consecutive word pairs.

Kernels compile on first use (about a second; ``cache=True`` keeps the machine code next to this file when the
directory is writable), so a process pool that forks after the first call shares it.
"""

from __future__ import annotations

import re

import numpy as np
from numba import njit

_MASK61 = np.uint64((1 << 61) - 1)
_MASK29 = np.uint64((1 << 29) - 1)
_LOW32 = np.uint64(0xFFFFFFFF)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
PAIR = np.uint64(0x9E3779B97F4A7C15)  # word pair keys: (first * PAIR) ^ second
_WS = np.zeros(256, dtype=np.bool_)
_WS[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # the ASCII characters str.split() splits at


def _crc_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table[i] = c
    return table


_CRC = _crc_table()


@njit(cache=True, nogil=True)
def _space_len(data, i):  # pragma: no cover - compiled
    # Bytes of the non-ASCII whitespace character (as str.isspace() defines it) that starts at data[i] (>= 0x80),
    # 0 if none: U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000 by their UTF-8
    # bytes. Called only for bytes >= 0x80: called for every byte, it made the loop 10x slower (measured).
    b = data[i]
    n = len(data)
    if b == 0xC2:
        return 2 if i + 1 < n and (data[i + 1] == 0x85 or data[i + 1] == 0xA0) else 0
    if i + 2 >= n or b < 0xE1 or b > 0xE3:
        return 0
    c, d = data[i + 1], data[i + 2]
    if b == 0xE1:
        return 3 if c == 0x9A and d == 0x80 else 0
    if b == 0xE3:
        return 3 if c == 0x80 and d == 0x80 else 0
    if c == 0x80 and (0x80 <= d <= 0x8A or d == 0xA8 or d == 0xA9 or d == 0xAF):
        return 3
    return 3 if c == 0x81 and d == 0x9F else 0


@njit(cache=True, nogil=True)
def _word_hashes(data, ws, crc):  # pragma: no cover - compiled
    out = np.empty(len(data) // 2 + 1, dtype=np.uint64)
    n = 0
    i = 0
    size = len(data)
    while i < size:
        k = (1 if ws[data[i]] else 0) if data[i] < 0x80 else _space_len(data, i)
        if k:
            i += k
            continue
        c = np.uint32(0xFFFFFFFF)
        while i < size and not (ws[data[i]] if data[i] < 0x80 else _space_len(data, i)):
            c = crc[(c ^ data[i]) & 0xFF] ^ (c >> np.uint32(8))
            i += 1
        out[n] = np.uint64(c ^ np.uint32(0xFFFFFFFF))
        n += 1
    return out[:n]


def word_hashes(data: bytes) -> np.ndarray:
    """``zlib.crc32`` of each word of UTF-8 ``data`` split as ``str.split()`` splits its text (at every
    character ``str.isspace()`` accepts: ASCII whitespace, the separators \\x1c-\\x1f and the Unicode spaces),
    as uint64."""
    return _word_hashes(np.frombuffer(data, dtype=np.uint8), _WS, _CRC)


@njit(cache=True, nogil=True)
def _shingle_hashes(data, ws, crc, n):  # pragma: no cover - compiled
    h = _word_hashes(data, ws, crc)
    if len(h) == 0:
        return h
    n = min(n, len(h))
    m = len(h) - n + 1
    out = np.empty(m, dtype=np.uint64)
    for i in range(m):
        s = h[i]
        for k in range(1, n):
            s = (s * _FNV_PRIME) ^ h[i + k]
        out[i] = (s >> np.uint64(32)) ^ (s & _LOW32)
    return out


def shingle_hashes(data: bytes, n: int) -> np.ndarray:
    """The 32-bit hash of every run of ``n`` consecutive words of ``data`` (split as ``word_hashes`` splits; one
    hash of all words when there are fewer than ``n``), in order, repeats kept (uint64): each word's CRC-32,
    combined FNV-style (``h = h * FNV_PRIME ^ next``, wrapping uint64), folded to 32 bits (high ^ low)."""
    return _shingle_hashes(np.frombuffer(data, dtype=np.uint8), _WS, _CRC, n)


@njit(cache=True, nogil=True, inline="always")
def _mod_p(a_hi, a_lo, b, x):  # pragma: no cover - compiled
    # (a*x + b) mod 2^61-1 for a = a_hi*2^32 + a_lo and 32-bit x. Every operand of the two products is masked
    # to 32 bits, so the compiler multiplies 32x32->64 (vpmuludq, one fast instruction per lane) rather than
    # 64x64 (vpmullq, several).
    hi = (a_hi & _LOW32) * (x & _LOW32)  # < 2^61
    t = ((hi & _MASK29) << np.uint64(32)) + (hi >> np.uint64(29))  # hi * 2^32 mod p, < 2^61 + 2^32
    lo = (a_lo & _LOW32) * (x & _LOW32)
    lo = (lo & _MASK61) + (lo >> np.uint64(61))
    v = t + lo + b
    v = (v & _MASK61) + (v >> np.uint64(61))
    return v - _MASK61 if v >= _MASK61 else v


@njit(cache=True, nogil=True)
def _minhash_min(a, b, x):  # pragma: no cover - compiled
    # Two permutations per pass over x: each x is loaded once for both, and the vectorised loop has two
    # independent minimum chains.
    k = len(a)
    sig = np.empty(k, dtype=np.uint64)
    for j in range(0, k - 1, 2):
        hi0, lo0, b0 = a[j] >> np.uint64(32), a[j] & _LOW32, b[j]
        hi1, lo1, b1 = a[j + 1] >> np.uint64(32), a[j + 1] & _LOW32, b[j + 1]
        best0 = _MASK61
        best1 = _MASK61
        for i in range(len(x)):
            best0 = min(best0, _mod_p(hi0, lo0, b0, x[i]))
            best1 = min(best1, _mod_p(hi1, lo1, b1, x[i]))
        sig[j] = best0
        sig[j + 1] = best1
    if k % 2:
        best = _MASK61
        for i in range(len(x)):
            best = min(best, _mod_p(a[k - 1] >> np.uint64(32), a[k - 1] & _LOW32, b[k - 1], x[i]))
        sig[k - 1] = best
    return sig


def minhash_min(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per permutation ``j``, min over ``x`` of ``(a[j]*x + b[j]) mod 2^61-1`` (uint64; ``x`` 32-bit values)."""
    return _minhash_min(np.ascontiguousarray(a), np.ascontiguousarray(b), np.ascontiguousarray(x))


@njit(cache=True, nogil=True, inline="always")
def _is_word(c, word_bmp):  # pragma: no cover - compiled
    return word_bmp[c] if c < 0x110000 else False


@njit(cache=True, nogil=True)
def _put_utf8(out, n, c):  # pragma: no cover - compiled
    # Append code point c as UTF-8 (lone surrogates as their 3-byte form, as "surrogatepass" does).
    c = np.int64(c)
    if c < 0x80:
        out[n] = c
        return n + 1
    if c < 0x800:
        out[n] = 0xC0 | (c >> 6)
        out[n + 1] = 0x80 | (c & 0x3F)
        return n + 2
    if c < 0x10000:
        out[n] = 0xE0 | (c >> 12)
        out[n + 1] = 0x80 | ((c >> 6) & 0x3F)
        out[n + 2] = 0x80 | (c & 0x3F)
        return n + 3
    out[n] = 0xF0 | (c >> 18)
    out[n + 1] = 0x80 | ((c >> 12) & 0x3F)
    out[n + 2] = 0x80 | ((c >> 6) & 0x3F)
    out[n + 3] = 0x80 | (c & 0x3F)
    return n + 4


@njit(cache=True, nogil=True)
def _slot(k, shift, mask, used, slot_key):  # pragma: no cover - compiled
    j = np.int64((k * np.uint64(0x9E3779B97F4A7C15)) >> shift)  # multiplicative hashing: the top bits
    while used[j] and slot_key[j] != k:
        j = (j + 1) & mask
    return j


@njit(cache=True, nogil=True, inline="always")
def _folded(c, fold):  # pragma: no cover - compiled
    c = np.uint64(c)
    # unsigned arithmetic throughout: a comparison of uint64 with a signed literal would go through float64
    return c + np.uint64(32) if fold and c - np.uint64(65) < np.uint64(26) else c


@njit(cache=True, nogil=True)
def _count_words(cps, word_bmp, doc_ends, fold, width):  # pragma: no cover - compiled
    # The output arrays are sized for the most words n characters can hold and never reallocated: an array
    # that is both returned and reassigned inside the loop costs reference counting on every iteration
    # (measured: 6 -> 40 ns a character). np.empty leaves the untouched part unmapped.
    n = len(cps)
    bits = 12
    used = np.zeros(1 << bits, dtype=np.bool_)
    slot_key = np.empty(1 << bits, dtype=np.uint64)
    slot_id = np.empty(1 << bits, dtype=np.int64)
    keys = np.empty(n // 2 + 1, dtype=np.uint64)
    counts = np.empty(n // 2 + 1, dtype=np.int64)
    offsets = np.empty(n // 2 + 2, dtype=np.int64)
    names = np.empty(width * n + 4, dtype=np.uint8)  # each distinct word once, as UTF-8
    pairs = np.empty(n // 2 + 1, dtype=np.uint64)
    offsets[0] = 0
    m = 0
    p = 0
    doc = 0
    prev_doc = -1
    prev = np.uint64(0)
    i = 0
    while i < n:
        if not _is_word(cps[i], word_bmp):
            i += 1
            continue
        start = i
        h = _FNV_OFFSET
        while i < n and _is_word(cps[i], word_bmp):
            h = (h ^ _folded(cps[i], fold)) * _FNV_PRIME
            i += 1
        while doc < len(doc_ends) and start >= doc_ends[doc]:
            doc += 1
        if doc == prev_doc:
            pairs[p] = (prev * PAIR) ^ h
            p += 1
        prev_doc = doc
        prev = h
        j = _slot(h, np.uint64(64 - bits), (1 << bits) - 1, used, slot_key)
        if used[j]:
            counts[slot_id[j]] += 1
            continue
        used[j] = True
        slot_key[j] = h
        slot_id[j] = m
        keys[m] = h
        counts[m] = 1
        o = offsets[m]
        for t in range(start, i):
            o = _put_utf8(names, o, _folded(cps[t], fold))
        offsets[m + 1] = o
        m += 1
        if 2 * m > (1 << bits):  # half full: grow 4x and reinsert
            bits += 2
            used = np.zeros(1 << bits, dtype=np.bool_)
            slot_key = np.empty(1 << bits, dtype=np.uint64)
            slot_id = np.empty(1 << bits, dtype=np.int64)
            for t in range(m):
                j = _slot(keys[t], np.uint64(64 - bits), (1 << bits) - 1, used, slot_key)
                used[j] = True
                slot_key[j] = keys[t]
                slot_id[j] = t
    return keys[:m], counts[:m], offsets[:m + 1], names[:offsets[m]], pairs[:p]


def count_words(cps: np.ndarray, doc_ends: np.ndarray, fold_ascii: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``\\w+`` words of a code-point array (uint32, or uint8 for ASCII text: the same words and hashes),
    counted in one pass.

    ``doc_ends``: sorted offsets where documents end (a word pair never spans one). ``fold_ascii``: hash and
    name ``A-Z`` as ``a-z`` (``str.lower()`` of ASCII text, without making the lowered copy).
    Returns the distinct hashes in order of first occurrence, their counts, each one's text as UTF-8 (word
    ``i`` is ``names[offsets[i]:offsets[i + 1]]``), and the key of every pair of consecutive words within a
    document (``(first * PAIR) ^ second``, wrapping uint64)."""
    return _count_words(cps, word_table(), np.ascontiguousarray(doc_ends, dtype=np.int64), fold_ascii,
                        1 if cps.dtype == np.uint8 else 4)


@njit(cache=True, nogil=True)
def _merge_counts(a_keys, a_counts, b_keys, b_counts):  # pragma: no cover - compiled
    out_keys = np.empty(len(a_keys) + len(b_keys), dtype=np.uint64)
    out_counts = np.empty(len(a_keys) + len(b_keys), dtype=np.int64)
    i = j = m = 0
    while i < len(a_keys) and j < len(b_keys):
        if a_keys[i] < b_keys[j]:
            out_keys[m], out_counts[m] = a_keys[i], a_counts[i]
            i += 1
        elif b_keys[j] < a_keys[i]:
            out_keys[m], out_counts[m] = b_keys[j], b_counts[j]
            j += 1
        else:
            out_keys[m], out_counts[m] = a_keys[i], a_counts[i] + b_counts[j]
            i += 1
            j += 1
        m += 1
    for t in range(i, len(a_keys)):
        out_keys[m], out_counts[m] = a_keys[t], a_counts[t]
        m += 1
    for t in range(j, len(b_keys)):
        out_keys[m], out_counts[m] = b_keys[t], b_counts[t]
        m += 1
    return out_keys[:m], out_counts[:m]


def merge_counts(a_keys: np.ndarray, a_counts: np.ndarray, b_keys: np.ndarray, b_counts: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Two tables of distinct, sorted uint64 keys with int64 counts as one (sorted, distinct, counts of a key
    in both summed): a linear merge, where sorting the concatenation would cost n log n."""
    return _merge_counts(a_keys, a_counts, b_keys, b_counts)


_RUN_CHARS = np.zeros(128, dtype=np.bool_)
_RUN_CHARS[[ord(c) for c in "0123456789 ().+/-"]] = True


@njit(cache=True, nogil=True)
def _digit_runs(cps, run_chars, min_len):  # pragma: no cover - compiled
    # Spans from a digit to a digit inside a run of run_chars at least min_len long, and 4-character spans
    # "two capitals, two digits" (the start of an IBAN).
    n = len(cps)
    out = np.empty((n // 2 + 1, 2), dtype=np.int64)
    m = 0
    i = 0
    while i < n:
        c = cps[i]
        if c < 48 or c > 57:
            i += 1
            continue
        if i >= 2 and 65 <= cps[i - 1] <= 90 and 65 <= cps[i - 2] <= 90 and i + 1 < n and 48 <= cps[i + 1] <= 57:
            out[m, 0] = i - 2
            out[m, 1] = i + 2
            m += 1
        j = i
        last = i
        while j < n and cps[j] < 128 and run_chars[cps[j]]:
            if 48 <= cps[j] <= 57:
                last = j
            j += 1
        if last + 1 - i >= min_len:
            out[m, 0] = i
            out[m, 1] = last + 1
            m += 1
        # an IBAN start can only follow capitals, never a run character: resume where the run ended
        i = j if j > i else i + 1
    return out[:m]


def digit_runs(cps: np.ndarray, min_len: int = 7) -> np.ndarray:
    """(start, end) rows, in order: each run of characters from ``[0-9 ().+/-]`` taken from its first to its
    last digit when that is at least ``min_len`` long, and each two capitals followed by two digits."""
    return _digit_runs(cps, _RUN_CHARS, min_len)


@njit(cache=True, nogil=True)
def _byte_counts(data):  # pragma: no cover - compiled
    counts = np.zeros(256, dtype=np.int64)
    for i in range(len(data)):
        counts[data[i]] += 1
    return counts


def byte_counts(data: bytes) -> np.ndarray:
    """Occurrences of each byte value 0..255 in ``data`` (int64)."""
    return _byte_counts(np.frombuffer(data, dtype=np.uint8))


_WORD_TABLE: list[np.ndarray] = []


def word_table() -> np.ndarray:
    """Booleans over all code points: True where ``re``'s ``\\w`` matches (``str.isalnum()`` or ``_``), found by
    ``re`` itself over a string of every code point (60 ms, where a call per code point takes 160 ms)."""
    if not _WORD_TABLE:
        every = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
        spans = np.array([m.span() for m in re.finditer(r"\w+", every)], dtype=np.int64).reshape(-1, 2)
        edges = np.zeros(0x110001, dtype=np.int8)
        edges[spans[:, 0]] += 1  # runs never touch, so each start and end is one edge
        edges[spans[:, 1]] -= 1
        _WORD_TABLE.append(np.cumsum(edges[:-1], dtype=np.int8).astype(np.bool_))
    return _WORD_TABLE[0]


def warm_up() -> None:
    """Compile every kernel now (before a process pool forks, so the workers inherit the machine code)."""
    word_hashes(b"a b")
    shingle_hashes(b"a b", 5)
    minhash_min(np.ones(1, np.uint64), np.ones(1, np.uint64), np.ones(1, np.uint64))
    digit_runs(np.array([49, 32], dtype=np.uint32))
    byte_counts(b"ab")
    merge_counts(np.ones(1, np.uint64), np.ones(1, np.int64), np.ones(1, np.uint64), np.ones(1, np.int64))
    count_words(np.array([97, 32], dtype=np.uint8), np.array([2]), True)
    count_words(np.array([97, 32], dtype=np.uint32), np.array([2]), False)
    digit_runs(np.array([49, 32], dtype=np.uint8))
