"""Vision families on the shared block: ViT classifier, MAE pretraining, CLIP towers and the contrastive losses
in one process; shapes at every named size, parameter counts against the published / Hugging Face figures,
MAE's masking contract, and interop details (patch layout, sin-cos table) with the reference implementation."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from fmforge.errors import FmforgeError
from fmforge.models.clip import CLIP, CLIPConfig, TextConfig
from fmforge.models.sizes import CLIP_SIZES, MAE_SIZES, SIGLIP_LOGIT_INIT, VIT_SIZES
from fmforge.models.vit import (
    MAE,
    MAEConfig,
    VisionConfig,
    ViT,
    patchify,
    random_masking,
    sincos_pos_embed,
    unpatchify,
)
from fmforge.objectives.contrastive import clip_loss, contrastive_loss, siglip_loss
from fmforge.objectives.image_classify import accuracy, classification_loss, topk_correct
from fmforge.objectives.mae import mae_loss, masked_patch_mse, pixel_targets

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Published sizes: timm / HF ViT (1000-class head), HF ViTMAEForPreTraining (trainable: the sin-cos tables are
# fixed), OpenAI CLIP (Radford et al. 2021).
KNOWN_PARAMS = {
    ("vit", "vit-s16"): 22_050_664, ("vit", "vit-b16"): 86_567_656, ("vit", "vit-l16"): 304_326_632,
    ("mae", "mae-b"): 111_655_680,
    ("clip", "clip-b32"): 151_277_313, ("clip", "clip-b16"): 149_620_737, ("clip", "clip-l14"): 427_616_513,
}
BUILD = {"vit": (VisionConfig, ViT), "mae": (MAEConfig, MAE), "clip": (CLIPConfig, CLIP)}


def build(family: str, size: str, seed: int = 0, **overrides):
    cfg_cls, model_cls = BUILD[family]
    torch.manual_seed(seed)
    return model_cls(cfg_cls.from_size(size, **overrides)).eval()


def images_for(cfg: VisionConfig, batch: int = 3, device=None) -> torch.Tensor:
    return torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device)


# ---------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", sorted(VIT_SIZES))
def test_vit_every_named_size_gives_logits_and_pooled_features_of_the_right_shape(size):
    cfg = VisionConfig.from_size(size)
    device = "cpu" if cfg.image_size <= 32 else "meta"  # the big sizes are checked on the meta device only
    with torch.device(device):
        model = ViT(cfg)
        x = images_for(cfg, device=device)
        assert model(x).shape == (3, cfg.num_classes)
        assert model.features(x).shape == (3, cfg.d_model)
        assert model.tokens(x).shape == (3, cfg.n_prefix + cfg.num_patches, cfg.d_model)


@pytest.mark.parametrize("size", sorted(MAE_SIZES))
def test_mae_every_named_size_predicts_every_patch(size):
    cfg = MAEConfig.from_size(size)
    enc = cfg.encoder
    device = "cpu" if enc.image_size <= 32 else "meta"
    with torch.device(device):
        model = MAE(cfg)
        pred, mask = model(images_for(enc, device=device))
    assert pred.shape == (3, enc.num_patches, enc.patch_dim) and mask.shape == (3, enc.num_patches)


@pytest.mark.parametrize("size", sorted(CLIP_SIZES))
def test_clip_every_named_size_embeds_images_and_captions_in_one_space(size):
    cfg = CLIPConfig.from_size(size)
    device = "cpu" if cfg.vision.image_size <= 32 else "meta"
    with torch.device(device):
        model = CLIP(cfg)
        out = model(images_for(cfg.vision, device=device),
                    torch.randint(0, cfg.text.vocab_size, (3, cfg.text.context_length), device=device))
    assert out.image_features.shape == out.text_features.shape == (3, cfg.embed_dim)
    if device == "cpu":
        torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(3))


def test_vit_with_mean_pooling_has_no_cls_token_and_averages_patch_tokens():
    model = build("vit", "vit-tiny", pooling="mean")
    assert model.cls_token is None and model.pos_emb.shape == (1, 64, 192)
    x = images_for(model.cfg)
    torch.testing.assert_close(model.features(x), model.tokens(x).mean(dim=1))


def test_unknown_size_and_impossible_shapes_fail_in_one_line():
    with pytest.raises(FmforgeError, match="unknown ViT size 'vit-xxl'; known: vit-b16"):
        VisionConfig.from_size("vit-xxl")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="vision.num_classes must be 0"):
        CLIPConfig(vision=VisionConfig(num_classes=10))
    with pytest.raises(ValueError, match="pool=eot needs eot_token_id"):
        TextConfig(pool="eot")


# ---------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("family,size", sorted(KNOWN_PARAMS))
def test_named_sizes_have_the_published_parameter_counts(family, size):
    cfg_cls, model_cls = BUILD[family]
    with torch.device("meta"):
        model = model_cls(cfg_cls.from_size(size))
    assert model.num_params() == KNOWN_PARAMS[family, size]


def test_parameter_counts_equal_transformers_models_built_from_their_default_configs():
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import (
        CLIPModel,
        ViTConfig,
        ViTForImageClassification,
        ViTMAEConfig,
        ViTMAEForPreTraining,
    )

    def count(model, trainable=False):
        return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)

    with torch.device("meta"):
        assert ViT(VisionConfig.from_size("vit-b16")).num_params() == count(
            ViTForImageClassification(ViTConfig(num_labels=1000)))
        assert MAE(MAEConfig.from_size("mae-b")).num_params() == count(
            ViTMAEForPreTraining(ViTMAEConfig()), trainable=True)
        assert CLIP(CLIPConfig.from_size("clip-b32")).num_params() == count(
            CLIPModel(HFCLIPConfig(vision_config=dict(patch_size=32))))


# ---------------------------------------------------------------------------------------------------- meta device


@pytest.mark.parametrize("family,size", [("vit", "vit-nano"), ("mae", "mae-nano"), ("clip", "clip-nano")])
def test_meta_construction_then_init_weights_equals_cpu_construction(family, size):
    """The path of sharded training: build on meta, to_empty, init_weights. Every draw comes from the CPU
    generator in a fixed order and the fixed sin-cos tables are rebuilt, so the weights and outputs equal
    those of a model built and initialized on the CPU from the same seed."""
    cpu = build(family, size)
    torch.manual_seed(1)
    cpu.init_weights()
    cfg_cls, model_cls = BUILD[family]
    with torch.device("meta"):
        meta = model_cls(cfg_cls.from_size(size))
    meta.to_empty(device="cpu")
    torch.manual_seed(1)
    meta.init_weights()
    for (name, a), (_, b) in zip(cpu.state_dict().items(), meta.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(cpu.named_buffers(), meta.named_buffers(), strict=True):
        assert torch.equal(a, b), name  # non-persistent buffers too


# ---------------------------------------------------------------------------------------------------- MAE


def test_patchify_matches_transformers_vitmae_layout_and_unpatchify_inverts_it():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, image_size=8, patch_size=2, num_channels=3,
                                           decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                           decoder_num_attention_heads=2, decoder_intermediate_size=32))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(patchify(x, 2), hf.patchify(x), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patchify(x, 2), 2, 3), x, rtol=0, atol=0)
    # The fixed 2-D position table is MAE's, channel for channel (HF rebuilds the original layout).
    hf.decoder.initialize_weights(16)
    torch.testing.assert_close(sincos_pos_embed(16, 4, n_prefix=1), hf.decoder.decoder_pos_embed[0].detach())


@pytest.mark.parametrize("ratio,masked", [(0.75, 12), (0.5, 8), (0.9, 15), (0.0, 0)])
def test_mae_masks_exactly_the_ratio_of_patches_in_every_sample(ratio, masked):
    model = build("mae", "mae-nano")  # 16 patches
    pred, mask = model(torch.randn(5, 1, 8, 8), mask_ratio=ratio, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (5, 16, 4)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [masked] * 5


def test_random_masking_is_reproducible_with_a_generator_and_varies_per_sample():
    x = torch.randn(6, 100, 8)
    _, m1, _ = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    _, m2, _ = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    _, m3, _ = random_masking(x, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert len({tuple(row.tolist()) for row in m1}) == 6  # each sample its own mask
    visible, mask, ids_restore = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    # The visible tokens are exactly the unmasked ones, and ids_restore puts them back in place.
    for b in range(6):
        kept = x[b, mask[b] == 0]
        assert torch.equal(visible[b][visible[b, :, 0].argsort()], kept[kept[:, 0].argsort()])


def test_mae_encoder_never_sees_masked_patches():
    """Same mask (same generator seed), masked patches' pixels changed: the prediction is unchanged, since
    only visible patches reach the encoder; the loss changes, since the masked patches are its targets."""
    model = build("mae", "mae-nano")
    images = torch.randn(4, 1, 8, 8)
    out = mae_loss(model, images, generator=torch.Generator().manual_seed(0))
    patches = patchify(images, 2)
    noisy = patches + 3 * torch.randn_like(patches) * out.mask[..., None]  # only masked patches change
    out2 = mae_loss(model, unpatchify(noisy, 2, 1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.mask, out2.mask)
    torch.testing.assert_close(out2.pred, out.pred, rtol=0, atol=1e-6)
    assert abs(out2.loss.item() - out.loss.item()) > 1e-3


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_counts_only_masked_patches(norm_pix):
    """With the prediction and mask held fixed, changing the target pixels of visible patches leaves the
    loss unchanged and changing masked ones does not; the gradient reaches only masked patches' predictions.
    (Run end to end, visible pixels do move the loss, but through the encoder's input, not the target.)"""
    model = build("mae", "mae-nano")
    images = torch.randn(4, 1, 8, 8)
    out = mae_loss(model, images, generator=torch.Generator().manual_seed(0), norm_pix=norm_pix)
    pred, mask = out.pred.detach().requires_grad_(), out.mask
    patches = patchify(images, 2)
    noise = 3 * torch.randn_like(patches)

    def loss_for(p):
        return masked_patch_mse(pred, pixel_targets(unpatchify(p, 2, 1), 2, norm_pix), mask)

    base = loss_for(patches)
    torch.testing.assert_close(base, out.loss)
    torch.testing.assert_close(loss_for(patches + noise * (1 - mask)[..., None]), base, rtol=0, atol=0)
    assert abs(loss_for(patches + noise * mask[..., None]).item() - base.item()) > 1e-3
    base.backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any()


def test_normalized_pixel_targets_have_zero_mean_unit_variance_per_patch():
    target = pixel_targets(torch.rand(2, 3, 32, 32) * 255, 4, norm_pix=True)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 64), rtol=0, atol=1e-5)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 64), rtol=0, atol=1e-3)


@pytest.mark.slow
def test_mae_nano_learns_to_reconstruct_digits():
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:256], dtype=torch.float32)[:, None] / 16.0
    model = build("mae", "mae-nano").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = mae_loss(model, images, generator=gen, norm_pix=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


# ---------------------------------------------------------------------------------------------------- ViT + classify


@pytest.mark.slow
def test_vit_nano_classifies_held_out_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 - 0.3) / 0.4
    y = torch.tensor(digits.target)
    model = build("vit", "vit-nano").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, 1500, (128,), generator=gen)
        loss = classification_loss(model(x[idx]), y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top1, top5 = accuracy(model.eval()(x[1500:]), y[1500:])
    assert top1 > 0.8 and top5 > 0.95


def test_topk_accuracy_counts_a_hit_when_the_label_is_among_the_k_best():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_correct(logits, labels, 1).item() == 1
    assert topk_correct(logits, labels, 2).item() == 2
    assert accuracy(logits, labels, topk=(1, 2, 5)) == (1 / 3, 2 / 3, 1.0)  # k capped at the 3 classes
    torch.testing.assert_close(classification_loss(logits, labels), F.cross_entropy(logits, labels))


# ---------------------------------------------------------------------------------------------------- CLIP


def test_clip_starts_at_temperature_0_07_and_clamps_the_scale_at_100():
    model = build("clip", "clip-nano")
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 512, (2, 8)))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07) and out.logit_bias is None
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model(torch.randn(2, 3, 32, 32), torch.randint(0, 512, (2, 8))).logit_scale.item() == pytest.approx(100.0)
    siglip = build("clip", "clip-nano", **SIGLIP_LOGIT_INIT)
    out = siglip(torch.randn(2, 3, 32, 32), torch.randint(0, 512, (2, 8)))
    assert out.logit_scale.item() == pytest.approx(10.0) and out.logit_bias.item() == -10.0


@pytest.mark.parametrize("pool", ["argmax", "eot"])
def test_caption_embedding_is_read_at_the_end_of_text_and_ignores_what_follows(pool):
    model = build("clip", "clip-nano", text=dict(pool=pool, eot_token_id=511))
    tokens = torch.tensor([[5, 17, 300, 511, 0, 0, 0, 0], [9, 8, 7, 6, 5, 4, 3, 511]])
    assert model.text.pool_positions(tokens).tolist() == [3, 7]
    after = tokens.clone()
    after[0, 4:] = torch.tensor([1, 2, 3, 4])  # causal attention: later tokens cannot reach the end-of-text
    torch.testing.assert_close(model.encode_text(after), model.encode_text(tokens), rtol=0, atol=1e-6)
    before = tokens.clone()
    before[0, 1] = 18
    assert not torch.allclose(model.encode_text(before)[0], model.encode_text(tokens)[0])


def test_caption_embedding_can_be_read_at_the_last_token_before_right_padding():
    model = build("clip", "clip-nano", text=dict(pool="last", pad_token_id=0))
    tokens = torch.tensor([[5, 17, 300, 42, 0, 0, 0, 0], [9, 8, 7, 6, 5, 4, 3, 2]])
    assert model.text.pool_positions(tokens).tolist() == [3, 7]


def _features(n=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_clip_loss_is_the_symmetric_cross_entropy_over_the_similarity_matrix():
    img, txt = _features()
    scale = torch.tensor(1 / 0.07)
    logits = scale * img @ txt.T
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(clip_loss(img, txt, scale), expected)


def test_siglip_loss_is_a_binary_decision_per_pair_averaged_over_images():
    img, txt = _features()
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    total = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if i == j else -1.0
            total -= math.log(torch.sigmoid(z * (t * img[i] @ txt[j] + b)).item())
    assert siglip_loss(img, txt, t, b).item() == pytest.approx(total / 6, rel=1e-5)


def test_contrastive_training_step_pulls_matching_pairs_together():
    for overrides in ({}, SIGLIP_LOGIT_INIT):
        model = build("clip", "clip-nano", **overrides).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        images, tokens = torch.randn(8, 3, 32, 32), torch.randint(0, 511, (8, 16))
        losses = []
        for _ in range(25):
            loss = contrastive_loss(model(images, tokens))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0], (overrides, losses)
