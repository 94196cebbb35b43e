"""The request handlers behind ``fmforge serve`` (``serve.py`` routes HTTP to them): OpenAI completions,
chat completions and embeddings over the served models, plain Python over plain dicts so they test without
a server. A streaming reply comes back as an ``SseStream`` of server-sent-event lines."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from fmforge.deploy.batching import Engine, QueueFull, SamplingParams, Sequence, TextStream, TokenEvent
from fmforge.deploy.chat import chat_prompt_ids
from fmforge.deploy.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_chunk,
    completion_chunk,
    error_body,
    model_card,
    new_id,
    usage,
    usage_chunk,
    validation_error,
)
from fmforge.errors import FmforgeError
from fmforge.objectives.contrastive import CaptionTokens

if TYPE_CHECKING:
    from starlette.requests import Request

MAX_BODY_BYTES = 1 << 20
MAX_EMBEDDING_INPUTS = 256
RETRY_AFTER_S = 1


@dataclass
class SseStream:
    """A streaming reply: ``body`` yields ``data: ...`` event lines, ending with ``data: [DONE]``."""

    body: AsyncIterator[str]


@dataclass
class ServedModel:
    name: str
    family: str
    model: torch.nn.Module
    tokenizer: object
    context: int
    engine: Engine | None = None  # decoders
    lock: threading.Lock | None = None  # encoders run one batch at a time
    created: int = 0


# ---------------------------------------------------------------------------------------------------- jobs


class Job:
    """The sequences of one request (prompts x n), their events gathered into one asyncio queue."""

    def __init__(self, sm: ServedModel, prompts: list[list[int]], params: list[SamplingParams], stop: list[str],
                 metrics, loop: asyncio.AbstractEventLoop):
        self.sm, self.metrics, self.loop = sm, metrics, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.seqs = [Sequence(ids, p, emit=self._emitter(i)) for i, (ids, p) in enumerate(zip(prompts, params))]
        self.streams = [TextStream(sm.tokenizer, stop) for _ in self.seqs]
        self.last = [None] * len(self.seqs)
        self.finish: list[str | None] = [None] * len(self.seqs)
        try:
            for seq in self.seqs:
                sm.engine.submit(seq)
        except QueueFull:
            self.cancel()
            raise ApiError(429, f"{sm.name} is at capacity; retry shortly", kind="rate_limit_error",
                           code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        metrics.prompt_tokens.labels(sm.name).inc(sum(len(p) for p in prompts))

    def _emitter(self, index: int):
        post, put = _mailbox(self.loop).post, self.queue.put_nowait

        def emit(event: TokenEvent) -> None:
            post(put, (index, event))
        return emit

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    def completion_tokens(self) -> int:
        return sum(len(s.ids) for s in self.streams)

    async def events(self, deadline: float):
        """Yield (index, text delta, event) per token and (index, "", finish reason) at each end."""
        open_ = len(self.seqs)
        name = self.sm.name
        e2e, ttft, itl = (m.labels(name) for m in (self.metrics.e2e, self.metrics.ttft, self.metrics.itl))
        generated = self.metrics.generation_tokens.labels(name)
        while open_:
            remaining = deadline - time.monotonic()
            try:
                if not self.queue.empty() and remaining > 0:  # no timer task for what already arrived
                    index, event = self.queue.get_nowait()
                else:
                    index, event = await asyncio.wait_for(self.queue.get(), max(remaining, 0.001))
            except asyncio.TimeoutError:
                self.cancel()
                raise ApiError(408, "the request timed out before the reply was complete", kind="timeout",
                               code="timeout") from None
            if self.finish[index] is not None:
                continue  # events after a stop string cut the sequence short
            if event.finish is not None:
                if event.finish == "error":
                    raise RuntimeError(event.error)
                self.finish[index] = "length" if event.finish == "length" else "stop"
                open_ -= 1
                e2e.observe(time.monotonic() - self.arrival)
                yield index, self.streams[index].flush(), event
                continue
            now = time.monotonic()
            if self.last[index] is None:
                ttft.observe(now - self.arrival)
            else:
                itl.observe(now - self.last[index])
            self.last[index] = now
            generated.inc()
            stream = self.streams[index]
            text = stream.push(event.token)
            if stream.stopped:
                self.seqs[index].cancel()
                stream.ids.pop()  # the token that completed the stop string is not part of the reply
                self.finish[index] = "stop"
                open_ -= 1
                e2e.observe(now - self.arrival)
                yield index, text, event
                yield index, "", TokenEvent(finish="stop")
                continue
            yield index, text, event


class _Mailbox:
    """Engine events into one event loop: a decode step emits one event per running sequence, and waking the
    loop once per step (not once per event) keeps the server's cost per token small under concurrency."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list = []
        self.lock = threading.Lock()

    def post(self, put, item) -> None:
        """Call ``put(item)`` in the loop (from any thread), in posting order."""
        with self.lock:
            self.items.append((put, item))
            if len(self.items) > 1:
                return  # a flush is already scheduled and will take this one too
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for put, item in items:
            put(item)


_MAILBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAILBOX_LOCK = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _MAILBOX_LOCK:
        box = _MAILBOXES.get(loop)
        if box is None:
            box = _MAILBOXES[loop] = _Mailbox(loop)
        return box


def _encoded(vector: list[float], encoding_format: str):
    """OpenAI's clients ask for base64: the little-endian float32 bytes of the vector."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _logprobs_entry(tok, event: TokenEvent, offset: int) -> dict:
    top = None
    if event.top_logprobs is not None:
        top = [{tok.decode([t]): lp for t, lp in event.top_logprobs.items()}]
    return {"tokens": [tok.decode([event.token])], "token_logprobs": [event.logprob], "top_logprobs": top,
            "text_offset": [offset]}


# ---------------------------------------------------------------------------------------------------- app


class ServeApp:
    """The handlers of one server over its served models."""

    def __init__(self, models: dict[str, ServedModel], metrics, *, api_keys: list[str] | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, request_timeout: float = 600.0,
                 grounders: dict[str, Callable] | None = None):
        self.models, self.api_keys = models, [k.encode() for k in (api_keys or [])]
        # index name -> ground(messages, k, hybrid, seed) -> (messages, citations): a chat request's
        # ``retrieval`` field names one (``fmforge serve --index NAME=DIR``, rag/serving.py)
        self.grounders = grounders or {}
        self.max_body_bytes, self.request_timeout = max_body_bytes, request_timeout
        self.metrics = metrics
        for sm in models.values():
            if sm.engine is not None:
                sm.engine.on_step = self.metrics.engine_hook(sm.name)

    # ------------------------------------------------------------------------------------------ helpers

    async def body(self, request: Request) -> dict:
        """The JSON object of the request, read in chunks so an oversize body is refused without being held."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body is larger than {self.max_body_bytes:,} bytes", "body",
                               code="body_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except (ValueError, RecursionError) as err:
            raise ApiError(400, f"request body is not valid JSON: {str(err)[:100]}", "body",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "body")
        return data

    def pick(self, name: str | None, want: str) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ApiError(400, "model: field required (this server has several models)", "model")
        sm = self.models.get(name)
        if sm is None:
            raise ApiError(404, f"model {name[:100]!r} does not exist; served: {', '.join(self.models)}", "model",
                           code="model_not_found")
        if want == "decoder" and sm.family != "decoder":
            raise ApiError(400, f"model {name!r} is a {sm.family} encoder: it serves /v1/embeddings only", "model")
        if want == "encoder" and sm.family == "decoder":
            raise ApiError(400, f"model {name!r} is a decoder: embeddings need a BERT-family or CLIP model",
                           "model")
        return sm

    def sampling(self, sm: ServedModel, req, max_tokens: int | None, prompts: list[list[int]],
                 logprobs: int | None = None) -> list[SamplingParams]:
        max_tokens = 16 if max_tokens is None else max_tokens
        if max_tokens > sm.context:
            raise ApiError(400, f"max_tokens: {max_tokens} is more than the model's context of {sm.context} tokens",
                           "max_tokens")
        for ids in prompts:
            if len(ids) > sm.context:
                field = "messages" if isinstance(req, ChatRequest) else "prompt"
                raise ApiError(400, f"{field}: {len(ids)} tokens is more than the model's context of {sm.context}",
                               field, code="context_length_exceeded")
        params = []
        for _ids in prompts:
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % 2**63
                params.append(SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                                             top_p=req.top_p if req.top_p < 1 else None, seed=seed,
                                             logprobs=logprobs))
        return params

    # ------------------------------------------------------------------------------------------ generation

    async def completions(self, data: dict, request: Request):
        req = _validate(CompletionRequest, data)
        sm = self.pick(req.model, "decoder")
        tok = sm.tokenizer
        prompts = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in req.prompt]
        if any(not ids for ids in prompts):
            raise ApiError(400, "prompt: empty prompt, and the tokenizer has no bos token", "prompt")
        params = self.sampling(sm, req, req.max_tokens, prompts, req.logprobs)
        job = Job(sm, [ids for ids in prompts for _ in range(req.n)], params, req.stop, self.metrics,
                  asyncio.get_running_loop())
        n_prompt = sum(len(ids) for ids in prompts)
        rid = new_id("cmpl")
        if req.stream:
            return self.stream(job, rid, sm, "text_completion", n_prompt, req, self._completion_chunks)
        texts = [""] * len(job.seqs)
        logprobs = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                    for _ in job.seqs]
        async for index, text, event in self.collect(job, request):
            if event.token is not None and req.logprobs is not None:
                for key, value in _logprobs_entry(tok, event, len(texts[index])).items():
                    logprobs[index][key] += value or [None]
            texts[index] += text
        choices = [{"index": i, "text": (req.prompt[i // req.n] if req.echo else "") + texts[i],
                    "finish_reason": job.finish[i], "logprobs": logprobs[i] if req.logprobs is not None else None}
                   for i in range(len(texts))]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": sm.name,
                "choices": choices, "usage": usage(n_prompt, job.completion_tokens())}

    async def chat(self, data: dict, request: Request):
        req = _validate(ChatRequest, data)
        sm = self.pick(req.model, "decoder")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, f"messages: the last message must be the user's (got {messages[-1]['role']!r})",
                           "messages")
        rid = new_id("chatcmpl")
        cited = None
        if req.retrieval is not None:
            messages, cited = await self.ground(messages, req.retrieval, rid)
        prompt = chat_prompt_ids(sm.tokenizer, messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self.sampling(sm, req, max_tokens, [prompt])
        job = Job(sm, [prompt] * req.n, params, req.stop, self.metrics, asyncio.get_running_loop())
        if req.stream:
            return self.stream(job, rid, sm, "chat.completion.chunk", len(prompt), req, self._chat_chunks)
        texts = [""] * req.n
        async for index, text, _event in self.collect(job, request):
            texts[index] += text
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "finish_reason": job.finish[i], "logprobs": None} for i in range(req.n)]
        reply = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": sm.name,
                 "choices": choices, "usage": usage(len(prompt), job.completion_tokens())}
        if cited is not None:
            reply["citations"] = cited
        return reply

    async def ground(self, messages: list[dict], retrieval, rid: str) -> tuple[list[dict], list[dict]]:
        """The request's messages grounded in the index its ``retrieval`` field names, and the citations."""
        ground = self.grounders.get(retrieval.index)
        if ground is None:
            known = ", ".join(sorted(self.grounders)) or "none (start the server with --index NAME=DIR)"
            raise ApiError(400, f"retrieval.index: no index named {retrieval.index!r} is served (served: {known})",
                           "retrieval.index")
        try:
            return await asyncio.to_thread(ground, messages, retrieval.k, retrieval.hybrid, rid)
        except FmforgeError as err:
            raise ApiError(400, f"retrieval: {err}", "retrieval") from None

    async def collect(self, job: Job, request: Request):
        """``job.events`` for a non-streaming reply, cancelling the sequences if the client goes away."""
        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            job.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for item in job.events(job.arrival + self.request_timeout):
                yield item
        finally:
            watcher.cancel()
            job.cancel()

    def stream(self, job: Job, rid: str, sm: ServedModel, obj: str, n_prompt: int, req, chunks):
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def body():
            try:
                for first in chunks(rid, sm, len(job.seqs), "", None, opening=True):  # index: the choice count
                    yield _sse(first)
                async for index, text, event in job.events(job.arrival + self.request_timeout):
                    for chunk in chunks(rid, sm, index, text, event, offset=len(job.streams[index].text)):
                        yield _sse(chunk)
                if include_usage:
                    yield _sse(usage_chunk(rid, sm.name, obj, n_prompt, job.completion_tokens()))
            except ApiError as err:  # a timeout after the headers went out: an error event, then the end
                yield _sse(error_body(err.message, err.param, err.kind, err.code))
            finally:
                job.cancel()  # a client that went away frees its sequences
            yield _sse("[DONE]")

        return SseStream(body())

    def _completion_chunks(self, rid, sm, index, text, event, opening=False, offset=0):
        if opening:
            return []
        finish = event.finish if event.finish is None else ("length" if event.finish == "length" else "stop")
        logprobs = None
        if event.token is not None and event.logprob is not None:
            logprobs = _logprobs_entry(sm.tokenizer, event, offset)
        if text or finish or logprobs:
            return [completion_chunk(rid, sm.name, index, text, finish, logprobs)]
        return []

    def _chat_chunks(self, rid, sm, index, text, event, opening=False, offset=0):
        if opening:
            return [chat_chunk(rid, sm.name, i, {"role": "assistant", "content": ""}, None) for i in range(index)]
        finish = event.finish if event.finish is None else ("length" if event.finish == "length" else "stop")
        out = []
        if text:
            out.append(chat_chunk(rid, sm.name, index, {"content": text}, None))
        if finish:
            out.append(chat_chunk(rid, sm.name, index, {}, finish))
        return out

    # ------------------------------------------------------------------------------------------ embeddings

    async def embeddings(self, data: dict):
        req = _validate(EmbeddingRequest, data)
        sm = self.pick(req.model, "encoder")
        if len(req.input) > MAX_EMBEDDING_INPUTS:
            raise ApiError(400, f"input: at most {MAX_EMBEDDING_INPUTS} texts per request", "input")
        vectors, n_tokens = await asyncio.to_thread(self._embed, sm, req.input)
        return {"object": "list", "model": sm.name, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
                         for i, v in enumerate(vectors)]}

    @staticmethod
    def _embed(sm: ServedModel, texts: list[str]) -> tuple[list[list[float]], int]:
        """BERT: mean of the final hidden states over real tokens ([CLS] text [SEP]), L2-normalized (the
        sentence-transformers recipe); CLIP: the text tower's normalized embedding."""
        tok, device = sm.tokenizer, next(sm.model.parameters()).device
        with sm.lock, torch.inference_mode():
            if sm.family == "clip":
                rows = CaptionTokens(tok, sm.context)(texts).to(device)
                n_tokens = sum(min(len(ids) + 1, sm.context) for ids in tok.encode_batch(texts))
                return sm.model.encode_text(rows).float().cpu().tolist(), n_tokens
            encoded = [e.ids[:sm.context] for e in tok.tokenizer.encode_batch(texts, add_special_tokens=True)]
            n_tokens = sum(len(ids) for ids in encoded)
            width = max(len(ids) for ids in encoded)
            pad = tok.pad_id if tok.pad_id is not None else 0
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for i, row in enumerate(encoded):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = sm.model(ids, attention_mask=mask).float()
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            return F.normalize(pooled, dim=-1).cpu().tolist(), n_tokens

    # ------------------------------------------------------------------------------------------ others

    def models_list(self) -> dict:
        return {"object": "list", "data": [model_card(sm.name, sm.created) for sm in self.models.values()]}

    async def invocations(self, data: dict, request: Request):
        """SageMaker's inference entry point: chat when the body has messages, embeddings for input, else a
        completion."""
        if "messages" in data:
            return await self.chat(data, request)
        if "input" in data:
            return await self.embeddings(data)
        return await self.completions(data, request)

    def authorized(self, header: str | None) -> bool:
        if not self.api_keys:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        given = header[len("Bearer "):].strip().encode()
        ok = False
        for key in self.api_keys:  # every key compared, constant time each
            ok |= hmac.compare_digest(given, key)
        return ok


def _validate(schema, data: dict):
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None

