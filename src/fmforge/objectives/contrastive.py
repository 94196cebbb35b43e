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
import torch.nn as nn
import torch.nn.functional as F

from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.models.clip import CLIP, CLIPOutput
from fmforge.objectives.base import encoder_flops, evaluating, round_up
from fmforge.objectives.images import ImageTask


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


def grouped_retrieval_recall(image_features: torch.Tensor, caption_features: torch.Tensor,
                             image_caption: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways when several images may share one caption text (captions are deduplicated first):
    image->text hits when the image's caption is among its K best captions; text->image when any image
    with that caption is among the caption's K best images. With distinct captions this is the usual
    recall@K."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(caption_features.float(), dim=-1)
    sims = img @ txt.T  # [N images, M captions]
    i2t = sims.argsort(dim=-1, descending=True)
    t2i = sims.T.argsort(dim=-1, descending=True)
    out = {}
    for k in ks:
        out[f"image_to_text_r@{k}"] = (i2t[:, :k] == image_caption[:, None]).any(-1).float().mean().item()
        owners = image_caption[t2i[:, :k]]  # caption of each of the K best images, per caption
        out[f"text_to_image_r@{k}"] = (owners == torch.arange(len(txt))[:, None]).any(-1).float().mean().item()
    return out


class CaptionTokens:
    """Captions → fixed-length token rows for the text tower: the caption's tokens cut to context_length - 1,
    then end-of-text, then padding. Every row has the same length, so FLOPs and shapes never vary."""

    def __init__(self, tokenizer, context_length: int):
        self.tok, self.length = tokenizer, context_length
        self.eot = tokenizer.eos_id
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id

    def __call__(self, captions: list[str]) -> torch.Tensor:
        rows = torch.full((len(captions), self.length), self.pad, dtype=torch.int64)
        for i, ids in enumerate(self.tok.encode_batch(list(captions))):
            ids = ids[: self.length - 1] + [self.eot]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows


class ContrastiveTask(ImageTask):
    """CLIP / SigLIP on image-caption pairs. Negatives: every caption of the micro-batch on every rank
    (features gathered with gradient); with gradient accumulation the contrastive batch is therefore
    micro_batch x data-parallel ranks, not the whole global batch."""

    needs_mode = "captions"

    @property
    def vision(self):
        return self.model_cfg.vision

    def resolve(self, m):
        if not self.train_shards.index.get("tokenizer"):
            raise FmforgeError(f"{self.data_dir} has no caption tokenizer: prepare it again with this fmforge "
                               "(`fmforge data prepare-images` writes tokenizer.json for captions)")
        self.tokenizer = load_tokenizer(self.data_dir / "tokenizer.json")
        self.tokenizer_dir = self.data_dir
        tok, text = self.tokenizer, m.text
        if "vocab_size" in text.model_fields_set:
            if text.vocab_size < tok.vocab_size:
                raise FmforgeError(f"model.text.vocab_size ({text.vocab_size}) is smaller than the caption "
                                   f"tokenizer's vocabulary ({tok.vocab_size})")
            vocab = text.vocab_size
        else:
            vocab = round_up(tok.vocab_size, 64)
        fields = {"vocab_size": vocab}
        if "pool" not in text.model_fields_set:  # the first end-of-text: ids are not ordered as OpenAI's BPE
            fields.update(pool="eot", eot_token_id=tok.eos_id)
        text = type(text)(**{**text.model_dump(), **fields})
        self.captions = CaptionTokens(tok, text.context_length)
        return type(m)(**{**m.model_dump(), "text": text.model_dump()})

    def build_model(self) -> nn.Module:
        return CLIP(self.model_cfg)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.model_cfg
        v, t = m.vision, m.text
        t_img = v.n_prefix + v.num_patches
        flops = encoder_flops(model.visual.blocks, t_img, v.n_layer, v.d_model)
        flops += encoder_flops(model.text.blocks, t.context_length, t.n_layer, t.d_model)
        flops += 6.0 * (v.patch_dim * v.d_model * v.num_patches + (v.d_model + t.d_model) * m.embed_dim)
        return flops

    def loss(self, model, batch, device, amp):
        images = batch[0].to(device, non_blocking=True)
        tokens = self.captions(batch[1]).to(device, non_blocking=True)
        with amp():
            out = model(images, tokens)
        return contrastive_loss(out)

    def validate(self, model, micro_batch, device, amp):
        if self.val_shards is None:
            return None
        with evaluating(model):
            total, n, images_f, texts_f, texts = 0.0, 0, [], [], []
            for images, captions in self.val_batches(micro_batch):
                images, tokens = images.to(device), self.captions(captions).to(device)
                with amp():
                    out = model(images, tokens)
                # Every rank holds the same batch here: score it locally, not against the other ranks' copies.
                total += contrastive_loss(out, gather=False).item() * len(images)
                n += len(images)
                images_f.append(out.image_features.float().cpu())
                texts_f.append(out.text_features.float().cpu())
                texts += captions
        # Retrieval among the distinct captions (several images may share one, e.g. captions made from labels).
        owner_of: dict[str, int] = {}
        first: list[int] = []  # where each distinct caption first occurs
        for i, text in enumerate(texts):
            if text not in owner_of:
                owner_of[text] = len(first)
                first.append(i)
        owner = torch.tensor([owner_of[t] for t in texts])
        recall = grouped_retrieval_recall(torch.cat(images_f), torch.cat(texts_f)[first], owner, ks=(1,))
        return {"val_loss": total / n, "val_image_to_text_r@1": recall["image_to_text_r@1"],
                "val_text_to_image_r@1": recall["text_to_image_r@1"]}
