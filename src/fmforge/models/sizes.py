"""Every named size of every model family, in one place: a config names a ``size`` and the fields it sets
explicitly win over it. Plain data and the two helpers that apply it; no model code, so every config
module can read it (``registry.py`` points each family at its table)."""

import copy
import math

from fmforge.errors import FmforgeError

# Decoder families: the defaults ``model.arch`` implies, then the named shapes.
DECODER_ARCH_DEFAULTS: dict[str, dict] = {
    # GPT-2: learned positions, LayerNorm, GELU MLP, biases everywhere, tied input/output embeddings.
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True,
                 rope_theta=10000.0),
    # Llama: rotary positions, RMSNorm, SwiGLU MLP, no biases, separate output head.
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False,
                  rope_theta=10000.0),
}

DECODER_SIZES: dict[str, dict] = {
    # CPU sizes: tests and the quickstart.
    "nano": dict(n_layer=2, n_head=4, d_model=64),
    "micro": dict(n_layer=4, n_head=4, d_model=128),
    "tiny": dict(n_layer=6, n_head=6, n_kv_head=2, d_model=192),
    # GPT-2 family (Radford et al. 2019).
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, d_model=1280, max_seq_len=1024),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, d_model=1600, max_seq_len=1024),
    # Llama-style shapes (GQA with 8 KV heads at 1B like Llama 3.2).
    "llama-125m": dict(n_layer=12, n_head=12, n_kv_head=4, d_model=768, max_seq_len=2048),
    "llama-350m": dict(n_layer=24, n_head=16, n_kv_head=8, d_model=1024, max_seq_len=2048),
    "llama-1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, max_seq_len=2048,
                     rope_theta=500000.0),
}


VIT_SIZES: dict[str, dict] = {
    # CPU sizes: 8x8 one-channel digits (scikit-learn load_digits), and 32x32 colour images.
    "vit-nano": dict(image_size=8, patch_size=2, channels=1, d_model=64, n_layer=2, n_head=4, num_classes=10),
    "vit-tiny": dict(image_size=32, patch_size=4, d_model=192, n_layer=6, n_head=3, num_classes=10),
    # Dosovitskiy et al. 2021 / Touvron et al. 2021 (DeiT-S), 224 px.
    "vit-s16": dict(image_size=224, patch_size=16, d_model=384, n_layer=12, n_head=6),
    "vit-b16": dict(image_size=224, patch_size=16, d_model=768, n_layer=12, n_head=12),
    "vit-b32": dict(image_size=224, patch_size=32, d_model=768, n_layer=12, n_head=12),
    "vit-l16": dict(image_size=224, patch_size=16, d_model=1024, n_layer=24, n_head=16),
}


def _mae_encoder(vit_size: str) -> dict:
    # MAE: fixed sin-cos positions, no classification head during pretraining.
    return {**VIT_SIZES[vit_size], "num_classes": 0, "pos": "sincos"}


MAE_SIZES: dict[str, dict] = {
    # A decoder of 2 blocks, not 1: linear probes of the encoder gain ~9 points on digits (as the paper found).
    "mae-nano": dict(encoder=_mae_encoder("vit-nano"), decoder_d_model=64, decoder_n_layer=2, decoder_n_head=4),
    "mae-tiny": dict(encoder=_mae_encoder("vit-tiny"), decoder_d_model=128, decoder_n_layer=2, decoder_n_head=4),
    # He et al. 2021: every encoder gets the same 8-block, 512-wide decoder.
    "mae-b": dict(encoder=_mae_encoder("vit-b16"), decoder_d_model=512, decoder_n_layer=8, decoder_n_head=16),
    "mae-l": dict(encoder=_mae_encoder("vit-l16"), decoder_d_model=512, decoder_n_layer=8, decoder_n_head=16),
}


# SigLIP (Zhai et al. 2023): temperature 10 and bias -10, so that the many negatives start near zero loss.
SIGLIP_LOGIT_INIT = dict(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


def _openai_vision(vit_size: str) -> dict:
    # OpenAI's image tower: LayerNorm before the first block, no patch-projection bias, eps 1e-5.
    return {**VIT_SIZES[vit_size], "num_classes": 0, "ln_pre": True, "patch_bias": False, "norm_eps": 1e-5}


CLIP_SIZES: dict[str, dict] = {
    # CPU size: 32x32 images, 32-token captions over a small BPE vocabulary.
    # OpenAI's tower layout (LayerNorm before the blocks, no patch bias), so CPU runs export to HF CLIPModel.
    "clip-nano": dict(vision=dict(image_size=32, patch_size=8, d_model=64, n_layer=2, n_head=4, num_classes=0,
                                  ln_pre=True, patch_bias=False, norm_eps=1e-5),
                      text=dict(vocab_size=512, context_length=32, d_model=64, n_layer=2, n_head=4),
                      embed_dim=64),
    # Radford et al. 2021, table 20: ViT-B/32 and ViT-B/16 towers share the 12-layer 512-wide text tower.
    "clip-b32": dict(vision=_openai_vision("vit-b32"), text={}, embed_dim=512),
    "clip-b16": dict(vision=_openai_vision("vit-b16"), text={}, embed_dim=512),
    "clip-l14": dict(vision={**_openai_vision("vit-l16"), "patch_size": 14},
                     text=dict(d_model=768, n_head=12), embed_dim=768),
}


BERT_SIZES: dict[str, dict] = {
    # CPU sizes (Turc et al. 2019's compact BERTs, bert-nano smaller still), on the full uncased vocabulary.
    "bert-nano": dict(d_model=64, n_layer=2, n_head=4),
    "bert-tiny": dict(d_model=128, n_layer=2, n_head=2),
    "bert-mini": dict(d_model=256, n_layer=4, n_head=4),
    # all-MiniLM-L6-v2's encoder (Wang et al. 2020), the pretrained BERT that ships offline here.
    "minilm-l6": dict(d_model=384, n_layer=6, n_head=12),
    "bert-base": dict(d_model=768, n_layer=12, n_head=12),
    "bert-large": dict(d_model=1024, n_layer=24, n_head=16),
}


DIT_SIZES: dict[str, dict] = {
    # CPU sizes: 8x8 one-channel digits in 2x2 patches (16 tokens), ten classes or CLIP-conditioned.
    "dit-nano": dict(image_size=8, patch_size=2, channels=1, d_model=64, n_layer=4, n_head=4, num_classes=10),
    "dit-micro": dict(image_size=8, patch_size=2, channels=1, d_model=128, n_layer=6, n_head=4, num_classes=10),
    # Peebles & Xie 2023, table 1: 256 px images as 32x32x4 Stable Diffusion latents (33M, 130M, 458M, 675M).
    "dit-s2": dict(image_size=32, patch_size=2, channels=4, d_model=384, n_layer=12, n_head=6),
    "dit-b2": dict(image_size=32, patch_size=2, channels=4, d_model=768, n_layer=12, n_head=12),
    "dit-l2": dict(image_size=32, patch_size=2, channels=4, d_model=1024, n_layer=24, n_head=16),
    "dit-xl2": dict(image_size=32, patch_size=2, channels=4, d_model=1152, n_layer=28, n_head=16),
    "dit-xl4": dict(image_size=32, patch_size=4, channels=4, d_model=1152, n_layer=28, n_head=16),
    "dit-xl8": dict(image_size=32, patch_size=8, channels=4, d_model=1152, n_layer=28, n_head=16),
}


def lookup_size(sizes: dict[str, dict], name: str, family: str) -> dict:
    if name not in sizes:
        raise FmforgeError(f"unknown {family} size {name!r}; known: {', '.join(sorted(sizes))}")
    return dict(sizes[name])


def apply_size(data, sizes: dict[str, dict], family: str, skip: tuple[str, ...] = ()):
    """A run config's raw ``model:`` mapping with its named ``size`` filled in underneath: fields given
    explicitly win, sub-sections (``encoder``, ``vision``, ``text``) merge field by field. ``skip`` lists
    dotted fields the size does not decide in a run because the data does (class count, vocabulary)."""
    if not isinstance(data, dict) or data.get("size") is None:
        return data
    try:
        spec = copy.deepcopy(lookup_size(sizes, data["size"], family))
    except FmforgeError as err:
        raise FmforgeError(f"model.size: {err}") from None
    for dotted in skip:
        *parents, leaf = dotted.split(".")
        node = spec
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    merged = {**spec, **data}
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merged[key] = {**value, **data[key]}
    return merged
