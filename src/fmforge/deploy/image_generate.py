"""``fmforge generate`` for diffusion runs: images from a class label or a text prompt, written as a PNG grid
and one PNG per image.

The run directory is loaded like every other (``runs.load_pretrained``: model.json checked against the
weights' header before anything is allocated); sampling uses the EMA weights when the run kept them. A
text-conditioned run reads prompts with the CLIP text tower it trained with (its ``text_encoder/`` copy).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmforge.device import pick_device
from fmforge.errors import FmforgeError
from fmforge.objectives.diffusion import NoiseSchedule, TextConditioner, sample, text_encoder_dir
from fmforge.runs import load_pretrained

MAX_IMAGES = 4096  # one call's batch: more is a mistake (or a job for a loop around this function)
GRID_TILE_PX = 64  # small images are enlarged (nearest neighbour) to at least this size in the grid


@dataclass
class DiffusionRun:
    """A loaded diffusion run: the network to sample (EMA when kept), its schedule, its text encoder."""

    run_dir: Path
    model: torch.nn.Module  # the whole DiT (net + ema)
    net: torch.nn.Module  # what sampling calls
    schedule: NoiseSchedule
    conditioner: TextConditioner | None

    @property
    def cfg(self):
        return self.model.cfg

    def conditions(self, prompts: list[str] | None = None, labels: list[int] | None = None) -> torch.Tensor:
        """The condition tensor for one image per prompt (text runs) or per label (class runs)."""
        cfg = self.cfg
        if cfg.condition == "text":
            if prompts is None:
                raise FmforgeError(f"{self.run_dir} is conditioned on text: give --prompt TEXT, not --class")
            return self.conditioner(prompts)
        if labels is None:
            raise FmforgeError(f"{self.run_dir} is conditioned on class labels: give --class K "
                               f"(0..{cfg.num_classes - 1}), not --prompt")
        bad = [k for k in labels if not 0 <= k < cfg.num_classes]
        if bad:
            raise FmforgeError(f"--class {bad[0]} is outside the model's classes 0..{cfg.num_classes - 1}")
        return torch.tensor(labels, dtype=torch.long)

    def sample(self, y: torch.Tensor, *, steps: int = 50, sampler: str = "ddim", guidance: float = 0.0,
               seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1], sampled ``batch_size`` at a time; image i's noise depends only on
        (seed, i // batch_size), so a call is reproducible."""
        cfg = self.cfg
        out = []
        for i, start in enumerate(range(0, len(y), batch_size)):
            out.append(sample(self.net, self.schedule, cfg.prediction, y[start:start + batch_size], steps=steps,
                              sampler=sampler, guidance=guidance, seed=seed + i).cpu())
        return torch.cat(out)


def load_diffusion_run(run_dir: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> DiffusionRun:
    run_dir = Path(run_dir)
    model, _ = load_pretrained(run_dir, device, family="dit")
    cfg = model.cfg
    conditioner = TextConditioner(text_encoder_dir(run_dir, cfg), device) if cfg.condition == "text" else None
    return DiffusionRun(run_dir, model, model.denoiser(use_ema).eval(), NoiseSchedule(cfg.schedule, cfg.timesteps),
                        conditioner)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def image_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2) -> Image.Image:
    """One PIL image of the batch in rows of ``ncol`` (default: near square), each tile enlarged by nearest
    neighbour to at least ``GRID_TILE_PX``, on a white background."""
    arrays = to_uint8(images)
    n, h, w, _ = arrays.shape
    scale = max(1, math.ceil(GRID_TILE_PX / max(h, w)))
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    tile_h, tile_w = h * scale, w * scale
    mode = "L" if arrays.shape[-1] == 1 else "RGB"
    grid = Image.new(mode, (ncol * (tile_w + pad) + pad, nrow * (tile_h + pad) + pad), color=255 if mode == "L" else (255,) * 3)
    for i, array in enumerate(arrays):
        tile = _pil(array).resize((tile_w, tile_h), Image.NEAREST)
        grid.paste(tile, (pad + (i % ncol) * (tile_w + pad), pad + (i // ncol) * (tile_h + pad)))
    return grid


def write_images(images: torch.Tensor, out: Path, overwrite: bool = False, ncol: int | None = None) -> Path:
    """The grid as ``out`` (a .png path) and each image at its own resolution as ``OUT_STEM/NNNN.png``.
    Nothing already there is replaced unless ``overwrite``; then only the grid and NNNN.png names are."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise FmforgeError(f"--out must name a .png file, got {out}")
    folder = out.with_suffix("")
    names = [folder / f"{i:04d}.png" for i in range(len(images))]
    present = [p for p in [out, *names] if os.path.lexists(p)]
    if present and not overwrite:
        raise FmforgeError(f"{present[0]} already exists; pass --overwrite to replace it, or choose another --out")
    if folder.exists() and not folder.is_dir():
        raise FmforgeError(f"{folder} exists and is not a directory; choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    for path, array in zip(names, to_uint8(images)):
        _save_png(_pil(array), path)
    _save_png(image_grid(images, ncol), out)
    return out


def _save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a stale temporary or a planted link: never written through
    image.save(tmp, "PNG")
    tmp.replace(path)


def generate_images(run_dir: str | Path, *, prompt: str | None = None, class_label: int | None = None,
                    images: int = 16, steps: int = 50, sampler: str = "ddim", guidance: float = 2.0,
                    seed: int = 0, out: str | Path = "grid.png", device: str = "auto", overwrite: bool = False,
                    echo=print) -> Path:
    """``fmforge generate RUN_DIR --prompt TEXT | --class K``: ``images`` samples of one condition, written
    as a grid to ``out`` and one by one beside it. DDIM (deterministic given the seed) or DDPM with
    ``steps`` steps; ``guidance`` is the classifier-free guidance weight (0: none)."""
    if not 1 <= images <= MAX_IMAGES:
        raise FmforgeError(f"--images must be between 1 and {MAX_IMAGES}, got {images}")
    if (prompt is None) == (class_label is None):
        raise FmforgeError("give exactly one of --prompt TEXT and --class K")
    run = load_diffusion_run(run_dir, pick_device(device))
    y = run.conditions(prompts=None if prompt is None else [prompt] * images,
                       labels=None if class_label is None else [class_label] * images)
    x = run.sample(y, steps=steps, sampler=sampler, guidance=guidance, seed=seed)
    path = write_images(x, Path(out), overwrite=overwrite)
    what = f"prompt {prompt!r}" if prompt is not None else f"class {class_label}"
    echo(f"{images} image(s) for {what} ({sampler}, {steps} steps, guidance {guidance:g}, seed {seed}): grid {path}, "
         f"images in {path.with_suffix('')}/")
    return path
