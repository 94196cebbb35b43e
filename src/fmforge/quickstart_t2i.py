"""``fmforge quickstart --task text-to-image``: a diffusion transformer that draws the digit a caption names,
conditioned on fmforge's own CLIP, trained, sampled and measured on a CPU in minutes.

Steps: scikit-learn's 1,797 handwritten digits as labelled images and as captioned ones ("a handwritten
seven") → a small CLIP on the captions (or ``clip=RUN_DIR``: reuse one, e.g. the vision quickstart's) → a
small ViT classifier on the labels (the judge: its features measure the generated images) → a tiny DiT
conditioned on the frozen CLIP text tower → a grid for "zero" … "nine" → Fréchet distance, KID,
precision/recall, prompt accuracy and CLIP score, each beside its real-image and noise baselines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import torch

from fmforge.config import build_config
from fmforge.data.builtin_images import DIGIT_NAMES, write_digit_captions, write_digits
from fmforge.data.image_prepare import prepare_images
from fmforge.deploy.image_generate import load_diffusion_run, write_images
from fmforge.errors import FmforgeError
from fmforge.eval.diffusion import evaluate_diffusion
from fmforge.objectives import make_task
from fmforge.train.loop import train

MARKER = ".fmforge-quickstart-t2i"
OUTPUTS = ("images", "data", "clip", "vit", "dit", "grid.png", "grid")  # what a rerun replaces
PROMPT = "a handwritten {}"  # one of the training captions' phrasings (builtin_images.DIGIT_CAPTIONS)

_DATA = {"crop_scale": [1.0, 1.0], "hflip": 0.0, "crop_pct": 1.0}
_TRAIN = {"global_batch": 128, "micro_batch_size": 128, "log_interval": 50, "eval_batches": 100, "threads": 1}
CONFIGS = {
    "clip": {"model": {"arch": "clip", "size": "clip-nano", "vision": {"image_size": 8, "patch_size": 2, "channels": 1},
                       "text": {"context_length": 16}},
             "data": {**_DATA, "crop_scale": [0.6, 1.0]}, "train": _TRAIN,
             "optim": {"lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.05, "min_lr_ratio": 0.05}},
    "vit": {"model": {"arch": "vit", "size": "vit-nano"}, "data": {**_DATA, "crop_scale": [0.6, 1.0]}, "train": _TRAIN,
            "optim": {"lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.05, "min_lr_ratio": 0.05}},
    # v-prediction at lr 5e-3 in batches of 32 learns the text condition several times faster per second
    # than ε-prediction at 2e-3 in batches of 128 (docs/text-to-image.md, "Measured").
    "dit": {"model": {"arch": "dit", "size": "dit-micro", "condition": "text", "schedule": "cosine",
                      "prediction": "v", "ema_decay": 0.995},
            "data": _DATA, "train": {**_TRAIN, "global_batch": 32, "micro_batch_size": 32},
            "optim": {"lr": 5e-3, "warmup_steps": 20, "weight_decay": 0.0, "min_lr_ratio": 0.1}},
}
SHARES = {"clip": 0.2, "vit": 0.1, "dit": 0.55}  # of the time budget; the rest samples and measures
MIN_STEPS = {"clip": 60, "vit": 40, "dit": 300}
SAMPLING_STEPS = 25  # DDIM steps for the grid and the measurements


def _fresh(out: Path) -> None:
    """Make ``out`` ready: new, empty, or an earlier run of this demo (whose own outputs are replaced)."""
    ours = (out / MARKER).is_file() and not (out / MARKER).is_symlink()
    if os.path.lexists(out) and not out.is_dir():
        raise FmforgeError(f"{out} exists and is not a directory; choose another --out")
    if not ours and out.is_dir() and next(out.iterdir(), None) is not None:
        raise FmforgeError(f"{out} exists and was not made by this quickstart; choose another --out")
    for path in (out / name for name in OUTPUTS if ours):  # keep anything else the user put there
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"made by fmforge quickstart --task text-to-image; a rerun replaces {', '.join(OUTPUTS)}\n")


def _step_seconds(cfg) -> float:
    """Seconds per optimizer step of this run on this machine: a few forward/backward passes of its task."""
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    task = make_task(cfg, Path(cfg.data.path), lambda _msg: None)
    model = task.build_model()
    batch = task.make_loader(cfg.train.micro_batch_size, 0, 1).next_step()[0]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        task.loss(model, batch, torch.device("cpu"), contextlib.nullcontext).backward()
        times.append(time.perf_counter() - t0)
    return min(times) * 1.15  # + the optimizer step and data loading


def _fit(name: str, data: Path, out: Path, seconds: float, echo, overrides: tuple[str, ...] = ()) -> Path:
    cfg = build_config(CONFIGS[name], [f"data.path={data}", f"train.out_dir={out / name}", *overrides])
    step_s = _step_seconds(cfg)
    cfg.train.max_steps = max(MIN_STEPS[name], int(seconds / step_s))
    cfg.train.eval_interval = max(20, cfg.train.max_steps // 2)
    cfg.checkpoint.interval = cfg.train.max_steps
    cfg.log.tensorboard = False
    echo(f"   {step_s:.3f} s/step measured → {cfg.train.max_steps} steps")
    train(cfg, echo=echo)
    return out / name


def quickstart_text_to_image(out: str | Path = "runs/quickstart-t2i", minutes: float = 6.0, echo=print,
                             clip: str | Path | None = None) -> dict:
    """Text-to-image quickstart (see the module docstring) into ``out``; returns the diffusion metrics."""
    if minutes <= 0:
        raise FmforgeError("--minutes must be positive")
    out = Path(out)
    _fresh(out)
    budget = minutes * 60
    t_start = time.perf_counter()
    echo("== 1/5 data: scikit-learn's 1,797 handwritten digits (8x8), labelled and captioned in words")
    raw = out / "images"
    digits, captions = out / "data" / "digits", out / "data" / "digit_captions"
    prepare_images([str(write_digits(raw))], digits, val_fraction=0.2, log=echo)
    prepare_images([str(write_digit_captions(raw))], captions, val_fraction=0.2, vocab_size=512, log=echo)
    if clip is None:
        echo("== 2/5 CLIP on the digit captions (its frozen text tower will condition the DiT)")
        clip = _fit("clip", captions, out, budget * SHARES["clip"], echo)
    else:
        echo(f"== 2/5 CLIP: reusing {clip}")
    echo("== 3/5 ViT classifier on the labels: the judge whose features measure the generated digits")
    vit = _fit("vit", digits, out, budget * SHARES["vit"], echo)
    echo("== 4/5 DiT (adaLN-Zero, 16 patches of 2x2) conditioned on the CLIP text embedding, EMA weights")
    remaining = budget - (time.perf_counter() - t_start)
    dit = _fit("dit", captions, out, max(remaining - budget * 0.15, 30.0), echo,
               (f"model.text_encoder={Path(clip).resolve()}",))

    echo("== 5/5 samples and measurements")
    run = load_diffusion_run(dit)
    per_digit = 8
    prompts = [PROMPT.format(name) for name in DIGIT_NAMES for _ in range(per_digit)]
    images = run.sample(run.conditions(prompts=prompts), steps=SAMPLING_STEPS, guidance=2.0, seed=0)
    grid = write_images(images, out / "grid.png", overwrite=True, ncol=per_digit)
    echo(f"   grid of {per_digit} samples per prompt, rows {PROMPT.format('zero')!r} … {PROMPT.format('nine')!r}: {grid}")
    result = evaluate_diffusion(dit, classifier=vit, class_names=list(DIGIT_NAMES), steps=SAMPLING_STEPS, guidance=2.0,
                                echo=echo)
    echo("== what it learned (held-out digits; chance is 10%)")
    echo(f"   prompt accuracy {result['prompt_accuracy']:.1%} (real digits {result['real_prompt_accuracy']:.1%}, "
         f"noise {result['noise_prompt_accuracy']:.1%})")
    echo(f"   Fréchet distance {result['fd']:.3f} (real-vs-real {result['real_fd']:.3f}, noise {result['noise_fd']:.3f})")
    result["minutes"] = (time.perf_counter() - t_start) / 60
    echo(f"quickstart done in {result['minutes']:.1f} min. Runs: {out / 'clip'}, {vit}, {dit}")
    echo(f"  next: fmforge generate {dit} --prompt 'a handwritten seven' --images 16 --out seven.png")
    echo(f"        fmforge eval {dit} --classifier {vit} --class-names {','.join(DIGIT_NAMES)}")
    return result
