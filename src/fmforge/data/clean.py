"""Cleaning: Unicode normalization, exact dedup, and MinHash-LSH near-duplicate detection.

Everything here is deterministic across runs, machines and Python versions: hashes are blake2b/crc32,
never Python's salted ``hash()``, so the same corpus always keeps the same documents.
"""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np

from fmforge.data.fastscan import minhash_min, shingle_hashes

MERSENNE = (1 << 61) - 1  # hash family (a*x + b) mod p with p = 2^61 - 1
NUM_PERM = 128
BANDS = 32  # 32 bands x 4 rows: a pair at Jaccard 0.8 shares a band with probability 1-(1-0.8^4)^32 = 1-5e-8
THRESHOLD = 0.8
NGRAM = 5  # word 5-gram shingles
_FNV_PRIME = np.uint64(0x100000001B3)


def normalize(text: str) -> str:
    """NFC, and every line ending as ``\\n``. Nothing else is touched: whitespace and case are data."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text  # a search costs 1/30 of two replaces


def text_digest(text: str) -> bytes:
    """128-bit content hash: the exact-dedup key, and the source of a document's train/val split."""
    return bytes_digest(text.encode("utf-8"))


def bytes_digest(data: bytes) -> bytes:
    """``text_digest`` of a text from its UTF-8 bytes."""
    return hashlib.blake2b(data, digest_size=16).digest()


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
    """Distinct 32-bit hashes of the word n-grams of ``text`` (one shingle for texts shorter than n words).

    Words are ``str.split()``'s; each word's hash is its ``zlib.crc32``; n consecutive ones are combined
    order-sensitively in wrapping uint64 arithmetic (FNV-style) and folded to 32 bits, the input size the
    permutations below are exact for (``fastscan.shingle_hashes``)."""
    s = shingle_hashes(text.encode("utf-8", "surrogatepass"), n)
    s.sort()
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s  # distinct, as np.unique but faster


def _hash_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``a`` uniform in [1, p) and ``b`` in [0, p) per permutation. A small ``a`` would make a*x wrap
    around p only a few times, a nearly linear map whose minimum always falls on the same few shingles."""
    # From blake2b rather than an RNG so the permutations never change with a numpy version.
    raw = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).digest(), "little")
           for i in range(num_perm)]
    a = np.array([1 + (r & (2**64 - 1)) % (MERSENNE - 1) for r in raw], dtype=np.uint64)
    b = np.array([(r >> 64) % MERSENNE for r in raw], dtype=np.uint64)
    return a, b


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
        x = shingle_hashes(text.encode("utf-8", "surrogatepass"), self.ngram)  # repeats kept: a minimum is the same
        return self.signature_of(x) if x.size else None

    def set_permutations(self, a: np.ndarray, b: np.ndarray) -> None:
        """The hash family's ``a`` (in [1, p)) and ``b`` (in [0, p)), ``num_perm`` uint64 each."""
        self.a, self.b = np.ascontiguousarray(a, dtype=np.uint64), np.ascontiguousarray(b, dtype=np.uint64)

    def signature_of(self, x: np.ndarray) -> np.ndarray:
        """The signature of a non-empty array of 32-bit shingle hashes (uint64): per permutation, the low 32
        bits of the minimum of (a*x + b) mod 2^61-1, exactly (``fastscan.minhash_min``)."""
        return minhash_min(self.a, self.b, x).astype(np.uint32)  # keep the low 32 bits

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """The LSH bucket keys (``bands`` uint64 per row) of a batch of signatures (rows of ``num_perm``)."""
        rows = sigs.reshape(len(sigs), self.bands, -1).astype(np.uint64)
        key = np.broadcast_to(np.arange(self.bands, dtype=np.uint64), rows.shape[:2])  # the band index is part of it
        for r in range(rows.shape[2]):
            key = (key * _FNV_PRIME) ^ rows[:, :, r]
        return key

    def is_near_duplicate(self, text: str) -> bool:
        """True if ``text`` is a near-duplicate of a document seen before; otherwise remember it."""
        return self.is_near_duplicate_signature(self.signature(text))

    def is_near_duplicate_signature(self, sig: np.ndarray | None, keys: list[int] | None = None) -> bool:
        """``is_near_duplicate`` from a signature computed earlier (``signature``), e.g. in another process;
        ``keys``: its ``band_keys``, when computed for a batch."""
        if sig is None:
            return False
        keys = self.band_keys(sig[None])[0].tolist() if keys is None else keys
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

    def near_duplicates(self, sigs: np.ndarray) -> np.ndarray:
        """``is_near_duplicate_signature`` for each row of ``sigs`` in order (bool per row), the same answers
        and state. A row none of whose band keys is known yet, or made by an earlier row of the batch, has no
        candidate: those rows are registered at once; the others go one by one (in order; no earlier row can
        be one of the first kind, whose keys all start with it)."""
        n = len(sigs)
        if not n:
            return np.zeros(0, bool)
        keys = self.band_keys(sigs)
        flat = keys.ravel()
        _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
        earlier = (first[inverse] // self.bands).reshape(n, self.bands) < np.arange(n)[:, None]
        known = np.fromiter(map(self._buckets.__contains__, flat.tolist()), bool, len(flat)).reshape(n, self.bands)
        alone = ~(earlier | known).any(axis=1)
        self._grow(int(alone.sum()))
        rows = np.flatnonzero(alone)
        idx = np.arange(self._count, self._count + len(rows))
        self._sigs[idx] = sigs[rows]
        self._count += len(rows)
        self._buckets.update(zip(keys[rows].ravel().tolist(), np.repeat(idx, self.bands).tolist()))
        out = np.zeros(n, bool)
        for i in np.flatnonzero(~alone).tolist():
            out[i] = self.is_near_duplicate_signature(sigs[i], keys[i].tolist())
        return out

    def _grow(self, more: int) -> None:
        while self._count + more > len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])

    def _register(self, sig: np.ndarray, keys: list[int]) -> None:
        self._grow(1)
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
