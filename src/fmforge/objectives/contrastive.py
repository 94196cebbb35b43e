"""Image-text contrastive losses: CLIP's symmetric InfoNCE (Radford et al. 2021) and SigLIP's pairwise
sigmoid loss (Zhai et al. 2023), with negatives drawn from the whole global batch in multi-process runs.

Each rank scores its own rows (its images, and for InfoNCE its captions) against the columns of every rank,
gathered *with* gradient (open_clip's ``local_loss`` + ``gather_with_grad``): memory grows with the local
batch times the global one, not the global batch squared. Because every rank's loss is the mean over its
own rows, the average of the ranks' losses is the single-process loss on the global batch, and the
gradients that DDP averages are the single-process gradients: the gather's backward sums each rank's
gradient with respect to the features it received, returning to the owner its features' share of every
rank's loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from fmforge.models.clip import CLIPOutput


def _world(gather: bool = True) -> tuple[int, int]:
    if gather and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Concatenate every rank's ``x`` [n, ...] along dim 0 in rank order; gradients flow back to their owner
    (the backward reduce-scatters, summing over ranks). Identity in a single process. Every rank must pass
    the same shape, i.e. equal local batches."""
    if _world(gather)[1] == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE over unit-norm features [n, D] of n matching pairs: image i should pick caption i
    among all captions of the global batch, and caption i image i. Logits in fp32. ``gather=False`` scores
    this rank's pairs alone (evaluation, where every rank holds the same batch)."""
    rank, _ = _world(gather)
    image_features, text_features = image_features.float(), text_features.float()
    all_images, all_texts = gather_with_grad(image_features, gather), gather_with_grad(text_features, gather)
    n = image_features.size(0)
    labels = torch.arange(n, device=image_features.device) + rank * n  # this rank's pairs in the global batch
    logits_per_image = logit_scale * image_features @ all_texts.T  # [n, N]
    logits_per_text = logit_scale * text_features @ all_images.T  # [n, N]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Sigmoid loss: every image-caption pair is an independent binary decision (match or not), summed over
    the global batch's captions and averaged over images: -1/N sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)),
    z_ij = 1 for matching pairs, -1 otherwise. Each pair is scored once, from its image's row, so the
    distributed form needs only the captions gathered."""
    rank, _ = _world(gather)
    image_features, text_features = image_features.float(), text_features.float()
    all_texts = gather_with_grad(text_features, gather)
    n = image_features.size(0)
    logits = logit_scale * image_features @ all_texts.T + logit_bias  # [n, N]
    signs = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device)
    signs[rows, rows + rank * n] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n


def contrastive_loss(out: CLIPOutput, gather: bool = True) -> torch.Tensor:
    """The loss the model was built for: sigmoid when it learns a logit bias (SigLIP), InfoNCE otherwise."""
    if out.logit_bias is not None:
        return siglip_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias, gather)
    return clip_loss(out.image_features, out.text_features, out.logit_scale, gather)
