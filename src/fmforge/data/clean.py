"""Cleaning: Unicode normalization, exact dedup, and MinHash-LSH near-duplicate detection.

Everything here is deterministic across runs, machines and Python versions: hashes are blake2b/crc32,
never Python's salted ``hash()``, so the same corpus always keeps the same documents.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

MERSENNE = (1 << 61) - 1  # hash family (a*x + b) mod p with p = 2^61 - 1
NUM_PERM = 128
BANDS = 32  # 32 bands x 4 rows: a pair at Jaccard 0.8 shares a band with probability 1-(1-0.8^4)^32 = 1-5e-8
THRESHOLD = 0.8
NGRAM = 5  # word 5-gram shingles
_CHUNK = 128  # shingles per step: each (NUM_PERM x chunk) uint64 temporary (128 KiB) stays in the CPU cache
_FNV_PRIME = np.uint64(0x100000001B3)
_P = np.uint64(MERSENNE)
_LOW32 = np.uint64(0xFFFFFFFF)
_ASCII_SEPARATORS = re.compile("[\x1c-\x1f]")


def normalize(text: str) -> str:
    """NFC, and every line ending as ``\\n``. Nothing else is touched: whitespace and case are data."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_digest(text: str) -> bytes:
    """128-bit content hash: the exact-dedup key, and the source of a document's train/val split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class ExactDeduper:
    """Remembers digests of documents seen; 16 bytes (plus set overhead) per document."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, digest: bytes) -> bool:
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


def shingles(text: str, n: int = NGRAM) -> np.ndarray:
    """Distinct 32-bit hashes of the word n-grams of ``text`` (one shingle for texts shorter than n words)."""
    # str.split() splits at Unicode whitespace; bytes.split() at ASCII whitespace only, which for ASCII text is
    # the same set except the separators \x1c-\x1f: split the bytes (no per-word encode) when that is exact.
    words = text.encode("ascii").split() if text.isascii() and not _ASCII_SEPARATORS.search(text) else \
        [w.encode("utf-8") for w in text.split()]
    if not words:
        return np.empty(0, dtype=np.uint64)
    h = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words))
    n = min(n, len(h))
    m = len(h) - n + 1
    # Combine n consecutive word hashes, order-sensitive, in wrapping uint64 arithmetic (FNV-style), then
    # fold to 32 bits, the input size the permutations below are exact for.
    s = h[:m].copy()
    for k in range(1, n):
        s = (s * _FNV_PRIME) ^ h[k:k + m]
    return np.unique((s >> np.uint64(32)) ^ (s & _LOW32))


def _hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``a`` uniform in [1, p) and ``b`` in [0, p) per permutation. A small ``a`` would make a*x wrap
    around p only a few times, a nearly linear map whose minimum always falls on the same few shingles."""
    # From blake2b rather than an RNG so the permutations never change with a numpy version.
    raw = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).digest(), "little")
           for i in range(num_perm)]
    a = np.array([1 + (r & (2**64 - 1)) % (MERSENNE - 1) for r in raw], dtype=np.uint64)
    b = np.array([(r >> 64) % MERSENNE for r in raw], dtype=np.uint64)
    return a, b


def _fold(v: np.ndarray) -> None:
    """v mod 2^61-1, almost: since 2^61 ≡ 1, adding the bits above 61 onto the low 61 keeps the residue."""
    high = v >> np.uint64(61)
    v &= _P
    v += high


def _permute(a_hi: np.ndarray, a_lo: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(a*x + b) mod 2^61-1 for 32-bit x, exactly, in uint64: a*x needs up to 93 bits, so split
    a = a_hi * 2^32 + a_lo and reduce each product before it can overflow."""
    hi = a_hi * x  # < 2^29 * 2^32 = 2^61
    # hi * 2^32 mod p: write hi = q * 2^29 + r, then hi * 2^32 = q * 2^61 + r * 2^32 ≡ q + r * 2^32.
    q = hi >> np.uint64(29)
    hi &= np.uint64(2**29 - 1)
    hi <<= np.uint64(32)
    hi += q
    lo = a_lo * x  # < 2^64
    _fold(lo)
    hi += lo
    hi += b  # three terms below 2^61 + 2^32: no overflow
    _fold(hi)
    # Now hi < p + 8; subtract p where hi ≥ p without a branch: (hi + 1) >> 61 is 1 exactly then, and
    # adding it before masking to 61 bits gives hi + 1 - 2^61 = hi - p. (np.minimum/where on uint64 is slow.)
    hi += (hi + np.uint64(1)) >> np.uint64(61)
    hi &= _P
    return hi


def _permute_redundant(a: np.ndarray, a_over_p: np.ndarray, b_plus_p: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(a*x + b) mod 2^61-1 for 32-bit x, in 9 array passes instead of ``_permute``'s 17, as a value
    v < p + 4 with v ≡ a*x + b: v is the exact residue whenever v < p (a residue below 4 comes out as r + p).

    The quotient q of a*x by p is estimated in float64 (relative error < 2^-51 on q < 2^32, so it is off by at
    most one), and a*x - q*p is then exact in wrapping uint64 arithmetic: its true value lies in [-p, 2p), so
    adding b + p puts it in [0, 4p), below 2^63, and one fold brings it under p + 4.
    """
    q = (a_over_p * x.astype(np.float64)).astype(np.int64).view(np.uint64)  # float to int64: a faster cast
    q *= _P
    v = a * x
    v -= q
    v += b_plus_p
    _fold(v)
    return v


class MinHashDeduper:
    """Streaming near-duplicate detector: MinHash signatures of word 5-grams, LSH banding for candidates,
    and a candidate counts when the estimated Jaccard similarity is ≥ ``threshold``.

    Only documents that are not near-duplicates are registered, so the reported count is exactly what
    dropping them would remove. Memory: a 512-byte signature plus ``bands`` bucket entries per document.
    """

    def __init__(self, num_perm: int = NUM_PERM, bands: int = BANDS, threshold: float = THRESHOLD,
                 ngram: int = NGRAM, seed: int = 0):
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self.num_perm, self.bands, self.threshold, self.ngram = num_perm, bands, threshold, ngram
        self.set_permutations(*_hash_params(num_perm, seed))
        # Keeping the low 32 bits of each minimum halves memory; a false match costs 2^-32 per slot.
        self._sigs = np.empty((1024, num_perm), dtype=np.uint32)
        self._count = 0
        self._buckets: dict[int, int | list[int]] = {}  # band key -> doc index (a list once keys collide)

    def signature(self, text: str) -> np.ndarray | None:
        """The MinHash signature (``num_perm`` uint32), or None for a text without words."""
        x = shingles(text, self.ngram)
        return self.signature_of(x) if x.size else None

    def set_permutations(self, a: np.ndarray, b: np.ndarray) -> None:
        """The hash family's ``a`` (in [1, p)) and ``b`` (in [0, p)), ``num_perm`` uint64 each."""
        self.a, self.b = a, b
        self._a, self._b = a[:, None], b[:, None]
        self._a_over_p, self._b_plus_p = (a.astype(np.float64) / MERSENNE)[:, None], self._b + _P

    def signature_of(self, x: np.ndarray) -> np.ndarray:
        """The signature of a non-empty array of 32-bit shingle hashes (uint64): per permutation, the low 32
        bits of the minimum of (a*x + b) mod 2^61-1, exactly."""
        sig = np.full(self.num_perm, MERSENNE, dtype=np.uint64)
        for i in range(0, x.size, _CHUNK):
            block = x[None, i:i + _CHUNK]
            v = _permute_redundant(self._a, self._a_over_p, self._b_plus_p, block)
            if v.max() >= _P:  # a residue below 4 (odds ~2^-59 per value): this block exactly
                v = _permute(self._a >> np.uint64(32), self._a & _LOW32, self._b, block)
            np.minimum(sig, v.min(axis=1), out=sig)
        return sig.astype(np.uint32)  # keep the low 32 bits

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        rows = sig.reshape(self.bands, -1).astype(np.uint64)
        key = np.arange(self.bands, dtype=np.uint64)  # the band index is part of the key
        for r in range(rows.shape[1]):
            key = (key * _FNV_PRIME) ^ rows[:, r]
        return key.tolist()

    def is_near_duplicate(self, text: str) -> bool:
        """True if ``text`` is a near-duplicate of a document seen before; otherwise remember it."""
        return self.is_near_duplicate_signature(self.signature(text))

    def is_near_duplicate_signature(self, sig: np.ndarray | None) -> bool:
        """``is_near_duplicate`` from a signature computed earlier (``signature``), e.g. in another process."""
        if sig is None:
            return False
        keys = self._band_keys(sig)
        candidates: set[int] = set()
        for k in keys:
            hit = self._buckets.get(k)
            if isinstance(hit, list):
                candidates.update(hit)
            elif hit is not None:
                candidates.add(hit)
        if candidates:
            idx = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            similarity = (self._sigs[idx] == sig).mean(axis=1)
            if similarity.max() >= self.threshold:
                return True
        self._register(sig, keys)
        return False

    def _register(self, sig: np.ndarray, keys: list[int]) -> None:
        if self._count == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        i = self._count
        self._sigs[i] = sig
        self._count += 1
        for k in keys:
            hit = self._buckets.get(k)
            if hit is None:
                self._buckets[k] = i
            elif isinstance(hit, list):
                hit.append(i)
            else:
                self._buckets[k] = [hit, i]
