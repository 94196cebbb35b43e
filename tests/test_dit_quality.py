"""What a trained DiT is for: on the built-in digits, a tiny class-conditional DiT trained through the one loop
draws images that an fmforge classifier (the judge ``fmforge eval`` uses for diffusion runs) finds close to
held-out real digits, and recognises as the digit that was asked for."""

from pathlib import Path

import pytest
import torch

from fmforge.config import build_config
from fmforge.data.builtin_images import write_digits
from fmforge.data.image_prepare import prepare_images
from fmforge.eval.diffusion import evaluate_diffusion
from fmforge.train.loop import train

pytestmark = pytest.mark.slow

SEED = 0
DATA = {"crop_scale": [1.0, 1.0], "hflip": 0.0, "crop_pct": 1.0}
JUDGE = {"model": {"arch": "vit", "size": "vit-nano"}, "steps": 120, "batch": 128,
         "optim": {"lr": 4e-3, "warmup_steps": 10, "weight_decay": 0.05, "min_lr_ratio": 0.05}}
# v-prediction on the cosine schedule and small batches learn the class condition in the fewest seconds.
DIT = {"model": {"arch": "dit", "size": "dit-nano", "prediction": "v", "schedule": "cosine", "ema_decay": 0.99},
       "steps": 400, "batch": 32, "optim": {"lr": 5e-3, "warmup_steps": 20, "weight_decay": 0.0, "min_lr_ratio": 0.1}}


def quiet(_msg):
    pass


def fit(spec: dict, data: Path, out: Path, seed: int) -> Path:
    train(build_config({
        "model": spec["model"], "data": {"path": str(data), **DATA}, "optim": spec["optim"],
        "train": {"out_dir": str(out), "max_steps": spec["steps"], "global_batch": spec["batch"],
                  "micro_batch_size": spec["batch"], "eval_interval": 0, "log_interval": 100, "threads": 1,
                  "seed": seed},
        "checkpoint": {"interval": 0}, "log": {"tensorboard": False},
    }), echo=quiet)
    return out


def train_and_measure(root: Path, seed: int) -> dict:
    """Digits prepared with a 20% held-out split, the judge and the DiT trained with ``seed``, then
    ``fmforge eval``'s measurement: 200 held-out digits against one DDIM sample (20 steps, guidance 2) each."""
    data = root / "digits"
    prepare_images([str(write_digits(root / "raw"))], data, val_fraction=0.2, log=None)
    judge = fit(JUDGE, data, root / "judge", seed)
    dit = fit(DIT, data, root / "dit", seed)
    return evaluate_diffusion(dit, classifier=judge, samples=200, steps=20, sampler="ddim", guidance=2.0, seed=seed,
                              device="cpu", echo=quiet)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trained_dit_beats_the_noise_baseline_widely_and_draws_the_asked_digit(tmp_path, one_thread):
    """Measured with seeds 0, 1, 2 (2-core machine at load average ~4, 1 thread, 56-70 s each): Fréchet
    distance 3.43, 4.14, 3.71 against uniform noise's 63.1, 28.8, 28.8 (noise/FD 18x, 7.0x, 7.8x; real
    train-split digits 1.47, 2.87, 3.17); prompt accuracy 0.83, 0.85, 0.82 with chance 0.10 (the judge on
    real digits 0.81, 0.88, 0.915; on noise 0.075, 0.105, 0.095). The thresholds, FD below a quarter of
    noise's and accuracy at least 0.5, leave headroom below every run. Seed 0 repeats its figures exactly."""
    result = train_and_measure(tmp_path, SEED)
    assert result["fd"] < result["noise_fd"] / 4, result
    assert result["prompt_accuracy"] >= 0.5, result
    assert result["prompt_accuracy_chance"] == pytest.approx(0.1)
    assert result["noise_prompt_accuracy"] < 0.2  # the judge does not find digits in noise
