"""Image batches in a deterministic, resumable global order, with reproducible augmentations.

Order contract (DESIGN.md): the sequence of global batches is a function of (seed, epoch) only; rank r of
world w takes rows ``[r*G/w, (r+1)*G/w)`` of every global batch of G samples, and the loader position is
just (epoch, cursor) — as for token windows (``fmforge.data.loader``).

Augmentations are part of that contract: each sample's random crop and flip are drawn from a generator
seeded by (seed, epoch, sample index), never from torch's global RNG, so a sample looks the same whether the
run was resumed, at any world size, and whatever the model's own random draws are (a background prefetch
thread cannot disturb them either). The transforms are torchvision's ``transforms.v2`` kernels;
RandomResizedCrop's parameters are drawn with torchvision's algorithm from that generator.

A sample that no longer decodes (a shard damaged after preparation, or an image over the reader's pixel
limit, which is never decoded: see ``image_shards.ImageTooLarge``) does not stop training: it is counted
and reported once, and the next sample of the split (in shard order, wrapping) that decodes takes its
place, with the augmentation of the original position — so the substitution is itself deterministic and
resume stays exact. Only a split where nothing decodes is an error.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from fmforge.data.image_shards import ImageShards, ImageTooLarge
from fmforge.data.sampler import GlobalBatchSampler, SampledLoader
from fmforge.errors import FmforgeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip(hflip) + ToDtype(float32) + Normalize,
    random parameters drawn from the generator passed with each image. Returns ``[3, size, size]``."""

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip
        self.mean, self.std = list(mean), list(std)

    def crop_params(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w): torchvision's RandomResizedCrop.make_params, drawing from ``g``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=g).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
                left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
                return top, left, h, w
        in_ratio = width / height  # fallback: the central crop closest to the allowed ratios
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, g: torch.Generator) -> torch.Tensor:
        x = F.pil_to_tensor(image)
        top, left, h, w = self.crop_params(x.shape[-2], x.shape[-1], g)
        x = F.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        if torch.rand(1, generator=g).item() < self.hflip:
            x = F.horizontal_flip(x)
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)


class EvalTransform:
    """Resize(shorter side to ``resize``, default size·256/224) + CenterCrop(size) + ToDtype + Normalize."""

    def __init__(self, size: int = 224, resize: int | None = None, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        self.size = size
        self.resize = resize if resize is not None else int(round(size * 256 / 224))
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Image.Image, g: torch.Generator | None = None) -> torch.Tensor:
        x = F.resize(F.pil_to_tensor(image), [self.resize], antialias=True)
        x = F.center_crop(x, [self.size, self.size])
        return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)


Transform = Callable[[Image.Image, torch.Generator], torch.Tensor]


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's augmentation: a function of (seed, epoch, sample index) only."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


class _Decoder:
    """Decodes samples of one split, substituting the next decodable sample for a damaged one."""

    def __init__(self, shards: ImageShards, log: Callable[[str], None] | None):
        self.shards = shards
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
        self.bad: set[int] = set()
        self._lock = threading.Lock()

    def load(self, i: int) -> tuple[Image.Image, int | str]:
        n = len(self.shards)
        for step in range(n):
            j = (i + step) % n
            if j in self.bad:
                continue
            try:
                return self.shards.image(j), self.shards.target(j)
            except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError ... on damaged bytes
                with self._lock:
                    if j not in self.bad:
                        self.bad.add(j)
                        what = (f"{err} (not decoded)" if isinstance(err, ImageTooLarge) else
                                f"{self.shards.where(j)} does not decode ({type(err).__name__}: {err})")
                        self.log(f"fmforge: warning: {what}; the next sample takes its place")
        raise FmforgeError(f"no sample of the {self.shards.split} split of {self.shards.data_dir} decodes; "
                           "prepare the images again")


def _collate(samples: list[tuple[torch.Tensor, int | str]], mode: str):
    images = torch.stack([x for x, _ in samples])
    targets = [t for _, t in samples]
    return images, (torch.tensor(targets, dtype=torch.int64) if mode == "classification" else targets)


class ImageBatchLoader(SampledLoader):
    """Yields, for each optimizer step, this rank's micro-batches ``(images, targets)`` of one global batch
    in ``sampler.GlobalBatchSampler``'s order: images ``[micro_batch, 3, H, W]`` float32, targets an int64
    label tensor (classification) or a list of caption strings (captions).

    transform: ``transform(pil_rgb_image, generator) -> [3, H, W] tensor`` drawing its randomness from the
        generator only (default ``TrainTransform(224)``).
    workers: threads decoding and transforming a micro-batch (default: the usable cores, at most 8).
    decode_failures: how many damaged samples were met and replaced (see the module docstring).
    """

    def __init__(self, shards: ImageShards, global_batch: int, micro_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, transform: Transform | None = None, workers: int | None = None,
                 log: Callable[[str], None] | None = None):
        self.sampler = GlobalBatchSampler(len(shards), global_batch, micro_batch, seed, rank, world_size,
                                          what="images", too_few="prepare more images")
        self.shards, self.seed = shards, seed
        self.transform = transform if transform is not None else TrainTransform()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = min(8, cores) if workers is None else workers
        self._decoder = _Decoder(shards, log)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def decode_failures(self) -> int:
        return len(self._decoder.bad)

    def sample(self, index: int, epoch: int) -> tuple[torch.Tensor, int | str]:
        """Sample ``index`` of the split as it appears in ``epoch`` (augmented): ``([3, H, W], target)``."""
        image, target = self._decoder.load(index)
        return self.transform(image, sample_generator(self.seed, epoch, index)), target

    def read(self, indices: np.ndarray, epoch: int):
        indices = [int(i) for i in indices]
        if self.workers > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fmforge-images")
            samples = list(self._pool.map(lambda i: self.sample(i, epoch), indices))
        else:
            samples = [self.sample(i, epoch) for i in indices]
        return _collate(samples, self.shards.mode)

    def __iter__(self):
        """Steps without end (each a list of micro-batches); the loader's state advances with each."""
        while True:
            yield self.next_step()


def eval_batches(shards: ImageShards, batch_size: int, transform: Transform | None = None,
                 max_batches: int | None = None, log: Callable[[str], None] | None = None):
    """Evaluation batches ``(images, targets)`` in shard order (deterministic, every sample once), optionally
    capped; ``transform`` defaults to ``EvalTransform(224)``."""
    transform = transform if transform is not None else EvalTransform()
    decoder = _Decoder(shards, log)
    n = len(shards) if max_batches is None else min(len(shards), max_batches * batch_size)
    for start in range(0, n, batch_size):
        samples = []
        for i in range(start, min(start + batch_size, n)):
            image, target = decoder.load(i)
            samples.append((transform(image, sample_generator(0, 0, i)), target))
        yield _collate(samples, shards.mode)
