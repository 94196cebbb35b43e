"""Batch size and learning rate for a planned run, each with the source of its heuristic, and the rules for
carrying a tuned learning rate to a different global batch.

The heuristics disagree by a factor of a few; the proposed config takes DeepSeek's compute-based fit (it
is the most recent and was fitted on AdamW + warmup-stable-decay runs close to ours). Treat every number as
a starting point for ``fmforge tune`` on a small proxy, not as an answer.
"""

from __future__ import annotations

import math

from fmforge.config import DEFAULT_GLOBAL_BATCH_TOKENS
from fmforge.errors import FmforgeError

# Brown et al. 2020 ("Language Models are Few-Shot Learners"), table 2.1: (parameters, batch tokens, peak lr).
GPT3_TABLE = [
    (125e6, 0.5e6, 6.0e-4), (350e6, 0.5e6, 3.0e-4), (760e6, 0.5e6, 2.5e-4), (1.3e9, 1e6, 2.0e-4),
    (2.7e9, 1e6, 1.6e-4), (6.7e9, 2e6, 1.2e-4), (13e9, 2e6, 1.0e-4), (175e9, 3.2e6, 0.6e-4),
]


def deepseek(flops: float) -> tuple[float, float]:
    """DeepSeek LLM (Bi et al. 2024) eq. 1: B_opt = 0.2920 C^0.3271 tokens, lr_opt = 0.3118 C^-0.1250."""
    return 0.2920 * flops ** 0.3271, 0.3118 * flops ** -0.1250


def gpt3_interpolated(n_params: float) -> tuple[float, float]:
    """GPT-3's table 2.1 batch and lr, interpolated in log N (clamped at the table's ends)."""
    xs = [math.log(p) for p, _, _ in GPT3_TABLE]
    x = min(max(math.log(n_params), xs[0]), xs[-1])
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            w = (x - xs[i]) / (xs[i + 1] - xs[i])
            (_, b0, l0), (_, b1, l1) = GPT3_TABLE[i], GPT3_TABLE[i + 1]
            return math.exp((1 - w) * math.log(b0) + w * math.log(b1)), math.exp((1 - w) * math.log(l0) + w * math.log(l1))
    return GPT3_TABLE[-1][1], GPT3_TABLE[-1][2]


def kaplan_lr(n_non_embedding: float) -> float | None:
    """Kaplan et al. 2020 eq. D.1: lr(N) ~ 0.003239 - 0.0001395 log N (N non-embedding). Fitted up to ~1.5B
    parameters; it turns negative past ~1e10, where None says it has nothing to offer."""
    lr = 0.003239 - 0.0001395 * math.log(n_non_embedding)
    return lr if lr > 1e-5 else None


def kaplan_critical_batch(loss: float) -> float:
    """Kaplan et al. 2020 eq. 5.3: B_crit(L) = 2e8 / L^(1/0.21) tokens (the batch beyond which more data
    parallelism stops paying; loss in nats on their data, so treat as an order of magnitude)."""
    return 2e8 / loss ** (1.0 / 0.21)


def round_batch(tokens: float, seq_len: int) -> int:
    """Global batch in tokens: a power-of-two number of sequences (at least 1) near ``tokens``."""
    seqs = max(1.0, tokens / seq_len)
    return seq_len * 2 ** round(math.log2(seqs))


def warmup_steps(max_steps: int) -> int:
    """~1-2% of the run, at most 2000 steps (Llama 2000; GPT-3 375M tokens ~ 1-2% of its steps), below
    max_steps."""
    return max(0, min(2000, max(10, round(0.02 * max_steps)), max_steps - 1))


def guidance(n_params: float, n_non_embedding: float, flops: float, loss: float | None, seq_len: int) -> list[dict]:
    """Rows of (heuristic, global batch tokens, lr, source) for a run of this size and budget."""
    rows = []
    b, lr = deepseek(flops)
    rows.append({"heuristic": "deepseek", "batch_tokens": b, "lr": lr,
                 "source": "Bi et al. 2024 (DeepSeek LLM) eq. 1: B=0.292 C^0.327, lr=0.312 C^-0.125"})
    b, lr = gpt3_interpolated(n_params)
    rows.append({"heuristic": "gpt3-table", "batch_tokens": b, "lr": lr,
                 "source": "Brown et al. 2020 table 2.1, interpolated in log N"})
    rows.append({"heuristic": "kaplan", "batch_tokens": kaplan_critical_batch(loss) if loss else None,
                 "lr": kaplan_lr(n_non_embedding),
                 "source": "Kaplan et al. 2020: critical batch eq. 5.3 (at the predicted loss), lr eq. D.1"})
    return rows


def rescale_lr(lr: float, old_batch: int, new_batch: int, rule: str) -> float:
    """Learning rate for a new global batch. ``linear``: lr x k (Goyal et al. 2017, SGD; holds for Adam only
    well below the critical batch). ``sqrt``: lr x sqrt(k) (Krizhevsky 2014; Malladi et al. 2022 derive it
    for Adam). ``none``: keep it."""
    if old_batch <= 0 or new_batch <= 0:
        raise FmforgeError("global batch sizes must be positive")
    k = new_batch / old_batch
    if rule == "linear":
        return lr * k
    if rule == "sqrt":
        return lr * math.sqrt(k)
    if rule == "none":
        return lr
    raise FmforgeError(f"unknown lr scaling rule {rule!r}; use linear, sqrt or none")


def rescale_plan(cfg, new_batch: int | None, world_size: int | None, rule: str) -> tuple[dict, list[str]]:
    """Overrides that carry ``cfg`` to a new global batch and/or world size, and the reasons, one per line.

    The token budget stays fixed (max_steps scales by old/new batch), warmup keeps its length in tokens, the
    lr follows ``rule``. A new world size alone changes nothing that matters to optimization: fmforge's
    global batch is per step, not per device, so only the micro-batch/accumulation split moves."""
    t, o, seq = cfg.train, cfg.optim, cfg.data.seq_len
    old_batch = t.global_batch or DEFAULT_GLOBAL_BATCH_TOKENS
    batch = new_batch or old_batch
    if batch % seq:
        raise FmforgeError(f"--global-batch-tokens ({batch}) must be a multiple of data.seq_len ({seq})")
    k = batch / old_batch
    changes, why = {}, []
    if batch != old_batch:
        changes["train.global_batch"] = batch
        changes["train.max_steps"] = max(1, round(t.max_steps / k))
        changes["optim.warmup_steps"] = round(o.warmup_steps / k)
        changes["optim.lr"] = rescale_lr(o.lr, old_batch, batch, rule)
        why.append(f"global batch {old_batch} -> {batch} tokens (x{k:g}): lr {o.lr:g} -> {changes['optim.lr']:.3g} "
                   f"({rule} rule), max_steps {t.max_steps} -> {changes['train.max_steps']} and warmup "
                   f"{o.warmup_steps} -> {changes['optim.warmup_steps']} steps (same tokens)")
    if world_size:
        seqs = batch // seq
        if seqs % world_size:
            raise FmforgeError(f"{seqs} sequences per step do not split over {world_size} ranks: pick a global "
                               f"batch that is a multiple of {world_size * seq} tokens")
        per_rank = seqs // world_size
        micro = min(t.micro_batch_size, per_rank)
        while per_rank % micro:
            micro -= 1
        if micro != t.micro_batch_size:
            changes["train.micro_batch_size"] = micro
        why.append(f"world size {world_size}: {per_rank} sequences per rank per step = {per_rank // micro} "
                   f"accumulation x micro-batch {micro}; lr and schedule unchanged (the global batch is what the "
                   "optimizer sees)")
    return changes, why
