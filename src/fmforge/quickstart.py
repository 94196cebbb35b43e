"""``fmforge quickstart``: the whole pipeline on data every Python install carries, on CPU, in minutes.

Language (default): the standard library's own ``.py`` sources (tests excluded) and the ``pydoc_data.topics``
English documentation. Steps: prepare data (tokenizer + shards) → pretrain a tiny Llama-style model for a
time budget → evaluate against the unigram baseline → sample text.

Vision (``--task vision``): scikit-learn's 1,797 real handwritten digits, as labelled images and as
image-caption pairs. Steps: prepare image shards → train a small ViT classifier → pretrain a small MAE and
probe its frozen encoder against a random-init one → train a small CLIP on the captions and classify the
held-out digits zero-shot from prompts it never saw. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
import time
from pathlib import Path

import torch

from fmforge.config import build_config
from fmforge.data.builtin_images import DIGIT_NAMES, write_digit_captions, write_digits
from fmforge.data.image_prepare import prepare_images
from fmforge.data.prepare import prepare_data
from fmforge.deploy.generate import generate
from fmforge.device import autocast_for, pick_device
from fmforge.errors import FmforgeError
from fmforge.eval.perplexity import evaluate
from fmforge.eval.runs import evaluate_run
from fmforge.lazy import resolve
from fmforge.models.gpt import GPT
from fmforge.objectives import make_task
from fmforge.objectives.clm import clm_loss
from fmforge.train.loop import train
from fmforge.train.optim import build_optimizer

MARKER = ".fmforge-quickstart"
# Everything quickstart writes into its folder (both demos): a rerun replaces these and leaves the rest.
QUICKSTART_OUTPUTS = ("corpus", "data", "run", "images", "vit", "mae", "clip")

QUICKSTART_CONFIG = {
    "model": {"arch": "llama", "size": "micro", "n_kv_head": 2},
    "data": {"seq_len": 256},
    "optim": {"lr": 3e-3, "warmup_steps": 30, "schedule": "cosine", "min_lr_ratio": 0.05, "weight_decay": 0.1},
    "train": {"global_batch": 8192, "micro_batch_size": 16, "precision": "auto", "eval_batches": 16,
              "log_interval": 10},
    "checkpoint": {"keep_last": 2},
}


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Tests are not library code; encodings/ is code-page tables and pydoc_data/ the topics added as prose.
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def write_pydoc_topics(path: Path) -> int:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    with open(path, "w") as f:
        for name in sorted(topics):
            f.write(json.dumps({"text": topics[name]}) + "\n")
    return len(topics)


def _seconds_per_step(cfg, vocab_size: int) -> float:
    """Time two optimizer steps of the real model on random tokens, to fit max_steps to the time budget."""

    device = pick_device(cfg.train.device)
    amp = autocast_for(device, cfg.train.precision)
    model = GPT(cfg.model.resolved(vocab_size=vocab_size, seq_len=cfg.data.seq_len)).to(device)
    opt = build_optimizer(model, cfg.optim, device)
    micro = cfg.train.global_batch // (cfg.train.micro_batch_size * cfg.data.seq_len)
    x = torch.randint(0, vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), device=device)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(micro):
            with amp():
                logits = model(x[:, :-1])
            (clm_loss(logits, x[:, 1:]) / micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _fresh_output(out: Path, minutes: float) -> None:
    if minutes <= 0:
        raise FmforgeError("--minutes must be positive")
    if out.exists() and not out.is_dir():
        raise FmforgeError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file() or (out / MARKER).is_symlink():
            raise FmforgeError(f"{out} exists and was not made by quickstart; choose another --out")
        _remove_own_outputs(out)  # our own earlier demo: start clean, keeping what the user added
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"made by fmforge quickstart; a rerun replaces {', '.join(QUICKSTART_OUTPUTS)} "
                              "and leaves anything else here\n")


def _remove_own_outputs(out: Path) -> None:
    """Remove what an earlier quickstart wrote into ``out`` (``QUICKSTART_OUTPUTS``) and nothing else; a
    symlink under one of those names is not quickstart's and is refused (before anything is removed)."""
    for name in QUICKSTART_OUTPUTS:
        if (out / name).is_symlink():
            raise FmforgeError(f"{out / name} is a symlink, which quickstart never makes; move it away and rerun")
    for name in QUICKSTART_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def quickstart(out: str | Path = "runs/quickstart", minutes: float = 6.0, echo=print, task: str = "language") -> dict:
    """Run the embedded end-to-end demo into ``out`` and return its evaluation. ``task``: language or vision."""

    if task != "language":
        target = QUICKSTART_TASKS.get(task, (None,))[0]
        if target is None:
            raise FmforgeError(f"unknown quickstart task {task!r}: {', '.join(QUICKSTART_TASKS)}")
        return resolve(target)(out=out, minutes=minutes, echo=echo)
    out = Path(out)
    _fresh_output(out, minutes)
    t_start = time.perf_counter()

    echo("== 1/4 data: Python standard library sources + pydoc topics (bundled with Python)")
    corpus = out / "corpus"
    corpus.mkdir()
    write_pydoc_topics(corpus / "pydoc_topics.jsonl")
    inputs = [str(p) for p in stdlib_sources()] + [str(corpus / "pydoc_topics.jsonl")]
    manifest = prepare_data(inputs, out / "data", vocab_size=4096, val_fraction=0.02, log=echo)

    echo("== 2/4 pretrain: tiny Llama-style model (RoPE, RMSNorm, SwiGLU, GQA) on CPU")
    cfg = build_config(QUICKSTART_CONFIG, [f"data.path={out / 'data'}", f"train.out_dir={out / 'run'}"])
    step_s = _seconds_per_step(cfg, manifest["tokenizer"]["vocab_size"])
    # --minutes is the training budget (data preparation comes on top); 10% is left for validation.
    cfg.train.max_steps = max(50, int(minutes * 60 * 0.9 / step_s))
    cfg.train.eval_interval = max(10, cfg.train.max_steps // 5)
    cfg.checkpoint.interval = max(10, cfg.train.max_steps // 4)
    echo(f"   {step_s:.2f} s/step measured → {cfg.train.max_steps} steps to fit {minutes:g} min")
    train(cfg, echo=echo)

    echo("== 3/4 evaluate on the held-out documents")
    result = evaluate(out / "run", echo=echo)
    ratio = result["val_loss"] / result["unigram_loss"]
    echo(f"   the model's loss is {ratio:.0%} of the context-free unigram baseline "
         f"({result['val_loss']:.3f} vs {result['unigram_loss']:.3f} nats/token)")

    echo("== 4/4 samples (temperature 0.8, top-k 50, seed 0)")
    # Prompts end at a word, not a space: BPE tokens carry their leading space.
    for prompt in ("def main(", "import os\n", "The"):
        text = generate(out / "run", prompt, max_new_tokens=120, temperature=0.8, top_k=50, seed=0, device="auto")
        echo(f"--- prompt {prompt!r}\n{text}\n")
    minutes_taken = (time.perf_counter() - t_start) / 60
    echo(f"quickstart done in {minutes_taken:.1f} min. Run directory: {out / 'run'}")
    echo(f"  next: fmforge generate {out / 'run'} --prompt 'def parse(' --seed 0")
    echo(f"        fmforge eval {out / 'run'}")
    echo(f"        tensorboard --logdir {out / 'run' / 'tb'}")
    result["minutes"] = minutes_taken
    return result


# ---------------------------------------------------------------------------------------------------- vision

_IMAGE_DATA = {"crop_scale": [0.6, 1.0], "hflip": 0.0, "crop_pct": 1.0}  # digits: no flips, mild crops
_IMAGE_TRAIN = {"global_batch": 128, "micro_batch_size": 128, "log_interval": 20, "eval_batches": 100}
_IMAGE_OPTIM = {"lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.05, "min_lr_ratio": 0.05}
VISION_CONFIGS = {
    # 8x8 one-channel digits in 2x2 patches: 16 patches + [CLS].
    "vit": {"model": {"arch": "vit", "size": "vit-nano"}, "data": _IMAGE_DATA, "train": _IMAGE_TRAIN,
            "optim": _IMAGE_OPTIM},
    "mae": {"model": {"arch": "mae", "size": "mae-nano"}, "data": _IMAGE_DATA, "train": _IMAGE_TRAIN,
            "optim": _IMAGE_OPTIM},
    "clip": {"model": {"arch": "clip", "size": "clip-nano", "vision": {"image_size": 8, "patch_size": 2, "channels": 1},
                       "text": {"context_length": 16}},
             "data": _IMAGE_DATA, "train": _IMAGE_TRAIN, "optim": _IMAGE_OPTIM},
}
# Zero-shot prompts: none of them is a training caption's phrasing (see builtin_images.DIGIT_CAPTIONS).
ZERO_SHOT_TEMPLATES = ("a photo of the number {}.", "a drawing of a {}.", "the {} digit", "{}")
VISION_SHARES = {"vit": 0.3, "mae": 0.35, "clip": 0.35}  # of the training budget


def _seconds_per_step_task(cfg) -> float:
    """Time optimizer steps of a run's real task (data loading, augmentation, model, loss) on this machine."""

    device = pick_device(cfg.train.device)
    task = make_task(cfg, Path(cfg.data.path), lambda _msg: None)
    cfg = task.resolved_config()
    model = task.build_model().to(device)
    opt = build_optimizer(model, cfg.optim, device)
    loader = task.make_loader(cfg.train.micro_batch_size, 0, 1)
    amp = autocast_for(device, cfg.train.precision)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        micro = loader.next_step()
        for batch in micro:
            (task.loss(model, batch, device, amp) / len(micro)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def quickstart_vision(out: str | Path = "runs/quickstart-vision", minutes: float = 4.0, echo=print) -> dict:
    """Vision quickstart (see the module docstring) into ``out``; returns every model's evaluation."""

    out = Path(out)
    _fresh_output(out, minutes)
    t_start = time.perf_counter()
    echo("== 1/4 data: scikit-learn's 1,797 handwritten digits (8x8, bundled with scikit-learn)")
    raw = out / "images"
    data = {"vit": out / "data" / "digits", "mae": out / "data" / "digits", "clip": out / "data" / "digit_captions"}
    prepare_images([str(write_digits(raw))], data["vit"], val_fraction=0.2, log=echo)
    prepare_images([str(write_digit_captions(raw))], data["clip"], val_fraction=0.2, vocab_size=512, log=echo)

    def fit(name: str):
        cfg = build_config(VISION_CONFIGS[name], [f"data.path={data[name]}", f"train.out_dir={out / name}"])
        step_s = _seconds_per_step_task(cfg)
        cfg.train.max_steps = max(30, int(minutes * 60 * VISION_SHARES[name] * 0.9 / step_s))
        cfg.train.eval_interval = max(10, cfg.train.max_steps // 4)
        cfg.checkpoint.interval = max(10, cfg.train.max_steps // 2)
        echo(f"   {step_s:.3f} s/step measured → {cfg.train.max_steps} steps")
        train(cfg, echo=echo)
        return cfg

    results = {}
    echo("== 2/4 ViT classifier (vit-nano: 16 patches of 2x2 pixels + [CLS])")
    fit("vit")
    results["vit"] = evaluate_run(out / "vit", echo=echo)
    echo("== 3/4 MAE pretraining (75% of patches masked), then probes of the frozen encoder vs a random-init one")
    fit("mae")
    results["mae"] = evaluate_run(out / "mae", random_baseline=True, echo=echo)
    echo("== 4/4 CLIP on digit captions, then zero-shot classification of the held-out digits")
    fit("clip")
    results["clip"] = evaluate_run(out / "clip", zero_shot=data["vit"], class_names=list(DIGIT_NAMES),
                                   templates=list(ZERO_SHOT_TEMPLATES), echo=echo)

    v, m, c = results["vit"], results["mae"], results["clip"]
    echo("== what they learned (held-out digits; chance is about 10%)")
    echo(f"   ViT classifier      top-1 {v['val_top1']:.1%}   top-5 {v['val_top5']:.1%}")
    echo(f"   MAE encoder probe   linear {m['linear_probe_top1']:.1%} (random-init encoder "
         f"{m['random_init_linear_probe_top1']:.1%})   k-NN {m['knn_top1']:.1%} "
         f"(random-init {m['random_init_knn_top1']:.1%})")
    echo(f"   CLIP zero-shot      top-1 {c['zero_shot_top1']:.1%} from prompts like {ZERO_SHOT_TEMPLATES[0]!r}; "
         f"retrieval image→text R@1 {c['image_to_text_r@1']:.1%} over {c['retrieval_captions']} captions")
    minutes_taken = (time.perf_counter() - t_start) / 60
    echo(f"quickstart done in {minutes_taken:.1f} min. Run directories: {out / 'vit'}, {out / 'mae'}, {out / 'clip'}")
    echo(f"  next: fmforge eval {out / 'clip'} --zero-shot {data['vit']} --class-names {','.join(DIGIT_NAMES)}")
    echo(f"        tensorboard --logdir {out}")
    results["minutes"] = minutes_taken
    return results


# Each demo: (the function that runs it, its default output directory, its default minutes). The later stages'
# demos are named as lazy targets, so `fmforge quickstart` imports only the demo it runs and those stages never
# import this module back.
QUICKSTART_TASKS: dict[str, tuple[str, str, float]] = {
    "language": ("fmforge.quickstart:quickstart", "runs/quickstart", 6.0),
    "vision": ("fmforge.quickstart:quickstart_vision", "runs/quickstart-vision", 3.0),
    "lifecycle": ("fmforge.pipeline.lifecycle:quickstart_lifecycle", "runs/quickstart-lifecycle", 15.0),
    "text-to-image": ("fmforge.quickstart_t2i:quickstart_text_to_image", "runs/quickstart-t2i", 6.0),
}


def quickstart_command(*, task: str = "language", out: str | None = None, minutes: float | None = None) -> None:
    """``fmforge quickstart``: the output directory and time budget default per demo."""
    if task not in QUICKSTART_TASKS:
        raise FmforgeError(f"unknown quickstart task {task!r}: {', '.join(QUICKSTART_TASKS)}")
    target, default_out, default_minutes = QUICKSTART_TASKS[task]
    resolve(target)(out=out or default_out, minutes=minutes if minutes is not None else default_minutes)
