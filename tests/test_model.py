"""The decoder LM and its shared block: shapes, causality, GQA, KV cache, init, learning, and parity with
the Hugging Face implementations of GPT-2 and Llama."""

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from fmforge.config import ModelConfig
from fmforge.models import build_model
from fmforge.models.blocks import Attention, apply_rope, fuse_qkv, rope_tables, split_qkv
from fmforge.models.gpt import GPT
from fmforge.objectives.clm import clm_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHS = ["gpt2", "llama"]


def tiny_cfg(arch: str, **kw) -> ModelConfig:
    """2 layers, d=64, 4 heads; the Llama preset uses grouped-query attention (2 kv heads)."""
    base = dict(arch=arch, n_layer=2, d_model=64, n_head=4, vocab_size=128, max_seq_len=32)
    if arch == "llama":
        base["n_kv_head"] = 2
    base.update(kw)
    return ModelConfig(**base).resolved()


def tiny_model(arch: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_cfg(arch, **kw)).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_returns_one_logit_row_per_position(arch):
    model = tiny_model(arch)
    logits = model(torch.randint(0, 128, (3, 17)))
    assert logits.shape == (3, 17, 128) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_llama_preset_uses_grouped_query_attention():
    model = tiny_model("llama")
    attn = model.blocks[0].attn
    assert (attn.n_head, attn.n_kv_head) == (4, 2)
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)


def test_tied_head_shares_storage_with_the_embedding():
    model = tiny_model("gpt2")
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert tiny_model("llama").lm_head.weight.data_ptr() != tiny_model("llama").tok_emb.weight.data_ptr()


def test_tying_survives_meta_construction_and_to_empty():
    with torch.device("meta"):
        model = GPT(tiny_cfg("gpt2"))
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.tok_emb.weight


def test_num_params_matches_a_hand_count():
    V, T, d, L, ff = 128, 32, 64, 2, 256
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d)
    gpt2 = tiny_model("gpt2")
    assert gpt2.num_params() == V * d + T * d + L * block + 2 * d  # tied head counted once
    assert gpt2.num_params(exclude_embeddings=True) == L * block + 2 * d

    ff, hd = 192, 16  # SwiGLU: 8d/3 rounded up to a multiple of 64
    block = d + d * (4 + 2 * 2) * hd + d * d + d + 3 * d * ff
    llama = tiny_model("llama")
    assert llama.num_params() == 2 * V * d + L * block + d
    assert llama.num_params(exclude_embeddings=True) == L * block + d


def test_flops_per_token_follows_the_palm_formula():
    model = tiny_model("llama")
    n = model.num_params(exclude_embeddings=True) + 64 * 128
    assert model.flops_per_token(32) == 6 * n + 12 * 2 * 4 * 16 * 32


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_a_token_leaves_earlier_logits_unchanged(arch):
    model = tiny_model(arch)
    idx = torch.randint(0, 128, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 128
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_grouped_query_attention_equals_explicit_repeat_interleave():
    cfg = tiny_cfg("llama", n_head=8, n_kv_head=2)
    torch.manual_seed(0)
    attn = Attention(cfg).eval()
    x = torch.randn(2, 10, 64)
    cos, sin = rope_tables(cfg.head_dim, 10, cfg.rope_theta)

    wq, wk, wv = split_qkv(attn.qkv.weight, 8, 2)
    q, k, v = (F.linear(x, w).view(2, 10, -1, 8) for w in (wq, wk, wv))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)  # kv head j serves q heads 4j..4j+3
    ref = attn.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 64))

    torch.testing.assert_close(attn(x, (cos, sin)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_prefill_then_token_by_token_decode_matches_full_forward(arch):
    model = tiny_model(arch)
    idx = torch.randint(0, 128, (2, 24))
    full = model(idx)
    cache = model.new_cache(2, 24)
    steps = [model(idx[:, :9], 0, cache)]
    steps += [model(idx[:, t:t + 1], t, cache) for t in range(9, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_chunked_prefill_matches_full_forward(arch):
    model = tiny_model(arch)
    idx = torch.randint(0, 128, (2, 32))
    full = model(idx)
    cache = model.new_cache(2, 32)
    outs, pos = [], 0
    for size in (5, 3, 1, 7, 16):  # chunks after a prefix need the shifted causal mask
        outs.append(model(idx[:, pos:pos + size], pos, cache))
        pos += size
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_at_different_positions_prefill_and_decode_as_each_sequence_alone(arch):
    """Right-padded prompts of different lengths in one cached forward (per-token ``positions``), then one
    decode step with each row at its own position: every row's logits equal its own unbatched forward."""
    model = tiny_model(arch)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 128, (n,)) for n in (11, 4, 7)]
    cache = model.new_cache(3, 16)
    ids = torch.zeros(3, 11, dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)] = seq
    with torch.no_grad():
        prefill = model(ids, cache=cache, positions=torch.arange(11).expand(3, -1))
        nxt = torch.tensor([[5], [9], [3]])
        step = model(nxt, cache=cache, positions=torch.tensor([[len(s)] for s in seqs]))[:, 0]
        for r, seq in enumerate(seqs):
            alone = model(torch.cat([seq, nxt[r]])[None])[0]
            torch.testing.assert_close(prefill[r, :len(seq)], alone[:-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[r], alone[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_row_holds_a_context_and_its_continuations_side_by_side(arch):
    """A context once, then two continuations at the same positions after it, masked from each other: each
    continuation's logits equal a plain forward of context + that continuation."""
    model = tiny_model(arch)
    torch.manual_seed(2)
    ctx, a, b = torch.randint(0, 128, (6,)), torch.randint(0, 128, (5,)), torch.randint(0, 128, (3,))
    row = torch.cat([ctx, a, b])[None]
    positions = torch.cat([torch.arange(6), torch.arange(6, 11), torch.arange(6, 9)])[None]
    branch = torch.tensor([0] * 6 + [1] * 5 + [2] * 3)
    mask = ((branch[None, :] == 0) | (branch[:, None] == branch[None, :]))[None]
    with torch.no_grad():
        packed = model(row, positions=positions, attn_mask=mask)[0]
        with_a, with_b = model(torch.cat([ctx, a])[None])[0], model(torch.cat([ctx, b])[None])[0]
    torch.testing.assert_close(packed[:11], with_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[11:], with_b[6:], atol=1e-5, rtol=1e-5)


def test_positions_past_max_seq_len_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, 33)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[31, 32]]))


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_construction_then_load_reproduces_the_saved_model(arch, tmp_path):
    """The runs.load_pretrained path: meta init, to_empty, safetensors load, reset_buffers."""
    model = tiny_model(arch)
    save_model(model, str(tmp_path / "m.safetensors"))
    with torch.device("meta"):
        loaded = GPT(model.cfg)
    loaded.to_empty(device="cpu")
    missing, unexpected = load_model(loaded, str(tmp_path / "m.safetensors"), strict=False)
    assert not missing and not unexpected
    loaded.reset_buffers()
    idx = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(loaded.eval()(idx), model(idx), rtol=0, atol=0)


def test_init_weights_scales_residual_projections_with_depth():
    gpt2 = GPT(tiny_cfg("gpt2", n_layer=8, d_model=256, n_head=4))
    assert gpt2.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert gpt2.blocks[3].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2*8)
    assert (gpt2.blocks[0].attn.qkv.bias == 0).all() and (gpt2.norm_f.weight == 1).all()

    llama = GPT(tiny_cfg("llama", n_layer=8, d_model=256, n_head=4))
    w2 = llama.blocks[7].mlp.w2.weight
    assert w2.abs().max().item() <= 3 * 0.02 / 4 + 1e-7  # truncated at 3 std, std 0.02/sqrt(2*8)
    assert llama.blocks[0].attn.proj.weight.std().item() < llama.blocks[0].attn.qkv.weight.std().item()


def test_dropout_is_active_only_in_training():
    model = tiny_model("gpt2", dropout=0.5)
    idx = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_build_model_resolves_the_config():
    model = build_model(ModelConfig(arch="llama", size="nano", vocab_size=100, max_seq_len=16))
    assert model.cfg.vocab_size == 100 and model.cfg.n_layer == 2 and model.cfg.mlp == "swiglu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clm_loss_matches_fp32_cross_entropy_ignoring_minus_100(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 70, 1000) * 3).to(dtype).requires_grad_()  # 210 rows: several CPU chunks
    targets = torch.randint(0, 1000, (3, 70))
    targets[0, :9] = -100
    loss = clm_loss(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = F.cross_entropy(logits.float().view(-1, 1000), targets.view(-1), ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-5)
    assert (grad[0, :9] == 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_overfits_one_fixed_batch(arch):
    torch.manual_seed(0)
    model = GPT(tiny_cfg(arch))
    data = torch.randint(0, 128, (4, 33))
    idx, targets = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        loss = clm_loss(model(idx), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


# ---------------------------------------------------------------------------------------------------- HF parity


def _perturb(module: torch.nn.Module) -> None:
    """Move every weight off its init (norm gains, biases) so the parity test exercises all of them."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_logits_match_huggingface_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = tiny_cfg("gpt2")
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    layer_norm_epsilon=cfg.norm_eps)).eval()
    _perturb(hf)
    sd = hf.state_dict()
    ours = {"tok_emb.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["lm_head.weight"],
            "pos_emb.weight": sd["transformer.wpe.weight"],
            "norm_f.weight": sd["transformer.ln_f.weight"], "norm_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(2):
        h = f"transformer.h.{i}."
        names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                 "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
        for mine, theirs in names.items():
            weight = sd[h + theirs + ".weight"]
            ours[f"blocks.{i}.{mine}.weight"] = weight.t() if weight.dim() == 2 else weight  # Conv1D: [in, out]
            ours[f"blocks.{i}.{mine}.bias"] = sd[h + theirs + ".bias"]
        for name in ("weight", "bias"):  # c_attn is [q; k; v]: regroup per head
            key = f"blocks.{i}.attn.qkv.{name}"
            ours[key] = fuse_qkv(*ours[key].chunk(3), n_head=4, n_kv_head=4)
    model = GPT(cfg).eval()
    model.load_state_dict(ours, strict=True)
    idx = torch.randint(0, 128, (2, 32))
    torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_logits_match_huggingface_llama_with_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_cfg("llama")
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=cfg.d_ff,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, rms_norm_eps=cfg.norm_eps,
                                      tie_word_embeddings=False)).eval()
    _perturb(hf)
    sd = hf.state_dict()
    ours = {"tok_emb.weight": sd["model.embed_tokens.weight"], "lm_head.weight": sd["lm_head.weight"],
            "norm_f.weight": sd["model.norm.weight"]}
    for i in range(2):
        h = f"model.layers.{i}."
        ours[f"blocks.{i}.attn.qkv.weight"] = fuse_qkv(  # rotate-half on both sides: no permutation
            *(sd[h + f"self_attn.{p}_proj.weight"] for p in "qkv"), n_head=4, n_kv_head=2)
        ours[f"blocks.{i}.attn.proj.weight"] = sd[h + "self_attn.o_proj.weight"]
        ours[f"blocks.{i}.norm1.weight"] = sd[h + "input_layernorm.weight"]
        ours[f"blocks.{i}.norm2.weight"] = sd[h + "post_attention_layernorm.weight"]
        for mine, theirs in {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.items():
            ours[f"blocks.{i}.mlp.{mine}.weight"] = sd[h + f"mlp.{theirs}.weight"]
    model = GPT(cfg).eval()
    model.load_state_dict(ours, strict=True)
    idx = torch.randint(0, 128, (2, 32))
    logits = model(idx)
    assert logits.abs().max() > 0.1  # perturbed weights: logits large enough for the tolerance to mean something
    torch.testing.assert_close(logits, hf(idx).logits, rtol=0, atol=1e-4)


def test_fused_qkv_groups_whole_heads_so_a_row_shard_holds_complete_kv_groups():
    hd, n_head, n_kv = 2, 4, 2
    q = torch.arange(n_head * hd).float()[:, None] + 100  # q rows 100.., k rows 200.., v rows 300..
    k = torch.arange(n_kv * hd).float()[:, None] + 200
    v = torch.arange(n_kv * hd).float()[:, None] + 300
    fused = fuse_qkv(q, k, v, n_head, n_kv)
    first_half = fused[: len(fused) // 2, 0].tolist()  # what rank 0 of a 2-way row shard holds
    assert first_half == [100, 101, 102, 103, 200, 201, 300, 301]  # q heads 0-1, their k and v head 0
    for a, b in zip(split_qkv(fused, n_head, n_kv), (q, k, v)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
