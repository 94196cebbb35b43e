"""Generation metrics and standard errors against values worked out by hand."""

import math

import pytest

from fmforge.eval.metrics import (
    answer_numbers,
    bleu_t5,
    bootstrap_stderr,
    corpus_bleu,
    exact_match,
    mean,
    mean_stderr,
    normalize_answer,
    number_match,
    rouge,
    rouge_l,
    sentence_bleu,
    token_f1,
)


def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The  Cat, sat on A mat!") == "cat sat on mat"
    assert normalize_answer("  An apple.\n") == "apple"
    assert normalize_answer("theory") == "theory"  # "the" only as a word


def test_exact_match_is_the_best_over_aliases():
    assert exact_match("the Cat.", ["a dog", "cat"]) == 1.0
    assert exact_match("cat", "dog") == 0.0
    assert exact_match("Barack Obama", ["Obama"]) == 0.0


def test_token_f1_hand_computed():
    # pred tokens [cat, sat, on, mat], ref [cat, on, mat]: 3 common, P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", "cat on the mat") == pytest.approx(6 / 7)
    # best over aliases: "Obama" gives P = 1/2, R = 1 -> 2/3; "Barack Obama" gives 1
    assert token_f1("Barack Obama", ["Obama", "Barack Obama"]) == 1.0
    assert token_f1("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalize to nothing: SQuAD counts agreement
    with pytest.raises(ValueError):
        token_f1("x", [])


def test_rouge_l_hand_computed_with_stemming():
    # LCS("the cat sat", "the cat sat down") = 3: P = 3/3, R = 3/4, F = 6/7
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert rouge_l("the cats sat", ["a dog", "the cat sat down"]) == pytest.approx(6 / 7)  # cats -> cat
    scores = rouge("a b c d", "a b x d", ("rouge1", "rouge2"))
    assert scores["rouge1"] == pytest.approx(3 / 4)  # 3 of 4 unigrams both ways
    assert scores["rouge2"] == pytest.approx(1 / 3)  # bigrams: only "a b" of 3 match
    assert rouge_l("", "a b") == 0.0


def test_bleu_is_100_for_an_exact_copy_and_falls_with_errors():
    ref = "the quick brown fox jumps over the lazy dog"
    assert sentence_bleu(ref, [ref]) == pytest.approx(100.0)
    assert corpus_bleu([ref, "hello there world"], [[ref], ["hello there world", "hi"]]) == pytest.approx(100.0)
    assert bleu_t5(ref, ref) == pytest.approx(100.0)
    worse = sentence_bleu("the quick brown cat jumps over a lazy dog", [ref])
    assert 0 < worse < 100
    assert sentence_bleu("completely unrelated words", [ref]) < 10
    assert math.isnan(corpus_bleu([], []))


def test_number_match_compares_the_answer_numbers():
    assert answer_numbers("11; 12; 13") == [11.0, 12.0, 13.0]
    assert answer_numbers("9 apples") == [9.0]
    assert answer_numbers("3:30 p.m.") == ["3:30"]
    assert answer_numbers("Mrs. Hilt") == []
    assert number_match(" The answer is 9 apples", "9 apples") == 1.0
    assert number_match("9.0", "9 apples") == 1.0
    assert number_match("1,200", "1200 dollars") == 1.0
    assert number_match("0.46", "0.46 dollars") == 1.0
    assert number_match("8", "9 apples") == 0.0
    assert number_match("11, 12 and 13", "11; 12; 13") == 1.0
    assert number_match("11 12", "11; 12; 13") == 0.0
    assert number_match("5/2", "5/2") == 1.0
    assert number_match("yes\nmore text", "Yes") == 1.0
    assert number_match("no", "Yes") == 0.0


def test_mean_stderr_is_lm_evals_sample_standard_error():
    # [1, 0, 1, 0]: sample variance 1/3, stderr sqrt(1/3) / 2
    assert mean_stderr([1, 0, 1, 0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert mean_stderr([1.0, 1.0, 1.0]) == 0.0
    assert mean_stderr([1.0]) is None
    assert math.isnan(mean([]))


def test_bootstrap_stderr_of_a_mean_matches_the_analytic_one_and_is_seeded():
    values = [0.0, 1.0] * 50  # stderr of the mean: ~0.5 / sqrt(100) = 0.05
    first = bootstrap_stderr(mean, values, iters=400, seed=7)
    assert first == pytest.approx(0.05, rel=0.2)
    assert bootstrap_stderr(mean, values, iters=400, seed=7) == first
    assert bootstrap_stderr(mean, [1.0]) is None
