"""What differs between objectives, for the one training loop in ``loop.py``: data, model, loss of a
micro-batch, validation metrics, FLOPs, final weights. Everything else (accumulation, clipping, spike
rollback, checkpoints, exact resume, preemption, out-of-memory retries, logging) is shared.

The task follows ``model.arch``: gpt2/llama → causal LM on token shards; bert → masked LM on token
shards; vit → image classification; mae → masked-autoencoder pretraining; clip → image-text contrastive
learning (CLIP's InfoNCE or SigLIP's sigmoid loss), all three on image shards (``fmforge data prepare-images``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmforge.config import Config
from fmforge.errors import FmforgeError
from fmforge.models.blocks import Block
from fmforge.models.config import ModelConfig
from fmforge.objectives.clm import clm_loss

DEFAULT_GLOBAL_BATCH_IMAGES = 256


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def block_params(model: nn.Module) -> int:
    """Parameters of the shared transformer blocks under ``model`` (the matmuls that run per token)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, Block) for p in m.parameters())


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) and no autograd inside, the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encoder_flops(model: nn.Module, tokens: int, n_layer: int, d_model: int) -> float:
    """Training FLOPs (forward + backward) of one sequence through a tower of shared blocks:
    6 · block weights · tokens + 12 · layers · width · tokens² (attention scores and their weighted sum,
    PaLM appendix B)."""
    return 6.0 * block_params(model) * tokens + 12.0 * n_layer * d_model * tokens * tokens


class Task(ABC):
    """Base: ``unit`` is what throughput counts ("tokens" or "samples"), ``units_per_step`` how many one
    optimizer step consumes."""

    unit = "tokens"

    def __init__(self, cfg: Config, data_dir: Path, echo):
        self.cfg, self.data_dir, self.echo = cfg, data_dir, echo
        self.compile = cfg.train.compile

    # The loop calls these, in this order.
    @abstractmethod
    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        ...

    @abstractmethod
    def build_model(self) -> nn.Module:
        ...

    @abstractmethod
    def flops_per_unit(self, model: nn.Module) -> float:
        ...

    @abstractmethod
    def batch_description(self, loader, dp_size: int) -> str:
        ...

    @abstractmethod
    def loss(self, model: nn.Module, batch, device: torch.device, amp) -> torch.Tensor:
        ...

    @abstractmethod
    def validate(self, model: nn.Module, micro_batch: int, device: torch.device, amp) -> dict | None:
        """Validation metrics (``val_loss`` first) over the configured number of batches, or None when the
        data has no validation split. Every rank evaluates the same batches (FSDP needs every rank in
        every forward)."""

    def save_pretrained(self, state_dict: dict, run_dir: Path) -> None:
        from fmforge.runs import save_pretrained

        save_pretrained(state_dict, self.cfg.model, run_dir, self.tokenizer_dir)

    tokenizer_dir: Path | None = None
    units_per_step: int = 0


# --------------------------------------------------------------------------------------------- text


class CausalLMTask(Task):
    """Next-token prediction on packed token windows (gpt2, llama)."""

    def __init__(self, cfg: Config, data_dir: Path, echo):
        from fmforge.data.loader import TokenWindows

        super().__init__(cfg, data_dir, echo)
        seq_len = cfg.data.seq_len
        self.train_windows = TokenWindows(data_dir, "train", seq_len)
        self.tokenizer_dir = data_dir
        tok_info = self.train_windows.manifest["tokenizer"]
        cfg.model = self._resolve(cfg, tok_info)
        if cfg.train.global_batch_tokens % seq_len:
            raise FmforgeError(f"train.global_batch_tokens ({cfg.train.global_batch_tokens}) must be a multiple "
                               f"of data.seq_len ({seq_len})")
        self.units_per_step = cfg.train.global_batch_tokens
        try:
            self.val_windows = TokenWindows(data_dir, "val", seq_len)
        except FmforgeError as err:
            echo(f"warning: no validation: {err}")
            self.val_windows = None

    def _resolve(self, cfg: Config, tok_info: dict):
        return cfg.model.resolved(vocab_size=tok_info["vocab_size"], seq_len=cfg.data.seq_len)

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        from fmforge.data.loader import GlobalBatchLoader

        return GlobalBatchLoader(self.train_windows, self.units_per_step // self.cfg.data.seq_len, micro_batch,
                                 self.cfg.train.seed, rank=rank, world_size=world_size)

    def build_model(self) -> nn.Module:
        from fmforge.models.gpt import GPT

        # Compile the loss with the model: the fused chunked cross-entropy is where compile gains most on
        # GPT-2 shapes (H100, 124M: 304k tokens/s eager loss vs 410k compiled).
        self.loss_fn = torch.compile(clm_loss) if self.compile else clm_loss
        return GPT(self.cfg.model)

    def flops_per_unit(self, model: nn.Module) -> float:
        return model.flops_per_token(self.cfg.data.seq_len)

    def batch_description(self, loader, dp_size: int) -> str:
        return (f"global batch {self.units_per_step} tokens = {loader.accum_steps} x {loader.micro_batch} x "
                f"{self.cfg.data.seq_len} x {dp_size}")

    def loss(self, model, batch, device, amp):
        inputs, targets = (t.to(device, non_blocking=True) for t in batch)
        with amp():
            logits = model(inputs)
        return self.loss_fn(logits, targets)

    def validate(self, model, micro_batch, device, amp):
        from fmforge.data.loader import eval_windows
        from fmforge.eval.perplexity import evaluate_batches

        if self.val_windows is None:
            return None
        batches = eval_windows(self.val_windows, micro_batch, self.cfg.train.eval_batches)
        return {"val_loss": evaluate_batches(model, batches, device, amp)["loss"]}


def mask_token_id(tokenizer, vocab_size: int) -> tuple[int, bool]:
    """The id [MASK] gets: the tokenizer's own mask token when it has one (WordPiece's [MASK], RoBERTa's
    <mask>), else the first row past its vocabulary, which the padded embedding already holds and the
    tokenizer never emits. Returns (id, whether it is an extra row)."""
    for name in ("[MASK]", "<mask>", "<|mask|>"):
        tid = tokenizer.tokenizer.token_to_id(name)
        if tid is not None:
            return tid, False
    return vocab_size, True


class MaskedLMTask(CausalLMTask):
    """BERT's masked-LM pretraining on the same token shards as the causal LM: each window of seq_len
    tokens (documents packed and separated by end-of-text, as RoBERTa's FULL-SENTENCES) is corrupted
    80/10/10 at ``model.mask_prob`` of its positions and the selected tokens are predicted from both sides."""

    def _resolve(self, cfg: Config, tok_info: dict):
        from fmforge.data.tokenizer import load_tokenizer

        tok = load_tokenizer(self.data_dir / "tokenizer.json")
        self.tok_vocab = tok.vocab_size
        self.mask_id, extra = mask_token_id(tok, tok.vocab_size)
        added = tok.tokenizer.get_added_tokens_decoder()
        self.special_ids = sorted({i for i, t in added.items() if t.special} |
                                  {i for i in (tok.eos_id, tok.bos_id, tok.pad_id) if i is not None})
        m = cfg.model
        needed = tok.vocab_size + int(extra)
        if "vocab_size" in m.model_fields_set:
            if m.vocab_size < needed:
                raise FmforgeError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's vocabulary"
                                   f"{' plus a [MASK] row' if extra else ''} ({needed})")
            vocab = m.vocab_size
        else:
            vocab = round_up(needed, m.vocab_multiple)
        if cfg.data.seq_len > m.max_seq_len:
            raise FmforgeError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
        return type(m)(**{**m.model_dump(), "vocab_size": vocab})

    def build_model(self) -> nn.Module:
        from fmforge.models.bert import Bert

        return Bert(self.cfg.model)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.cfg.model
        head = m.d_model * m.d_model + m.d_model * m.vocab_size  # run only on the selected positions
        return encoder_flops(model, self.cfg.data.seq_len, m.n_layer, m.d_model) / self.cfg.data.seq_len + \
            6.0 * m.mask_prob * head

    def _masked(self, inputs: torch.Tensor, generator=None):
        from fmforge.objectives.mlm import mask_tokens

        return mask_tokens(inputs, mask_token_id=self.mask_id, vocab_size=self.tok_vocab,
                           special_token_ids=self.special_ids, generator=generator, mask_prob=self.cfg.model.mask_prob)

    def loss(self, model, batch, device, amp):
        from fmforge.objectives.mlm import IGNORE_INDEX

        inputs = batch[0].to(device, non_blocking=True)
        inputs, labels = self._masked(inputs)  # torch's RNG: checkpointed, so a resumed run masks the same
        selected = labels != IGNORE_INDEX
        with amp():
            logits = model(inputs, mlm_select=selected)
        return clm_loss(logits, labels[selected])

    def validate(self, model, micro_batch, device, amp):
        from fmforge.data.loader import eval_windows
        from fmforge.objectives.mlm import IGNORE_INDEX

        if self.val_windows is None:
            return None
        with evaluating(model):
            g = torch.Generator(device).manual_seed(0)  # the same masks at every validation: comparable losses
            total, count = 0.0, 0
            for inputs, _ in eval_windows(self.val_windows, micro_batch, self.cfg.train.eval_batches):
                inputs, labels = self._masked(inputs.to(device), generator=g)
                selected = labels != IGNORE_INDEX
                with amp():
                    logits = model(inputs, mlm_select=selected)
                total += F.cross_entropy(logits.float(), labels[selected], reduction="sum").item()
                count += int(selected.sum())
        return {"val_loss": total / max(count, 1)}


# --------------------------------------------------------------------------------------------- images


class ImageTask(Task):
    """Shared by the image objectives: shards, transforms, the global batch in images."""

    unit = "samples"
    needs_mode: str | None = None  # "classification" or "captions"; None: either (labels unused)

    def __init__(self, cfg: Config, data_dir: Path, echo):
        from fmforge.data.image_loader import IMAGENET_MEAN, IMAGENET_STD
        from fmforge.data.image_shards import ImageShards

        super().__init__(cfg, data_dir, echo)
        self.train_shards = ImageShards(data_dir, "train")
        self.mode = self.train_shards.mode
        if self.needs_mode and self.mode != self.needs_mode:
            what = {"classification": "labelled images (class folders or --label-field)",
                    "captions": "captioned images (a caption list)"}[self.needs_mode]
            raise FmforgeError(f"model.arch={cfg.model.arch} trains on {what}, but {data_dir} holds {self.mode} data")
        self.val_shards = None
        if self.train_shards.index["samples"].get("val"):
            self.val_shards = ImageShards(data_dir, "val")
        else:
            echo(f"warning: no validation: {data_dir} has no val images")
        if cfg.train.global_batch_size is None:
            cfg.train.global_batch_size = DEFAULT_GLOBAL_BATCH_IMAGES
        self.units_per_step = cfg.train.global_batch_size
        cfg.model = self.resolve(cfg.model)
        channels = self.vision.channels
        d = cfg.data
        if d.mean is not None and len(d.mean) != channels:
            raise FmforgeError(f"data.mean has {len(d.mean)} values but the model reads {channels}-channel images")
        self.mean = d.mean if d.mean is not None else (IMAGENET_MEAN if channels == 3 else (0.5,) * channels)
        self.std = d.std if d.std is not None else (IMAGENET_STD if channels == 3 else (0.5,) * channels)

    def resolve(self, model_cfg):
        return model_cfg

    @property
    @abstractmethod
    def vision(self):
        """The image tower's ``VisionConfig`` (image size, channels, patches)."""

    def transforms(self):
        """(train, eval) transforms: torchvision v2 kernels, to the model's image size and channels."""
        from fmforge.data.image_loader import EvalTransform, TrainTransform

        size, d = self.vision.image_size, self.cfg.data
        train = TrainTransform(size, scale=tuple(d.crop_scale), hflip=d.hflip, mean=self.mean, std=self.std)
        evaluate = EvalTransform(size, resize=round(size / d.crop_pct), mean=self.mean, std=self.std)
        if self.vision.channels == 1:
            return _Gray(train), _Gray(evaluate)
        if self.vision.channels != 3:
            raise FmforgeError(f"images are decoded as RGB or gray; the model reads {self.vision.channels} channels")
        return train, evaluate

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        from fmforge.data.image_loader import ImageBatchLoader

        return ImageBatchLoader(self.train_shards, self.units_per_step, micro_batch, self.cfg.train.seed, rank=rank,
                                world_size=world_size, transform=self.transforms()[0], workers=self.cfg.data.workers,
                                log=self.echo)

    def batch_description(self, loader, dp_size: int) -> str:
        return (f"global batch {self.units_per_step} images = {loader.accum_steps} x {loader.micro_batch} x "
                f"{dp_size}, {self.vision.image_size} px")

    def val_batches(self, micro_batch: int):
        from fmforge.data.image_loader import eval_batches

        return eval_batches(self.val_shards, micro_batch, self.transforms()[1], self.cfg.train.eval_batches,
                            log=self.echo)


class _Gray:
    """Feed a one-channel model: convert the decoded RGB image to luminance ("L") before the transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, g=None):
        return self.transform(image.convert("L"), g)


class ImageClassificationTask(ImageTask):
    needs_mode = "classification"

    @property
    def vision(self):
        return self.cfg.model

    def resolve(self, m):
        classes = len(self.train_shards.classes)
        if "num_classes" in m.model_fields_set and m.num_classes != classes:
            raise FmforgeError(f"model.num_classes ({m.num_classes}) differs from the {classes} classes of "
                               f"{self.data_dir}; leave it unset to take the data's")
        return type(m)(**{**m.model_dump(), "num_classes": classes})

    def build_model(self) -> nn.Module:
        from fmforge.models.vit import ViT

        return ViT(self.cfg.model)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.cfg.model
        tokens = m.n_prefix + m.num_patches
        patch = m.patch_dim * m.d_model * m.num_patches
        return encoder_flops(model, tokens, m.n_layer, m.d_model) + 6.0 * (patch + m.d_model * m.num_classes)

    def loss(self, model, batch, device, amp):
        from fmforge.objectives.classify import classification_loss

        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with amp():
            logits = model(images)
        return classification_loss(logits, labels, self.cfg.model.label_smoothing)

    def validate(self, model, micro_batch, device, amp):
        from fmforge.objectives.classify import topk_correct

        if self.val_shards is None:
            return None
        with evaluating(model):
            total, top1, top5, n = 0.0, 0, 0, 0
            for images, labels in self.val_batches(micro_batch):
                images, labels = images.to(device), labels.to(device)
                with amp():
                    logits = model(images)
                total += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                top1 += int(topk_correct(logits, labels, 1))
                top5 += int(topk_correct(logits, labels, 5))
                n += len(labels)
        return {"val_loss": total / n, "val_top1": top1 / n, "val_top5": top5 / n}


class MAETask(ImageTask):
    """Masked-autoencoder pretraining: labels and captions, if any, are ignored."""

    @property
    def vision(self):
        return self.cfg.model.encoder

    def build_model(self) -> nn.Module:
        from fmforge.models.vit import MAE

        return MAE(self.cfg.model)

    def flops_per_unit(self, model: nn.Module) -> float:
        m, enc = self.cfg.model, self.cfg.model.encoder
        keep = max(1, int(enc.num_patches * (1 - m.mask_ratio) + 1e-9))
        t_enc, t_dec = enc.n_prefix + keep, enc.n_prefix + enc.num_patches
        flops = encoder_flops(model.encoder, t_enc, enc.n_layer, enc.d_model)
        flops += 6.0 * block_params(nn.ModuleList(model.decoder_blocks)) * t_dec
        flops += 12.0 * m.decoder_n_layer * m.decoder_d_model * t_dec * t_dec
        flops += 6.0 * (enc.patch_dim * enc.d_model * enc.num_patches + enc.d_model * m.decoder_d_model * t_enc
                        + m.decoder_d_model * enc.patch_dim * t_dec)
        return flops

    def _loss(self, model, images, generator=None):
        from fmforge.objectives.mae import masked_patch_mse, pixel_targets

        pred, mask = model(images, generator=generator)
        target = pixel_targets(images, self.vision.patch_size, self.cfg.model.norm_pix)
        return masked_patch_mse(pred, target, mask)

    def loss(self, model, batch, device, amp):
        images = batch[0].to(device, non_blocking=True)
        with amp():  # masks come from torch's RNG: checkpointed, so a resumed run draws the same
            return self._loss(model, images)

    def validate(self, model, micro_batch, device, amp):
        if self.val_shards is None:
            return None
        with evaluating(model):
            g = torch.Generator(device).manual_seed(0)  # the same masks at every validation: comparable losses
            total, n = 0.0, 0
            for images, _ in self.val_batches(micro_batch):
                images = images.to(device)
                with amp():
                    total += self._loss(model, images, g).item() * len(images)
                n += len(images)
        return {"val_loss": total / n}


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
        return self.cfg.model.vision

    def resolve(self, m):
        from fmforge.data.tokenizer import load_tokenizer

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
        from fmforge.models.clip import CLIP

        return CLIP(self.cfg.model)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.cfg.model
        v, t = m.vision, m.text
        t_img = v.n_prefix + v.num_patches
        flops = encoder_flops(model.visual, t_img, v.n_layer, v.d_model)
        flops += encoder_flops(model.text, t.context_length, t.n_layer, t.d_model)
        flops += 6.0 * (v.patch_dim * v.d_model * v.num_patches + (v.d_model + t.d_model) * m.embed_dim)
        return flops

    def loss(self, model, batch, device, amp):
        from fmforge.objectives.contrastive import contrastive_loss

        images = batch[0].to(device, non_blocking=True)
        tokens = self.captions(batch[1]).to(device, non_blocking=True)
        with amp():
            out = model(images, tokens)
        return contrastive_loss(out)

    def validate(self, model, micro_batch, device, amp):
        from fmforge.eval.vision import grouped_retrieval_recall
        from fmforge.objectives.contrastive import contrastive_loss

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


TASKS = {"gpt2": CausalLMTask, "llama": CausalLMTask, "bert": MaskedLMTask, "vit": ImageClassificationTask,
         "mae": MAETask, "clip": ContrastiveTask}


def make_task(cfg: Config, data_dir: Path, echo) -> Task:
    """The task for ``cfg.model.arch`` (and ``finetune.task``), with ``cfg.model`` (and, for images,
    ``train.global_batch_size``) resolved against the data in place."""
    from fmforge.finetune.tasks import DPOTask, SFTTask, TextClassificationTask

    if cfg.finetune.task == "classify":
        if cfg.model.arch == "vit":  # a ViT or MAE base, its encoder under a new head (finetune.base)
            return ImageClassificationTask(cfg, data_dir, echo)
        if cfg.model.arch != "bert":
            raise FmforgeError(f"finetune.task=classify fine-tunes BERT-family text encoders and ViT/MAE image "
                               f"encoders, not model.arch={cfg.model.arch}")
        return TextClassificationTask(cfg, data_dir, echo)
    if cfg.finetune.task in ("sft", "dpo"):
        if not is_decoder(cfg.model):
            raise FmforgeError(f"finetune.task={cfg.finetune.task} trains decoders (gpt2, llama), not "
                               f"model.arch={cfg.model.arch}")
        return (SFTTask if cfg.finetune.task == "sft" else DPOTask)(cfg, data_dir, echo)
    return TASKS[cfg.model.arch](cfg, data_dir, echo)


def is_decoder(model_cfg) -> bool:
    return isinstance(model_cfg, ModelConfig)
