"""``fmforge chat RUN_DIR``: talk to a chat-tuned decoder in the terminal, and ``fmforge generate --chat``.

The prompt is the run's chat template (``data/chat.py``, what SFT trained on), tokenized segment by segment
exactly as training did, so the model sees the layout it learned. Replies stream token by token from the
batching engine (one sequence); Ctrl-C cancels the reply being written and the session goes on. The history
is trimmed from the oldest turn so the prompt plus the reply fit the context window.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from fmforge.data.chat import segments
from fmforge.deploy.batching import Engine, SamplingParams, Sequence, TextStream, TokenEvent
from fmforge.deploy.generate import _check_sampling_args, generate_command, sample
from fmforge.deploy.image_generate import generate_images
from fmforge.device import pick_device
from fmforge.errors import FmforgeError
from fmforge.runs import family_of, load_pretrained, read_model_config

HELP = "Type a message. /reset clears the conversation, /exit (or Ctrl-D) ends it; Ctrl-C stops a reply."


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """[bos] + the chat template's segments, each tokenized on its own (as ``encode_chat`` trains), ending
    with the assistant header when the last message is the user's. A "developer" message is a system one."""
    messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for text, is_assistant in segments(messages):
        ids += tokenizer.encode(text) + ([tokenizer.eos_id] if is_assistant else [])
    return ids


def trimmed_prompt(tokenizer, system: str | None, history: list[dict], context: int,
                   reserve: int) -> tuple[list[int], list[dict]]:
    """The prompt ids of ``system`` + ``history`` leaving ``reserve`` tokens for the reply, dropping the
    oldest turns first; the kept history is returned too. The last message alone too long: an error."""
    head = [{"role": "system", "content": system}] if system else []
    while True:
        ids = chat_prompt_ids(tokenizer, head + history)
        if len(ids) + reserve <= context:
            return ids, history
        if len(history) <= 1:
            raise FmforgeError(f"the message is {len(ids)} tokens with the template; the model's context is "
                               f"{context} and {reserve} are kept for the reply: shorten it")
        # drop the oldest exchange (a user message and the reply to it)
        history = history[2:] if len(history) > 2 and history[1]["role"] == "assistant" else history[1:]


def _reserve(max_new_tokens: int, context: int) -> int:
    return max(1, min(max_new_tokens, context // 2))


def generate_chat(run_dir: str | Path, message: str, *, system: str | None = None, max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, device: str = "auto") -> str:
    """One chat turn: the reply of the run's model to ``message`` (with an optional ``system`` prompt)."""
    if not message:
        raise FmforgeError("empty message: give the prompt to answer")
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    dev = pick_device(device)
    model, tok = load_pretrained(run_dir, dev, family="decoder")
    context = model.cfg.max_seq_len - getattr(model, "virtual", 0)
    ids, _ = trimmed_prompt(tok, system, [{"role": "user", "content": message}], context,
                            _reserve(max_new_tokens, context))
    generator = torch.Generator(device=dev)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    new = sample(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 generator=generator, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
    return tok.decode(new)


def generate_chat_command(run_dir: str, *, prompt: str = "", system: str | None = None, max_new_tokens: int = 200,
                          temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                          seed: int | None = None, device: str = "auto") -> None:
    """``fmforge generate --chat``: print the model's reply to ``prompt`` sent as one chat message."""
    print(generate_chat(run_dir, prompt, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, device=device))


class ChatSession:
    """The state of one terminal conversation over an engine; ``reply`` streams one answer into ``out``."""

    def __init__(self, engine: Engine, tokenizer, context: int, system: str | None, params: SamplingParams):
        self.engine, self.tok, self.context = engine, tokenizer, context
        self.system, self.params = system, params
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, message: str, out: TextIO) -> str:
        """Stream the model's answer to ``message``; Ctrl-C (KeyboardInterrupt) cancels it and keeps what was
        written. The exchange joins the history either way."""
        history = self.history + [{"role": "user", "content": message}]
        ids, history = trimmed_prompt(self.tok, self.system, history, self.context,
                                      _reserve(self.params.max_tokens, self.context))
        events: list[TokenEvent] = []
        arrived = _Signal()
        seq = Sequence(ids, self.params, emit=lambda ev: (events.append(ev), arrived.set()))
        self.engine.submit(seq)
        stream = TextStream(self.tok)
        done = 0
        try:
            finished = False
            while not finished:
                arrived.wait()
                while done < len(events):
                    ev = events[done]
                    done += 1
                    if ev.error:
                        raise FmforgeError(f"generation failed: {ev.error}")
                    if ev.finish:
                        finished = True
                        break
                    out.write(stream.push(ev.token))
                    out.flush()
        except KeyboardInterrupt:
            seq.cancel()
            out.write(" [stopped]")
        out.write(stream.flush() + "\n")
        out.flush()
        self.history = history + [{"role": "assistant", "content": stream.text or " "}]
        return stream.text


class _Signal:
    """A threading.Event that clears itself when waited on (the engine thread sets it per token)."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def wait(self) -> None:
        while not self._event.wait(0.1):  # a short timeout lets Ctrl-C through on every platform
            pass
        self._event.clear()


def chat(run_dir: str | Path, *, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_k: int | None = None, top_p: float | None = 0.9, seed: int | None = None, device: str = "auto",
         read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """``fmforge chat``: an interactive conversation with the run's decoder until /exit or end of input."""
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    dev = pick_device(device)
    model, tok = load_pretrained(run_dir, dev, family="decoder")
    context = model.cfg.max_seq_len - getattr(model, "virtual", 0)
    engine = Engine(model, tok.eos_id, tok.vocab_size, max_running=1, max_waiting=1).start()
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed)
    session = ChatSession(engine, tok, context, system, params)
    out.write(f"fmforge chat: {Path(run_dir).name} ({context} tokens of context). {HELP}\n")
    try:
        while True:
            try:
                line = read(">>> ").strip()
            except EOFError:
                out.write("\n")
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not the end
                out.write("\n")
                continue
            if not line:
                continue
            if line in ("/exit", "/quit", "/bye"):
                break
            if line == "/reset":
                session.reset()
                out.write("(conversation cleared)\n")
                continue
            if line.startswith("/"):
                out.write(f"unknown command {line.split()[0]}. {HELP}\n")
                continue
            try:
                session.reply(line, out)
            except FmforgeError as err:
                out.write(f"error: {err}\n")
    finally:
        engine.stop(timeout=5)


IMAGE_FLAGS = {"class_label": "--class", "images": "--images", "steps": "--steps", "sampler": "--sampler",
               "guidance": "--guidance", "out": "--out", "overwrite": "--overwrite"}


def generate_verb(run_dir: str, *, chat: bool = False, system: str | None = None, **kwargs) -> None:
    """``fmforge generate``: the plain continuation, or with ``chat`` the reply to --prompt as one chat message
    in the run's chat template; for a diffusion run, images (``deploy/image_generate.py``)."""
    image_args = {key: kwargs.pop(key) for key in IMAGE_FLAGS if key in kwargs}
    if family_of(read_model_config(run_dir)) == "dit":
        if chat or system is not None:
            raise FmforgeError("--chat and --system apply to language models, not diffusion runs")
        given = {k: v for k, v in image_args.items() if v not in (None, False)}
        if "out" not in given:
            raise FmforgeError("a diffusion run writes images: give --out GRID.png")
        generate_images(run_dir, prompt=kwargs["prompt"] or None, seed=kwargs.get("seed") or 0,
                        device=kwargs.get("device", "auto"), **given)
        return
    given = [flag for key, flag in IMAGE_FLAGS.items() if image_args.get(key) not in (None, False)]
    if given:
        raise FmforgeError(f"{given[0]} applies to diffusion runs (model.arch=dit); {run_dir} is a language model")
    if chat:
        generate_chat_command(run_dir, system=system, **kwargs)
        return
    if system is not None:
        raise FmforgeError("--system applies with --chat")
    generate_command(run_dir, **kwargs)
