"""Inter-rater agreement (Cohen's κ, Fleiss' κ, Krippendorff's α) and Bradley–Terry strengths.

Small, dependency-free (numpy) implementations of the textbook formulas, each checked in the tests against
the published worked examples: Krippendorff (2011) "Computing Krippendorff's Alpha-Reliability", Fleiss
(1971) Table 1, and Cohen's κ against R's ``irr`` package. A coefficient that is undefined for the data
(no pairable values, a single category observed) is ``nan``, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.sparse.csgraph import connected_components

LEVELS = ("nominal", "ordinal", "interval", "ratio")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable], weights: str | None = None,
                categories: Sequence[Hashable] | None = None) -> float:
    """Cohen's κ between two raters' labels for the same units (``a[i]`` and ``b[i]`` rate unit i; a unit
    either rater left missing is dropped). ``weights`` None is the unweighted κ; "linear" or "quadratic"
    weigh a disagreement by the distance between the categories' positions in ``categories`` (default: the
    sorted categories observed, as R's ``irr::kappa2`` and scikit-learn do)."""
    if len(a) != len(b):
        raise ValueError("cohen_kappa needs two equally long rating lists")
    pairs = [(x, y) for x, y in zip(a, b) if not (_is_missing(x) or _is_missing(y))]
    if not pairs:
        return float("nan")
    cats = list(categories) if categories is not None else sorted({v for p in pairs for v in p})
    index = {c: i for i, c in enumerate(cats)}
    k = len(cats)
    observed = np.zeros((k, k))
    for x, y in pairs:
        observed[index[x], index[y]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    pos = np.arange(k, dtype=float)
    if weights is None:
        w = 1.0 - np.eye(k)
    elif weights == "linear":
        w = np.abs(pos[:, None] - pos[None, :])
    elif weights == "quadratic":
        w = (pos[:, None] - pos[None, :]) ** 2
    else:
        raise ValueError(f"unknown weights {weights!r}: None, 'linear' or 'quadratic'")
    disagreement_expected = float((w * expected).sum())
    if disagreement_expected == 0:
        return float("nan")
    return 1.0 - float((w * observed).sum()) / disagreement_expected


def fleiss_kappa(counts) -> float:
    """Fleiss' κ from a units × categories table of counts (``counts[i][j]``: raters who put unit i in
    category j). Units may have different numbers of raters; units with fewer than two are left out. With
    the same number of raters everywhere this is exactly Fleiss (1971)."""
    table = np.asarray(counts, dtype=float)
    if table.ndim != 2:
        raise ValueError("fleiss_kappa needs a units x categories table")
    n = table.sum(axis=1)
    table, n = table[n >= 2], n[n >= 2]
    if len(table) == 0:
        return float("nan")
    per_unit = ((table ** 2).sum(axis=1) - n) / (n * (n - 1))
    p_bar = float(per_unit.mean())
    p_j = table.sum(axis=0) / n.sum()
    p_e = float((p_j ** 2).sum())
    if p_e == 1.0:
        return float("nan")
    return (p_bar - p_e) / (1.0 - p_e)


def category_counts(units: Sequence[Sequence[Hashable]], categories: Sequence[Hashable] | None = None) -> np.ndarray:
    """The units × categories count table ``fleiss_kappa`` takes, from each unit's list of labels."""
    cats = list(categories) if categories is not None else sorted({v for u in units for v in u})
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(units), len(cats)))
    for i, unit in enumerate(units):
        for v in unit:
            table[i, index[v]] += 1
    return table


def coincidences(data) -> tuple[list, np.ndarray]:
    """(sorted values, Krippendorff's coincidence matrix ``o_ck``) from reliability data: rows are raters,
    columns units, None/nan where a rater did not rate a unit. Units with fewer than two values are not
    pairable and are left out."""
    columns = list(zip(*data)) if len(data) else []
    units = [[v for v in col if not _is_missing(v)] for col in columns]
    units = [u for u in units if len(u) >= 2]
    values = sorted({v for u in units for v in u})
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for u in units:
        counts = np.zeros(len(values))
        for v in u:
            counts[index[v]] += 1
        o += (np.outer(counts, counts) - np.diag(counts)) / (len(u) - 1)
    return values, o


def _distances(values: list, n_c: np.ndarray, level: str) -> np.ndarray:
    """Krippendorff's squared difference function δ²(c, k) for each pair of observed values."""
    k = len(values)
    if level == "nominal":
        return 1.0 - np.eye(k)
    if level == "ordinal":
        cum = np.concatenate([[0.0], np.cumsum(n_c)])
        lo, hi = np.minimum.outer(np.arange(k), np.arange(k)), np.maximum.outer(np.arange(k), np.arange(k))
        return (cum[hi + 1] - cum[lo] - (n_c[lo] + n_c[hi]) / 2) ** 2
    v = np.asarray(values, dtype=float)
    if level == "interval":
        return (v[:, None] - v[None, :]) ** 2
    if level == "ratio":
        total = v[:, None] + v[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            d = ((v[:, None] - v[None, :]) / total) ** 2
        return np.where(total == 0, 0.0, d)
    raise ValueError(f"unknown level of measurement {level!r}: one of {', '.join(LEVELS)}")


def krippendorff_alpha(data, level: str = "nominal") -> float:
    """Krippendorff's α for reliability data (rows: raters, columns: units, None/nan for missing) at the
    ``level`` of measurement: nominal, ordinal, interval or ratio. Any number of raters, missing values
    allowed. ``nan`` when fewer than two pairable values or only one value was ever given."""
    values, o = coincidences(data)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n < 2:
        return float("nan")
    delta = _distances(values, n_c, level)
    expected = float((np.outer(n_c, n_c) * delta).sum())
    if expected == 0:
        return float("nan")
    return 1.0 - (n - 1) * float((o * delta).sum()) / expected


def bradley_terry(wins, max_iter: int = 10_000, tol: float = 1e-10) -> np.ndarray:
    """Bradley–Terry strengths p (summing to 1; P(i beats j) = p_i / (p_i + p_j)) from a square matrix
    ``wins[i][j]`` = times i beat j (a tie counted as half a win each way), by Hunter's (2004) MM
    algorithm. The maximum-likelihood strengths exist only when every model has beaten, directly or
    through others, every model it lost to; otherwise the iteration drives some strengths towards 0."""
    w = np.asarray(wins, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError("bradley_terry needs a square wins matrix")
    m = w.shape[0]
    games = w + w.T
    total_wins = w.sum(axis=1)
    p = np.full(m, 1.0 / m)
    for _ in range(max_iter):
        with np.errstate(invalid="ignore", divide="ignore"):
            denom = np.where(games > 0, games / (p[:, None] + p[None, :]), 0.0).sum(axis=1)
            new = np.where(denom > 0, total_wins / denom, p)
        new /= new.sum()
        if np.max(np.abs(new - p)) < tol:
            return new
        p = new
    return p


def bt_mle_exists(wins) -> bool:
    """True when the maximum-likelihood Bradley–Terry strengths are finite and positive: the directed
    graph "i beat j at least once" is strongly connected (Zermelo's / Ford's condition)."""
    n_components, _ = connected_components(np.asarray(wins, dtype=float) > 0, directed=True, connection="strong")
    return n_components == 1
