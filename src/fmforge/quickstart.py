"""``fmforge quickstart``: the whole language pipeline on data every Python install carries, on CPU, in minutes.

Corpus: the standard library's own ``.py`` sources (tests excluded) and the ``pydoc_data.topics`` English
documentation. Steps: prepare data (tokenizer + shards) → pretrain a tiny Llama-style model for a time
budget → evaluate against the unigram baseline → sample text. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
import time
from pathlib import Path

import torch

from fmforge.config import build_config
from fmforge.errors import FmforgeError

MARKER = ".fmforge-quickstart"

QUICKSTART_CONFIG = {
    "model": {"arch": "llama", "size": "micro", "n_kv_head": 2},
    "data": {"seq_len": 256},
    "optim": {"lr": 3e-3, "warmup_steps": 30, "schedule": "cosine", "min_lr_ratio": 0.05, "weight_decay": 0.1},
    "train": {"global_batch_tokens": 8192, "micro_batch_size": 16, "precision": "auto", "eval_batches": 16,
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
    from fmforge.device import pick_device
    from fmforge.models.gpt import GPT
    from fmforge.objectives.clm import clm_loss
    from fmforge.train.loop import autocast_for
    from fmforge.train.optim import build_optimizer

    device = pick_device(cfg.train.device)
    amp = autocast_for(device, cfg.train.precision)
    model = GPT(cfg.model.resolved(vocab_size=vocab_size, seq_len=cfg.data.seq_len)).to(device)
    opt = build_optimizer(model, cfg.optim, device)
    micro = cfg.train.global_batch_tokens // (cfg.train.micro_batch_size * cfg.data.seq_len)
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


def quickstart(out: str | Path = "runs/quickstart", minutes: float = 6.0, echo=print) -> dict:
    """Run the embedded end-to-end demo into ``out`` and return its evaluation."""
    from fmforge.data.prepare import prepare_data
    from fmforge.deploy.generate import generate
    from fmforge.eval.perplexity import evaluate
    from fmforge.train.loop import train

    if minutes <= 0:
        raise FmforgeError("--minutes must be positive")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FmforgeError(f"{out} exists and was not made by quickstart; choose another --out")
        shutil.rmtree(out)  # our own earlier demo: start clean
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by fmforge quickstart; safe to delete\n")
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
