"""Sampling with a KV cache: it must produce exactly what full recomputation produces, honour the filters,
eos, the context limit and the padded vocabulary, and be reproducible under a seed."""

import pytest
import torch

from fmforge.config import ModelConfig
from fmforge.deploy import generate as generate_mod
from fmforge.deploy.generate import filter_logits, generate, sample
from fmforge.errors import FmforgeError
from fmforge.models.gpt import GPT

PROMPT = [5, 17, 3, 99, 42]


def tiny_model(arch: str = "llama") -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, d_model=64, n_head=4, n_kv_head=2 if arch == "llama" else None,
                      vocab_size=128, max_seq_len=48).resolved()
    return GPT(cfg).eval()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_with_cache_equals_greedy_without(arch):
    model = tiny_model(arch)
    with_cache = sample(model, PROMPT, 30, temperature=0, use_cache=True)
    without = sample(model, PROMPT, 30, temperature=0, use_cache=False)
    assert with_cache == without and len(with_cache) == 30


@pytest.mark.parametrize("kw", [dict(), dict(top_k=20), dict(top_p=0.9), dict(top_k=50, top_p=0.8)])
def test_seeded_sampling_with_cache_equals_sampling_without(kw):
    model = tiny_model()
    a = sample(model, PROMPT, 30, temperature=1.0, generator=seeded(3), use_cache=True, **kw)
    b = sample(model, PROMPT, 30, temperature=1.0, generator=seeded(3), use_cache=False, **kw)
    assert a == b


def test_same_seed_same_tokens_different_seed_different_tokens():
    model = tiny_model()
    first = sample(model, PROMPT, 20, generator=seeded(7))
    assert sample(model, PROMPT, 20, generator=seeded(7)) == first
    assert sample(model, PROMPT, 20, generator=seeded(8)) != first


def test_sampling_works_inside_inference_mode_and_restores_training_mode():
    model = tiny_model().train()
    with torch.inference_mode():
        assert len(sample(model, PROMPT, 5, temperature=0)) == 5
    assert model.training


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([1.0, 4.0, 3.0, 0.0, 2.0])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out).tolist() == [True, False, False, True, True]
    assert out[1] == 4.0 and out[2] == 3.0


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.1, 0.5, 0.25, 0.15])
    logits = probs.log()
    # Sorted: 0.5, 0.25 (0.75), 0.15 (0.90), 0.1. top_p 0.7 needs the first two; 0.8 the first three.
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [False, True, True, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [False, True, True, True]
    assert torch.isfinite(filter_logits(logits, top_p=0.3)).tolist() == [False, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_top_k_and_top_p_combine():
    logits = torch.tensor([0.1, 0.5, 0.25, 0.15]).log()
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.99)).tolist() == [False, True, True, True]


class FavoursPaddedIds(torch.nn.Module):
    """Puts almost all probability on ids >= 100, the padded rows a real tokenizer never produces."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=128, max_seq_len=64, n_layer=1, n_head=1, d_model=8).resolved()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx, start_pos=0, cache=None):
        logits = torch.zeros(*idx.shape, 128)
        logits[..., 100:] = 20.0
        return logits


def test_vocab_limit_never_samples_a_padded_id():
    model = FavoursPaddedIds()
    out = sample(model, [1], 50, temperature=1.0, generator=seeded(0), use_cache=False, vocab_limit=100)
    assert len(out) == 50 and max(out) < 100
    assert max(sample(model, [1], 5, temperature=0, use_cache=False, vocab_limit=100)) < 100


def test_stops_at_eos_without_returning_it():
    model = tiny_model()
    free = sample(model, PROMPT, 20, temperature=0)
    eos = free[6]
    first = free.index(eos)
    assert sample(model, PROMPT, 20, temperature=0, eos_id=eos) == free[:first]


def test_stops_when_the_context_is_full():
    model = tiny_model()  # max_seq_len 48
    prompt = list(range(45))
    # positions 45, 46, 47 are fed back; the token predicted at 47 is the last one the context allows
    assert len(sample(model, prompt, 10, temperature=0)) == 4
    assert sample(model, prompt, 10, temperature=0) == sample(model, prompt, 10, temperature=0, use_cache=False)
    with pytest.raises(FmforgeError, match="context"):
        sample(model, list(range(49)), 1)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                dict(top_p=1.5), dict(top_k=0)])
def test_bad_sampling_arguments_are_user_errors(kw):
    args = dict(max_new_tokens=5) | kw
    with pytest.raises(FmforgeError):
        sample(tiny_model(), PROMPT, args.pop("max_new_tokens"), **args)
    with pytest.raises(FmforgeError):
        generate("/nonexistent", "x", **(dict(max_new_tokens=5) | kw))


class CharTokenizer:
    """Stands in for TextTokenizer: one id per character, bos 1, eos 2."""

    bos_id, eos_id, vocab_size = 1, 2, 100

    def encode(self, text):
        return [ord(c) % 90 + 10 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 60) for i in ids)


def test_generate_prepends_bos_and_returns_prompt_plus_continuation(monkeypatch):
    model = tiny_model()
    seen = {}
    real_sample = generate_mod.sample

    def spy(model, ids, *args, **kw):
        seen["ids"], seen["kw"] = ids, kw
        return real_sample(model, ids, *args, **kw)

    monkeypatch.setattr(generate_mod, "load_pretrained", lambda run_dir, device, family=None: (model, CharTokenizer()))
    monkeypatch.setattr(generate_mod, "sample", spy)
    text = generate("run", "hi", max_new_tokens=8, temperature=1.0, seed=11, device="cpu")
    assert seen["ids"] == [1] + CharTokenizer().encode("hi")
    assert seen["kw"]["eos_id"] == 2 and seen["kw"]["vocab_limit"] == 100
    assert text.startswith("hi") and len(text) <= 2 + 8
    assert generate("run", "hi", max_new_tokens=8, temperature=1.0, seed=11, device="cpu") == text
