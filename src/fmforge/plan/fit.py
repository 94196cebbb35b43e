"""Fit L(N, D) = E + A / N^alpha + B / D^beta to measured losses: Hoffmann et al. 2022 ("Chinchilla")
approach 3, appendix D.2, with bootstrap confidence intervals.

The fit works in log space with A = e^a, B = e^b, E = e^e:

    log L^(N, D) = LSE(a - alpha log N, b - beta log D, e)

and minimizes sum_i Huber_delta(log L^_i - log L_i) with delta = 1e-3, by L-BFGS-B with the analytic
gradient (the LSE's softmax weights). The Huber loss makes a few bad runs (a spike, a diverged rung) pull
the fit much less than squares would. N is non-embedding parameters, D training tokens, L the final
validation loss in nats per token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from fmforge.errors import FmforgeError

HUBER_DELTA = 1e-3
FORM = "E + A/N^alpha + B/D^beta"
PARAMS = ("E", "A", "B", "alpha", "beta")
# Chinchilla's initialization grid (appendix D.2): 5 x 5 x 5 x 6 x 6 = 4,500 (alpha, beta, e, a, b) points.
GRID_ALPHA = GRID_BETA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
# Bounds only keep L-BFGS away from overflow and sign flips; real fits sit well inside them.
_BOUNDS = [(-20.0, 80.0), (-20.0, 80.0), (-20.0, 10.0), (0.0, 5.0), (0.0, 5.0)]  # a, b, e, alpha, beta
_THETA_NAMES = ("A", "B", "E", "alpha", "beta")  # the constants behind (a, b, e, alpha, beta)
MIN_POINTS = 5


@dataclass
class FittedLaw:
    """A fitted L(N, D). ``ci`` maps E, A, B, alpha, beta and the compute-optimal exponents a = beta/(alpha+beta)
    (N_opt ~ C^a) and b = alpha/(alpha+beta) (D_opt ~ C^b) to [2.5%, 97.5%] bootstrap percentiles;
    ``samples`` holds the bootstrap fits (rows of E, A, B, alpha, beta) so predictions get intervals too."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    ci: dict = field(default_factory=dict)
    n_points: int = 0
    objective: float = float("nan")
    points: list = field(default_factory=list)
    samples: np.ndarray | None = None
    source: str = ""
    at_bound: list = field(default_factory=list)  # constants the fit pushed to the edge of their range
    non_monotone: list = field(default_factory=list)  # points whose loss rises with N or D (non_monotone())

    def loss(self, N, D):
        """Predicted loss; N and D broadcast like numpy arrays."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    @property
    def a(self) -> float:
        """Exponent of the compute-optimal model size, N_opt ~ C^a (Hoffmann et al. eq. 4)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of the compute-optimal data size, D_opt ~ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def loss_ci(self, N: float, D: float, level: float = 0.95) -> tuple[float, float] | None:
        """Bootstrap percentile interval of the predicted loss at (N, D); None without bootstrap fits."""
        if self.samples is None or len(self.samples) == 0:
            return None
        E, A, B, alpha, beta = self.samples.T
        preds = E + A / float(N) ** alpha + B / float(D) ** beta
        tail = 50.0 * (1.0 - level)
        lo, hi = np.nanpercentile(preds, [tail, 100.0 - tail])
        return float(lo), float(hi)

    def bound_notes(self) -> list[str]:
        """One phrase per constant at a bound: its value, which bound, and the bound."""
        notes = []
        for name in self.at_bound:
            lo, hi = _BOUNDS[_THETA_NAMES.index(name)]
            value = float(getattr(self, name))
            x = math.log(value) if name in ("A", "B", "E") and value > 0 else value
            edge, side = (lo, "lower") if abs(x - lo) <= abs(hi - x) else (hi, "upper")
            shown = f"e^{edge:g} = {math.exp(edge):.3g}" if name in ("A", "B", "E") else f"{edge:g}"
            notes.append(f"{name} = {value:.4g} at its {side} bound ({shown})")
        return notes

    def predict(self, N: float, D: float, allow_bounded: bool = False) -> float:
        """The loss at (N, D), refused (one-line FmforgeError) when a constant sits at a bound of the fit:
        those points did not determine the law, so an extrapolation from it means nothing."""
        if self.at_bound and not allow_bounded:
            raise FmforgeError(f"refusing to predict from this fit: {'; '.join(self.bound_notes())} - the points do "
                               "not determine the law; widen the ladder (more sizes and token budgets, further "
                               "apart) or pass --allow-bounded-fit")
        return float(self.loss(N, D))

    def to_json(self) -> dict:
        data = {"form": FORM, **{k: float(getattr(self, k)) for k in PARAMS},
                "a": self.a, "b": self.b,
                "n_definition": "non-embedding parameters", "d_definition": "training tokens",
                "ci": {k: [float(v) for v in self.ci[k]] for k in self.ci},
                "points": list(self.points), "n_points": self.n_points, "objective": float(self.objective),
                "at_bound": list(self.at_bound), "non_monotone": list(self.non_monotone), "source": self.source}
        if self.samples is not None:
            data["bootstrap"] = [[float(v) for v in row] for row in self.samples]
        return data

    @classmethod
    def from_json(cls, data: dict) -> FittedLaw:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        values = {k: float(data[k]) for k in PARAMS}
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError("non-finite constants")
        samples = np.asarray(data["bootstrap"], dtype=float).reshape(-1, 5) if data.get("bootstrap") else None
        return cls(**values, ci={k: list(v) for k, v in data.get("ci", {}).items()},
                   n_points=int(data.get("n_points", len(data.get("points", [])))),
                   objective=float(data.get("objective", float("nan"))), points=list(data.get("points", [])),
                   samples=samples, source=str(data.get("source", "")), at_bound=list(data.get("at_bound", [])),
                   non_monotone=list(data.get("non_monotone", [])))


def load_law(path) -> FittedLaw:
    """Read a law.json written by ``fmforge ladder``."""
    p = Path(path)
    if not p.is_file():
        raise FmforgeError(f"law file not found: {p}")
    try:
        data = json.loads(p.read_text())
        if data.get("form", FORM) != FORM:
            raise ValueError(f"unknown form {data['form']!r}")
        return FittedLaw.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        detail = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0][:80]
        raise FmforgeError(f"law file {p} is not a law.json from `fmforge ladder` ({FORM}): {detail}") from None


def save_law(law: FittedLaw, path, **extra) -> None:
    """Write ``law`` as JSON, with ``extra`` top-level keys (a ladder adds its target prediction)."""
    Path(path).write_text(json.dumps({**law.to_json(), **extra}, indent=1) + "\n")


def non_monotone(N, D, L, names=None) -> list[dict]:
    """Points whose loss is higher than their neighbour's with fewer parameters at the same D (``axis`` "N"),
    or with fewer tokens at the same N (``axis`` "D"): a larger model or a longer run should not do worse, so
    such a rung is noise, a divergence or a badly tuned size, and pulls the fit."""
    N, D, L = (np.asarray(x, dtype=float).ravel() for x in (N, D, L))
    names = [(names[i] if names is not None and names[i] else f"N={n:g},D={d:g}") for i, (n, d) in enumerate(zip(N, D))]
    flags = []
    for axis, key, other in (("N", N, D), ("D", D, N)):
        for value in np.unique(other):
            idx = sorted(np.flatnonzero(other == value), key=lambda i: key[i])
            for prev, cur in zip(idx, idx[1:]):
                if L[cur] > L[prev] and key[cur] > key[prev]:
                    flags.append({"name": names[cur], "axis": axis, "loss": float(L[cur]),
                                  "than": names[prev], "than_loss": float(L[prev])})
    return flags


def _objective_grid(theta: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    """Huber objective for many parameter vectors at once: theta (K, 5) as (a, b, e, alpha, beta) → (K,)."""
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    r = np.abs(pred - log_l)
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(axis=1)


def _objective(theta: np.ndarray, log_n, log_d, log_l, delta: float) -> tuple[float, np.ndarray]:
    """Huber objective and its gradient in (a, b, e, alpha, beta). Written out term by term: on a few dozen
    points numpy's per-call overhead is the whole cost, and L-BFGS calls this ~100 times per start."""
    a, b, e, alpha, beta = theta
    u0 = a - alpha * log_n
    u1 = b - beta * log_d
    m = np.maximum(np.maximum(u0, u1), e)
    w0, w1, w2 = np.exp(u0 - m), np.exp(u1 - m), np.exp(e - m)
    total = w0 + w1 + w2
    r = m + np.log(total) - log_l
    ar = np.abs(r)
    c = np.minimum(ar, delta)  # Huber = c (|r| - c/2): r^2/2 inside delta, delta (|r| - delta/2) outside
    g = np.copysign(c, r) / total  # dHuber/dr times the softmax denominator of dLSE/du
    g0, g1 = g * w0, g * w1
    grad = np.array([g0.sum(), g1.sum(), np.dot(g, w2), -np.dot(g0, log_n), -np.dot(g1, log_d)])
    return float(np.dot(c, ar - 0.5 * c)), grad


def _grid() -> np.ndarray:
    alpha, beta, e, a, b = np.meshgrid(GRID_ALPHA, GRID_BETA, GRID_E, GRID_AB, GRID_AB, indexing="ij")
    return np.stack([a.ravel(), b.ravel(), e.ravel(), alpha.ravel(), beta.ravel()], axis=1)


_GRID = _grid()


def _fit_logs(log_n, log_d, log_l, starts: int, delta: float, extra: np.ndarray | None = None):
    """Best (theta, objective) of L-BFGS-B runs from the ``starts`` best grid points (plus ``extra``)."""
    values = _objective_grid(_GRID, log_n, log_d, log_l, delta)
    inits = _GRID[np.argsort(values, kind="stable")[:starts]]
    if extra is not None:
        inits = np.vstack([extra[None, :], inits])
    # The objective is ~delta x residuals (tiny) and scipy's ftol is absolute below |f| = 1: the defaults stop
    # early (constants good to 1e-8 instead of 1e-12 on noiseless data).
    options = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000}
    best_theta, best_value = None, math.inf
    # L-BFGS-B's tiny 5-parameter updates go through scipy's BLAS: its thread pool only adds wake-up cost
    # (2 threads made a fit 8x slower than 1 on a 2-core VM; benchmarks/fit_speed.py).
    with threadpool_limits(1, user_api="blas"):
        for x0 in inits:
            res = minimize(_objective, x0, args=(log_n, log_d, log_l, delta), method="L-BFGS-B", jac=True,
                           bounds=_BOUNDS, options=options)
            if np.all(np.isfinite(res.x)) and res.fun < best_value:
                best_theta, best_value = res.x, float(res.fun)
    return best_theta, best_value


def _constants(theta: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.array([math.exp(e), math.exp(a), math.exp(b), alpha, beta])


def fit_law(N, D, L, *, starts: int = 32, bootstrap: int = 0, bootstrap_starts: int = 4, seed: int = 0,
            delta: float = HUBER_DELTA, points: list | None = None, source: str = "") -> FittedLaw:
    """Fit E + A/N^alpha + B/D^beta to losses ``L`` measured at (``N``, ``D``).

    All 4,500 points of Chinchilla's initialization grid are scored at once; L-BFGS-B then starts only
    from the ``starts`` best of them (default 32) and the lowest objective wins. Running all 4,500, as the
    paper did, found the same optimum to 1e-8 both on a synthetic 8 x 8 ladder and on a poorly determined
    3 x 3 one, at 100x the time (17 s and 86 s against 0.15 s and 0.8 s). ``bootstrap`` resamples the points
    with replacement (seeded) and refits each resample from the full-data optimum plus its
    ``bootstrap_starts`` best grid points (default 4: 4 and 8 gave the same intervals on the synthetic
    ladder; a resample takes 20-150 ms); ``ci`` then holds the 2.5 and 97.5 percentiles of each constant
    and of the compute-optimal exponents a and b."""
    N, D, L = (np.asarray(x, dtype=float).ravel() for x in (N, D, L))
    if not (len(N) == len(D) == len(L)):
        raise FmforgeError(f"N, D and loss need one value per point, got {len(N)}, {len(D)} and {len(L)}")
    if len(L) < MIN_POINTS:
        raise FmforgeError(f"fitting {FORM} needs at least {MIN_POINTS} finished runs, got {len(L)}")
    if not (np.all(N > 0) and np.all(D > 0) and np.all(L > 0) and np.all(np.isfinite(N * D * L))):
        raise FmforgeError("every N, D and loss must be a positive finite number")
    if np.unique(N).size < 2 or np.unique(D).size < 2:
        which = "model size N" if np.unique(N).size < 2 else "token count D"
        raise FmforgeError(f"every run has the same {which}: the fit needs at least two of each")
    log_n, log_d, log_l = np.log(N), np.log(D), np.log(L)
    theta, value = _fit_logs(log_n, log_d, log_l, starts, delta)
    if theta is None:
        raise FmforgeError("the scaling-law fit did not converge to finite constants")
    law = FittedLaw(*_constants(theta), n_points=len(L), objective=value, source=source,
                    points=list(points) if points is not None else
                    [{"N": float(n), "D": float(d), "loss": float(loss)} for n, d, loss in zip(N, D, L)])
    # A constant at a bound means the points do not determine it (say, E -> 0 when no run nears the floor).
    law.at_bound = [name for name, x, (lo, hi) in zip(_THETA_NAMES, theta, _BOUNDS)
                    if min(x - lo, hi - x) < 0.01]  # a tiny gradient leaves e a hair above its bound
    law.non_monotone = non_monotone(N, D, L, [p.get("name") for p in points] if points is not None else None)
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(L), len(L))
            t, _ = _fit_logs(log_n[idx], log_d[idx], log_l[idx], bootstrap_starts, delta, extra=theta)
            if t is not None:
                rows.append(_constants(t))
        law.samples = np.array(rows).reshape(-1, 5)
        cols = dict(zip(PARAMS, law.samples.T))
        total = cols["alpha"] + cols["beta"]
        with np.errstate(divide="ignore", invalid="ignore"):
            cols["a"], cols["b"] = cols["beta"] / total, cols["alpha"] / total
        law.ci = {k: [float(x) for x in np.nanpercentile(v, [2.5, 97.5])] for k, v in cols.items()}
    return law
