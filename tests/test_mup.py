"""μP (``model.mup``): the per-layer init, learning rates and attention scale follow the table at any width,
mup=None is the standard model unchanged, activations stay flat across widths, and training resumes exactly."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_overrides
from safetensors.torch import load_file

from fmforge.config import OptimConfig, build_config
from fmforge.errors import FmforgeError
from fmforge.interop.hf.convert import export_hf
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.runs import save_pretrained
from fmforge.train.loop import train
from fmforge.train.optim import build_optimizer, param_groups

_spec = importlib.util.spec_from_file_location(
    "mup_coord_check", Path(__file__).resolve().parent.parent / "benchmarks" / "mup_coord_check.py")
coord = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coord)

BASE, LR, WD, STD = 64, 1e-2, 0.1, 0.02


def _cfg(width: int, arch: str = "llama", mup: int | None = BASE, **extra) -> ModelConfig:
    return ModelConfig(arch=arch, n_layer=2, n_head=4, d_model=width, vocab_size=256, max_seq_len=32,
                       mup=None if mup is None else {"base_width": mup}, **extra).resolved()


def _model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def _lr_and_wd(model: GPT) -> dict[int, tuple[float, float]]:
    opt = build_optimizer(model, OptimConfig(lr=LR, weight_decay=WD), torch.device("cpu"))
    return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("width", [64, 256])
def test_init_std_and_learning_rates_follow_the_mup_table(width):
    m = width / BASE
    model = _model(_cfg(width))
    groups = _lr_and_wd(model)
    block = model.blocks[0]
    hidden_std = STD / math.sqrt(m)
    # Truncated at 3 std (Llama's init), the drawn std is 0.986 of the nominal.
    for weight, std in [(block.attn.qkv.weight, hidden_std), (block.mlp.w1.weight, hidden_std),
                        (block.attn.proj.weight, hidden_std / math.sqrt(2)),  # layer 0: depth scaling 1/sqrt(2)
                        (model.tok_emb.weight, STD), (model.lm_head.weight, STD)]:
        assert weight.std().item() == pytest.approx(0.986 * std, rel=0.08)
    for p in model.param_kinds()["hidden"]:  # matrix-like: lr / m, decay per step lr x wd unchanged
        assert groups[id(p)] == pytest.approx((LR / m, WD * m))
    assert groups[id(model.lm_head.weight)] == pytest.approx((LR, WD))  # output: logits x 1/m instead
    assert groups[id(model.tok_emb.weight)] == (LR, 0.0)
    for p in model.param_kinds()["vector"]:
        assert groups[id(p)] == (LR, 0.0)
    assert set(groups) == {id(p) for p in model.parameters()}
    head_dim = width // 4
    assert block.attn.scale == pytest.approx(math.sqrt(BASE // 4) / head_dim)  # 1/d, equal to SP at the base


def test_logits_are_scaled_by_one_over_the_width_multiplier():
    model = _model(_cfg(256))
    seen = {}
    model.norm_f.register_forward_hook(lambda _m, _i, out: seen.__setitem__("normed", out))
    model.lm_head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("head_in", args[0]))
    model(torch.arange(16).view(2, 8))
    torch.testing.assert_close(seen["head_in"], seen["normed"] / 4)


def test_a_tied_head_is_the_embedding_at_the_base_learning_rate():
    model = _model(_cfg(128, arch="gpt2"))
    kinds = model.param_kinds()
    assert model.lm_head.weight is model.tok_emb.weight and kinds["output"] == []
    assert model.tok_emb.weight.std().item() == pytest.approx(STD, rel=0.05)
    assert _lr_and_wd(model)[id(model.tok_emb.weight)] == (LR, 0.0)
    assert _lr_and_wd(model)[id(model.blocks[0].attn.qkv.bias)] == (LR, 0.0)


def test_group_zero_carries_the_base_lr_the_trainer_logs():
    groups = param_groups(_model(_cfg(256)), WD, LR)
    assert groups[0]["lr"] == LR and any(g["lr"] == LR / 4 for g in groups)
    with pytest.raises(ValueError, match="base learning rate"):
        param_groups(_model(_cfg(256)), WD)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_without_mup_the_model_and_optimizer_are_unchanged(arch):
    cfg = _cfg(64, arch=arch, mup=None)
    assert "mup" not in cfg.model_dump() and "mup" not in cfg.model_dump(mode="json")  # saved files unchanged
    model = _model(cfg)
    assert model.blocks[0].attn.scale is None
    # Fingerprints of the seed-0 init computed with the code before μP existed.
    reference = {"llama": 2316.005929002933, "gpt2": 2111.76088404616}[arch]
    total = sum(t.double().abs().sum().item() for t in model.state_dict().values())
    assert total == pytest.approx(reference, rel=1e-9)
    groups = param_groups(model, WD)
    assert [sorted(g) for g in groups] == [["params", "weight_decay"]] * 2  # no per-group lr
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(p) for n, p in model.named_parameters() if p.ndim == 2 and "emb" not in n}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_at_the_base_width_mup_is_the_standard_model(arch):
    plain, mup = _model(_cfg(64, arch=arch, mup=None)), _model(_cfg(64, arch=arch, mup=64))
    for (name, a), b in zip(plain.state_dict().items(), mup.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.arange(24).view(3, 8)
    assert torch.equal(plain(x), mup(x))


def test_mup_config_round_trips_and_refuses_prefix_tuning():
    cfg = _cfg(128, mup=32)
    assert cfg.model_dump(mode="json")["mup"] == {"base_width": 32, "base_head_dim": None}
    assert ModelConfig(**cfg.model_dump()) == cfg and cfg.width_mult == 4.0
    with pytest.raises(FmforgeError, match="prefix"):
        _cfg(64, prefix_tokens=4)


def test_base_head_dim_sets_the_attention_scale_when_heads_are_added():
    cfg = ModelConfig(arch="llama", n_layer=1, n_head=8, d_model=256, vocab_size=256, max_seq_len=32,
                      mup={"base_width": 128, "base_head_dim": 32}).resolved()
    assert cfg.attn_scale == pytest.approx(1 / math.sqrt(32))  # head_dim 32 at both widths: the SP scale


def test_coordinate_check_slopes_are_flat_under_mup_and_grow_without():
    kwargs = dict(steps=3, n_layer=2, n_head=4, seq_len=32, batch_size=4)
    widths = [32, 64, 128]
    sp, mup = coord.coord_check(widths, mup=False, **kwargs), coord.coord_check(widths, mup=True, **kwargs)
    assert mup["logits"]["slope"] < sp["logits"]["slope"]
    assert sp["block1"]["slope"] > 1.0 and abs(mup["block1"]["slope"]) < 0.5


def test_mup_trains_through_the_loop_and_resumes_exactly(prepared, tmp_path):
    out = tmp_path / "run"
    extra = {"model.mup.base_width": 32, "train.max_steps": 12, "checkpoint.interval": 6, "train.eval_interval": 0}
    overrides = tiny_overrides(prepared, out, **extra)
    train(build_config({}, overrides), echo=lambda _msg: None)
    assert "base_width: 32" in (out / "config.yaml").read_text()
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    lrs = [m["lr"] for m in read_metrics(out) if "lr" in m]
    final = load_file(out / "model.safetensors")
    assert losses[-1] < losses[0] and max(lrs) == pytest.approx(3e-3)  # the base lr is the one logged
    messages = []
    train(build_config({}, overrides), resume=str(out / "checkpoints" / "step_0000006"), echo=messages.append)
    assert any("resumed from" in m for m in messages) and len(losses) == 12
    assert [m["loss"] for m in read_metrics(out) if "loss" in m] == losses
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_kv_cache_decoding_matches_the_full_forward_under_mup():
    model = _model(_cfg(128, mup=32)).eval()
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    full = model(x)
    cache = model.new_cache(2, 12)
    steps = [model(x[:, :8], 0, cache)] + [model(x[:, t:t + 1], t, cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_export_to_hugging_face_refuses_a_mup_model(tmp_path):
    cfg = _cfg(64)
    save_pretrained(_model(cfg).state_dict(), cfg, tmp_path / "run", None)
    with pytest.raises(FmforgeError, match="muP model"):
        export_hf(tmp_path / "run", tmp_path / "hf", echo=lambda _msg: None)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
