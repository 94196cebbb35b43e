"""Sampling from a trained decoder with a KV cache, and the ``fmforge generate`` verb."""

from __future__ import annotations

from pathlib import Path

import torch

from fmforge.device import pick_device
from fmforge.errors import FmforgeError
from fmforge.runs import load_pretrained


def _check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 1:
        raise FmforgeError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise FmforgeError(f"temperature must be >= 0 (got {temperature}); 0 means greedy")
    if top_k is not None and top_k < 1:
        raise FmforgeError(f"top_k must be at least 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise FmforgeError(f"top_p must be in (0, 1] (got {top_p})")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the k largest (top-k) and outside the nucleus: the smallest set of
    most likely tokens whose probability reaches top_p (top-p). The most likely token always survives."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the tokens ranked above it already hold top_p of the mass.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> int:
    logits = logits.float()  # sampling in bf16 would quantize probabilities of rare tokens away
    if temperature == 0:
        return int(logits.argmax())
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
           eos_id: int | None = None, use_cache: bool = True, vocab_limit: int | None = None) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens and return only the new ones.

    Stops early at ``eos_id`` (not included) and at the model's context: the sequence never grows past
    ``cfg.max_seq_len`` tokens, as no context window is cropped or slid. ``temperature`` 0 is greedy;
    otherwise logits are divided by it, filtered by ``top_k``/``top_p`` and sampled with ``generator``
    (which must live on the model's device). Ids >= ``vocab_limit`` (embedding rows padded beyond the real
    tokenizer vocabulary) are never produced. ``use_cache=False`` recomputes the whole prefix per token
    (the reference the KV-cache path is tested against). The model runs in eval mode under inference_mode
    and is put back in its previous mode afterwards.
    """
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if not prompt_ids:
        raise FmforgeError("sampling needs at least one prompt token")
    max_len = model.cfg.max_seq_len - getattr(model, "virtual", 0)  # virtual tokens take the first positions
    if len(prompt_ids) > max_len:
        raise FmforgeError(f"prompt is {len(prompt_ids)} tokens; the model's context is {max_len}")
    # The last new token is never fed back, so a full context still predicts one more token.
    n_new = min(max_new_tokens, max_len - len(prompt_ids) + 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    new: list[int] = []
    try:
        with torch.inference_mode():
            seq = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            cache = model.new_cache(1, min(max_len, len(prompt_ids) + n_new - 1)) if use_cache else None
            logits = model(seq, 0, cache)[0, -1]
            for i in range(n_new):
                if vocab_limit is not None:
                    logits = logits[:vocab_limit]
                token = _next_token(logits, temperature, top_k, top_p, generator)
                if token == eos_id:
                    break
                new.append(token)
                if i == n_new - 1:
                    break
                step = torch.tensor([[token]], dtype=torch.long, device=device)
                if use_cache:
                    logits = model(step, seq.size(1) + i, cache)[0, -1]
                else:
                    seq = torch.cat((seq, step), dim=1)
                    logits = model(seq)[0, -1]
    finally:
        model.train(was_training)
    return new


def generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             device: str = "auto") -> str:
    """Load the model of a finished run and return ``prompt`` followed by its sampled continuation.

    The prompt is fed as [bos] + tokens, the layout of every training document, and generation stops at
    the tokenizer's eos. ``seed`` fixes the sampling RNG (same seed, same device: same text); None draws
    a fresh seed. ``temperature`` 0 is greedy. ``device`` is auto (cuda when available), cpu or cuda.
    """

    _check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    dev = pick_device(device)
    model, tok = load_pretrained(run_dir, dev, family="decoder")
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(prompt))
    if not ids:
        raise FmforgeError("empty prompt, and the tokenizer has no bos token to start from")
    generator = torch.Generator(device=dev)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    new = sample(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 generator=generator, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
    return prompt + tok.decode(new)


def generate_command(run_dir: str, *, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     device: str = "auto") -> None:
    """``fmforge generate``: print the prompt and its sampled continuation."""
    print(generate(run_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, device=device))
