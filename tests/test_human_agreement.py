"""Inter-rater agreement and Bradley–Terry, checked against published worked examples and independent code."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.metrics import cohen_kappa_score

from fmforge.eval.human.agreement import (
    bradley_terry,
    bt_mle_exists,
    category_counts,
    cohen_kappa,
    coincidences,
    fleiss_kappa,
    krippendorff_alpha,
)

N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units, values
# 1-5, missing data (unit 12 has a single value and is not pairable).
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
]
# Fleiss (1971), Table 1: 30 patients, each diagnosed by 6 psychiatrists into 5 categories (one row per
# patient, the six diagnoses given), as reproduced in R's irr::diagnoses.
FLEISS_1971 = [
    [4, 4, 4, 4, 4, 4], [2, 2, 2, 5, 5, 5], [2, 3, 3, 3, 3, 5], [5, 5, 5, 5, 5, 5], [2, 2, 2, 4, 4, 4],
    [1, 1, 3, 3, 3, 3], [3, 3, 3, 3, 5, 5], [1, 1, 3, 3, 3, 4], [1, 1, 4, 4, 4, 4], [5, 5, 5, 5, 5, 5],
    [1, 4, 4, 4, 4, 4], [1, 2, 4, 4, 4, 4], [2, 2, 2, 3, 3, 3], [1, 4, 4, 4, 4, 4], [2, 2, 4, 4, 4, 5],
    [3, 3, 3, 3, 3, 5], [1, 1, 1, 4, 5, 5], [1, 1, 1, 1, 1, 2], [2, 2, 4, 4, 4, 4], [1, 3, 3, 5, 5, 5],
    [5, 5, 5, 5, 5, 5], [2, 4, 4, 4, 4, 4], [2, 2, 4, 5, 5, 5], [1, 1, 4, 4, 4, 4], [1, 4, 4, 4, 4, 5],
    [2, 2, 2, 2, 2, 4], [1, 1, 1, 1, 5, 5], [2, 2, 4, 4, 4, 4], [1, 3, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5],
]
# R's irr::anxiety, raters 2 and 3 (20 subjects, scores 1-6).
ANXIETY_R2 = [3, 6, 4, 6, 2, 4, 2, 4, 3, 3, 2, 3, 3, 3, 2, 2, 1, 3, 3, 4]
ANXIETY_R3 = [2, 1, 4, 4, 3, 2, 1, 6, 1, 1, 1, 2, 3, 3, 1, 1, 3, 3, 2, 2]


def test_krippendorff_alpha_reproduces_the_2011_worked_example_at_every_level():
    values, o = coincidences(KRIPPENDORFF_2011)
    assert values == [1, 2, 3, 4, 5]
    # The paper's coincidence matrix marginals n_c and total n (unit 12 is not pairable).
    assert o.sum(axis=1).tolist() == pytest.approx([9, 13, 10, 5, 3])
    assert o.sum() == pytest.approx(40) and o[0, 0] == pytest.approx(7) and o[0, 1] == pytest.approx(4 / 3)
    assert krippendorff_alpha(KRIPPENDORFF_2011, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(KRIPPENDORFF_2011, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(KRIPPENDORFF_2011, "interval") == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha(KRIPPENDORFF_2011, "ratio") == pytest.approx(0.797, abs=5e-4)


def test_krippendorff_alpha_matches_the_three_coder_example_with_many_missing_values():
    # Krippendorff's three-coder, fifteen-unit example (Wikipedia "A computational example").
    data = [[N, N, N, N, N, 3, 4, 1, 2, 1, 1, 3, 3, N, 3],
            [1, N, 2, 1, 3, 3, 4, 3, N, N, N, N, N, N, N],
            [N, N, 2, 1, 3, 4, 4, N, 2, 1, 1, 3, 3, N, 4]]
    assert krippendorff_alpha(data, "nominal") == pytest.approx(0.691358, abs=1e-6)
    assert krippendorff_alpha(data, "interval") == pytest.approx(0.810845, abs=1e-6)


def test_krippendorff_alpha_is_one_for_perfect_agreement_and_nan_when_undefined():
    assert krippendorff_alpha([[1, 2, 3], [1, 2, 3]], "interval") == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]]))  # a single value: no expected disagreement
    assert math.isnan(krippendorff_alpha([[1, N], [N, 2]]))  # nothing pairable
    assert krippendorff_alpha([["up", "down"], ["up", "down"]], "nominal") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="level of measurement"):
        krippendorff_alpha([[1, 2], [2, 1]], "cardinal")


def test_fleiss_kappa_reproduces_fleiss_1971():
    counts = category_counts(FLEISS_1971)
    assert counts.sum(axis=0).tolist() == [26, 26, 30, 55, 43]  # as in Fleiss' Table 1
    assert fleiss_kappa(counts) == pytest.approx(0.4302445, abs=1e-7)


def test_fleiss_kappa_matches_the_fourteen_rater_textbook_table():
    # 10 subjects, 14 raters, 5 categories (the table most textbooks and Wikipedia use): kappa = 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=5e-5)


def test_fleiss_kappa_skips_units_with_a_single_rating_and_is_nan_without_any_pair():
    assert fleiss_kappa([[2, 0], [0, 2], [1, 0]]) == pytest.approx(fleiss_kappa([[2, 0], [0, 2]]))
    assert math.isnan(fleiss_kappa([[1, 0], [0, 1]]))


def test_cohen_kappa_matches_r_irr_and_scikit_learn():
    # irr::kappa2(anxiety[, 2:3]) unweighted, "equal" (linear) and "squared" (quadratic) weights.
    assert cohen_kappa(ANXIETY_R2, ANXIETY_R3) == pytest.approx(-0.006289308, abs=1e-8)
    assert cohen_kappa(ANXIETY_R2, ANXIETY_R3, "linear") == pytest.approx(0.1459075, abs=1e-7)
    assert cohen_kappa(ANXIETY_R2, ANXIETY_R3, "quadratic") == pytest.approx(0.2520325, abs=1e-7)
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 6, 200).tolist(), rng.integers(1, 6, 200).tolist()
    b = [x if rng.random() < 0.6 else y for x, y in zip(a, b)]
    for weights in (None, "linear", "quadratic"):
        assert cohen_kappa(a, b, weights) == pytest.approx(cohen_kappa_score(a, b, weights=weights), abs=1e-12)


def test_cohen_kappa_textbook_two_by_two_and_missing_pairs():
    # 50 proposals: both yes 20, yes/no 5, no/yes 10, both no 15 -> p_o = 0.7, p_e = 0.5, kappa = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a + [None], b + ["yes"]) == pytest.approx(0.4)  # a unit one rater skipped is dropped


def test_bradley_terry_matches_the_closed_form_for_two_models_and_the_likelihood_maximum():
    p = bradley_terry([[0, 3], [1, 0]])
    assert p.tolist() == pytest.approx([0.75, 0.25])
    wins = np.array([[0, 7, 4, 9], [3, 0, 6, 5], [5, 2, 0, 8], [1, 4, 3, 0]], dtype=float)
    p = bradley_terry(wins)
    assert p.sum() == pytest.approx(1.0)

    def nll(theta):  # log-strengths, the first pinned at 0
        t = np.concatenate([[0.0], theta])
        diff = t[:, None] - t[None, :]
        return -(wins * (diff - np.logaddexp(0, diff))).sum()

    theta = minimize(nll, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    mle = np.exp(np.concatenate([[0.0], theta]))
    assert p.tolist() == pytest.approx((mle / mle.sum()).tolist(), abs=1e-6)


def test_bradley_terry_existence_condition():
    assert bt_mle_exists([[0, 2, 1], [1, 0, 1], [1, 1, 0]])
    assert not bt_mle_exists([[0, 2, 1], [0, 0, 1], [0, 1, 0]])  # model 0 never lost
