"""MinHash signatures (``clean.py``, shared by ``data prepare`` and ``data profile``) checked against a plain
Python reference with big integers: the compiled kernels' arithmetic (``fastscan``), residues at the edges of the
field, and the shingle split."""

import pydoc_data.topics
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from fmforge.data.clean import MERSENNE, NGRAM, MinHashDeduper, shingles
from fmforge.data.fastscan import minhash_min, word_hashes

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MASK64 = 2**64 - 1


def reference_shingles(text: str, n: int = NGRAM) -> list[int]:
    """The shingle definition in plain Python: crc32 of each ``str.split()`` word, n consecutive ones combined
    FNV-style in 64-bit arithmetic, folded to 32 bits, distinct and sorted."""
    h = [zlib.crc32(w.encode("utf-8")) for w in text.split()]
    if not h:
        return []
    n = min(n, len(h))
    out = set()
    for i in range(len(h) - n + 1):
        s = h[i]
        for k in range(1, n):
            s = ((s * 0x100000001B3) & MASK64) ^ h[i + k]
        out.add((s >> 32) ^ (s & 0xFFFFFFFF))
    return sorted(out)


def reference_signature(d: MinHashDeduper, xs: list[int]) -> list[int]:
    return [min((int(a) * x + int(b)) % MERSENNE for x in xs) & 0xFFFFFFFF for a, b in zip(d.a, d.b)]


def test_signature_is_the_exact_minimum_of_a_x_plus_b_mod_p_per_permutation():
    d = MinHashDeduper()
    text = pydoc_data.topics.topics["assignment"][:6000]
    xs = reference_shingles(text)
    assert len(xs) > 300  # several 128-shingle blocks
    assert d.signature(text).tolist() == reference_signature(d, xs)


def test_residues_at_the_edges_of_the_field_stay_exact():
    d = MinHashDeduper()
    x = shingles((STDLIB / "textwrap.py").read_text(encoding="utf-8"))
    a, b = d.a.copy(), d.b.copy()
    # permutations 0-3 map the 10th shingle to residues 0-3, and 4-7 to p-1 .. p-4 (where a missed reduction
    # would show)
    for i in range(8):
        b[i] = ((i if i < 4 else MERSENNE - (i - 3)) - int(a[i]) * int(x[10])) % MERSENNE
    d.set_permutations(a, b)
    sig = d.signature_of(x)
    assert sig[:4].tolist() == [0, 1, 2, 3]
    assert sig.tolist() == reference_signature(d, x.tolist())


def test_shingles_split_words_exactly_as_str_split_does_for_ascii_and_unicode_whitespace():
    texts = ["one two three", "a b c d e f g", "", " \t\n ", "word", "x\x1cy\x1dz\x1ew\x1fv u t s",
             "tab\tvt\x0bff\x0ccr\rnl\nsp end of the line", "caf\u00e9 na\u00efve co\u00f6p r\u00e9sum\u00e9 x y",
             "nb\u00a0sp em\u2003sp nel\x85x ideographic\u3000space one two three",
             (STDLIB / "textwrap.py").read_text(encoding="utf-8")]
    for text in texts:
        assert shingles(text).tolist() == reference_shingles(text), repr(text[:40])


def test_signatures_of_real_source_files_equal_the_reference():
    d = MinHashDeduper()
    for name in ("textwrap.py", "shlex.py", "colorsys.py"):
        text = (STDLIB / name).read_text(encoding="utf-8")
        assert d.signature(text).tolist() == reference_signature(d, reference_shingles(text)), name


def test_minhash_kernel_is_exactly_a_x_plus_b_mod_2_61_minus_1_for_every_32_bit_edge():
    d = MinHashDeduper()
    for v in (0, 1, 2**31, 2**32 - 1, 123456789):
        got = minhash_min(d.a, d.b, np.array([v], dtype=np.uint64))
        assert got.tolist() == [(int(a) * v + int(b)) % MERSENNE for a, b in zip(d.a, d.b)]
    assert int(d.a.max()) > 2**60  # multipliers span the field, so a*x wraps around p many times


def test_word_hashes_split_utf8_at_every_character_str_isspace_accepts_and_nowhere_else():
    spaces = [chr(i) for i in range(sys.maxunicode + 1) if chr(i).isspace()]
    near_misses = ["\u0084", "\u00a1", "\u1681", "\u200b", "\u2027", "\u202a", "\u205e", "\u3001", "\u00c2", "\u00e3"]
    text = "".join(f"w{i}{sp}é{near_misses[i % len(near_misses)]}z" for i, sp in enumerate(spaces * 3))
    want = [zlib.crc32(w.encode("utf-8")) for w in text.split()]
    assert word_hashes(text.encode("utf-8")).tolist() == want
    assert len(want) == 3 * len(spaces) + 1


def test_a_batch_of_signatures_gets_exactly_the_answers_of_one_by_one_calls():
    """``near_duplicates`` registers rows without candidates at once: the answers (and what later batches see)
    must be those of sequential ``is_near_duplicate_signature`` calls, with near copies inside a batch, across
    batches, and of copies that were themselves dropped."""
    rng = np.random.default_rng(0)
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:12]
    docs = [f.read_text(encoding="utf-8") for f in files]
    variants = []
    for text in docs:
        words = text.split()
        for _ in range(int(rng.integers(0, 3))):  # near copies: one word changed, or a copy of a copy
            w = list(words)
            w[int(rng.integers(len(w)))] = "changed"
            variants.append(" ".join(w))
    texts = docs + variants
    texts = [texts[i] for i in rng.permutation(len(texts))]
    one = MinHashDeduper()
    sigs = np.stack([one.signature(t) for t in texts])
    want = [one.is_near_duplicate_signature(s) for s in sigs]
    assert 0 < sum(want) < len(want)
    batched = MinHashDeduper()
    got = []
    for start, stop in ((0, 1), (1, 9), (9, len(sigs) // 2), (len(sigs) // 2, len(sigs))):
        got += batched.near_duplicates(sigs[start:stop]).tolist()
    assert got == want
    assert batched.near_duplicates(sigs[:5]).all()  # all remembered (or near what was)
