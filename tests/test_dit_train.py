"""Diffusion training through the one loop on real digits: the loss falls, the EMA is saved beside the raw
weights, a run conditioned on an fmforge CLIP samples from prompts, resume after SIGKILL equals an
uninterrupted run, 2-process DDP equals 1 process, and `fmforge eval` reports the offline image metrics with
their baselines. Trains for seconds: tests/test_dit_quality.py trains until the samples are good and asserts
the quality figures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fmforge.cli import main as cli_main
from fmforge.config import build_config
from fmforge.data.builtin_images import write_digit_captions, write_digits
from fmforge.data.image_prepare import prepare_images
from fmforge.errors import FmforgeError
from fmforge.interop.hf.convert import export_hf
from fmforge.train.loop import train

pytestmark = pytest.mark.slow

DATA = {"crop_scale": [1.0, 1.0], "hflip": 0.0, "crop_pct": 1.0}
OPTIM = {"lr": 2e-3, "warmup_steps": 5, "weight_decay": 0.0, "min_lr_ratio": 0.1}
DIT = {"arch": "dit", "size": "dit-nano", "ema_decay": 0.99}


def config(model: dict, data: Path, out: Path, steps: int, checkpoint_interval: int = 0, **train_extra):
    return build_config({
        "model": model, "data": {"path": str(data), **DATA}, "optim": OPTIM,
        "train": {"out_dir": str(out), "max_steps": steps, "global_batch": 64, "micro_batch_size": 64,
                  "eval_interval": 0, "log_interval": 1, "threads": 1, **train_extra},
        "checkpoint": {"interval": checkpoint_interval}, "log": {"tensorboard": False},
    })


def quiet(_msg):
    pass


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dit_digits")
    prepare_images([str(write_digits(root / "raw"))], root / "prepared", val_fraction=0.2, log=None)
    return root / "prepared"


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dit_captions")
    prepare_images([str(write_digit_captions(root / "raw"))], root / "prepared", val_fraction=0.2, vocab_size=512,
                   log=None)
    return root / "prepared"


@pytest.fixture(scope="module")
def class_run(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dit_class") / "run"
    train(config(DIT, digits, out, 40, eval_interval=40), echo=quiet)
    return out


@pytest.fixture(scope="module")
def vit_run(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dit_judge") / "vit"
    train(config({"arch": "vit", "size": "vit-nano"}, digits, out, 40, global_batch=128, micro_batch_size=128),
          echo=quiet)
    return out


def test_loss_falls_on_real_digits_and_the_ema_is_saved_beside_the_raw_weights(class_run):
    curve = losses(class_run)
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5, curve
    weights = load_file(str(class_run / "model.safetensors"))
    raw, ema = weights["net.proj_out.weight"], weights["ema.proj_out.weight"]
    assert raw.abs().sum() > 0 and ema.abs().sum() > 0 and not torch.equal(raw, ema)
    model_json = json.loads((class_run / "model.json").read_text())
    assert model_json["family"] == "dit" and model_json["num_classes"] == 10


def test_text_conditioned_run_on_an_fmforge_clip_samples_from_prompts(captions, tmp_path):
    clip = tmp_path / "clip"
    train(config({"arch": "clip", "size": "clip-nano", "vision": {"image_size": 8, "patch_size": 2, "channels": 1},
                  "text": {"context_length": 16}}, captions, clip, 5), echo=quiet)
    dit = tmp_path / "dit"
    train(config({**DIT, "condition": "text", "text_encoder": str(clip), "prediction": "v"}, captions, dit, 5),
          echo=quiet)
    assert json.loads((dit / "model.json").read_text())["cond_dim"] == 64
    assert (dit / "text_encoder" / "model.safetensors").is_file()  # the run samples on its own
    cli_main(["generate", str(dit), "--prompt", "a handwritten seven", "--images", "4", "--steps", "3",
              "--guidance", "1.5", "--seed", "3", "--out", str(tmp_path / "seven.png"), "--device", "cpu"])
    assert len(list((tmp_path / "seven").glob("*.png"))) == 4
    with pytest.raises(FmforgeError, match="class labels only"):
        export_hf(dit, tmp_path / "hf")


def test_eval_reports_fd_kid_precision_recall_and_prompt_accuracy_beside_real_and_noise_baselines(class_run,
                                                                                               vit_run):
    from fmforge.eval.diffusion import evaluate_diffusion

    result = evaluate_diffusion(class_run, classifier=vit_run, samples=100, steps=10, guidance=2.0,
                                device="cpu", echo=quiet)
    for metric in ("fd", "kid", "precision", "recall", "prompt_accuracy"):
        assert {metric, f"real_{metric}", f"noise_{metric}"} <= result.keys()
    # The baselines bracket the scale: real digits are close to held-out ones, noise is far and unrecognised.
    assert result["real_fd"] < 0.5 * result["noise_fd"]
    assert result["real_prompt_accuracy"] > max(0.2, result["noise_prompt_accuracy"])  # chance 0.1; a 40-step judge


def test_resume_after_sigkill_matches_uninterrupted(digits, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    settings = dict(checkpoint_interval=4, global_batch=32, micro_batch_size=32, log_interval=4)
    train(config(DIT, digits, full, 12, **settings), echo=quiet)
    raw = config(DIT, digits, killed, 12, **settings)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw.model_dump(mode="json", exclude_unset=True)))
    proc = subprocess.Popen([sys.executable, "-m", "fmforge", "train", str(tmp_path / "run.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "step_0000004" / "meta.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "model.safetensors").exists()
    messages = []
    train(raw, resume="auto", echo=messages.append)
    assert any("resumed from" in m for m in messages), messages
    a, b = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_two_process_data_parallel_equals_one_process(dp, digits, tmp_path):
    """1 process with micro-batch 32 and 2 gloo processes with 16 each draw the same timesteps, noise and
    dropped conditions for the same images, so they log the same losses and end with the same EMA."""
    single = tmp_path / "single"
    train(config(DIT, digits, single, 4, global_batch=32, micro_batch_size=32), echo=quiet)
    cfg = config(DIT, digits, tmp_path / "unused", 4, global_batch=32, micro_batch_size=16)
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    raw["train"].pop("out_dir")
    raw["parallel"] = {"dp": dp}
    (tmp_path / "dit.yaml").write_text(yaml.safe_dump(raw))
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "fmforge", "train", str(tmp_path / "dit.yaml"), "--out", str(two),
                           "--nproc-per-node", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(single)), rtol=1e-4, atol=1e-5)
    a, b = load_file(str(single / "model.safetensors")), load_file(str(two / "model.safetensors"))
    torch.testing.assert_close(b["ema.proj_out.weight"], a["ema.proj_out.weight"], rtol=1e-4, atol=1e-6)

