"""``fmforge eval`` for diffusion runs: how close generated images are to held-out real ones, measured
offline in the feature space of an fmforge image classifier trained on the same data (no Inception weights
can be downloaded here), and how well they follow their condition.

- Fréchet distance (Heusel et al. 2017) and KID (Bińkowski et al. 2018, unbiased MMD² with the cubic
  polynomial kernel) between the classifier's pooled features of generated and held-out real images;
- precision and recall of the generated distribution (Kynkäänniemi et al. 2019, k = 3 nearest neighbours);
- prompt accuracy: the classifier's accuracy at recognising the prompted class in the generated images;
- CLIP score: cosine similarity (x100, clipped at 0) of generated images and their prompts under an fmforge
  CLIP (the run's own text encoder for text-conditioned runs, or ``--clip``).

Every score comes with two baselines measured the same way so it can be read: **real** (train-split images
against the same held-out set: what a perfect generator would score) and **noise** (uniform noise images:
what a useless one would).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from fmforge.config import build_config
from fmforge.data.image_loader import IMAGENET_MEAN, IMAGENET_STD, eval_batches
from fmforge.deploy.image_generate import load_diffusion_run
from fmforge.device import autocast_for, pick_device
from fmforge.errors import FmforgeError
from fmforge.eval.runs import load_run_config
from fmforge.objectives import make_task
from fmforge.objectives.diffusion import TextConditioner
from fmforge.runs import load_pretrained

PR_NEIGHBOURS = 3  # Kynkäänniemi et al.'s k


def _quiet(_msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------- metrics


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||μa - μb||² + Tr(Σa + Σb - 2 (Σa Σb)^½) of two feature sets [N, D], in float64. The trace of the
    matrix square root is taken as Σ √λ of Σa^½ Σb Σa^½ (symmetric, so an eigendecomposition suffices)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 10, subset_size: int = 1000,
                              seed: int = 0) -> float:
    """Mean over random subsets of the unbiased MMD² with k(x, y) = (x·y / D + 1)³."""
    a, b = a.double(), b.double()
    d = a.size(1)
    m = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = 1 - torch.eye(m, dtype=torch.float64)
        total += float((kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean())
    return total / subsets


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Precision: share of generated samples inside the real manifold (the union of balls around each real
    sample reaching its k-th nearest real neighbour); recall: share of real samples inside the generated
    manifold, built the same way."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        dist = torch.cdist(x, x)
        return dist.kthvalue(k + 1, dim=1).values  # +1: each point is its own nearest neighbour

    def coverage(support: torch.Tensor, queries: torch.Tensor) -> float:
        inside = torch.cdist(queries, support) <= radii(support)[None]
        return inside.any(dim=1).float().mean().item()

    real, fake = real.double(), fake.double()
    return coverage(real, fake), coverage(fake, real)


def distribution_scores(real: torch.Tensor, other: torch.Tensor, prefix: str) -> dict[str, float]:
    precision, recall = precision_recall(real, other)
    return {f"{prefix}fd": frechet_distance(real, other), f"{prefix}kid": kernel_inception_distance(real, other),
            f"{prefix}precision": precision, f"{prefix}recall": recall}


# ---------------------------------------------------------------------------------------------------- models


def _normalization(cfg, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean/std a run's images were standardized with (``ImageTask``'s rule)."""
    mean = cfg.data.mean or (IMAGENET_MEAN if channels == 3 else (0.5,) * channels)
    std = cfg.data.std or (IMAGENET_STD if channels == 3 else (0.5,) * channels)
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


class ImageModel:
    """A frozen fmforge image model (a ViT classifier, or a CLIP's image tower) fed images in [-1, 1]: they
    are resized and standardized the way that run trained."""

    def __init__(self, run_dir: str | Path, family: str, device, channels: int):
        self.model, self.tokenizer = load_pretrained(run_dir, device, family=family)
        vision = self.model.cfg if family == "vit" else self.model.cfg.vision
        if vision.channels != channels:
            raise FmforgeError(f"{run_dir} reads {vision.channels}-channel images; the diffusion run makes "
                               f"{channels}-channel ones")
        config = Path(run_dir) / "config.yaml"  # imported runs have one too; without it, fmforge's defaults
        cfg = build_config(yaml.safe_load(config.read_text())) if config.is_file() else build_config({})
        self.mean, self.std = _normalization(cfg, channels)
        self.size, self.device = vision.image_size, device

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def run(self, images: torch.Tensor, fn, batch_size: int) -> torch.Tensor:
        return torch.cat([fn(self.prepare(images[i:i + batch_size])).float().cpu()
                          for i in range(0, len(images), batch_size)])


def prompt_classes(prompts: list[str], class_names: list[str]) -> list[int | None]:
    """The class each prompt names (the one whose name appears in it as a whole word), None if not one."""
    patterns = [re.compile(rf"\b{re.escape(name.lower())}\b") for name in class_names]
    out = []
    for prompt in prompts:
        hits = [i for i, p in enumerate(patterns) if p.search(prompt.lower())]
        out.append(hits[0] if len(hits) == 1 else None)
    return out


def prompt_accuracy(logits: torch.Tensor, conditions: list, class_names: list[str] | None) -> float | None:
    """Share of images the classifier assigns to the class they were asked for: the label itself, or (text
    conditions, ``class_names`` given) the class the prompt names; prompts naming none are left out."""
    targets = prompt_classes(list(conditions), class_names or []) if class_names is not None else \
        [int(c) for c in conditions]
    known = [i for i, t in enumerate(targets) if t is not None]
    if not known:
        return None
    wanted = torch.tensor([targets[i] for i in known])
    return (logits[known].argmax(-1) == wanted).float().mean().item()


# ---------------------------------------------------------------------------------------------------- command


def _real_images(task, shards, limit: int | None, batch_size: int, seed: int):
    """A split's images (evaluation transform) and targets: all of them, or a seeded random ``limit`` of
    them (shards are often in class order, so the first ones would be a few classes)."""
    images, targets = [], []
    for x, target in eval_batches(shards, batch_size, task.transforms()[1], None, log=_quiet):
        images.append(x)
        targets += list(target)
    images = torch.cat(images)
    if limit is None or limit >= len(images):
        return images, targets
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
    return images[keep], [targets[i] for i in keep.tolist()]


def evaluate_diffusion(run_dir: str | Path, *, classifier: str | Path, clip: str | Path | None = None,
                       data_dir: str | Path | None = None, class_names: list[str] | None = None,
                       samples: int | None = None, steps: int = 50, sampler: str = "ddim", guidance: float = 2.0,
                       seed: int = 0, batch_size: int = 256, device: str = "auto", json_out: bool = False,
                       echo=print) -> dict:
    """Generate one image per held-out image (its label, or its caption as the prompt) and score them
    against the held-out set; returns the metrics with the real and noise baselines."""
    run_dir = Path(run_dir)
    dev = pick_device(device)
    run = load_diffusion_run(run_dir, dev)
    cfg = load_run_config(run_dir, data_dir)
    task = make_task(cfg, Path(cfg.data.path), _quiet)
    if task.val_shards is None:
        raise FmforgeError(f"nothing to evaluate: {cfg.data.path} has no validation split")
    val_x, val_y = _real_images(task, task.val_shards, samples, batch_size, seed)
    train_x, train_y = _real_images(task, task.train_shards, len(val_x), batch_size, seed)
    n = len(val_x)
    text = run.cfg.condition == "text"
    conds = run.conditions(prompts=list(val_y)) if text else run.conditions(labels=[int(v) for v in val_y])
    fake = run.sample(conds, steps=steps, sampler=sampler, guidance=guidance, seed=seed, batch_size=batch_size)
    noise = torch.rand(fake.shape, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
    sets = {"": fake, "real_": train_x, "noise_": noise}

    judge = ImageModel(classifier, "vit", dev, run.cfg.channels)
    classes = judge.model.cfg.num_classes
    result: dict = {"run_dir": str(run_dir), "data_dir": cfg.data.path, "family": "dit", "classifier": str(classifier),
                    "images": n, "sampler": sampler, "steps": steps, "guidance": guidance}
    amp = autocast_for(dev, cfg.train.precision)
    with amp():
        real_f = judge.run(val_x, judge.model.features, batch_size)
        feats = {k: judge.run(v, judge.model.features, batch_size) for k, v in sets.items()}
        logits = {k: judge.run(v, judge.model, batch_size) for k, v in sets.items()}
    for prefix, f in feats.items():
        result.update(distribution_scores(real_f, f, prefix))

    if not text and classes != run.cfg.num_classes:
        raise FmforgeError(f"the classifier has {classes} classes, the diffusion run {run.cfg.num_classes}: "
                           "train it on the same data")
    # Generated and noise images were asked for the val conditions; the real baseline shows train images.
    conditions = {"": val_y, "real_": train_y, "noise_": val_y}
    for prefix, lg in logits.items():
        if text and not class_names:
            break
        accuracy = prompt_accuracy(lg, conditions[prefix], class_names if text else None)
        if accuracy is not None:
            result[f"{prefix}prompt_accuracy"] = accuracy
    if "prompt_accuracy" in result:
        result["prompt_accuracy_chance"] = 1.0 / classes
    else:
        echo("note: no prompt accuracy: give --class-names naming the classifier's classes in the prompts' words")

    clip_dir = clip or (run.conditioner.clip_dir if text else None)
    if clip_dir is not None:
        prompts = list(val_y) if text else [(class_names or [str(c) for c in range(classes)])[int(v)] for v in val_y]
        result.update(_clip_scores(clip_dir, sets, prompts, dev, run.cfg.channels, batch_size, amp))
    _report(result, json_out, echo)
    return result


def _clip_scores(clip_dir, sets: dict, prompts: list[str], device, channels: int, batch_size: int, amp) -> dict:
    clip = ImageModel(clip_dir, "clip", device, channels)
    texts = TextConditioner(clip_dir, device)
    t = F.normalize(texts(prompts), dim=-1)
    out = {}
    with amp():
        for prefix, images in sets.items():
            i = F.normalize(clip.run(images, clip.model.encode_image, batch_size), dim=-1)
            out[f"{prefix}clip_score"] = 100 * (i * t).sum(-1).clamp(min=0).mean().item()
    return out


def _report(result: dict, json_out: bool, echo) -> None:
    if json_out:
        echo(json.dumps(result))
        return
    echo(f"eval of {result['run_dir']} (dit) on {result['data_dir']}: {result['images']} generated vs held-out "
         f"images ({result['sampler']}, {result['steps']} steps, guidance {result['guidance']:g}), features of "
         f"{result['classifier']}")
    echo(f"  {'metric':<18} {'generated':>10} {'real':>10} {'noise':>10}")
    for name in ("fd", "kid", "precision", "recall", "prompt_accuracy", "clip_score"):
        if name in result:
            echo(f"  {name:<18} {result[name]:>10.4f} {result['real_' + name]:>10.4f} {result['noise_' + name]:>10.4f}")
    if "prompt_accuracy_chance" in result:
        echo(f"  prompt accuracy chance: {result['prompt_accuracy_chance']:.4f}")
