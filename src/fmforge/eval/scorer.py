"""Scoring text with a trained decoder the way lm-evaluation-harness does, fast: the one engine under the
benchmark tasks (``fmforge eval --tasks``) and the lm-eval model class (``harness.py``).

Three requests, lm-eval's: the log-likelihood of a continuation given a context (multiple choice), the
log-likelihood of a whole text in rolling windows (perplexity), and generation until a stop string.
Tokenization and truncation follow lm-eval's ``HFLM`` exactly, so the numbers match it on the exported model:
the model sees ``[bos] + context``; the context's trailing spaces move onto the continuation; the continuation
is ``encode(context + continuation)`` past ``len(encode(context))``; a request longer than the model's context
loses tokens on the left.

Speed comes from not recomputing shared work and not computing padding. Requests with the same context (the
choices of a question) are packed into one row of a batch: the context once, then each continuation (less its
last token) after it at the positions it would have followed the context, with an attention mask that lets
a continuation see the context and itself but not its sibling choices. A row holds as many such groups as
fit the model's context (each group sees only itself), so one forward scores many questions with little
padding, and every scored token gets exactly the positions and attention of one plain forward over its
context + continuation. Models that take no per-token positions (virtual-token wrappers) get one request
per row instead, lm-eval's way. The output head runs only at the scored positions (the model's head is
lifted off while scoring, and put back). Scores do not depend on the batch size or the packing beyond
floating-point noise (~1e-6; sums are accumulated in float64).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from fmforge.deploy.generate import filter_logits
from fmforge.device import pick_device
from fmforge.errors import FmforgeError
from fmforge.models.gpt import GPT
from fmforge.runs import load_pretrained

DEFAULT_MAX_GEN_TOKS = 256
PACK_WIDTH = 128  # narrowest row that several questions share (a wider question gets a row its width)
HEAD_CHUNK = 256  # scored positions per output-head call: 256 x a 32k vocabulary of fp32 logits = 32 MB


class LMScorer:
    """Log-likelihoods and generations of ``model`` (an fmforge decoder) under ``tokenizer`` (TextTokenizer).

    ``batch_size`` sizes one forward: at most ``batch_size * max_length`` tokens (batch_size rows of a full
    context, more rows when they are shorter); ``max_length`` is the tokens the model sees at once
    (default: its context, ``cfg.max_seq_len``)."""

    def __init__(self, model, tokenizer, device, *, batch_size: int = 16, max_length: int | None = None):
        if batch_size < 1:
            raise FmforgeError(f"batch size must be at least 1 (got {batch_size})")
        context = model.cfg.max_seq_len - getattr(model, "virtual", 0)  # virtual tokens take the first positions
        if max_length is not None and not 1 <= max_length <= context:
            raise FmforgeError(f"max_length must be in [1, {context}] for this model (got {max_length})")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length or context
        self.bos_id = tokenizer.bos_id
        self.eos_id = tokenizer.eos_id
        # What an empty context conditions on (lm-eval's prefix_token_id): bos, or eos when there is none.
        self.prefix_id = self.bos_id if self.bos_id is not None else self.eos_id
        self._prefix = [self.bos_id] if self.bos_id is not None else []
        # Several requests per row need per-token positions and a mask: a plain GPT takes them; a wrapper
        # (virtual tokens) scores one request per row.
        self.share = type(model) is GPT
        # Chat transcripts (``harness.py``'s template) close each assistant turn with the eos token's text,
        # which then stands for the eos id; off by default, so a literal "<|eos|>" in benchmark text is text.
        self.eos_in_text = False
        self._eos_text = tokenizer.tokenizer.id_to_token(self.eos_id)
        self._head: nn.Module = nn.Identity()  # the model's output head while scoring (``_scoring``)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", batch_size: int = 16) -> LMScorer:
        """The scorer of a finished decoder run (an encoder or vision run is a one-line error)."""
        dev = pick_device(device)
        model, tokenizer = load_pretrained(run_dir, dev, family="decoder")
        return cls(model, tokenizer, dev, batch_size=batch_size)

    # ------------------------------------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of many texts at once (the tokenizer spreads them over the cores)."""
        if not self.eos_in_text:
            return self.tokenizer.encode_batch(texts)
        pieces = [text.split(self._eos_text) for text in texts]
        flat = iter(self.tokenizer.encode_batch([p for parts in pieces for p in parts]))
        out = []
        for parts in pieces:
            ids = list(next(flat))
            for _ in parts[1:]:
                ids += [self.eos_id] + list(next(flat))
            out.append(ids)
        return out

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with the bos prefix, continuation ids), split as lm-eval splits them."""
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, requests: Iterable[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        requests = list(requests)
        contexts, wholes = [], []
        for context, continuation in requests:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:  # "a: " + "b" is scored as "a:" + " b", as lm-eval does
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            contexts.append(context)
            wholes.append(context + continuation)
        encoded = self.encode_batch(contexts + wholes)
        out = []
        for i, (context, _) in enumerate(requests):
            ctx, whole = encoded[i], encoded[len(requests) + i]
            if context == "":
                out.append(([self.prefix_id], whole))
            else:
                out.append((self._prefix + ctx, whole[len(ctx):]))
        return out

    # ------------------------------------------------------------------------------------------------ requests

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | [bos] + context), whether greedy decoding would produce them)
        for each (context, continuation)."""
        return self.loglikelihood_tokens(self.encode_pairs(requests))

    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``loglikelihood`` on token ids: (context ids, bos included if wanted; continuation ids)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                results[i] = (0.0, True)
                continue
            if len(cont) > self.max_length:
                raise FmforgeError(f"a continuation of {len(cont)} tokens does not fit the model's context of "
                                   f"{self.max_length} tokens")
            if not ctx:
                ctx = [self.prefix_id]
            whole = (ctx + cont)[-(self.max_length + 1):]  # lm-eval's left truncation
            groups.setdefault(tuple(whole[:-len(cont)]), []).append((i, cont))
        with _scoring(self):
            for batch in self._plan(groups):
                for i, result in self._score_rows(batch):
                    results[i] = result
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Log-likelihood of each whole text after [bos] (eos when there is no bos), in lm-eval's rolling
        windows of the model's context: the first window predicts its first ``max_length`` tokens, each next
        one the following tokens with as much preceding text as fits."""
        windows, owner = [], []
        for t, ids in enumerate(self.encode_batch(list(texts))):
            for ctx, cont in rolling_windows(ids, self.prefix_id, self.max_length):
                windows.append((ctx, cont))
                owner.append(t)
        totals = [0.0] * len(texts)
        for t, (logprob, _) in zip(owner, self.loglikelihood_tokens(windows)):
            totals[t] += logprob
        return totals

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        """The continuation of each context ([bos] + context), cut before the first stop string of
        ``until`` and ended by eos. gen_kwargs: ``until`` (str or list), ``max_gen_toks`` (256),
        ``temperature`` (0: greedy), ``do_sample``, ``top_k``, ``top_p``, ``seed`` (0; every sampled request
        gets its own generator seeded with it, so a request's text does not depend on the others)."""
        jobs = []
        encoded = self.encode_batch([context for context, _ in requests])
        for i, ((_, kwargs), ctx) in enumerate(zip(requests, encoded)):
            opts = _generation_options(dict(kwargs or {}))
            keep = max(1, self.max_length - opts["max_gen_toks"])  # room for the answer, as lm-eval leaves
            ids = (self._prefix + ctx)[-keep:] or [self.prefix_id]
            jobs.append((i, ids, opts))
        jobs.sort(key=lambda job: (-len(job[1]), job[0]))
        out = [""] * len(requests)
        with _scoring(self):
            start = 0
            while start < len(jobs):
                # One batch: up to batch_size prompts, of one length where the model takes no per-row positions.
                end = start + 1
                while (end < len(jobs) and end - start < self.batch_size
                       and (self.share or len(jobs[end][1]) == len(jobs[start][1]))):
                    end += 1
                for (i, _, _), text in zip(jobs[start:end], self._generate_batch(jobs[start:end])):
                    out[i] = text
                start = end
        return out

    # ------------------------------------------------------------------------------------------------ planning

    def _plan(self, groups: dict) -> list[list[list]]:
        """Batches of rows; a row is a list of units (context, [(index, continuation), ...]), each unit
        taking len(context) + sum(len(continuation) - 1) tokens of the row. Rows are filled best-fit up to
        the model's context, and a batch holds at most ``batch_size * max_length`` tokens (rows x width)."""
        width = self.max_length
        units: list = []
        for ctx, conts in groups.items():
            conts = sorted(conts, key=lambda ic: (-len(ic[1]), ic[0]))
            unit: list = []
            used = len(ctx)
            for i, cont in conts:
                if unit and (not self.share or used + len(cont) - 1 > width):
                    units.append((used, ctx, unit))
                    unit, used = [], len(ctx)
                unit.append((i, cont))
                used += len(cont) - 1
            units.append((used, ctx, unit))
        units.sort(key=lambda u: (-u[0], u[2][0][0]))
        # Rows no wider than needed: attention costs each token the width of its row.
        width = min(width, max(PACK_WIDTH, units[0][0])) if units else width
        rows: list[list] = []
        free: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is the first with enough room
        for used, ctx, unit in units:
            k = bisect.bisect_left(free, (used, -1)) if self.share else len(free)
            if k == len(free):
                rows.append([used, (ctx, unit)])
                room, r = width - used, len(rows) - 1
            else:
                room, r = free.pop(k)
                rows[r][0] += used
                rows[r].append((ctx, unit))
                room -= used
            if self.share and room > 0:
                bisect.insort(free, (room, r))
        rows.sort(key=lambda row: -row[0])
        budget = self.batch_size * self.max_length
        plan: list[list[list]] = []
        for row in rows:
            if not plan or (len(plan[-1]) + 1) * plan[-1][0][0] > budget:
                plan.append([])
            plan[-1].append(row)
        return [[row[1:] for row in batch] for batch in plan]

    # ------------------------------------------------------------------------------------------------ scoring

    def _score_rows(self, batch: list[list]) -> list[tuple[int, tuple[float, bool]]]:
        """One forward over a batch of packed rows; the log-likelihood of every continuation in it."""
        rows = [_pack_row(units) for units in batch]
        width = max(len(row["ids"]) for row in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        seg = torch.full((len(rows), width), -1, dtype=torch.long)
        branch = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row["ids"])
            ids[r, :n] = torch.tensor(row["ids"])
            positions[r, :n] = torch.tensor(row["positions"])
            seg[r, :n] = torch.tensor(row["seg"])
            branch[r, :n] = torch.tensor(row["branch"])
        dev = self.device
        ids = ids.to(dev)
        if self.share:
            seg, branch = seg.to(dev), branch.to(dev)
            # same group, and a context token or the same continuation (causality is added by the model)
            mask = (seg[:, :, None] == seg[:, None, :]) & ((branch[:, None, :] == 0)
                                                           | (branch[:, :, None] == branch[:, None, :]))
            hidden = self.model(ids, positions=positions.to(dev), attn_mask=mask)
        else:
            hidden = self.model(ids)
        scored = [(i, r, at, cont) for r, row in enumerate(rows) for i, at, cont in row["scored"]]
        row_of = [r for _, r, at, _ in scored for _ in at]
        pos_of = [p for _, _, at, _ in scored for p in at]
        lps, greedy = self._scores(hidden, row_of, pos_of, [cont for _, _, _, cont in scored])
        return [(i, (lps[k], greedy[k])) for k, (i, _, _, _) in enumerate(scored)]

    def _scores(self, hidden: torch.Tensor, row_of: list[int], pos_of: list[int],
                targets: list[list[int]]) -> tuple[list[float], list[bool]]:
        """For each target list t: the summed log-probability of t's tokens, predicted from the hidden states
        at (row_of[j], pos_of[j]) (flat over all targets' tokens), and whether every token of t is the argmax.
        The head runs only on those positions, and the log-softmax spans the model's full vocabulary (padded
        rows included), as transformers' does."""
        dev = hidden.device
        flat = [tok for t in targets for tok in t]
        segment = torch.tensor([k for k, t in enumerate(targets) for _ in t], device=dev)
        if not flat:
            return [0.0] * len(targets), [True] * len(targets)
        picked = hidden[torch.tensor(row_of, device=dev), torch.tensor(pos_of, device=dev)]
        tgt = torch.tensor(flat, device=dev)
        token_lp = torch.empty(len(flat), dtype=torch.float64, device=dev)
        wrong = torch.empty(len(flat), dtype=torch.int64, device=dev)
        # The head in chunks small enough to stay in cache while each chunk's logits are read three times
        # (normalizer, target, argmax): log p = logit - logsumexp, and the argmax of the logits is that of p.
        for a in range(0, len(flat), HEAD_CHUNK):
            logits = self._head(picked[a:a + HEAD_CHUNK]).float()
            t = tgt[a:a + HEAD_CHUNK, None]
            token_lp[a:a + HEAD_CHUNK] = (logits.gather(1, t)[:, 0] - logits.logsumexp(-1)).double()
            wrong[a:a + HEAD_CHUNK] = logits.argmax(-1) != t[:, 0]
        sums = torch.zeros(len(targets), dtype=torch.float64, device=dev).index_add_(0, segment, token_lp)
        misses = torch.zeros(len(targets), dtype=torch.int64, device=dev).index_add_(0, segment, wrong)
        return sums.tolist(), (misses == 0).tolist()

    # ------------------------------------------------------------------------------------------------ generation

    def _generate_batch(self, jobs: list) -> list[str]:
        """Continue prompts together with a KV cache until every row has stopped. Prompts of different
        lengths are right-padded and each row decodes at its own position (a plain GPT); a model without
        per-row positions gets prompts of one length."""
        model, dev = self.model, self.device
        lengths = [len(ids) for _, ids, _ in jobs]
        limits = [min(o["max_gen_toks"], self.max_length - n + 1) for n, (_, _, o) in zip(lengths, jobs)]
        n_new = max(limits)
        if n_new < 1:
            return [""] * len(jobs)
        generators = []
        for _, _, opts in jobs:
            gen = None
            if opts["sample"]:
                gen = torch.Generator(device=dev)
                gen.manual_seed(opts["seed"])
            generators.append(gen)
        size = max(n + limit - 1 for n, limit in zip(lengths, limits))
        cache = model.new_cache(len(jobs), max(size, max(lengths)))
        prompts = _right_padded([ids for _, ids, _ in jobs], max(lengths)).to(dev)
        if self.share:
            positions = torch.arange(prompts.size(1), device=dev).expand(len(jobs), -1)
            hidden = model(prompts, cache=cache, positions=positions)
        else:
            hidden = model(prompts, 0, cache)
        logits = self._head(hidden[torch.arange(len(jobs), device=dev), torch.tensor(lengths, device=dev) - 1])
        new: list[list[int]] = [[] for _ in jobs]
        done = [limit < 1 for limit in limits]
        vocab = self.tokenizer.vocab_size
        for step in range(n_new):
            tokens = []
            for r, (_, _, opts) in enumerate(jobs):
                token = _pick(logits[r, :vocab], opts, generators[r]) if not done[r] else self.eos_id
                tokens.append(token)
                if done[r]:
                    continue
                if token == self.eos_id:
                    done[r] = True
                    continue
                new[r].append(token)
                if len(new[r]) >= limits[r] or _stops(self.tokenizer.decode(new[r]), opts["until"]):
                    done[r] = True
            if all(done) or step == n_new - 1:
                break
            step_ids = torch.tensor([[t] for t in tokens], device=dev)
            if self.share:  # a finished row keeps writing its own (unread) last position
                at = torch.tensor([[min(n + step, cache[0].max_len - 1)] for n in lengths], device=dev)
                logits = self._head(model(step_ids, cache=cache, positions=at)[:, -1])
            else:
                logits = self._head(model(step_ids, lengths[0] + step, cache)[:, -1])
        return [_cut(self.tokenizer.decode(ids), opts["until"]) for ids, (_, _, opts) in zip(new, jobs)]


# ---------------------------------------------------------------------------------------------------- helpers


class _scoring:
    """The scorer's model in eval mode under inference_mode, returning hidden states: its output head is
    taken out for the duration (``scorer._head``) so logits are computed only at the positions scored, a
    fraction of a padded batch. Everything is put back afterwards."""

    def __init__(self, scorer: LMScorer):
        self.scorer = scorer
        self.inference = torch.inference_mode()

    def __enter__(self):
        model = self.scorer.model
        self.was_training = model.training
        model.eval()
        self.inference.__enter__()
        self.head = getattr(model, "lm_head", None)
        if isinstance(self.head, nn.Linear):
            model.lm_head = nn.Identity()
            self.scorer._head = self.head
        else:  # not a plain GPT: its output already is the logits
            self.head = None
            self.scorer._head = nn.Identity()

    def __exit__(self, *exc):
        model = self.scorer.model
        if self.head is not None:
            model.lm_head = self.head
        self.inference.__exit__(*exc)
        model.train(self.was_training)


def _pack_row(units: list) -> dict:
    """The tokens of one row: per unit its context (positions 0..), then each continuation less its last
    token at the positions after the context; ``seg`` numbers the units, ``branch`` is 0 on a context and
    k on the k-th continuation. ``scored``: (request index, row offsets that predict each of its tokens,
    continuation) — the first token from the context's last offset, the others from the continuation's."""
    row: dict = {"ids": [], "positions": [], "seg": [], "branch": [], "scored": []}
    for u, (ctx, conts) in enumerate(units):
        last = len(row["ids"]) + len(ctx) - 1
        row["ids"] += ctx
        row["positions"] += range(len(ctx))
        row["seg"] += [u] * len(ctx)
        row["branch"] += [0] * len(ctx)
        for k, (i, cont) in enumerate(conts, start=1):
            start = len(row["ids"])
            row["ids"] += cont[:-1]
            row["positions"] += range(len(ctx), len(ctx) + len(cont) - 1)
            row["seg"] += [u] * (len(cont) - 1)
            row["branch"] += [k] * (len(cont) - 1)
            row["scored"].append((i, [last] + list(range(start, start + len(cont) - 1)), cont))
    return row


def _right_padded(rows: list[list[int]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def rolling_windows(ids: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (``get_rolling_token_windows`` with context_len=1, then
    ``make_disjoint_window``): (context, tokens to predict) pairs covering every token of ``ids`` once."""
    if not ids:
        return []
    first = min(max_length, len(ids))
    windows = [([prefix_id] + ids[:first - 1], ids[:first])]
    predicted = first
    while predicted < len(ids):
        n = min(len(ids) - predicted, max_length)
        end = predicted + n
        windows.append((ids[end - max_length - 1:end - 1], ids[end - n:end]))
        predicted += n
    return [(ctx[:len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def _generation_options(kwargs: dict) -> dict:
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    if not all(isinstance(s, str) for s in until):
        raise FmforgeError(f"generation 'until' must be strings (got {until!r:.80})")
    max_gen_toks = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    if max_gen_toks < 1:
        raise FmforgeError(f"max_gen_toks must be at least 1 (got {max_gen_toks})")
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if temperature < 0:
        raise FmforgeError(f"temperature must be >= 0 (got {temperature}); 0 means greedy")
    do_sample = kwargs.pop("do_sample", None)
    sample = bool(do_sample) if do_sample is not None else temperature > 0
    return {"until": [s for s in until if s], "max_gen_toks": max_gen_toks, "sample": sample,
            "temperature": temperature if temperature > 0 else 1.0, "top_k": kwargs.pop("top_k", None),
            "top_p": kwargs.pop("top_p", None), "seed": int(kwargs.pop("seed", 0) or 0)}


def _pick(logits: torch.Tensor, opts: dict, generator) -> int:
    logits = logits.float()
    if not opts["sample"]:
        return int(logits.argmax())
    probs = filter_logits(logits / opts["temperature"], opts["top_k"], opts["top_p"]).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _stops(text: str, until: list[str]) -> bool:
    return any(s in text for s in until)


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text
