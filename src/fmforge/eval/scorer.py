"""Scoring text with a trained decoder the way lm-evaluation-harness does, fast: the one engine under the
benchmark tasks (``fmforge eval --tasks``) and the lm-eval model class (``harness.py``).

Three requests, lm-eval's: the log-likelihood of a continuation given a context (multiple choice), the
log-likelihood of a whole text in rolling windows (perplexity), and generation until a stop string.
Tokenization and truncation follow lm-eval's ``HFLM`` exactly, so the numbers match it on the exported model:
the model sees ``[bos] + context``; the context's trailing spaces move onto the continuation; the continuation
is ``encode(context + continuation)`` past ``len(encode(context))``; a request longer than the model's context
loses tokens on the left.

Speed comes from not recomputing shared work. Requests with the same context (the choices of a question)
prefill the context once into a KV cache, which is then repeated once per choice; all choices are scored in
one right-padded forward that continues from the context's last position (right padding is harmless to a
causal model: no real token attends to a later one). Contexts of equal token length share one prefill batch
(the model's KV cache has one position counter for the whole batch); contexts too rare at their length are
scored with others as whole right-padded sequences (lm-eval's way) when the saved tokens do not pay for the
extra forward call. Work is sorted by length to limit padding, and the output head runs only at the scored
positions (the model's head is lifted off while scoring, and put back). Scores do not depend on the batch
size beyond floating-point noise (~1e-6; sums are accumulated in float64).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from fmforge.deploy.generate import filter_logits
from fmforge.device import pick_device
from fmforge.errors import FmforgeError
from fmforge.runs import load_pretrained

# What one extra forward call costs, in tokens of work, so the planner weighs a shared context's saved
# tokens against the extra, smaller forwards sharing needs. On a CPU small matmuls lose much of their speed:
# on a 4-layer d_model 128 Llama, sharing paid off only where it saved over ~1,000 tokens per extra call
# (PIQA: 2 long answers, no gain; few-shot contexts: large gains). On a GPU it is kernel launches, ~0.1 ms
# per block at ~100 TFLOP/s, divided by one token's FLOPs.
CPU_CALL_TOKENS = 1024
GPU_CALL_FLOPS_PER_BLOCK = 1e10
DEFAULT_MAX_GEN_TOKS = 256


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
        if self.device.type == "cpu":
            self.call_tokens = float(CPU_CALL_TOKENS)
        else:
            token_flops = 2 * sum(p.numel() for p in model.parameters())  # an upper bound: embeddings are gathers
            self.call_tokens = GPU_CALL_FLOPS_PER_BLOCK * model.cfg.n_layer / max(1, token_flops)
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
            for kind, batch in self._plan(groups):
                scored = self._score_shared(batch) if kind == "shared" else self._score_whole(batch)
                for i, result in scored:
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
                # One batch: prompts of one length (they share positions in the KV cache).
                end = start + 1
                while (end < len(jobs) and end - start < self.batch_size
                       and len(jobs[end][1]) == len(jobs[start][1])):
                    end += 1
                for (i, _, _), text in zip(jobs[start:end], self._generate_batch(jobs[start:end])):
                    out[i] = text
                start = end
        return out

    # ------------------------------------------------------------------------------------------------ planning

    def _plan(self, groups: dict) -> list[tuple[str, list]]:
        """Batches of work: ("shared", [(context, [(index, continuation), ...]), ...]) for contexts of one
        length prefilled together, ("whole", [(index, context, continuation), ...]) for whole sequences.
        A batch holds at most ``batch_size * max_length`` tokens: batch_size rows of a full context, more
        rows when they are shorter."""
        budget = self.batch_size * self.max_length
        by_length: dict[int, list] = {}
        for ctx, conts in groups.items():
            by_length.setdefault(len(ctx), []).append((ctx, sorted(conts, key=lambda ic: -len(ic[1]))))
        plan, loose = [], []
        for length in sorted(by_length, reverse=True):
            # longest continuation first, so a chunk's first group sets its width
            items = sorted(by_length[length], key=lambda g: (-len(g[1][0][1]), g[1][0][0]))
            chunk: list = []
            rows = 0
            for ctx, conts in items:
                width = length + len((chunk or [(ctx, conts)])[0][1][0][1]) - 1
                if chunk and (rows + len(conts)) * width > budget:
                    self._place(chunk, plan, loose)
                    chunk, rows = [], 0
                chunk.append((ctx, conts))
                rows += len(conts)
            if chunk:
                self._place(chunk, plan, loose)
        loose.sort(key=lambda r: (-(len(r[1]) + len(r[2])), r[0]))
        batch: list = []
        for row in loose:
            width = len(batch[0][1]) + len(batch[0][2]) - 1 if batch else 0
            if batch and (len(batch) + 1) * width > budget:
                plan.append(("whole", batch))
                batch = []
            batch.append(row)
        if batch:
            plan.append(("whole", batch))
        return plan

    def _place(self, chunk: list, plan: list, loose: list) -> None:
        """Score ``chunk`` (contexts of one length) with a shared prefill when that beats adding its rows to
        batches of whole sequences, counting each forward call as ``call_tokens`` tokens of work."""
        length = len(chunk[0][0])
        rows = [(i, cont) for _, conts in chunk for i, cont in conts]
        longest = max(len(cont) for _, cont in rows)
        calls = 1 + (longest > 1)
        shared = len(chunk) * length + len(rows) * (longest - 1) + calls * self.call_tokens
        whole_tokens = len(rows) * (length + longest - 1)
        whole = whole_tokens * (1 + self.call_tokens / (self.batch_size * self.max_length))
        if shared <= whole:
            plan.append(("shared", chunk))
        else:
            loose.extend((i, list(ctx), cont) for ctx, conts in chunk for i, cont in conts)

    # ------------------------------------------------------------------------------------------------ scoring

    def _score_shared(self, chunk: list) -> list[tuple[int, tuple[float, bool]]]:
        """Prefill the contexts (one length) once, repeat each cache row per continuation, score the first
        continuation token from the prefill's last position and the rest in one right-padded forward."""
        model, dev = self.model, self.device
        length = len(chunk[0][0])
        rows = [(g, i, cont) for g, (_, conts) in enumerate(chunk) for i, cont in conts]
        rest = max(len(cont) for _, _, cont in rows) - 1
        cache = model.new_cache(len(chunk), length + rest)
        ctx = torch.tensor([list(c) for c, _ in chunk], dtype=torch.long, device=dev)
        last = model(ctx, 0, cache)[:, -1:]  # [groups, 1, d]: hidden states, the head is applied below
        owner = [g for g, _, _ in rows]
        first_lp, first_greedy = self._scores(last, owner, [0] * len(rows), [cont[:1] for _, _, cont in rows])
        if rest == 0:
            return [(i, (lp, ok)) for (_, i, _), lp, ok in zip(rows, first_lp, first_greedy)]
        index = torch.tensor(owner, device=dev)
        for layer in cache:  # one cache row per continuation
            layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)
        hidden = model(_right_padded([cont[:-1] for _, _, cont in rows], rest, dev), length, cache)
        lps, greedy = self._scores(hidden, range(len(rows)), [0] * len(rows), [cont[1:] for _, _, cont in rows])
        return [(i, (first_lp[r] + lps[r], first_greedy[r] and greedy[r])) for r, (_, i, _) in enumerate(rows)]

    def _score_whole(self, batch: list) -> list[tuple[int, tuple[float, bool]]]:
        """lm-eval's way: each (context, continuation) as one right-padded sequence without the last token."""
        inputs = [(ctx + cont)[:-1] for _, ctx, cont in batch]
        hidden = self.model(_right_padded(inputs, max(len(x) for x in inputs), self.device))
        starts = [len(ctx) - 1 for _, ctx, _ in batch]
        lps, greedy = self._scores(hidden, range(len(batch)), starts, [cont for _, _, cont in batch])
        return [(i, (lps[r], greedy[r])) for r, (i, _, _) in enumerate(batch)]

    def _scores(self, hidden: torch.Tensor, rows, starts: list[int],
                targets: list[list[int]]) -> tuple[list[float], list[bool]]:
        """For each target list t (of hidden row rows[k], from position starts[k]): the summed log-probability
        of t and whether every token of t is the argmax. The head runs only on those positions, and the
        log-softmax spans the model's full vocabulary (padded rows included), as transformers' does."""
        dev = hidden.device
        row_of = [r for r, t in zip(rows, targets) for _ in t]
        pos_of = [p + j for p, t in zip(starts, targets) for j in range(len(t))]
        flat = [tok for t in targets for tok in t]
        segment = torch.tensor([k for k, t in enumerate(targets) for _ in t], device=dev)
        if not flat:
            return [0.0] * len(targets), [True] * len(targets)
        picked = hidden[torch.tensor(row_of, device=dev), torch.tensor(pos_of, device=dev)]
        logprobs = self._head(picked).float().log_softmax(-1)
        tgt = torch.tensor(flat, device=dev)
        token_lp = logprobs.gather(1, tgt[:, None])[:, 0].double()
        wrong = (logprobs.argmax(-1) != tgt).to(torch.int64)
        sums = torch.zeros(len(targets), dtype=torch.float64, device=dev).index_add_(0, segment, token_lp)
        misses = torch.zeros(len(targets), dtype=torch.int64, device=dev).index_add_(0, segment, wrong)
        return sums.tolist(), (misses == 0).tolist()

    # ------------------------------------------------------------------------------------------------ generation

    def _generate_batch(self, jobs: list) -> list[str]:
        """Continue prompts of one length together with a KV cache until every row has stopped."""
        model, dev = self.model, self.device
        length = len(jobs[0][1])
        n_new = min(max(o["max_gen_toks"] for _, _, o in jobs), self.max_length - length + 1)
        if n_new < 1:
            return [""] * len(jobs)
        generators = []
        for _, _, opts in jobs:
            gen = None
            if opts["sample"]:
                gen = torch.Generator(device=dev)
                gen.manual_seed(opts["seed"])
            generators.append(gen)
        cache = model.new_cache(len(jobs), length + n_new - 1)
        logits = self._head(model(torch.tensor([ids for _, ids, _ in jobs], device=dev), 0, cache)[:, -1])
        new: list[list[int]] = [[] for _ in jobs]
        done = [False] * len(jobs)
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
                if len(new[r]) >= opts["max_gen_toks"] or _stops(self.tokenizer.decode(new[r]), opts["until"]):
                    done[r] = True
            if all(done) or step == n_new - 1:
                break
            step_ids = torch.tensor([[t] for t in tokens], device=dev)
            logits = self._head(model(step_ids, length + step, cache)[:, -1])
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


def _right_padded(rows: list[list[int]], width: int, device) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out.to(device)


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
