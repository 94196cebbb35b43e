"""LoRA adapters on the shared block: only adapters train, merging changes nothing, updates are low-rank,
adapters save and load on their own."""

import pytest
import torch

from fmforge.errors import FmforgeError
from fmforge.finetune.lora import (
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    load_adapters,
    lora_modules,
    merge_lora,
    save_adapters,
)
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.objectives.clm import clm_loss


def tiny_gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(arch="llama", size="nano", n_kv_head=2).resolved(vocab_size=64, seq_len=32))


def trained_with_lora(rank=4, steps=20):
    model = tiny_gpt()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=rank, alpha=8.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (8, 33))
    losses = []
    for _ in range(steps):
        loss = clm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, base, ids, losses


def test_a_fresh_adapter_changes_nothing_and_only_adapters_are_trainable():
    model = tiny_gpt()
    ids = torch.randint(0, 64, (2, 16))
    before = model(ids)
    wrapped = apply_lora(model, rank=4)
    assert "blocks.0.attn.qkv" in wrapped and "blocks.1.mlp.w2" in wrapped and "lm_head" not in wrapped
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert "blocks.0.attn.qkv.weight" in model.state_dict()  # base names unchanged


def test_training_moves_only_adapter_parameters_and_lowers_the_loss():
    model, base, _, losses = trained_with_lora()
    assert losses[-1] < losses[0]
    state = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), name  # every base weight bit-identical
    assert any(m.lora_B.abs().sum() > 0 for m in lora_modules(model).values())


def test_each_update_has_rank_at_most_r_and_the_merged_model_computes_the_same():
    model, _, ids, _ = trained_with_lora(rank=3)
    for name, m in lora_modules(model).items():
        # Singular values past the third are float32 rounding (~1e-7 of the largest).
        assert torch.linalg.matrix_rank(m.delta().detach(), rtol=1e-4) <= 3, name
    adapted = model(ids[:, :-1]).detach()
    assert merge_lora(model) == 10  # 2 blocks x (qkv, proj, w1, w2, w3)
    assert not lora_modules(model) and not any("lora" in n for n in model.state_dict())
    torch.testing.assert_close(model(ids[:, :-1]), adapted, rtol=0, atol=1e-5)


def test_adapters_save_alone_and_load_into_a_fresh_base(tmp_path):
    model, _, ids, _ = trained_with_lora()
    save_adapters(model, tmp_path / "adapters", base="runs/base")
    assert (tmp_path / "adapters" / ADAPTER_WEIGHTS).stat().st_size < 100_000
    fresh = tiny_gpt()
    config = load_adapters(fresh, tmp_path / "adapters")
    assert config["rank"] == 4 and config["base"] == "runs/base"
    assert all(isinstance(m, LoRALinear) for m in lora_modules(fresh).values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids[:, :-1]), model(ids[:, :-1]), rtol=0, atol=0)


def test_lora_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(FmforgeError, match="no Linear layer matches the LoRA targets"):
        apply_lora(tiny_gpt(), targets=["*.attention.query"])
    with pytest.raises(FmforgeError, match="rank must be at least 1"):
        apply_lora(tiny_gpt(), rank=0)
    with pytest.raises(FmforgeError, match="no LoRA adapters in"):
        load_adapters(tiny_gpt(), tmp_path)
