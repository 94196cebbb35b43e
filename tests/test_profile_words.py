"""Word and word-pair counts of ``data profile`` (compiled scan, counted by hash, merged across chunks and
workers) against the plain definition: ``re.findall(r"\\w+", text.lower())`` and consecutive pairs within a
document, counted with ``collections.Counter``."""

import re
import sysconfig
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from fmforge.data import profile_text, profile_words
from fmforge.data.fastscan import count_words, word_table
from fmforge.data.profile_text import TextStats, analyze_chunk
from fmforge.data.profile_words import pair_key

STDLIB = Path(sysconfig.get_paths()["stdlib"])
UNICODE = ["Straße ΣΊΣΥΦΟΣ İstanbul naïve ﬁne ½ ２３ 🙂 x_y__z", "日本語のテキスト、漢字とかな。", "İİ ii", "",
           "tab\tand\nnewline\r\nrun-on_words don't"]


def reference(texts: list[str]) -> tuple[Counter, Counter]:
    words, pairs = Counter(), Counter()
    for text in texts:
        w = re.findall(r"\w+", text.lower())
        words.update(w)
        pairs.update(map(" ".join, zip(w, w[1:])))
    return words, pairs


def test_the_compiled_word_count_finds_exactly_what_re_finds_including_unicode():
    for text in UNICODE + ["\ud800 lone surrogate \udfff", (STDLIB / "textwrap.py").read_text(encoding="utf-8")]:
        low = text.lower()
        points = np.frombuffer(low.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        keys, counts, offsets, names, pairs = count_words(points, np.array([len(low)]))
        found = re.findall(r"\w+", low)
        words = [bytes(names[a:b]).decode("utf-8", "surrogatepass") for a, b in zip(offsets[:-1], offsets[1:])]
        assert words == list(dict.fromkeys(found)), repr(text)  # distinct, in order of first occurrence
        assert dict(zip(words, counts.tolist())) == Counter(found)
        assert len(pairs) == max(0, len(found) - 1)
        if text.isascii():  # ASCII text is scanned as its bytes, lowercased on the fly: the same words and keys
            as_bytes = count_words(np.frombuffer(text.encode("ascii"), dtype=np.uint8), np.array([len(text)]), True)
            assert all((x == y).all() for x, y in zip(as_bytes, (keys, counts, offsets, names, pairs)))


def test_word_pairs_stop_at_document_ends():
    text = "one two\nthree four five\nsix"
    points = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    keys, counts, offsets, names, pairs = count_words(points, np.array([7, 23, 27]))
    key = dict(zip([bytes(names[a:b]).decode() for a, b in zip(offsets[:-1], offsets[1:])], keys.tolist()))
    want = [("one", "two"), ("three", "four"), ("four", "five")]
    firsts, seconds = (np.array([key[w[i]] for w in want], dtype=np.uint64) for i in (0, 1))
    assert sorted(pairs.tolist()) == sorted(pair_key(firsts, seconds).tolist())


def test_counts_merged_across_chunks_equal_counter_counts_and_pairs_never_span_documents(monkeypatch):
    texts = UNICODE + [(STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "shlex.py", "csv.py")]
    monkeypatch.setattr(profile_words, "MAX_NGRAM_KEYS", 10**9)
    total = TextStats()
    for i in range(0, len(texts), 3):
        total.merge(analyze_chunk(texts[i:i + 3], None, near_duplicates=False))
    words, pairs = reference(texts)
    n = len(pairs)
    assert total.top_words(10**6) == sorted(words.items(), key=lambda r: (-r[1], r[0]))
    assert total.top_bigrams(10**6) == sorted(pairs.items(), key=lambda r: (-r[1], r[0]))
    assert n > 3000 and "run on_words" in pairs and "straße" in words


def test_a_table_past_its_bound_keeps_the_most_common_entries_with_their_exact_counts(monkeypatch):
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "shlex.py", "csv.py", "glob.py")]
    monkeypatch.setattr(profile_words, "MAX_NGRAM_KEYS", 2000)
    total = TextStats()
    for text in texts:
        total.merge(analyze_chunk([text], None, near_duplicates=False))
    words, pairs = reference(texts)
    assert len(pairs) > 2000 and len(total.bigrams.keys) <= 2000  # pruned
    for got, want in ((total.top_words(20), words), (total.top_bigrams(20), pairs)):
        ranked = sorted(want.items(), key=lambda r: (-r[1], r[0]))
        above_ties = [r for r in ranked if r[1] > ranked[20][1]]  # ties at the cut may be broken differently
        assert len(got) == 20 and got[:len(above_ties)] == above_ties and got[-1][1] == ranked[19][1]


def test_binary_lines_and_character_classes_of_ascii_and_unicode_documents_in_one_chunk():
    texts = ["plain\nnul\x01here\nok\n", "clean ascii text\n", "tab\tonly\n", "Привет\x7f\nmir\n"]
    stats = analyze_chunk(texts, None, near_duplicates=False)
    assert stats.binary_lines == 2 and stats.lines == 7
    want: Counter = Counter()
    for text in texts:
        for ch in text:
            cat = unicodedata.category(ch)
            want["space" if ch in "\t\n\r" else profile_text.CLASS_NAMES.get(cat[0], "other")] += 1
    assert stats.char_classes == want
    assert stats.scripts == Counter({"LATIN": sum(c.isascii() and c.isalpha() for t in texts for c in t),
                                     "CYRILLIC": 6})


def test_the_word_table_counts_exactly_as_a_counter_does_as_it_grows():
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    for distinct, n in ((5, 1000), (3000, 20000), (20000, 20000)):  # few repeated words .. nearly all distinct
        vocab = ["".join(rng.choice(letters, 8)) for _ in range(distinct)]
        found = [vocab[i] for i in rng.integers(0, distinct, n)]
        text = " ".join(found)
        keys, counts, offsets, names, pairs = count_words(np.frombuffer(text.encode(), dtype=np.uint8),
                                                          np.array([len(text)]))
        words = [bytes(names[a:b]).decode() for a, b in zip(offsets[:-1], offsets[1:])]
        want = Counter(found)
        assert words == list(want) and counts.tolist() == list(want.values())  # first-seen order
        assert len(set(keys.tolist())) == len(keys) and len(pairs) == n - 1


def test_lines_and_bad_lines_of_random_mixed_chunks_equal_a_line_by_line_count():
    rng = np.random.default_rng(1)
    alphabet = list("ab \n\n\t\x01\x7f") + ["\ufffd", "Ã©", "â€™", "é", "Ж", "\x85"]
    texts = ["".join(rng.choice(alphabet, rng.integers(0, 40))) for _ in range(300)]
    texts = [t for t in texts if t]
    stats = analyze_chunk(texts, None, near_duplicates=False)
    lines = [line for t in texts for line in (t[:-1] if t.endswith("\n") else t).split("\n")]
    assert stats.lines == len(lines)
    assert stats.binary_lines == sum(any(c in line for c in "\x01\x7f") for line in lines)
    garbled = [line for t in texts if not t.isascii()
               for line in (t[:-1] if t.endswith("\n") else t).split("\n")]
    assert stats.garbled_lines == sum(any(m in line for m in ("\ufffd", "Ã©", "â€™")) for line in garbled)
    assert sum(stats.char_classes.values()) == sum(map(len, texts))


def test_the_word_character_table_is_isalnum_or_underscore_for_every_code_point():
    want = np.fromiter((chr(i).isalnum() or chr(i) == "_" for i in range(0x110000)), dtype=np.bool_, count=0x110000)
    assert (word_table() == want).all()
