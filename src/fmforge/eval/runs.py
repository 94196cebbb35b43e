"""``fmforge eval`` for image, image-text and masked-LM runs (ViT, MAE, CLIP/SigLIP, BERT).

Every family first gets its training objective's validation metrics over the whole validation split (the
same code the trainer validates with). Then, by family:

- vit: top-1 / top-5 accuracy; linear probe and k-NN on its frozen pooled features;
- mae: linear probe and k-NN on the encoder's frozen features (labelled data: the run's own, or --data);
- clip: image<->caption retrieval recall@1/5/10 on the validation captions, and zero-shot classification of
  a labelled image set (--zero-shot DATA_DIR): class names x prompt templates, embeddings averaged and
  normalized (Radford et al. 2021);
- bert: masked-LM loss and perplexity on the validation tokens.

Probes fit on the train split's features (evaluation transform, no augmentation) and score on the val split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from fmforge.config import build_config
from fmforge.data.image_loader import eval_batches
from fmforge.data.image_shards import ImageShards
from fmforge.data.staging import stage_prepared_data
from fmforge.device import autocast_for, pick_device
from fmforge.errors import FmforgeError
from fmforge.eval.vision import (
    TEMPLATES,
    knn_predict,
    linear_probe,
    zero_shot_logits,
    zero_shot_weights,
)
from fmforge.io.fs import is_remote
from fmforge.models import build_model
from fmforge.objectives import make_task
from fmforge.objectives.contrastive import CaptionTokens, grouped_retrieval_recall
from fmforge.runs import family_of, load_pretrained

PROBE_FAMILIES = ("vit", "mae", "clip")


def _quiet(_msg: str) -> None:
    pass


def load_run_config(run_dir: Path, data_dir: str | Path | None):
    """The run's resolved config, pointed at ``data_dir`` (default: the run's own data, staged if remote)."""

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FmforgeError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = build_config(yaml.safe_load(path.read_text()))
    data = str(data_dir or cfg.data.path)
    if is_remote(data):
        data = str(stage_prepared_data(data))
    if not Path(data).is_dir():
        raise FmforgeError(f"data directory not found: {data}")
    cfg.data.path = data
    return cfg


@torch.no_grad()
def image_features(family: str, model, shards, transform, batch_size: int, device, amp,
                   limit: int | None = None) -> tuple[torch.Tensor, list]:
    """Frozen features of a split's images (pooled ViT / MAE-encoder features, CLIP image embeddings) and
    their targets, in shard order."""

    encode = {"vit": lambda x: model.features(x), "mae": lambda x: model.encoder.features(x),
              "clip": lambda x: model.encode_image(x)}[family]
    feats, targets = [], []
    max_batches = None if limit is None else math.ceil(limit / batch_size)
    for images, target in eval_batches(shards, batch_size, transform, max_batches, log=_quiet):
        with amp():
            feats.append(encode(images.to(device)).float().cpu())
        targets += list(target)
    return torch.cat(feats), targets


def probe_scores(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 classes: int, prefix: str = "") -> dict[str, float]:
    """Weighted k-NN (k=20) and L-BFGS linear-probe top-1 on the val features."""
    knn = knn_predict(train_x, train_y, val_x, num_classes=classes)
    probe = linear_probe(train_x, train_y, val_x, val_y, num_classes=classes)
    return {f"{prefix}knn_top1": (knn == val_y).float().mean().item(), f"{prefix}linear_probe_top1": probe["test_top1"]}


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None, zero_shot: str | Path | None = None,
                 class_names: list[str] | None = None, templates: list[str] | None = None, batch_size: int = 64,
                 max_batches: int | None = None, probe_samples: int = 10000, random_baseline: bool = False,
                 device: str = "auto", json_out: bool = False, echo=print) -> dict:
    """Evaluate a finished ViT, MAE, CLIP or BERT run; returns the metrics (also printed, or as JSON).
    ``random_baseline`` also probes a randomly initialized model of the same shape (seeded with the run's
    seed): what the features are worth without any training."""

    if batch_size < 1:
        raise FmforgeError(f"--batch-size must be at least 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise FmforgeError(f"--max-batches must be at least 1, got {max_batches}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, data_dir)
    dev = pick_device(device)
    model, tok = load_pretrained(run_dir, dev)
    family = family_of(model.cfg)
    if zero_shot is not None and family != "clip":
        raise FmforgeError(f"--zero-shot needs an image-text (clip) model; {run_dir} holds a {family} model")
    amp = autocast_for(dev, cfg.train.precision)
    # The whole validation split unless capped (a copy: the run's config is left as it was read).
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_batches": max_batches or 10**9})})
    data = Path(cfg.data.path)
    result: dict = {"run_dir": str(run_dir), "data_dir": str(data), "family": family}

    task = make_task(cfg, data, _quiet)
    if family == "clip":  # the model's own caption tokenizer, whatever the data's
        task.captions = CaptionTokens(tok, model.cfg.text.context_length)
    metrics = task.validate(model, batch_size, dev, amp)
    if metrics is None:
        raise FmforgeError(f"nothing to evaluate: {data} has no validation split")
    result.update(metrics)
    if family == "bert":
        result["val_perplexity"] = math.exp(metrics["val_loss"])

    # Probes need labels: MAE pretrained on captioned images is probed through --data LABELLED_DIR.
    if family in PROBE_FAMILIES and task.mode == "classification" and task.val_shards is not None:
        _, evaluate_tf = task.transforms()
        models = {"": model}
        if random_baseline:

            torch.manual_seed(cfg.train.seed)
            models["random_init_"] = build_model(model.cfg).to(dev).eval()
        for prefix, m in models.items():
            train_x, train_y = image_features(family, m, task.train_shards, evaluate_tf, batch_size, dev, amp,
                                              limit=probe_samples)
            val_x, val_y = image_features(family, m, task.val_shards, evaluate_tf, batch_size, dev, amp)
            result.update(probe_scores(train_x, torch.tensor(train_y), val_x, torch.tensor(val_y),
                                       len(task.train_shards.classes), prefix))
        result["probe_train_images"] = len(train_y)

    if family == "clip":
        val_x, captions = image_features(family, model, task.val_shards, task.transforms()[1], batch_size, dev, amp)
        texts = sorted(set(captions))
        text_x = _encode_texts(model, task.captions, texts, batch_size, dev, amp)
        owner = torch.tensor([texts.index(c) for c in captions])
        result.update(grouped_retrieval_recall(val_x, text_x, owner))
        result["retrieval_images"], result["retrieval_captions"] = len(captions), len(texts)
        if zero_shot is not None:
            result.update(_zero_shot(model, task, Path(zero_shot), class_names, templates, batch_size, dev, amp))

    _report(result, json_out, echo)
    return result


@torch.no_grad()
def _encode_texts(model, captions, texts: list[str], batch_size: int, device, amp) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        with amp():
            out.append(model.encode_text(captions(texts[i:i + batch_size]).to(device)).float().cpu())
    return torch.cat(out)


def _zero_shot(model, task, data: Path, class_names, templates, batch_size, device, amp) -> dict:
    """Classify the val images of a labelled directory by their nearest class-prompt embedding."""

    shards = ImageShards(data, "val")
    if shards.mode != "classification":
        raise FmforgeError(f"--zero-shot needs labelled images (class folders or --label-field); {data} holds captions")
    names = class_names or shards.classes
    if len(names) != len(shards.classes):
        raise FmforgeError(f"--class-names gives {len(names)} names for the {len(shards.classes)} classes of {data}")
    templates = templates or list(TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise FmforgeError(f"template {bad[0]!r} has no {{}} for the class name")
    x, labels = image_features("clip", model, shards, task.transforms()[1], batch_size, device, amp)
    weights = zero_shot_weights(lambda texts: _encode_texts(model, task.captions, texts, batch_size, device, amp),
                                names, templates)
    logits = zero_shot_logits(x, weights)
    labels = torch.tensor(labels)
    top1 = (logits.argmax(-1) == labels).float().mean().item()
    top5 = (logits.topk(min(5, len(names)), dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
    counts = torch.bincount(labels, minlength=len(names))
    return {"zero_shot_top1": top1, "zero_shot_top5": top5, "zero_shot_images": len(labels),
            "zero_shot_classes": len(names), "zero_shot_templates": len(templates),
            "zero_shot_chance": (counts.max() / counts.sum()).item()}


def _report(result: dict, json_out: bool, echo) -> None:
    if json_out:
        echo(json.dumps(result))
        return
    echo(f"eval of {result['run_dir']} ({result['family']}) on {result['data_dir']} (val split)")
    for key, value in result.items():
        if key in ("run_dir", "data_dir", "family"):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        echo(f"  {key:<24} {shown}")
