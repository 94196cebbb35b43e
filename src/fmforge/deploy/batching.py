"""Continuous batching for ``fmforge serve``: iteration-level scheduling over every running sequence.

One engine per served decoder runs in its own thread. Each loop iteration (1) drops sequences whose client
went away, (2) admits waiting requests while the running set stays under ``max_running`` sequences and
``token_budget`` tokens (prompt + tokens it may still generate), prefilling all admitted prompts in one
right-padded forward, and (3) runs ONE batched decode step for all running sequences. Every running sequence
owns a row ("slot") of one shared KV cache, and the model takes each row's own position (``GPT.forward``'s
``positions``), so sequences of different lengths decode in one forward, attention included; slots stay
packed at the front of the cache (a finished sequence's slot is refilled by the last one), so a step reads a
view of the first B rows, never a copy. New requests therefore join between decode steps, and a long
generation never blocks a short one. Models that take no per-row positions (virtual-token wrappers) step each
sequence through their own forward and cache.

The waiting queue is bounded: a full queue refuses at once (``QueueFull``), which the server turns into a
429 with Retry-After. Results go back through each sequence's ``emit`` callback (called from the engine
thread; the server forwards them into its event loop).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fmforge.deploy.generate import filter_logits
from fmforge.models.blocks import KVCache
from fmforge.models.gpt import GPT

# Prompts prefill in one forward while each is at most this many tokens, or a quarter, shorter than the
# longest: the padding a longer batch computes for nothing against the fixed cost of one more forward call.
PREFILL_SLACK = 16


class QueueFull(Exception):
    """The waiting queue is at its limit: try again later."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely


@dataclass
class TokenEvent:
    """One sampled token (``token`` set) or the end of a sequence (``finish`` set: "stop" at end-of-text,
    "length" at max_tokens or the context, "cancelled", or "error" with ``error``)."""

    token: int | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent], None]
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrival: float = field(default_factory=time.monotonic)
    # set by the engine
    n_new: int = 0
    cache: list | None = None  # its own cache (wrapper models); batched models use ``slot`` of the engine's
    slot: int = -1
    last_token: int = 0
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Free this sequence at the next step (a client that disconnected, a stop string, a timeout)."""
        self.cancelled = True

    @property
    def footprint(self) -> int:
        return len(self.prompt_ids) + self.n_new


class Engine:
    """Schedules the sequences of one decoder; ``start`` its thread, ``submit`` sequences, ``stop`` at the end."""

    def __init__(self, model, eos_id: int | None, vocab_limit: int | None, *, max_running: int = 32,
                 token_budget: int = 32768, max_waiting: int = 256):
        self.model = model.eval()
        self.eos_id, self.vocab_limit = eos_id, vocab_limit
        self.max_running, self.token_budget, self.max_waiting = max_running, token_budget, max_waiting
        self.max_len = model.cfg.max_seq_len - getattr(model, "virtual", 0)
        self.device = next(model.parameters()).device
        self.batched = type(model) is GPT  # a wrapper (virtual tokens) steps each sequence through its forward
        self.slots = SlotCache(model, self.device, max_running)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fmforge-engine", daemon=True)
        self.on_step: Callable[[Engine], None] | None = None  # metrics hook (running/waiting gauges)

    # ------------------------------------------------------------------------------------------ public

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; raise QueueFull when ``max_waiting`` requests already wait, or while stopping."""
        with self._cond:
            if self._stopping or len(self.waiting) >= self.max_waiting:
                raise QueueFull
            self.waiting.append(seq)
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what runs and waits, then end the thread (graceful shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def load(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting)

    # ------------------------------------------------------------------------------------------ loop

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self.waiting and not self.running and not self._stopping:
                        self._cond.wait()
                    if self._stopping and not self.waiting and not self.running:
                        return
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.running:
                        self._decode_step()
                except Exception as err:  # noqa: BLE001 - a bug must fail its requests, not hang them
                    for seq in self.running + list(self.waiting):
                        seq.emit(TokenEvent(finish="error", error=f"{type(err).__name__}: {err}"))
                    self.running.clear()
                    with self._cond:
                        self.waiting.clear()
                if self.on_step is not None:
                    self.on_step(self)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, "cancelled")
        with self._cond:
            gone = [s for s in self.waiting if s.cancelled]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in gone:
            seq.emit(TokenEvent(finish="cancelled"))

    def _admit(self) -> None:
        admitted: list[Sequence] = []
        while True:
            with self._cond:
                if not self.waiting or len(self.running) + len(admitted) >= self.max_running:
                    break
                seq = self.waiting[0]
                seq.n_new = min(seq.params.max_tokens, self.max_len - len(seq.prompt_ids) + 1)
                used = sum(s.footprint for s in self.running + admitted)
                if (self.running or admitted) and used + seq.footprint > self.token_budget:
                    break  # admitted once enough finishes; an oversize request still runs alone
                self.waiting.popleft()
            admitted.append(seq)
        if admitted:
            self._prefill(admitted)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        seq.cache = None
        seq.slot = -1
        seq.emit(TokenEvent(finish=reason))

    # ------------------------------------------------------------------------------------------ model

    def _prefill(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.generator = torch.Generator(device=self.device)
            if seq.params.seed is None:
                seq.generator.seed()
            else:
                seq.generator.manual_seed(seq.params.seed)
        if not self.batched:
            for seq in seqs:
                seq.cache = self.model.new_cache(1, min(self.max_len, len(seq.prompt_ids) + seq.n_new - 1))
                ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
                self.running.append(seq)
                self._sample([seq], self.model(ids, 0, seq.cache)[0, -1:])
            return
        first = self._compact()
        need = max(min(self.max_len, len(s.prompt_ids) + s.n_new - 1) for s in self.running + seqs)
        self.slots.reserve(first + len(seqs), max(need, max(len(s.prompt_ids) for s in seqs)))
        # Prompts of similar length prefill together (right padding is computed for nothing).
        seqs = sorted(seqs, key=lambda s: -len(s.prompt_ids))
        start = 0
        while start < len(seqs):
            longest, end = len(seqs[start].prompt_ids), start + 1
            while end < len(seqs) and longest - len(seqs[end].prompt_ids) <= max(PREFILL_SLACK, longest // 4):
                end += 1
            for r, seq in enumerate(seqs[start:end]):
                seq.slot = first + start + r
            self._prefill_rows(seqs[start:end], first + start)
            start = end

    def _prefill_rows(self, seqs: list[Sequence], first: int) -> None:
        """Prefill ``seqs`` into cache rows first.. in one right-padded forward; sample their first tokens."""
        lengths = [len(s.prompt_ids) for s in seqs]
        ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, :lengths[r]] = torch.tensor(seq.prompt_ids, dtype=torch.long)
        positions = torch.arange(ids.size(1)).expand(len(seqs), -1).to(self.device)
        model = self.model
        hidden = model.hidden_states(model.tok_emb(ids.to(self.device)), cache=self.slots.rows(first, first + len(seqs)),
                                     positions=positions)
        last = hidden[torch.arange(len(seqs)), torch.tensor(lengths) - 1]  # the head only where it is read
        self.running.extend(seqs)
        self._sample(seqs, model.lm_head(last))

    def _compact(self) -> int:
        """Move running sequences into the free slots below len(running) (cache rows copied); that count."""
        n = len(self.running)
        taken = {s.slot for s in self.running}
        free = [r for r in range(n) if r not in taken]
        for seq in [s for s in self.running if s.slot >= n]:
            slot = free.pop()
            self.slots.move(seq.slot, slot)
            seq.slot = slot
        return n

    def _decode_step(self) -> None:
        if not self.batched:
            seqs = list(self.running)
            logits = torch.cat([self.model(torch.tensor([[s.last_token]], device=self.device),
                                           self._position(s), s.cache)[0, -1:] for s in seqs])
        else:
            self._compact()
            seqs = sorted(self.running, key=lambda s: s.slot)
            tokens = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=self.device)
            positions = torch.tensor([[self._position(s)] for s in seqs], device=self.device)
            logits = self.model(tokens, cache=self.slots.rows(0, len(seqs)), positions=positions)[:, -1]
        self._sample(seqs, logits)

    @staticmethod
    def _position(seq: Sequence) -> int:
        return len(seq.prompt_ids) + len(seq.generated) - 1  # where the last sampled token sits

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        logits = logits.float()
        if self.vocab_limit is not None:
            logits = logits[:, :self.vocab_limit]
        greedy = logits.argmax(dim=-1).tolist()
        logp = None
        if any(s.params.logprobs is not None for s in seqs):
            logp = logits.log_softmax(dim=-1)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0:
                token = greedy[i]
            else:
                probs = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p).softmax(dim=-1)
                token = int(torch.multinomial(probs, 1, generator=seq.generator))
            if token == self.eos_id:
                self._finish(seq, "stop")
                continue
            event = TokenEvent(token=token)
            if p.logprobs is not None and logp is not None:
                event.logprob = float(logp[i, token])
                if p.logprobs > 0:
                    top = torch.topk(logp[i], p.logprobs)
                    event.top_logprobs = dict(zip(top.indices.tolist(), top.values.tolist()))
            seq.generated.append(token)
            seq.last_token = token
            seq.emit(event)
            if len(seq.generated) >= seq.n_new:
                self._finish(seq, "length")


class SlotCache:
    """One KV cache per layer whose rows are the running sequences' slots, grown on demand (rows and positions
    doubled, contents kept) so memory follows the load rather than ``max_running x max_seq_len``."""

    def __init__(self, model, device, max_rows: int):
        self.model, self.device, self.max_rows = model, device, max_rows
        self.layers: list[KVCache] = []
        self.n_rows = self.length = 0

    def reserve(self, rows: int, length: int) -> None:
        if rows <= self.n_rows and length <= self.length:
            return
        cfg = self.model.cfg
        rows = max(rows, min(2 * self.n_rows, self.max_rows)) if rows > self.n_rows else self.n_rows
        length = min(cfg.max_seq_len, max(length, 2 * self.length)) if length > self.length else self.length
        grown = self.model.new_cache(rows, length, self.device)
        for new, old in zip(grown, self.layers):
            new.k[:self.n_rows, :, :self.length] = old.k
            new.v[:self.n_rows, :, :self.length] = old.v
        self.layers, self.n_rows, self.length = grown, rows, length

    def rows(self, start: int, stop: int) -> list[KVCache]:
        return [layer.rows(start, stop) for layer in self.layers]

    def move(self, src: int, dst: int) -> None:
        for layer in self.layers:
            layer.k[dst] = layer.k[src]
            layer.v[dst] = layer.v[src]


class TextStream:
    """Token ids in, printable text out: holds back a trailing partial UTF-8 character and any tail that may
    still grow into a ``stop`` string; ``stopped`` once a stop string appears (the text ends before it)."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok, self.stop = tokenizer, [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        for s in self.stop:
            cut = text.find(s)
            if cut != -1:
                self.stopped = True
                text = text[:cut]
        self.text = text
        safe = len(text)
        if not self.stopped:
            if text.endswith("\ufffd"):
                safe -= 1
            for s in self.stop:  # a tail that is a prefix of a stop string may yet become one
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if s.startswith(text[-n:]):
                        safe = min(safe, len(text) - n)
                        break
        return self._take(safe)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
