"""Compiled inner loops (numba) for the data scans that pure numpy cannot do in one pass.

Each kernel computes exactly what a slower reference in plain Python/numpy computes (the tests compare them):

- ``word_hashes``: the CRC-32 of every word of an ASCII text as ``str.split()`` splits it, the input of
  ``clean.shingles``;
- ``minhash_min``: per permutation, the minimum of ``(a*x + b) mod 2^61-1`` over 32-bit shingles, exactly
  (split multiplication, no float estimate), which is ``clean.MinHashDeduper.signature_of`` before its cast;
- ``count_keys``: distinct 64-bit keys with their summed weights and first positions (a hash table; the same
  groups as sorting would give, in order of first occurrence);
- ``digit_runs``: the spans where personal data with digits can be (``pii._digit_windows``);
- ``byte_counts``: how often each byte value occurs (``np.bincount`` without its copy to 64-bit integers);
- ``scan_words``: the spans and 64-bit FNV-1a hashes of the words of a code-point array, where a word is a
  maximal run of characters that Python's ``re`` ``\\w`` matches (``str.isalnum()`` or ``_``), as
  ``re.findall(r"\\w+", text)`` finds them.

Kernels compile on first use (about a second; ``cache=True`` keeps the machine code next to this file when the
directory is writable), so a process pool that forks after the first call shares it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MASK61 = np.uint64((1 << 61) - 1)
_MASK29 = np.uint64((1 << 29) - 1)
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
def _word_hashes(data, ws, crc):  # pragma: no cover - compiled
    out = np.empty(len(data) // 2 + 1, dtype=np.uint64)
    n = 0
    i = 0
    size = len(data)
    while i < size:
        while i < size and ws[data[i]]:
            i += 1
        if i >= size:
            break
        c = np.uint32(0xFFFFFFFF)
        while i < size and not ws[data[i]]:
            c = crc[(c ^ data[i]) & 0xFF] ^ (c >> np.uint32(8))
            i += 1
        out[n] = np.uint64(c ^ np.uint32(0xFFFFFFFF))
        n += 1
    return out[:n]


def word_hashes(data: bytes) -> np.ndarray:
    """``zlib.crc32`` of each word of ``data`` split at the ASCII characters ``str.split()`` splits at (ASCII
    whitespace and the separators \\x1c-\\x1f), as uint64."""
    return _word_hashes(np.frombuffer(data, dtype=np.uint8), _WS, _CRC)


@njit(cache=True, nogil=True)
def _minhash_min(a, b, x):  # pragma: no cover - compiled
    k = len(a)
    sig = np.empty(k, dtype=np.uint64)
    for j in range(k):
        a_hi = a[j] >> np.uint64(32)
        a_lo = a[j] & np.uint64(0xFFFFFFFF)
        bj = b[j]
        best = _MASK61
        for i in range(len(x)):
            xi = x[i]
            hi = a_hi * xi  # < 2^61
            t = ((hi & _MASK29) << np.uint64(32)) + (hi >> np.uint64(29))  # hi * 2^32 mod p, < 2^61 + 2^32
            lo = a_lo * xi
            lo = (lo & _MASK61) + (lo >> np.uint64(61))
            v = t + lo + bj
            v = (v & _MASK61) + (v >> np.uint64(61))
            v = v - _MASK61 if v >= _MASK61 else v
            best = v if v < best else best
        sig[j] = best
    return sig


def minhash_min(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per permutation ``j``, min over ``x`` of ``(a[j]*x + b[j]) mod 2^61-1`` (uint64; ``x`` 32-bit values)."""
    return _minhash_min(np.ascontiguousarray(a), np.ascontiguousarray(b), np.ascontiguousarray(x))


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@njit(cache=True, nogil=True)
def _scan_words(cps, word_bmp):  # pragma: no cover - compiled
    n = len(cps)
    starts = np.empty(n // 2 + 1, dtype=np.int64)
    ends = np.empty(n // 2 + 1, dtype=np.int64)
    hashes = np.empty(n // 2 + 1, dtype=np.uint64)
    m = 0
    i = 0
    while i < n:
        c = cps[i]
        if not (word_bmp[c] if c < 0x110000 else False):
            i += 1
            continue
        h = _FNV_OFFSET
        starts[m] = i
        while i < n:
            c = cps[i]
            if not (word_bmp[c] if c < 0x110000 else False):
                break
            h = (h ^ np.uint64(c)) * _FNV_PRIME
            i += 1
        ends[m] = i
        hashes[m] = h
        m += 1
    return starts[:m], ends[:m], hashes[:m]


@njit(cache=True, nogil=True)
def _slot(k, shift, mask, used, slot_key):  # pragma: no cover - compiled
    j = np.int64((k * np.uint64(0x9E3779B97F4A7C15)) >> shift)  # multiplicative hashing: the top bits
    while used[j] and slot_key[j] != k:
        j = (j + 1) & mask
    return j


@njit(cache=True, nogil=True)
def _count_keys(keys, weights):  # pragma: no cover - compiled
    # Open addressing, grown 4x when half full: sized by the distinct keys, so it stays in the CPU cache
    # when few keys repeat many times (words).
    n = len(keys)
    bits = 12
    used = np.zeros(1 << bits, dtype=np.bool_)
    slot_key = np.empty(1 << bits, dtype=np.uint64)
    slot_id = np.empty(1 << bits, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)
    sums = np.zeros(n, dtype=np.int64)
    m = 0
    for i in range(n):
        k = keys[i]
        j = _slot(k, np.uint64(64 - bits), (1 << bits) - 1, used, slot_key)
        if used[j]:
            sums[slot_id[j]] += weights[i]
            continue
        used[j] = True
        slot_key[j] = k
        slot_id[j] = m
        first[m] = i
        sums[m] = weights[i]
        m += 1
        if 2 * m > (1 << bits):
            bits += 2
            used = np.zeros(1 << bits, dtype=np.bool_)
            slot_key = np.empty(1 << bits, dtype=np.uint64)
            slot_id = np.empty(1 << bits, dtype=np.int64)
            for t in range(m):
                j = _slot(keys[first[t]], np.uint64(64 - bits), (1 << bits) - 1, used, slot_key)
                used[j] = True
                slot_key[j] = keys[first[t]]
                slot_id[j] = t
    return first[:m], sums[:m]


def count_keys(keys: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For the distinct values of ``keys`` (uint64), in order of first occurrence: the index of that first
    occurrence and the sum of ``weights`` (int64; 1 each when None) over the occurrences."""
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    w = np.ones(len(keys), dtype=np.int64) if weights is None else np.ascontiguousarray(weights, dtype=np.int64)
    return _count_keys(keys, w)


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
    """Booleans over all code points: True where ``re``'s ``\\w`` matches (``str.isalnum()`` or ``_``)."""
    if not _WORD_TABLE:
        table = np.fromiter((chr(i).isalnum() for i in range(0x110000)), dtype=np.bool_, count=0x110000)
        table[ord("_")] = True
        _WORD_TABLE.append(table)
    return _WORD_TABLE[0]


def scan_words(cps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start and end offsets (int64) and FNV-1a hashes (uint64) of the ``\\w+`` words of a code-point array
    (uint32, or uint8 for ASCII text: the same words and hashes)."""
    return _scan_words(cps, word_table())


def warm_up() -> None:
    """Compile every kernel now (before a process pool forks, so the workers inherit the machine code)."""
    word_hashes(b"a b")
    minhash_min(np.ones(1, np.uint64), np.ones(1, np.uint64), np.ones(1, np.uint64))
    scan_words(np.array([97, 32], dtype=np.uint32))
    scan_words(np.array([97, 32], dtype=np.uint8))
    digit_runs(np.array([49, 32], dtype=np.uint32))
    count_keys(np.ones(2, np.uint64))
    byte_counts(b"ab")
    digit_runs(np.array([49, 32], dtype=np.uint8))
