"""Hugging Face <-> fmforge decoder mappings (``models/hf_decoder.py``), checked against the real transformers
classes: an HF model imported into ``GPT`` gives HF's logits, a ``GPT`` exported to an HF directory loads
with ``AutoModelForCausalLM.from_pretrained`` and gives ours, and weights survive the round trip bit for bit.
Whole-directory import/export through the CLI lives in test_hf_interop.py."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fmforge.errors import FmforgeError
from fmforge.interop.hf.decoder import config_from_hf, config_to_hf, state_from_hf, state_to_hf
from fmforge.models.blocks import rope_tables
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 100
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}

# HF config per case, and the sequence length its logits are compared at.
HF_CASES = {
    "llama": (lambda: transformers.LlamaConfig(**SHAPE, max_position_embeddings=64), 32),
    # max_position_embeddings (1024) past the pretraining length (256): the regime llama3 scaling is for.
    "llama3-scaled": (lambda: transformers.LlamaConfig(**SHAPE, max_position_embeddings=1024, tie_word_embeddings=True,
                                                       rope_parameters=dict(LLAMA3_ROPE)), 32),
    # A window shorter than the context: the import caps max_seq_len to it, where attention is exact. Linear
    # rope scaling (position interpolation) rides along.
    "mistral": (lambda: transformers.MistralConfig(**SHAPE, max_position_embeddings=128, sliding_window=16,
                                                   rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 10000.0}), 16),
    "qwen2": (lambda: transformers.Qwen2Config(**SHAPE, max_position_embeddings=64), 32),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                             n_inner=128, bos_token_id=0, eos_token_id=0), 32),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter: fresh models have zero biases and unit norms, which would hide a bias or
    norm mapped to the wrong place."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_model(case: str):
    make_config, _ = HF_CASES[case]
    torch.manual_seed(0)
    return randomize_(transformers.AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)).eval()


def token_ids(seq_len: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))


def imported(hf) -> GPT:
    cfg = config_from_hf(hf.config.to_dict())
    model = GPT(cfg).eval()
    missing, unexpected = model.load_state_dict(state_from_hf(hf.state_dict(), cfg), strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    return model


@pytest.mark.parametrize("case", HF_CASES)
def test_an_hf_decoder_imports_with_equal_logits(case):
    hf = hf_model(case)
    ours = imported(hf)
    ids = token_ids(HF_CASES[case][1])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_mistral_sliding_window_caps_the_context_to_where_attention_is_exact():
    cfg = config_from_hf(hf_model("mistral").config.to_dict())
    assert cfg.max_seq_len == 16
    with pytest.raises(ValueError, match="max_seq_len"):
        GPT(cfg)(token_ids(17))


def test_qwen2_imports_biases_on_qkv_only():
    cfg = config_from_hf(hf_model("qwen2").config.to_dict())
    assert (cfg.bias, cfg.qkv_bias) == (False, True)
    names = set(state_from_hf(hf_model("qwen2").state_dict(), cfg))
    assert "blocks.0.attn.qkv.bias" in names and "blocks.0.attn.proj.bias" not in names


def test_llama3_rope_scaling_imports_and_builds_hfs_rotary_tables():
    hf = hf_model("llama3-scaled")
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.original_max_position_embeddings == 256
    ours = GPT(cfg)
    positions = torch.arange(32)[None]
    hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(ours.rope_cos[:32], hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.rope_sin[:32], hf_sin[0], rtol=0, atol=1e-6)
    unscaled_cos, _ = rope_tables(cfg.head_dim, 32, cfg.rope_theta)
    assert (unscaled_cos - ours.rope_cos[:32]).abs().max() > 0.1  # the scaling changes the tables


def test_a_llama_3_1_config_json_in_the_transformers_4_form_imports():
    """meta-llama/Llama-3.1-8B's config.json as published: rope_theta and rope_scaling at the top level."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
          "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
          "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}
    cfg = config_from_hf(hf)
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.d_ff) == (32, 32, 8, 4096, 14336)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == (128256, 131072, 500000.0, 1e-5)
    assert cfg.rope_scaling.model_dump() == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def fm_config(kind: str) -> ModelConfig:
    shape = dict(n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=64)
    if kind == "gpt2":
        return ModelConfig(arch="gpt2", **shape).resolved(vocab_size=VOCAB)
    if kind == "qwen2":
        return ModelConfig(arch="llama", n_kv_head=2, qkv_bias=True, **shape).resolved(vocab_size=VOCAB)
    scaling = {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}
    return ModelConfig(arch="llama", n_kv_head=2, tie_embeddings=True, rope_theta=500000.0, rope_scaling=scaling,
                       **shape).resolved(vocab_size=VOCAB)


EXPORTS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.mark.parametrize("kind", EXPORTS)
def test_a_gpt_exports_to_a_directory_transformers_loads_with_equal_logits(kind, tmp_path):
    cfg = fm_config(kind)
    torch.manual_seed(0)
    ours = randomize_(GPT(cfg)).eval()
    state = {k: v for k, v in ours.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(state_to_hf(state, cfg), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == EXPORTS[kind]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = token_ids(32)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_weights_round_trip_bit_for_bit(case):
    hf = hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    original = hf.state_dict()
    back = state_to_hf(state_from_hf(original, cfg), cfg)
    assert set(back) == set(original) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    for name, tensor in back.items():
        assert torch.equal(tensor, original[name]), name


@pytest.mark.parametrize("case", HF_CASES)
def test_a_config_survives_export_and_reimport(case):
    cfg = config_from_hf(HF_CASES[case][0]().to_dict())
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_a_gpt2_base_model_checkpoint_with_attention_buffers_imports():
    """openai-community/gpt2's file: GPT2Model names (no ``transformer.``) and the causal-mask buffers."""
    hf = hf_model("gpt2")
    cfg = config_from_hf(hf.config.to_dict())
    base = dict(hf.transformer.state_dict())
    base["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    base["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    full = state_from_hf(hf.state_dict(), cfg)
    assert all(torch.equal(t, full[k]) for k, t in state_from_hf(base, cfg).items())


def llama_config_dict(**changes) -> dict:
    return {**transformers.LlamaConfig(**SHAPE, max_position_embeddings=64).to_dict(), **changes}


@pytest.mark.parametrize("changes, key", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "falcon"}, "falcon"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_an_unsupported_hf_config_fails_naming_the_key(changes, key):
    with pytest.raises(FmforgeError, match=key):
        config_from_hf(llama_config_dict(**changes))


@pytest.mark.parametrize("hf, key", [
    ({"model_type": "qwen2", **SHAPE, "max_position_embeddings": 64, "use_sliding_window": True},
     "use_sliding_window"),
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": VOCAB,
      "activation_function": "relu"}, "activation_function"),
])
def test_unsupported_qwen2_and_gpt2_variants_fail_naming_the_key(hf, key):
    with pytest.raises(FmforgeError, match=key):
        config_from_hf(hf)


def test_hf_weights_that_do_not_fit_the_config_fail_naming_the_tensor():
    hf = hf_model("llama")
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(FmforgeError, match=rf"{q} has shape \[32, 64\], expected \[64, 64\]"):
        state_from_hf({**sd, q: sd[q][:32]}, cfg)
    down = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(FmforgeError, match=f"{down} is missing"):
        state_from_hf({k: v for k, v in sd.items() if k != down}, cfg)
    extra = "model.layers.0.self_attn.q_norm.weight"
    with pytest.raises(FmforgeError, match=f"unexpected tensor {extra}"):
        state_from_hf({**sd, extra: torch.ones(16)}, cfg)


def test_an_fmforge_state_that_does_not_fit_the_config_fails_naming_the_tensor():
    cfg = fm_config("qwen2")
    sd = GPT(cfg).state_dict()
    with pytest.raises(FmforgeError, match="blocks.1.attn.qkv.bias is missing"):
        state_to_hf({k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.bias"}, cfg)


@pytest.mark.parametrize("kind, changes, field", [
    ("gpt2", {"pos": "rope"}, "pos"),
    ("gpt2", {"tie_embeddings": False}, "tie_embeddings"),
    ("gpt2", {"n_kv_head": 2}, "n_kv_head"),
    ("llama", {"mlp": "gelu"}, "mlp"),
    ("llama", {"norm": "layernorm"}, "norm"),
    ("llama", {"bias": True, "qkv_bias": False}, "qkv_bias"),
])
def test_a_config_without_an_hf_equivalent_fails_naming_the_field(kind, changes, field):
    cfg = fm_config(kind).model_copy(update=changes)
    with pytest.raises(FmforgeError, match=f"model.{field}"):
        config_to_hf(cfg)
