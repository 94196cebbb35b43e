"""Counterfactual data augmentation (CDA): swap the words of an attribute (gender by default) for their
counterparts, so a model sees "she is a doctor" as often as "he is a doctor" (Lu et al. 2018).

Pairs: a two-column file, ``WORD<TAB>COUNTERPART`` (any whitespace between the two), ``#`` comments; the
shipped ``cda/gender_pairs.tsv`` (sources in its header and docs/bias.md) and, with ``names``,
``cda/name_pairs.tsv``. A word has one partner, except the pronouns whose partner depends on their role:
``her`` → ``his`` | ``him`` and ``his`` → ``her`` | ``hers`` (``AMBIGUOUS``). The rule that picks: look at
the next word after the pronoun (only spaces between; punctuation or the end of the text means "none"):

- a following word (after spaces and perhaps an opening quote) that is not a function word
  (``FUNCTION_WORDS``: determiners, pronouns, prepositions, conjunctions, auxiliaries, "to", "not", a few
  adverbs such as "back") and is not an "-ly" adverb (``LY_NOT_ADVERBS`` lists the -ly nouns and adjectives:
  family, elderly, only, ...) is taken for the noun or adjective the pronoun modifies: the possessive
  determiner (her book → his book, his old car → her old car, her only son → his only son);
- anything else is an object or an independent possessive (saw her. → saw him.; gave her the → gave him the;
  the book is his. → the book is hers.).

It is a rule, not a parser: "I saw her run" becomes "I saw his run" (a verb after an object pronoun reads as
a noun). Swaps are whole words, case-insensitive, and keep the case of the word they replace (he → she,
He → She, HE → SHE); a word in another mix of cases (hE) is left alone. Names swap only when capitalized.

Modes: ``two-sided`` keeps each document and adds its counterfactual copy (when a word was swapped);
``substitute`` replaces the document by its counterfactual. Either applies to a document with probability
``p`` (default 1 for two-sided, 0.5 for substitute), decided by a hash of (seed, document text): the same
documents are chosen on every run, by any number of workers.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from importlib import resources
from pathlib import Path

from fmforge.errors import FmforgeError, clip
from fmforge.io.fs import sha256_file

BUILTIN = "builtin:gender"
MODES = ("two-sided", "substitute")
DEFAULT_P = {"two-sided": 1.0, "substitute": 0.5}
MAX_PAIRS_FILE_BYTES = 4 << 20
# The pronouns whose counterpart depends on their role: (possessive determiner, object / independent form).
AMBIGUOUS = {"her": ("his", "him"), "his": ("her", "hers")}
FUNCTION_WORDS = frozenset("""
a an the this that these those my your his her its our their me him us them you it i we they he she
mine yours hers ours theirs myself yourself himself herself itself ourselves themselves some any no
every each all both either neither another such what which who whom whose
to of in on at by for with from into onto upon about above below over under after before since until
during through across against among between around behind beside beyond near off out up down than as
like unlike via per and or but nor so yet if because while although though when where whether then
is am are was were be been being has have had do does did will would shall should can could may might
must not never also too again there here now just even still already back away alone together instead
""".split())
# Words ending in -ly that are nouns or adjectives (her family, his elderly aunt, her only son): not adverbs.
LY_NOT_ADVERBS = frozenset("""
family families elderly early lovely lonely friendly ugly silly holy jolly daily weekly monthly yearly curly
only deadly lively costly homely orderly wily belly bully ally rally lily jelly manly womanly motherly
fatherly brotherly sisterly saintly worldly heavenly ghastly beastly stately unlikely likely
""".split())
_WORD_CHAR = r"[^\W\d_]"
# The next word after a pronoun: only spaces between, and perhaps an opening quote.
_NEXT_WORD = re.compile(rf"[ \t]+[\"'\u201c\u2018]?({_WORD_CHAR}+)")


def _pair_lines(raw: bytes, where: str) -> list[tuple[int, str, str]]:
    """The (line number, word, counterpart) pairs of a pair file's bytes; a bad line is a one-line error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FmforgeError(f"pair file {where} is not UTF-8 text") from None
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise FmforgeError(f"pair file {where} line {n}: expected two words (WORD<TAB>COUNTERPART), got "
                               f"{len(fields)}: {clip(line.strip(), 60)}")
        a, b = (f.lower() for f in fields)
        for w in (a, b):
            if not re.fullmatch(rf"{_WORD_CHAR}+", w):
                raise FmforgeError(f"pair file {where} line {n}: {clip(w, 40)} is not a word (letters only)")
        if a == b:
            raise FmforgeError(f"pair file {where} line {n}: {a!r} is paired with itself")
        pairs.append((n, a, b))
    return pairs


def parse_pairs(raw: bytes, where: str) -> dict[str, str | tuple[str, str]]:
    """word → counterpart (both directions) from a pair file's bytes. A word with two different partners is
    an error naming both lines, unless it is one of the ``AMBIGUOUS`` pronouns with exactly its two partners
    (then it maps to the (possessive, object) tuple). An empty list is an error."""
    partners: dict[str, dict[str, int]] = {}
    for n, a, b in _pair_lines(raw, where):
        for w, other in ((a, b), (b, a)):
            partners.setdefault(w, {}).setdefault(other, n)
    if not partners:
        raise FmforgeError(f"pair file {where} holds no pairs (lines of WORD<TAB>COUNTERPART)")
    table: dict[str, str | tuple[str, str]] = {}
    for w, found in partners.items():
        if len(found) == 1:
            table[w] = next(iter(found))
        elif w in AMBIGUOUS and set(found) == set(AMBIGUOUS[w]):
            table[w] = AMBIGUOUS[w]
        else:
            (x, nx), (y, ny) = sorted(found.items(), key=lambda kv: kv[1])[:2]
            raise FmforgeError(f"pair file {where} line {ny}: {w!r} is paired with {y!r} but line {nx} pairs it "
                               f"with {x!r}; a word has one counterpart"
                               + (f" (or exactly {' and '.join(AMBIGUOUS[w])})" if w in AMBIGUOUS else ""))
    return table


def _read_pairs_file(path: Path) -> bytes:
    if not path.is_file():
        raise FmforgeError(f"pair file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read(MAX_PAIRS_FILE_BYTES + 1)
    if len(raw) > MAX_PAIRS_FILE_BYTES:
        raise FmforgeError(f"pair file {path} is larger than {MAX_PAIRS_FILE_BYTES >> 20} MiB")
    return raw


def _builtin(name: str) -> bytes:
    return resources.files("fmforge.data").joinpath("cda", name).read_bytes()


def augment_settings(augment: str | None, mode: str = "two-sided", p: float | None = None, seed: int = 0,
                     names: bool = False) -> dict | None:
    """The checked, JSON-able settings of ``--augment cda[=PAIRS_FILE]`` (None without ``augment``); they
    travel in a sharded preparation's plan. A user's pair file is named by absolute path and sha256."""
    if augment is None:
        if mode != "two-sided" or p is not None or seed != 0 or names:
            raise FmforgeError("--augment-mode, --augment-p, --augment-seed and --augment-names need --augment cda")
        return None
    method, sep, pairs = augment.partition("=")
    if method != "cda":
        raise FmforgeError(f"unknown --augment {clip(augment)}: expected cda or cda=PAIRS_FILE")
    if sep and not pairs:
        raise FmforgeError("--augment cda= names no pair file: give cda=PAIRS_FILE or plain cda")
    if mode not in MODES:
        raise FmforgeError(f"unknown --augment-mode {clip(mode)}; choose {' or '.join(MODES)}")
    p = DEFAULT_P[mode] if p is None else p
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
        raise FmforgeError(f"--augment-p must be above 0 and at most 1, got {clip(p)}")
    settings = {"method": "cda", "pairs": BUILTIN, "pairs_sha256": None, "names": bool(names), "mode": mode,
                "p": float(p), "seed": int(seed)}
    if pairs:
        path = Path(pairs).resolve()
        parse_pairs(_read_pairs_file(path), str(path))  # a bad file fails here, before any work
        settings.update(pairs=str(path), pairs_sha256=sha256_file(path))
    return settings


class Swapper:
    """Whole-word, case-keeping swaps from a pair table (``parse_pairs``); ``proper`` words swap only when
    capitalized."""

    def __init__(self, table: dict[str, str | tuple[str, str]], proper: frozenset[str] = frozenset()):
        self.table, self.proper = table, proper
        words = sorted(table, key=lambda w: (-len(w), w))
        self.pattern = re.compile(rf"(?<!{_WORD_CHAR})(?:{'|'.join(map(re.escape, words))})(?!{_WORD_CHAR})",
                                  re.IGNORECASE)

    def swap(self, text: str) -> tuple[str, Counter]:
        """``text`` with every pair word swapped, and the swaps counted by (lower-case) source word."""
        swapped: Counter = Counter()

        def one(m: re.Match) -> str:
            word = m.group()
            key = word.lower()
            if key in self.proper and not word[0].isupper():
                return word
            target = self.table.get(key)  # None: a case-folding match (the Kelvin sign for k) that lower() misses
            if target is None:
                return word
            if isinstance(target, tuple):
                target = target[0] if _modifies_next(m.string, m.end()) else target[1]
            out = _with_case(word, target)
            if out is not None:
                swapped[key] += 1
                return out
            return word

        return self.pattern.sub(one, text), swapped


def _modifies_next(text: str, end: int) -> bool:
    """The role rule for ``AMBIGUOUS`` pronouns: True (possessive determiner) when a content word follows."""
    m = _NEXT_WORD.match(text, end)
    if m is None:
        return False
    nxt = m.group(1).lower()
    return nxt not in FUNCTION_WORDS and (not nxt.endswith("ly") or nxt in LY_NOT_ADVERBS)


def _with_case(word: str, target: str) -> str | None:
    if word.islower():
        return target
    if word.isupper() and len(word) > 1:
        return target.upper()
    if word[0].isupper() and (len(word) == 1 or word[1:].islower()):
        return target[:1].upper() + target[1:]
    return None


def load_swapper(settings: dict) -> Swapper:
    """The swapper ``augment_settings`` describes; a user's pair file must still have its recorded sha256."""
    if settings["pairs"] == BUILTIN:
        table = parse_pairs(_builtin("gender_pairs.tsv"), BUILTIN)
    else:
        path = Path(settings["pairs"])
        raw = _read_pairs_file(path)
        if hashlib.sha256(raw).hexdigest() != settings["pairs_sha256"]:
            raise FmforgeError(f"pair file {path} changed since this preparation started; rerun with --overwrite")
        table = parse_pairs(raw, str(path))
    proper: frozenset[str] = frozenset()
    if settings["names"]:
        names = parse_pairs(_builtin("name_pairs.tsv"), "builtin:names")
        clash = sorted(set(names) & set(table))
        if clash:
            raise FmforgeError(f"--augment-names: {', '.join(clash[:5])} is both a name and a word of the pair file")
        table = {**table, **names}
        proper = frozenset(names)
    return Swapper(table, proper)


def chosen(seed: int, key: bytes, p: float) -> bool:
    """Whether the item with ``key`` is augmented: a uniform draw from a hash of (seed, key), below ``p``."""
    if p >= 1.0:
        return True
    digest = hashlib.blake2b(str(seed).encode() + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < p


class Augmenter:
    """Applies ``augment_settings`` to documents and counts what it did (summable across work units)."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.swapper = load_swapper(settings)
        self.counts: Counter = Counter()
        self.words: Counter = Counter()

    def expand(self, text: str) -> list[tuple[str, bool]]:
        """The documents ``text`` becomes, each with whether it is an added counterfactual copy: ``[(text,
        False)]`` unchanged, ``[(text, False), (copy, True)]`` two-sided, ``[(counterfactual, False)]``
        substituted."""
        s = self.settings
        self.counts["documents_seen"] += 1
        if not chosen(s["seed"], text.encode("utf-8"), s["p"]):
            return [(text, False)]
        new, swapped = self.swapper.swap(text)
        if not swapped:
            self.counts["documents_without_pair_words"] += 1
            return [(text, False)]
        self.counts["documents_augmented"] += 1
        self.counts["words_swapped"] += swapped.total()
        self.words.update(swapped)
        return [(text, False), (new, True)] if s["mode"] == "two-sided" else [(new, False)]

    def stats(self) -> dict:
        return {"counts": dict(self.counts), "words": dict(self.words)}


def make_augmenter(augment: str | None, mode: str = "two-sided", p: float | None = None, seed: int = 0,
                   names: bool = False) -> Augmenter | None:
    """The ``Augmenter`` of ``augment_settings(...)``, or None without ``augment``."""
    settings = augment_settings(augment, mode, p, seed, names)
    return Augmenter(settings) if settings else None


def augment_manifest(settings: dict, stats: list[dict]) -> dict:
    """The manifest's ``augment`` entry: the settings and the counts summed over ``stats`` (``Augmenter.stats``
    of one run or of every work unit)."""
    counts = sum((Counter(st["counts"]) for st in stats), Counter())
    words = sum((Counter(st["words"]) for st in stats), Counter())
    out = {k: v for k, v in settings.items() if k != "pairs_sha256" or v is not None}
    out.update({k: counts[k] for k in ("documents_seen", "documents_augmented", "documents_without_pair_words",
                                       "words_swapped")})
    out["top_swapped"] = dict(sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:20])
    return out


def describe(entry: dict) -> str:
    """One line for the preparation summary."""
    return (f"counterfactual augmentation ({entry['mode']}, p={entry['p']:g}): {entry['documents_augmented']} of "
            f"{entry['documents_seen']} documents, {entry['words_swapped']} words swapped")
