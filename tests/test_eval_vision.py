"""Vision evaluation on real features: scikit-learn's digits (1,797 handwritten 8x8 images) as raw pixels."""

import pytest
import torch
import torch.nn.functional as F

from fmforge.eval.vision import (
    TEMPLATES,
    knn_predict,
    linear_probe,
    retrieval_recall,
    topk_accuracy,
    zero_shot_logits,
    zero_shot_weights,
)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def test_topk_accuracy_counts_label_within_k_highest():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.5], [0.2, 0.3, 0.1]])
    labels = torch.tensor([1, 2, 2])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(1 / 3)
    assert acc["top2"] == pytest.approx(2 / 3)
    assert acc["top5"] == 1.0  # k above the class count means every class


def test_knn_and_linear_probe_classify_digit_pixels_well_and_random_features_at_chance(digits):
    xtr, ytr, xte, yte = digits
    knn = (knn_predict(xtr, ytr, xte, k=10) == yte).float().mean().item()
    probe = linear_probe(xtr, ytr, xte, yte)
    assert knn > 0.95 and probe["test_top1"] > 0.93  # published figures for raw digits: ~0.98 / ~0.96
    g = torch.Generator().manual_seed(1)
    noise_tr, noise_te = torch.randn(len(xtr), 64, generator=g), torch.randn(len(xte), 64, generator=g)
    assert (knn_predict(noise_tr, ytr, noise_te, k=10) == yte).float().mean().item() < 0.2
    assert linear_probe(noise_tr, ytr, noise_te, yte)["test_top1"] < 0.2


def _bag_of_words(dim: int = 256):
    """A real (if weak) text encoder: hashed bag of words. Enough to check the ensemble arithmetic."""
    def encode(texts):
        out = torch.zeros(len(texts), dim)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", "").split():
                out[i, hash(w) % dim] += 1.0
        return out
    return encode


def test_zero_shot_weights_are_normalized_template_averages_and_pick_the_matching_class():
    encode = _bag_of_words()
    names = ["cat", "rocket", "coffee"]
    w = zero_shot_weights(encode, names)
    assert w.shape == (3, 256) and torch.allclose(w.norm(dim=-1), torch.ones(3))
    expected = F.normalize(F.normalize(encode([t.format("rocket") for t in TEMPLATES]), dim=-1).mean(0), dim=-1)
    assert torch.allclose(w[1], expected, atol=1e-6)
    images = encode(["rocket", "coffee", "cat"])  # an "image" whose features sit on its class's word
    assert zero_shot_logits(images, w).argmax(-1).tolist() == [1, 2, 0]


def test_retrieval_recall_with_several_captions_per_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(20, 32, generator=g)
    text_to_image = torch.arange(20).repeat_interleave(2)  # two captions per image
    captions = images[text_to_image] + 0.01 * torch.randn(40, 32, generator=g)
    r = retrieval_recall(images, captions, text_to_image)
    assert r["image_to_text_r@1"] == 1.0 and r["text_to_image_r@1"] == 1.0
    shuffled = captions[torch.randperm(40, generator=g)]
    r = retrieval_recall(images, shuffled, text_to_image, ks=(1, 10))
    assert r["text_to_image_r@1"] < 0.3 and r["text_to_image_r@10"] >= r["text_to_image_r@1"]
