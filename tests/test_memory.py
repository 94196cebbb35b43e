"""The per-device memory estimate follows the strategy: sharding divides states, checkpointing activations."""

import pytest

from fmforge.config import build_config
from fmforge.models.gpt import GPT
from fmforge.train.memory import estimate_memory


@pytest.fixture(scope="module")
def gpt2():
    cfg = build_config({"model": {"arch": "gpt2", "size": "gpt2-124m"}}).model.resolved(vocab_size=50257, seq_len=1024)
    return cfg, sum(p.numel() for p in GPT(cfg).parameters())


def test_states_are_16_bytes_a_parameter_and_fsdp_divides_them_by_the_world(gpt2):
    cfg, n = gpt2
    ddp = estimate_memory(cfg, n, 1024, 12, world_size=8, dp="ddp")
    fsdp = estimate_memory(cfg, n, 1024, 12, world_size=8, dp="fsdp")
    assert ddp["params"] + ddp["grads"] + ddp["optimizer"] == pytest.approx(16 * n / 1e9)
    assert fsdp["grads"] == pytest.approx(ddp["grads"] / 8)
    assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 8)
    assert fsdp["activations"] == ddp["activations"]


def test_activation_checkpointing_shrinks_only_activations(gpt2):
    cfg, n = gpt2
    none, sel, full = (estimate_memory(cfg, n, 1024, 12, ac=ac) for ac in ("none", "selective", "full"))
    assert full["activations"] < sel["activations"] < none["activations"]
    assert full["optimizer"] == none["optimizer"]
    # GPT-2 124M, 12 x 1024, bf16: ~34·s·b·h bytes per layer x 12 layers ≈ 3.9 GB of block activations.
    assert 3.5 < none["activations"] - 1024 * 12 * cfg.vocab_size * 4 / 1e9 < 4.5
