"""Scores of a generated text against its references, and the standard errors of their means.

Pure functions, each the field's standard definition:

- ``exact_match`` / ``token_f1``: SQuAD's (the official evaluation script, also lm-evaluation-harness's
  ``exact_match`` with ignore_case + ignore_punctuation + articles ignored): lower-case, drop punctuation and
  the articles a/an/the, collapse whitespace; the best score over every acceptable reference (aliases).
- ``rouge``: ROUGE F-measures from Google's ``rouge-score`` package, best over the references, in [0, 1].
- ``sentence_bleu`` / ``corpus_bleu``: ``sacrebleu``'s BLEU, 0-100; ``bleu_t5`` is the per-reference BLEU
  lm-evaluation-harness's truthfulqa_gen takes the max of.
- ``number_match``: ASDiv-style answers ("9 apples", "0.46 dollars", "3:4", "11; 12; 13"): the numbers the
  prediction starts with equal the reference's.
- ``mean_stderr``: lm-evaluation-harness's standard error of a mean (sample standard deviation / sqrt n);
  ``bootstrap_stderr`` for a statistic that is not a mean of per-example scores (corpus BLEU).

rouge-score and sacrebleu are optional (``pip install 'fmforge[eval]'``): imported when first used.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

from fmforge.errors import FmforgeError

EVAL_EXTRA = "pip install 'fmforge[eval]'"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# A number as people write one: 1,200 / -3 / 0.46 / .5 / 3:30 / 5/2.
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[:/]\d+)*")


# ---------------------------------------------------------------------------------------------------- text


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _as_list(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference is needed")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _as_list(references)))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:  # SQuAD: two empty answers agree, one empty one scores 0
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD's token-overlap F1 between the normalized texts, the best over the references."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(ref).split()) for ref in _as_list(references))


def _numbers(text: str) -> list[float | str]:
    """The numbers in ``text`` in order: plain ones as floats (1,200 == 1200.0), ratios and times as text."""
    out: list[float | str] = []
    for match in _NUMBER.findall(text):
        token = match.replace(",", "")
        if ":" in token or "/" in token:
            out.append(token)
            continue
        try:
            out.append(float(token))
        except ValueError:  # "," alone after stripping: not a number
            continue
    return out


def answer_numbers(answer: str) -> list[float | str]:
    """The numbers an ASDiv answer consists of ("11; 12; 13" -> [11, 12, 13], "9 apples" -> [9]); an
    answer that does not start with a number ("Mrs. Hilt", "Yes") has none."""
    head = re.match(r"[\s\d.,:/;-]*", answer).group(0)
    return _numbers(head) if re.search(r"\d", head) else []


def number_match(prediction: str, answer: str) -> float:
    """1.0 when the first numbers of ``prediction`` are the numbers of ``answer`` (numerically: "9.0" is
    9); for a non-numeric answer, SQuAD exact match of the prediction's first line."""
    wanted = answer_numbers(answer)
    if not wanted:
        return exact_match(prediction.strip().split("\n")[0], answer)
    got = _numbers(prediction)[:len(wanted)]
    return float(len(got) == len(wanted) and all(
        (isinstance(g, float) and isinstance(w, float) and math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9))
        or g == w for g, w in zip(got, wanted)))


# ---------------------------------------------------------------------------------------------------- packages


@lru_cache(maxsize=8)
def _rouge_scorer(types: tuple[str, ...], use_stemmer: bool):
    try:
        from rouge_score import rouge_scorer  # optional: the [eval] extra
    except ImportError:
        raise FmforgeError(f"ROUGE needs the rouge-score package: {EVAL_EXTRA}") from None
    return rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)


def _sacrebleu():
    try:
        import sacrebleu  # optional: the [eval] extra
    except ImportError:
        raise FmforgeError(f"BLEU needs the sacrebleu package: {EVAL_EXTRA}") from None
    return sacrebleu


def rouge(prediction: str, references: str | Sequence[str], types: Sequence[str] = ("rougeL",),
          use_stemmer: bool = True) -> dict[str, float]:
    """ROUGE F-measure of each of ``types`` ("rouge1", "rouge2", "rougeL", "rougeLsum"), each the best over
    the references, in [0, 1]. Porter stemming on by default, as in the XSum/CNN papers."""
    scorer = _rouge_scorer(tuple(types), use_stemmer)
    scores = [scorer.score(ref, prediction) for ref in _as_list(references)]
    return {t: float(max(s[t].fmeasure for s in scores)) for t in types}


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (longest common subsequence, stemmed), the best over the references."""
    return rouge(prediction, references, ("rougeL",))["rougeL"]


def sentence_bleu(prediction: str, references: str | Sequence[str]) -> float:
    """sacrebleu's sentence BLEU (0-100, exponential smoothing) against all references at once."""
    return float(_sacrebleu().sentence_bleu(prediction, _as_list(references)).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100): the standard way to report BLEU over a test set. ``references[i]``
    are the acceptable texts of ``predictions[i]`` (their number may differ per example)."""
    if len(predictions) != len(references):
        raise ValueError("one list of references per prediction")
    if not predictions:
        return float("nan")
    refs = [_as_list(r) for r in references]
    width = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    return float(_sacrebleu().corpus_bleu(list(predictions), streams).score)


def bleu_t5(prediction: str, reference: str) -> float:
    """BLEU of one prediction against one reference as lm-evaluation-harness's truthfulqa_gen computes it
    (T5's settings: corpus BLEU of one pair, exponential smoothing without effective order, intl tokens)."""
    return float(_sacrebleu().corpus_bleu([prediction], [[reference]], smooth_method="exp", smooth_value=0.0,
                                          force=False, lowercase=False, tokenize="intl",
                                          use_effective_order=False).score)


# ---------------------------------------------------------------------------------------------------- errors


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if len(values) else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean, lm-evaluation-harness's: sample standard deviation (n - 1) / sqrt(n).
    None below two values, where it is undefined."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def bootstrap_stderr(statistic: Callable[[list], float], items: Sequence, iters: int = 200,
                     seed: int = 1234) -> float | None:
    """Bootstrap standard error of ``statistic(items)``: the standard deviation of the statistic over
    ``iters`` resamples (with replacement, seeded). None below two items."""
    items = list(items)
    if len(items) < 2 or iters < 2:
        return None
    rng = random.Random(seed)
    stats = [statistic(rng.choices(items, k=len(items))) for _ in range(iters)]
    mu = mean(stats)
    return math.sqrt(sum((s - mu) ** 2 for s in stats) / (iters - 1))
