"""Prefix and prompt tuning, native to the decoder and its KV cache: virtual tokens started from real text
reproduce the base model reading that text, training moves only them, generation works with the cache."""

import pytest
import torch
from conftest import read_metrics, tiny_overrides
from safetensors.torch import load_file

from fmforge.config import FinetuneConfig, build_config
from fmforge.deploy.generate import sample
from fmforge.finetune.base import init_virtual_tokens
from fmforge.models import build_model
from fmforge.models.config import ModelConfig
from fmforge.models.virtual import PrefixAttention, VirtualTokenGPT
from fmforge.runs import load_pretrained
from fmforge.train.loop import train

TEXT = "def parse(text):"


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def base_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("virtual_base") / "run"
    # Long enough to use its context: virtual tokens act only through attention.
    train(build_config({}, tiny_overrides(prepared, out, **{"train.max_steps": 200, "checkpoint.interval": 0,
                                                            "train.eval_interval": 0})),
          echo=quiet)
    return out


def with_virtual(base_run, method: str, n: int) -> VirtualTokenGPT:
    """The base run's model with n virtual tokens, started from TEXT's tokens."""
    base, _ = load_pretrained(base_run)
    cfg = ModelConfig(**{**base.cfg.model_dump(), f"{method}_tokens": n})
    model = build_model(cfg).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    init_virtual_tokens(model, FinetuneConfig(base=str(base_run), method=method, virtual_tokens=n, init_text=TEXT))
    return model


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_from_text_reproduce_the_base_model_reading_that_text(base_run, method):
    base, tok = load_pretrained(base_run)
    text_ids = tok.encode(TEXT)
    model = with_virtual(base_run, method, len(text_ids))
    ids = torch.tensor([tok.encode("    return text.split()")])
    with torch.no_grad():
        expected = base(torch.cat([torch.tensor([text_ids]), ids], dim=1))[:, len(text_ids):]
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generation_with_virtual_tokens_uses_the_kv_cache_and_matches_full_recompute(base_run, method):
    model = with_virtual(base_run, method, 5)
    with torch.no_grad():
        model.prompt is not None and model.prompt.add_(0.3 * torch.randn_like(model.prompt))
        for block in model.blocks:
            if isinstance(block.attn, PrefixAttention):
                block.attn.prefix_k.add_(0.3 * torch.randn_like(block.attn.prefix_k))
    prompt = [0, 17, 42, 99]
    cached = sample(model, prompt, 12, temperature=0.0, use_cache=True)
    recomputed = sample(model, prompt, 12, temperature=0.0, use_cache=False)
    assert cached == recomputed and len(cached) == 12


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_tuning_lowers_the_loss_while_every_base_weight_stays_bit_identical(prepared, base_run, tmp_path, method):
    out = tmp_path / method
    messages = []
    train(build_config({}, tiny_overrides(prepared, out, **{
        "finetune.base": str(base_run), "finetune.method": method, "finetune.virtual_tokens": 8,
        "finetune.init_text": repr(TEXT), "train.max_steps": 30, "optim.lr": 3e-2, "checkpoint.interval": 0,
        "train.eval_interval": 5, "train.eval_batches": 4})),
        echo=messages.append)
    assert any(f"{method} tuning, 8 virtual tokens" in m for m in messages)
    val = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]  # the same held-out batches each time
    # Seen: prefix 4.2218 -> 4.2179, prompt 4.2210 -> 4.2144 over 30 steps.
    assert val[-1] < val[0], val
    before, after = load_file(str(base_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    virtual = {"prefix": {f"blocks.{i}.attn.prefix_{kv}" for i in range(2) for kv in "kv"}, "prompt": {"prompt"}}
    assert set(after) - set(before) == virtual[method]
    model, tok = load_pretrained(out)  # model.json carries the virtual tokens: generate reads it as is
    assert model.virtual == 8
    assert len(sample(model, tok.encode("def"), 5, temperature=0.0)) == 5
