"""SageMaker Clarify's bias metrics as plain numpy functions.

Notation (Clarify's): facet ``d`` is the sensitive group the user names (``facet`` is True), facet ``a`` is the
rest. ``n_a``/``n_d`` are group sizes, ``n_a^(1)`` observed positives, ``n̂_a^(1)`` predicted positives; TP, FP,
TN, FN are confusion counts inside one group.

Conventions, as Clarify's reference implementation (``smclarify``) applies them:

- a ratio with a zero denominator is +inf or -inf by the sign of the numerator, and 0 when both are zero;
- a difference of two equal infinities is 0 (both groups undefined the same way: no disparity);
- the distribution metrics (KL, JS, LP, TVD, KS) take each group's label distribution (normalised over that
  group), then keep only the label values that have non-zero probability in *both* groups; the kept
  probabilities are not renormalised;
- KS is the largest absolute difference of label probabilities (the L-infinity norm), not of CDFs;
- natural logarithms;
- on a table, labels are first collapsed to "positive or not", so the distribution metrics compare the two
  groups' binary label distributions (Clarify's report passes the positive-label index as the label).
"""

from collections.abc import Sequence

import numpy as np

INF = float("inf")


def divide(num: float, den: float) -> float:
    """``num / den`` with Clarify's convention: 0/0 = 0, x/0 = ±inf by the sign of x."""
    if den == 0:
        if num == 0:
            return 0.0
        return -INF if num < 0 else INF
    return float(num) / float(den)


def difference(x: float, y: float) -> float:
    """``x - y``, except that a difference of two equal infinities is 0 rather than NaN."""
    if np.isinf(x) and x == y:
        return 0.0
    return float(x - y)


def _bool(values) -> np.ndarray:
    return np.asarray(values, dtype=bool)


def _groups(facet) -> tuple[np.ndarray, np.ndarray]:
    d = _bool(facet)
    if not d.any():
        raise ValueError("facet d is empty")
    if d.all():
        raise ValueError("facet a (the rest) is empty")
    return ~d, d


def _confusion(mask: np.ndarray, label: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, TN, FN) inside the rows of ``mask``."""
    y, p = label[mask], pred[mask]
    return int((y & p).sum()), int((~y & p).sum()), int((~y & ~p).sum()), int((y & ~p).sum())


# ---------------------------------------------------------------- pre-training (labels only)

def ci(facet) -> float:
    """Class imbalance. ``CI = (n_a - n_d) / (n_a + n_d)``; range [-1, 1], ideal 0 (> 0: d under-represented)."""
    a, d = _groups(facet)
    return (int(a.sum()) - int(d.sum())) / a.size


def dpl(facet, label) -> float:
    """Difference in proportions of labels. ``DPL = q_a - q_d``, ``q_x = n_x^(1) / n_x``; range [-1, 1], ideal 0."""
    a, d = _groups(facet)
    y = _bool(label)
    return float(y[a].mean() - y[d].mean())


def aligned_distributions(facet, labels) -> tuple[np.ndarray, np.ndarray]:
    """Label distributions ``(P_a, P_d)`` over the label values present in both groups (see module doc)."""
    a, d = _groups(facet)
    values = np.asarray(labels)
    keys_a, counts_a = np.unique(values[a], return_counts=True)
    keys_d, counts_d = np.unique(values[d], return_counts=True)
    prob_a = dict(zip(keys_a.tolist(), (counts_a / counts_a.sum()).tolist()))
    prob_d = dict(zip(keys_d.tolist(), (counts_d / counts_d.sum()).tolist()))
    common = sorted(set(prob_a) & set(prob_d))
    if not common:
        raise ValueError("no label value occurs in both groups")
    return np.array([prob_a[k] for k in common]), np.array([prob_d[k] for k in common])


def kl(facet, labels) -> float:
    """Kullback-Leibler divergence. ``KL = Σ_y P_a(y) ln(P_a(y) / P_d(y))``; range [0, inf), ideal 0."""
    pa, pd = aligned_distributions(facet, labels)
    return float(np.sum(pa * np.log(pa / pd)))


def js(facet, labels) -> float:
    """Jensen-Shannon divergence. ``JS = ½[KL(P_a, P) + KL(P_d, P)]``, ``P = ½(P_a + P_d)``; range [0, ln 2], ideal 0."""
    pa, pd = aligned_distributions(facet, labels)
    p = 0.5 * (pa + pd)
    return float(0.5 * (np.sum(pa * np.log(pa / p)) + np.sum(pd * np.log(pd / p))))


def lp(facet, labels, p: float = 2) -> float:
    """Lp-norm of the label-distribution difference. ``LP = (Σ_y |P_a(y) - P_d(y)|^p)^(1/p)``, p = 2;
    range [0, √2], ideal 0."""
    pa, pd = aligned_distributions(facet, labels)
    return float(np.linalg.norm(pa - pd, p))


def tvd(facet, labels) -> float:
    """Total variation distance. ``TVD = ½ Σ_y |P_a(y) - P_d(y)|``; range [0, 1], ideal 0."""
    pa, pd = aligned_distributions(facet, labels)
    return float(0.5 * np.sum(np.abs(pa - pd)))


def ks(facet, labels) -> float:
    """Kolmogorov-Smirnov distance, Clarify style. ``KS = max_y |P_a(y) - P_d(y)|`` over label probabilities
    (not CDFs); range [0, 1], ideal 0."""
    pa, pd = aligned_distributions(facet, labels)
    return float(np.max(np.abs(pa - pd)))


def cddl(facet, label, group) -> float:
    """Conditional demographic disparity in labels.

    ``DD_i = n_d^(0)_i / n^(0)_i - n_d^(1)_i / n^(1)_i`` within group-by value i (share of the rejected that
    are in d minus share of the accepted that are in d; a share with an empty denominator counts 0);
    ``CDDL = Σ_i n_i DD_i / n``. Range [-1, 1], ideal 0 (> 0: d over-represented among rejections).
    """
    d = _bool(facet)
    y = _bool(label)
    groups = np.asarray(group)
    if groups.size == 0:
        raise ValueError("group-by column is empty")
    if not y.any():
        raise ValueError("no positive labels")
    if y.all():
        raise ValueError("no negative labels")
    total = 0.0
    for value in np.unique(groups):
        g = groups == value
        accepted, rejected = int((g & y).sum()), int((g & ~y).sum())
        share_accepted = (g & y & d).sum() / accepted if accepted else 0.0
        share_rejected = (g & ~y & d).sum() / rejected if rejected else 0.0
        total += int(g.sum()) * (share_rejected - share_accepted)
    return divide(total, groups.size)


# ---------------------------------------------------------------- post-training (labels + predictions)

def dppl(facet, pred) -> float:
    """Difference in positive proportions in predicted labels. ``DPPL = q̂_a - q̂_d``, ``q̂_x = n̂_x^(1) / n_x``;
    range [-1, 1], ideal 0."""
    return dpl(facet, pred)


def di(facet, pred) -> float:
    """Disparate impact. ``DI = q̂_d / q̂_a``; range [0, inf), ideal 1 (the four-fifths rule flags < 0.8)."""
    a, d = _groups(facet)
    p = _bool(pred)
    return divide(float(p[d].mean()), float(p[a].mean()))


def dcacc(facet, label, pred) -> float:
    """Difference in conditional acceptance. ``c_x = n_x^(1) / n̂_x^(1)``; ``DCAcc = c_a - c_d``;
    range (-inf, inf), ideal 0 (> 0: d accepted more than its labels warrant)."""
    a, d = _groups(facet)
    y, p = _bool(label), _bool(pred)
    ca = divide(int(y[a].sum()), int(p[a].sum()))
    cd = divide(int(y[d].sum()), int(p[d].sum()))
    return difference(ca, cd)


def dcr(facet, label, pred) -> float:
    """Difference in conditional rejection. ``r_x = n_x^(0) / n̂_x^(0)``; ``DCR = r_d - r_a``;
    range (-inf, inf), ideal 0 (> 0: d rejected less than its labels warrant)."""
    a, d = _groups(facet)
    y, p = _bool(label), _bool(pred)
    ra = divide(int((~y[a]).sum()), int((~p[a]).sum()))
    rd_ = divide(int((~y[d]).sum()), int((~p[d]).sum()))
    return difference(rd_, ra)


def rd(facet, label, pred) -> float:
    """Recall difference. ``recall_x = TP_x / (TP_x + FN_x)``; ``RD = recall_a - recall_d``; range [-1, 1], ideal 0."""
    a, d = _groups(facet)
    y, p = _bool(label), _bool(pred)
    tpa, _, _, fna = _confusion(a, y, p)
    tpd, _, _, fnd = _confusion(d, y, p)
    return difference(divide(tpa, tpa + fna), divide(tpd, tpd + fnd))


def sd(facet, label, pred) -> float:
    """Specificity difference. ``spec_x = TN_x / (TN_x + FP_x)``; ``SD = spec_d - spec_a``; range [-1, 1], ideal 0."""
    a, d = _groups(facet)
    y, p = _bool(label), _bool(pred)
    _, fpa, tna, _ = _confusion(a, y, p)
    _, fpd, tnd, _ = _confusion(d, y, p)
    return difference(divide(tnd, tnd + fpd), divide(tna, tna + fpa))


def dar(facet, label, pred) -> float:
    """Difference in acceptance rates (precision). ``DAR = TP_a / (TP_a + FP_a) - TP_d / (TP_d + FP_d)``;
    range [-1, 1], ideal 0."""
    a, d = _groups(facet)
    y, p = _bool(label), _bool(pred)
    tpa, fpa, _, _ = _confusion(a, y, p)
    tpd, fpd, _, _ = _confusion(d, y, p)
    return difference(divide(tpa, tpa + fpa), divide(tpd, tpd + fpd))


def drr(facet, label, pred) -> float:
    """Difference in rejection rates. ``DRR = TN_d / (TN_d + FN_d) - TN_a / (TN_a + FN_a)``; range [-1, 1], ideal 0."""
    a, d = _groups(facet)
    y, p = _bool(label), _bool(pred)
    _, _, tna, fna = _confusion(a, y, p)
    _, _, tnd, fnd = _confusion(d, y, p)
    return difference(divide(tnd, tnd + fnd), divide(tna, tna + fna))


def ad(facet, label, pred) -> float:
    """Accuracy difference. ``ACC_x = (TP_x + TN_x) / n_x``; ``AD = ACC_a - ACC_d``; range [-1, 1], ideal 0."""
    a, d = _groups(facet)
    y, p = _bool(label), _bool(pred)
    acc_a = divide(int((y[a] == p[a]).sum()), int(a.sum()))
    acc_d = divide(int((y[d] == p[d]).sum()), int(d.sum()))
    return difference(acc_a, acc_d)


def te(facet, label, pred) -> float:
    """Treatment equality. ``TE = FN_d / FP_d - FN_a / FP_a``; range (-inf, inf), ideal 0."""
    a, d = _groups(facet)
    y, p = _bool(label), _bool(pred)
    _, fpa, _, fna = _confusion(a, y, p)
    _, fpd, _, fnd = _confusion(d, y, p)
    return difference(divide(fnd, fpd), divide(fna, fpa))


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, k: int) -> np.ndarray:
    """Majority vote of the ``k`` nearest (Euclidean) training rows, uniform weights; a tied vote goes to False."""
    out = np.empty(len(query_x), dtype=bool)
    train_y = _bool(train_y)
    for start in range(0, len(query_x), 256):
        block = query_x[start:start + 256]
        dist = ((block[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)
        nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
        votes = train_y[nearest].sum(1)
        out[start:start + len(block)] = votes * 2 > k
    return out


def ft(facet, pred, features) -> float:
    """Flip test (Clarify's k-NN approximation of Black et al.'s FlipTest).

    A k-NN classifier (k = 5, or 1 when facet a has 9 rows or fewer; Euclidean on the raw, unscaled numeric
    features) is fitted on facet a's rows and their *predicted* labels, then asked about each row of d.
    F+ counts d rows the model rejects while their a-neighbours are accepted, F- d rows the model accepts while
    their a-neighbours are rejected: ``FT = (F+ - F-) / n_d``; range [-1, 1], ideal 0 (> 0: flips go against d).
    This is the sign of Clarify's documentation; smclarify's code counts the flips the other way round.
    """
    a, d = _groups(facet)
    p = _bool(pred)
    x = np.asarray(features, dtype=float)
    if x.ndim != 2 or x.shape[0] != a.size or x.shape[1] == 0:
        raise ValueError("flip test needs a 2-D numeric feature matrix with one row per record")
    k = 5 if int(a.sum()) > 9 else 1
    neighbours = knn_predict(x[a], p[a], x[d], k)
    model = p[d]
    unfavourable_flips = int((~model & neighbours).sum())
    favourable_flips = int((model & ~neighbours).sum())
    return divide(unfavourable_flips - favourable_flips, int(d.sum()))


def ge(label, pred, alpha: float = 2.0) -> float:
    """Generalized entropy index over all rows (facet-free). ``b_i = ŷ_i - y_i + 1``,
    ``GE = Σ_i ((b_i / mean(b))^α - 1) / (n α (α - 1))``, α = 2 (half the squared coefficient of variation);
    range [0, 0.5] for α = 2, ideal 0."""
    if alpha in (0, 1):
        raise ValueError("GE is defined here for alpha other than 0 and 1")
    y, p = _bool(label).astype(int), _bool(pred).astype(int)
    if y.size == 0:
        raise ValueError("no rows")
    benefit = p - y + 1
    mean = benefit.mean()
    if mean == 0:
        raise ValueError("every prediction is a false negative")
    return float(((benefit / mean) ** alpha - 1).sum() / (y.size * alpha * (alpha - 1)))


PRETRAINING = ("CI", "DPL", "KL", "JS", "LP", "TVD", "KS", "CDDL")
POSTTRAINING = ("DPPL", "DI", "DCAcc", "DCR", "RD", "SD", "DAR", "DRR", "AD", "TE", "FT", "GE")


def _run(results: dict, errors: dict, name: str, fn, *args) -> None:
    try:
        results[name] = float(fn(*args))
    except ValueError as err:  # a metric undefined on this data is reported, not fatal
        results[name] = None
        errors[name] = str(err)


def pretraining_metrics(facet, label, group: Sequence | None = None) -> tuple[dict, dict]:
    """All pre-training metrics: ``({name: value or None}, {name: why it is None})``."""
    results: dict = {}
    errors: dict = {}
    _run(results, errors, "CI", ci, facet)
    _run(results, errors, "DPL", dpl, facet, label)
    for name, fn in (("KL", kl), ("JS", js), ("LP", lp), ("TVD", tvd), ("KS", ks)):
        _run(results, errors, name, fn, facet, label)
    if group is None:
        results["CDDL"] = None
        errors["CDDL"] = "needs a group-by column (--group)"
    else:
        _run(results, errors, "CDDL", cddl, facet, label, group)
    return results, errors


def posttraining_metrics(facet, label, pred, features=None) -> tuple[dict, dict]:
    """All post-training metrics on observed ``label`` and predicted ``pred`` (both booleans)."""
    results: dict = {}
    errors: dict = {}
    _run(results, errors, "DPPL", dppl, facet, pred)
    _run(results, errors, "DI", di, facet, pred)
    for name, fn in (("DCAcc", dcacc), ("DCR", dcr), ("RD", rd), ("SD", sd), ("DAR", dar), ("DRR", drr),
                     ("AD", ad), ("TE", te)):
        _run(results, errors, name, fn, facet, label, pred)
    if features is None:
        results["FT"] = None
        errors["FT"] = "needs numeric feature columns besides facet, label and prediction"
    else:
        _run(results, errors, "FT", ft, facet, pred, features)
    _run(results, errors, "GE", ge, label, pred)
    return results, errors
