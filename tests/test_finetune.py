"""`fmforge finetune`: the training loop started from a base model, full (with frozen parts) or LoRA, and
`fmforge merge`."""

import json

import pytest
import torch
from conftest import read_metrics, run_cli, tiny_overrides
from safetensors.torch import load_file

from fmforge.config import build_config
from fmforge.errors import FmforgeError
from fmforge.finetune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fmforge.train.loop import train


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def base_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    train(build_config({}, tiny_overrides(prepared, out, **{"train.max_steps": 30, "checkpoint.interval": 0})),
          echo=quiet)
    return out


def finetune_overrides(prepared, out, base, **extra):
    return tiny_overrides(prepared, out, **{"finetune.base": str(base), "train.max_steps": 10,
                                            "checkpoint.interval": 0, "optim.warmup_steps": 2, **extra})


def test_full_finetune_starts_from_the_base_weights_and_keeps_frozen_tensors(prepared, base_run, tmp_path):
    messages = []
    train(build_config({}, finetune_overrides(prepared, tmp_path / "ft", base_run,
                                              **{"finetune.freeze": "[tok_emb.*, norm_f.*]"})),
          echo=messages.append)
    assert any("full fine-tune, 2 tensors frozen" in m for m in messages), messages
    base_losses = [r["loss"] for r in read_metrics(base_run) if "loss" in r]
    first = read_metrics(tmp_path / "ft")[0]["loss"]
    assert abs(first - base_losses[-1]) < 0.5 < base_losses[0] - first  # the base's level, not a fresh start
    before, after = load_file(str(base_run / "model.safetensors")), load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert torch.equal(before["tok_emb.weight"], after["tok_emb.weight"])
    assert torch.equal(before["norm_f.weight"], after["norm_f.weight"])
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_lora_finetune_trains_adapters_saves_them_apart_and_merge_rebuilds_the_model(prepared, base_run, tmp_path):
    out = tmp_path / "lora"
    messages = []
    train(build_config({}, finetune_overrides(prepared, out, base_run, **{
        "finetune.method": "lora", "finetune.lora_rank": 4, "optim.lr": 1e-2, "train.max_steps": 30})),
        echo=messages.append)
    assert any("LoRA r=4" in m and "M parameters train" in m for m in messages), messages
    losses = torch.tensor([r["loss"] for r in read_metrics(out) if "loss" in r])
    assert losses[-5:].mean() < losses[:5].mean() - 0.05, losses
    adapter_cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert adapter_cfg["rank"] == 4 and "blocks.0.attn.qkv" in adapter_cfg["modules"]
    adapters = load_file(str(out / ADAPTER_WEIGHTS))
    assert set(adapters) == {f"{m}.{p}" for m in adapter_cfg["modules"] for p in ("lora_A", "lora_B")}
    before, merged = load_file(str(base_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in merged)
    assert torch.equal(before["tok_emb.weight"], merged["tok_emb.weight"])  # not a LoRA target
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], merged["blocks.0.attn.qkv.weight"])
    proc = run_cli("merge", out, "--out", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    again = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key, value in merged.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6)
    proc = run_cli("generate", tmp_path / "merged", "--prompt", "def", "--max-new-tokens", "4", "--seed", "0")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_finetune_mistakes_are_one_line_errors(prepared, base_run, tmp_path):
    with pytest.raises(FmforgeError, match="finetune.method needs finetune.base"):
        train(build_config({}, tiny_overrides(prepared, tmp_path / "a", **{"finetune.method": "lora"})), echo=quiet)
    with pytest.raises(FmforgeError, match="holds no model"):
        train(build_config({}, finetune_overrides(prepared, tmp_path / "b", tmp_path / "nowhere")), echo=quiet)
    with pytest.raises(FmforgeError, match="matches no parameter"):
        train(build_config({}, finetune_overrides(prepared, tmp_path / "c", base_run,
                                                  **{"finetune.freeze": "[encoder.*]"})), echo=quiet)
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    proc = run_cli("finetune", cfg, "--data", prepared, "--out", tmp_path / "d")
    assert proc.returncode == 2 and "needs a base model" in proc.stderr
    proc = run_cli("merge", tmp_path, "--out", tmp_path / "e")
    assert proc.returncode == 2 and "no LoRA adapters" in proc.stderr
