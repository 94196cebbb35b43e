"""Continuous batching for ``fmforge serve``: iteration-level scheduling over every running sequence.

One engine per served decoder runs in its own thread. Each loop iteration (1) drops sequences whose client
went away, (2) admits waiting requests while the running set stays under ``max_running`` sequences and
``token_budget`` tokens (prompt + tokens it may still generate), prefilling each with its own KV cache, and
(3) runs ONE batched decode step for all running sequences: embeddings, q/k/v, output projections, MLPs and
the head run as one batch of B tokens; attention runs per sequence over its own cache (the sequences have
different lengths, and this keeps each one's arithmetic that of ``generate.sample``). New requests
therefore join between decode steps, and a long generation never blocks a short one.

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
import torch.nn.functional as F

from fmforge.deploy.generate import filter_logits
from fmforge.models.gpt import GPT


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
    cache: list | None = None
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
        while True:
            with self._cond:
                if not self.waiting or len(self.running) >= self.max_running:
                    return
                seq = self.waiting[0]
                seq.n_new = min(seq.params.max_tokens, self.max_len - len(seq.prompt_ids) + 1)
                used = sum(s.footprint for s in self.running)
                if self.running and used + seq.footprint > self.token_budget:
                    return  # admitted once enough finishes; an oversize request still runs alone
                self.waiting.popleft()
            self._prefill(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        seq.cache = None
        seq.emit(TokenEvent(finish=reason))

    # ------------------------------------------------------------------------------------------ model

    def _prefill(self, seq: Sequence) -> None:
        seq.generator = torch.Generator(device=self.device)
        if seq.params.seed is None:
            seq.generator.seed()
        else:
            seq.generator.manual_seed(seq.params.seed)
        seq.cache = self.model.new_cache(1, min(self.max_len, len(seq.prompt_ids) + seq.n_new - 1))
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        logits = self.model(ids, 0, seq.cache)[0, -1:]
        self.running.append(seq)
        self._sample([seq], logits)

    def _decode_step(self) -> None:
        seqs = list(self.running)
        if self.batched:
            logits = self._batched_logits(seqs)
        else:
            logits = torch.cat([self.model(torch.tensor([[s.last_token]], device=self.device),
                                           self._position(s), s.cache)[0, -1:] for s in seqs])
        self._sample(seqs, logits)

    @staticmethod
    def _position(seq: Sequence) -> int:
        return len(seq.prompt_ids) + len(seq.generated) - 1  # where the last sampled token sits

    def _batched_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [B, vocab] of each sequence's next token: one decode step for all of them. The B new tokens
        travel as one sequence of length B (x is [1, B, d]) so every Linear and norm is one batched call and
        RoPE takes one position per token; attention then reads each token's own cache."""
        model = self.model
        tokens = torch.tensor([[s.last_token for s in seqs]], dtype=torch.long, device=self.device)
        positions = torch.tensor([self._position(s) for s in seqs], device=self.device)
        x = model.tok_emb(tokens)
        if model.pos_emb is not None:
            x = x + model.pos_emb(positions)[None]
        rope = None
        if model.cfg.pos == "rope":
            rope = (model.rope_cos[positions], model.rope_sin[positions])
        for layer, block in enumerate(model.blocks):
            if block.post_norm:
                x = block.norm1(x + self._attend(block.attn, x, rope, seqs, layer))
                x = block.norm2(x + block.mlp(x))
            else:
                x = x + self._attend(block.attn, block.norm1(x), rope, seqs, layer)
                x = x + block.mlp(block.norm2(x))
        x = model.norm_f(x)
        if model.cfg.mup is not None:
            x = x * (1.0 / model.cfg.width_mult)
        return model.lm_head(x)[0]

    @staticmethod
    def _attend(attn, x: torch.Tensor, rope, seqs: list[Sequence], layer: int) -> torch.Tensor:
        q, k, v = attn.project(x, rope)  # [1, heads, B, head_dim]
        gqa = attn.n_head // attn.n_kv_head > 1
        outs = []
        for b, seq in enumerate(seqs):
            pos = len(seq.prompt_ids) + len(seq.generated) - 1
            keys, values = seq.cache[layer].update(pos, k[:, :, b:b + 1], v[:, :, b:b + 1])
            outs.append(F.scaled_dot_product_attention(q[:, :, b:b + 1], keys, values, enable_gqa=gqa,
                                                       scale=attn.scale))
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, len(seqs), -1)
        return attn.proj(y)

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
