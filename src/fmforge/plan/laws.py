"""Scaling laws: predicted loss L(N, D), the compute-optimal split of a FLOP budget C = 6 N D, the
data-constrained (repeated-epoch) correction and the inference-aware optimum.

The published laws disagree, and this module does not reconcile them:

- Kaplan et al. 2020, "Scaling Laws for Neural Language Models", eq. 4.1 with table 2's fit
  (alpha_N = 0.076, alpha_D = 0.103, N_c = 6.4e13, D_c = 1.8e13); N is non-embedding parameters.
  Its optimum under C = 6 N D is the minimum of that L(N, D). Kaplan's own compute-efficient frontier
  (fig. 14, N_opt = 1.3e9 C^0.73 with C in PF-days) comes from runs stopped well before convergence and is
  reported beside it as ``kaplan-frontier``.
- Hoffmann et al. 2022 ("Chinchilla"), approach 3: L = E + A/N^alpha + B/D^beta with E=1.69, A=406.4,
  B=410.7, alpha=0.34, beta=0.28 (N counts all parameters, Pearce & Song 2024). These constants imply ~50-120
  tokens per parameter at current budgets, not the ~20 of the paper's approaches 1 and 2.
- Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt": the same form refit to the paper's
  data, E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, which gives ~20 tokens per parameter.
- The 20-tokens-per-parameter rule (Hoffmann et al. 2022, table 3): D = 20 N. It predicts no loss; where a
  loss is needed it borrows the Besiroglu refit's.

All losses are in nats per token on the authors' data and tokenizers: they rank choices, they are not
the loss your data will give. ``fmforge ladder`` fits a law of the same form to your own data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.optimize import brentq, minimize_scalar

PF_DAY = 1e15 * 86400  # FLOPs in a petaflop/s-day (Kaplan et al.'s compute unit)

# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", eq. 5 fit: repeated tokens lose value
# with decay constant R*_D (in epochs beyond the first); parameters beyond the optimum for the unique data
# lose value with R*_N.
R_STAR_D = 15.387
R_STAR_N = 5.309


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n_definition: str = "total"  # which parameter count N means: "total" or "non_embedding"
    source: str = ""

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """Closed form of argmin L subject to 6 N D = C (Hoffmann et al. eq. 4):
        N = G (C/6)^(beta/(alpha+beta)), D = (C/6) / N, G = (alpha A / (beta B))^(1/(alpha+beta))."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * (flops / 6.0) ** (self.beta / (self.alpha + self.beta))
        return n, flops / (6.0 * n)


@dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020 eq. 4.1: L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D."""

    name: str = "kaplan"
    alpha_n: float = 0.076
    alpha_d: float = 0.103
    n_c: float = 6.4e13
    d_c: float = 1.8e13
    n_definition: str = "non_embedding"
    source: str = "Kaplan et al. 2020, eq. 4.1, table 2"

    def loss(self, n: float, d: float) -> float:
        return ((self.n_c / n) ** (self.alpha_n / self.alpha_d) + self.d_c / d) ** self.alpha_d

    def optimum(self, flops: float) -> tuple[float, float]:
        """L is increasing in (N_c/N)^p + D_c/D with p = alpha_N/alpha_D; with D = C/(6N) its minimum is at
        N^(p+1) = p N_c^p C / (6 D_c)."""
        p = self.alpha_n / self.alpha_d
        n = (p * self.n_c ** p * flops / (6.0 * self.d_c)) ** (1.0 / (p + 1.0))
        return n, flops / (6.0 * n)


@dataclass(frozen=True)
class KaplanFrontier:
    """Kaplan et al. 2020 fig. 14 / table 6: N_opt = 1.3e9 C_min^0.73, D_opt = 2e10 C_min^0.27 (C_min in
    PF-days). Fitted to runs stopped early at the compute-efficient point, not trained to convergence: the
    allocation most 2020-2021 models followed. Loss from Kaplan's L(N, D)."""

    name: str = "kaplan-frontier"
    n_definition: str = "non_embedding"
    source: str = "Kaplan et al. 2020, fig. 14 (not a minimum of L: early-stopped runs)"
    loss_law: KaplanLaw = KaplanLaw()

    def loss(self, n: float, d: float) -> float:
        return self.loss_law.loss(n, d)

    def optimum(self, flops: float) -> tuple[float, float]:
        n = 1.3e9 * (flops / PF_DAY) ** 0.73
        return n, flops / (6.0 * n)


@dataclass(frozen=True)
class TokensPerParameter:
    """D = ratio x N (Hoffmann et al. 2022's rule of thumb, ~20). C = 6 N D = 6 ratio N^2."""

    name: str = "20-tokens"
    ratio: float = 20.0
    n_definition: str = "total"
    source: str = "Hoffmann et al. 2022, table 3 (~20 tokens/parameter); loss from the Besiroglu refit"
    loss_law: ChinchillaLaw | None = None

    def loss(self, n: float, d: float) -> float:
        return (self.loss_law or BESIROGLU).loss(n, d)

    def optimum(self, flops: float) -> tuple[float, float]:
        n = math.sqrt(flops / (6.0 * self.ratio))
        return n, self.ratio * n


CHINCHILLA = ChinchillaLaw("chinchilla", 1.69, 406.4, 410.7, 0.34, 0.28,
                           source="Hoffmann et al. 2022, approach 3")
BESIROGLU = ChinchillaLaw("besiroglu", 1.8172, 482.01, 2085.43, 0.3478, 0.3658,
                          source="Besiroglu et al. 2024 refit of Hoffmann et al.'s data")
KAPLAN = KaplanLaw()
LAWS = {law.name: law for law in (KAPLAN, KaplanFrontier(), CHINCHILLA, BESIROGLU, TokensPerParameter())}
Law = ChinchillaLaw | KaplanLaw | KaplanFrontier | TokensPerParameter


def irreducible_loss(law: Law) -> float:
    """The loss no model size or data amount gets below (E; 0 for Kaplan's pure power laws)."""
    if isinstance(law, ChinchillaLaw):
        return law.E
    if isinstance(law, TokensPerParameter):
        return (law.loss_law or BESIROGLU).E
    return 0.0


def numeric_optimum(law: Law, flops: float) -> tuple[float, float]:
    """argmin over N of L(N, C / (6N)), by bounded scalar minimization in log N: the check on the closed
    forms (and the way to optimize laws that have none)."""
    x0 = math.log(law.optimum(flops)[0])  # search a wide bracket around it, 8 decades each way
    res = minimize_scalar(lambda x: law.loss(math.exp(x), flops / (6.0 * math.exp(x))),
                          bounds=(x0 - 18.0, x0 + 18.0), method="bounded", options={"xatol": 1e-10})
    n = math.exp(res.x)
    return n, flops / (6.0 * n)


def flops_for(law: Law, *, n: float | None = None, d: float | None = None, loss: float | None = None) -> float:
    """The budget whose compute-optimal run has this N, or this D, or reaches this loss (bisection in log C)."""
    if n is not None:
        f = lambda c: math.log(law.optimum(c)[0] / n)  # noqa: E731
    elif d is not None:
        f = lambda c: math.log(law.optimum(c)[1] / d)  # noqa: E731
    elif loss is not None:
        floor = irreducible_loss(law)
        if loss <= floor:
            raise ValueError(f"target loss {loss} is at or below the law's irreducible loss {floor}")
        f = lambda c: law.loss(*law.optimum(c)) - loss  # noqa: E731
    else:
        raise ValueError("give n, d or loss")
    log_c = brentq(lambda x: f(math.exp(x)), math.log(1e3), math.log(1e40), xtol=1e-12)
    return math.exp(log_c)


def effective_data(tokens: float, unique: float) -> float:
    """Muennighoff et al. 2023 eq. 5: D' = U + U R* (1 - exp(-R / R*)), R = tokens/U - 1 repeated epochs."""
    if tokens <= unique:
        return tokens
    repeats = tokens / unique - 1.0
    return unique + unique * R_STAR_D * (1.0 - math.exp(-repeats / R_STAR_D))


def effective_params(n: float, unique_tokens: float, law: Law) -> float:
    """Muennighoff et al. eq. 5, parameter side: beyond U_N, the compute-optimal size for the unique data,
    extra parameters are worth less (decay R*_N)."""
    u_n = min(n, law.optimum(flops_for(law, d=unique_tokens))[0])
    if n <= u_n:
        return n
    excess = n / u_n - 1.0
    return u_n + u_n * R_STAR_N * (1.0 - math.exp(-excess / R_STAR_N))


def repeated_loss(law: Law, n: float, tokens: float, unique: float) -> float:
    """Loss of N parameters trained on ``tokens`` drawn by repeating ``unique`` tokens. Without repetition
    it is the law's own loss: the parameter-side decay is applied only once data repeats."""
    if tokens <= unique:
        return law.loss(n, tokens)
    return law.loss(effective_params(n, unique, law), effective_data(tokens, unique))


def data_constrained_optimum(law: Law, flops: float, unique: float) -> tuple[float, float]:
    """argmin over N of the repeated-data loss at budget C when only ``unique`` tokens exist."""
    x0 = math.log(law.optimum(flops)[0])
    res = minimize_scalar(lambda x: repeated_loss(law, math.exp(x), flops / (6.0 * math.exp(x)), unique),
                          bounds=(x0 - 12.0, x0 + 12.0), method="bounded", options={"xatol": 1e-8})
    n = math.exp(res.x)
    return n, flops / (6.0 * n)


def tokens_for_loss(law: Law, n: float, loss: float) -> float | None:
    """Training tokens for N parameters to reach ``loss``; None when N alone cannot get there."""
    def gap(x):
        return law.loss(n, math.exp(x)) - loss
    lo, hi = math.log(1.0), math.log(1e30)
    if gap(hi) >= 0:
        return None
    if gap(lo) <= 0:
        return 1.0
    return math.exp(brentq(gap, lo, hi, xtol=1e-12))


def inference_aware_optimum(law: Law, loss: float, inference_tokens: float) -> tuple[float, float] | None:
    """Sardana & Frankle 2023, "Beyond Chinchilla-Optimal": the (N, D) reaching ``loss`` that minimizes
    training + inference FLOPs, 6 N D + 2 N D_inference. More inference demand favours a smaller model
    trained on more tokens. None if the loss is unreachable."""
    def total(x):
        n = math.exp(x)
        d = tokens_for_loss(law, n, loss)
        # Unreachable sizes get a huge finite cost: an infinity would turn the Brent steps into NaNs.
        return 1e300 if d is None else 6.0 * n * d + 2.0 * n * inference_tokens

    n0 = law.optimum(flops_for(law, loss=loss))[0]
    res = minimize_scalar(total, bounds=(math.log(n0) - 12.0, math.log(n0) + 2.0), method="bounded",
                          options={"xatol": 1e-8})
    if res.fun >= 1e300:
        return None
    n = math.exp(res.x)
    return n, tokens_for_loss(law, n, loss)
