"""Validation loss, perplexity and bits per byte of a trained causal LM, and the unigram baseline they beat.

Bits per byte normalizes away the tokenizer: total loss in bits over the UTF-8 bytes of the predicted
tokens, so models with different vocabularies compare on the same text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import yaml

from fmforge.data.loader import TokenWindows, eval_windows
from fmforge.data.manifest import load_manifest
from fmforge.data.shards import read_shard
from fmforge.data.staging import stage_prepared_data
from fmforge.device import autocast_for, pick_device
from fmforge.errors import FmforgeError
from fmforge.io.fs import is_remote
from fmforge.io.paths import confined
from fmforge.objectives.clm import evaluate_batches
from fmforge.runs import load_pretrained


def token_counts(data_dir: str | Path, split: str, vocab_size: int) -> np.ndarray:

    data_dir = Path(data_dir)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in load_manifest(data_dir)["shards"]:
        if shard["split"] == split:
            tokens = read_shard(confined(data_dir, shard["file"], f"{data_dir}/manifest.json"))
            for i in range(0, len(tokens), 1 << 24):  # bounded memory on large shards
                counts += np.bincount(tokens[i: i + (1 << 24)], minlength=vocab_size)[:vocab_size]
    return counts


def unigram_baseline(data_dir: str | Path) -> float:
    """Cross-entropy (nats/token) on the val split of a unigram model fit on the train split (add-one
    smoothing): what a model that ignores context scores. A language model must land far below it."""

    vocab = load_manifest(data_dir)["tokenizer"]["vocab_size"]
    train = token_counts(data_dir, "train", vocab) + 1
    val = token_counts(data_dir, "val", vocab)
    if val.sum() == 0:
        val = train - 1  # no val split: report the train entropy instead
    logp = np.log(train / train.sum())
    return float(-(val * logp).sum() / val.sum())


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, max_batches: int | None = None,
             batch_size: int = 8, device: str = "auto", json_out: bool = False, echo=print) -> dict:
    """The ``fmforge eval`` verb: loss, perplexity and bits per byte on a prepared validation split."""

    if batch_size < 1:
        raise FmforgeError(f"--batch-size must be at least 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise FmforgeError(f"--max-batches must be at least 1, got {max_batches}")
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FmforgeError(f"not a run directory (no config.yaml): {run_dir}")
    run_cfg = yaml.safe_load(cfg_path.read_text())
    data_dir = data_dir or run_cfg["data"]["path"]
    if is_remote(data_dir):
        data_dir = stage_prepared_data(data_dir)
    data_dir = Path(data_dir)
    if data_dir.is_file():  # SFT/DPO/classification runs name a JSONL file, not prepared shards
        raise FmforgeError(f"{run_dir} was fine-tuned on {data_dir.name}, not on prepared data; pass --data "
                           "PREPARED_DIR (from `fmforge data prepare --tokenizer RUN_DIR`) to measure perplexity")
    seq_len = int(run_cfg["data"]["seq_len"])
    dev = pick_device(device)
    model, tok = load_pretrained(run_dir, dev, family="decoder")
    windows = TokenWindows(data_dir, "val", seq_len)
    if windows.manifest["tokenizer"]["sha256"] != tok.sha256:
        raise FmforgeError(f"{data_dir} was tokenized with a different tokenizer than the model in {run_dir}")
    token_bytes = torch.from_numpy(tok.token_bytes())
    token_bytes = torch.cat([token_bytes, torch.zeros(max(0, model.cfg.vocab_size - len(token_bytes)), dtype=torch.int64)])
    res = evaluate_batches(model, eval_windows(windows, batch_size, max_batches), dev,
                           autocast_for(dev, run_cfg["train"]["precision"]), token_bytes)
    result = {
        "run_dir": str(run_dir), "data_dir": str(data_dir), "split": "val", "tokens": res["tokens"],
        "val_loss": res["loss"], "perplexity": math.exp(res["loss"]),
        "bits_per_byte": res["nats"] / math.log(2) / max(1, res["bytes"]),
        "unigram_loss": unigram_baseline(data_dir),
    }
    if json_out:
        echo(json.dumps(result))
    else:
        echo(f"eval on {data_dir} (val, {result['tokens']:,} tokens)")
        echo(f"  loss           {result['val_loss']:.4f} nats/token")
        echo(f"  perplexity     {result['perplexity']:.2f}")
        echo(f"  bits per byte  {result['bits_per_byte']:.4f}")
        echo(f"  unigram loss   {result['unigram_loss']:.4f} nats/token (context-free baseline)")
    return result
