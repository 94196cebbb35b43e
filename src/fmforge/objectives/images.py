"""What the image objectives share (image classification, MAE, CLIP/SigLIP): the WebDataset shards of
``fmforge data prepare-images``, the train/eval transforms, and a global batch counted in images."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

from fmforge.config import Config
from fmforge.data.image_loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageBatchLoader,
    TrainTransform,
    eval_batches,
)
from fmforge.data.image_shards import ImageShards
from fmforge.errors import FmforgeError
from fmforge.objectives.base import Task


class ImageTask(Task):
    """Shared by the image objectives: shards, transforms, the global batch in images."""

    unit = "samples"
    needs_mode: str | None = None  # "classification" or "captions"; None: either (labels unused)

    default_global_batch = 256

    def __init__(self, cfg: Config, data_dir: Path, echo):
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
        self.global_batch = cfg.train.global_batch or self.default_global_batch
        self.model_cfg = self.resolve(cfg.model)
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
        size, d = self.vision.image_size, self.cfg.data
        train = TrainTransform(size, scale=tuple(d.crop_scale), hflip=d.hflip, mean=self.mean, std=self.std)
        evaluate = EvalTransform(size, resize=round(size / d.crop_pct), mean=self.mean, std=self.std)
        if self.vision.channels == 1:
            return _Gray(train), _Gray(evaluate)
        if self.vision.channels != 3:
            raise FmforgeError(f"images are decoded as RGB or gray; the model reads {self.vision.channels} channels")
        return train, evaluate

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        return ImageBatchLoader(self.train_shards, self.global_batch, micro_batch, self.cfg.train.seed, rank=rank,
                                world_size=world_size, transform=self.transforms()[0], workers=self.cfg.data.workers,
                                log=self.echo)

    def batch_description(self, loader, dp_size: int) -> str:
        return (f"global batch {self.global_batch} images = {loader.accum_steps} x {loader.micro_batch} x "
                f"{dp_size}, {self.vision.image_size} px")

    def val_batches(self, micro_batch: int):
        return eval_batches(self.val_shards, micro_batch, self.transforms()[1], self.cfg.train.eval_batches,
                            log=self.echo)


class _Gray:
    """Feed a one-channel model: convert the decoded RGB image to luminance ("L") before the transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, g=None):
        return self.transform(image.convert("L"), g)
