"""Evaluations for vision and vision-language models, on features a model has already produced:
top-k accuracy, k-NN and linear-probe classification of frozen features, CLIP zero-shot classification
(class names x prompt templates), and image<->text retrieval recall@K.

Everything here takes tensors (or a text-encoding callable) so the same code serves ViT, MAE, CLIP and
any imported model; the eval verb wires models and data to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fmforge.objectives.image_classify import accuracy

# A subset of the prompt ensemble Radford et al. 2021 used for ImageNet zero-shot (their notebook lists 80);
# averaging over several templates gained them ~1.5% top-1 over "a photo of a {}.".
TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a low resolution photo of a {}.",
    "a close-up photo of a {}.", "a black and white photo of a {}.", "a bright photo of a {}.",
    "a cropped photo of a {}.", "a drawing of a {}.", "a photo of the large {}.", "a photo of the small {}.",
    "itap of a {}.",
)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Share of rows whose label is among the k highest logits, for each k (k capped at the class count)."""
    return {f"top{k}": acc for k, acc in zip(ks, accuracy(logits, labels, tuple(ks)))}


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN on cosine similarity (Wu et al. 2018; the protocol DINO and MAE report): each of the k
    nearest training features votes for its label with weight exp(similarity / temperature)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    bank = F.normalize(train_features.float(), dim=-1)
    k = min(k, len(bank))
    preds = []
    for start in range(0, len(features), chunk):
        q = F.normalize(features[start:start + chunk].float(), dim=-1)
        sims, idx = (q @ bank.T).topk(k, dim=-1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        preds.append(votes.argmax(dim=-1))
    return torch.cat(preds)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, weight_decay: float = 1e-4, max_iter: int = 200,
                 num_classes: int | None = None) -> dict[str, float]:
    """Multinomial logistic regression on frozen, standardized features, fitted full-batch with L-BFGS
    (deterministic: no data order, no lr schedule to tune). Returns train and test top-1 accuracy."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_features.double() - mean) / std
    head = torch.nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), train_labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = (head(x).argmax(-1) == train_labels).double().mean().item()
        test_acc = (head(xt).argmax(-1) == test_labels).double().mean().item()
    return {"train_top1": train_acc, "test_top1": test_acc}


@torch.no_grad()
def zero_shot_weights(encode_text: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                      templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """One unit vector per class: every template filled with the class name, encoded, L2-normalized, averaged
    and normalized again (Radford et al. 2021's ensemble). ``encode_text`` maps strings to [n, d]."""
    weights = []
    for name in class_names:
        emb = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot_logits(image_features: torch.Tensor, class_weights: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    return logit_scale * F.normalize(image_features.float(), dim=-1) @ class_weights.T


@torch.no_grad()
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways for N images and M captions, caption j describing image ``text_to_image[j]``
    (several captions per image allowed, as in COCO/Flickr30k). Image->text counts a hit when any of the
    image's captions is in its top K; text->image when its image is."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    sims = img @ txt.T  # [N, M]
    out = {}
    t2i_rank = sims.T.argsort(dim=-1, descending=True)  # [M, N]
    i2t_rank = sims.argsort(dim=-1, descending=True)  # [N, M]
    owner = text_to_image[i2t_rank]  # image each ranked caption belongs to
    mine = owner == torch.arange(len(img)).unsqueeze(-1)
    for k in ks:
        out[f"text_to_image_r@{k}"] = (t2i_rank[:, :k] == text_to_image.unsqueeze(-1)).any(-1).float().mean().item()
        out[f"image_to_text_r@{k}"] = mine[:, :k].any(-1).float().mean().item()
    return out
