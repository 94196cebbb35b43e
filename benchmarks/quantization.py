"""Quantization benchmark (issue 19): weights size, CPU decode tokens/s and validation perplexity of one
decoder at fp32, bf16, fmforge int8 and int4 (and torchao's int8 / int4 when torchao is installed).

    python benchmarks/quantization.py                      # trains a quickstart-sized model first
    python benchmarks/quantization.py --run RUN_DIR        # any finished decoder run on prepared data

Without ``--run`` it prepares part of the standard library (quickstart's data, ``--files`` sources) and
trains quickstart's model (Llama "micro", seq 256, quickstart's optimizer) for ``--steps`` steps into
``--work``. Decode speed: greedy ``sample`` with the KV cache, batch 1, ``--prompt`` prompt tokens then
``--new`` new tokens, best of ``--repeats``, on ``--threads`` CPU threads. Perplexity: the run's val
split, ``--batches`` batches of 8, no autocast (bf16 means bf16 weights and activations).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from fmforge.config import build_config
from fmforge.data.loader import TokenWindows, eval_windows
from fmforge.data.prepare import prepare_data
from fmforge.deploy.generate import sample
from fmforge.deploy.quantize import quantize
from fmforge.objectives.clm import evaluate_batches
from fmforge.quickstart import QUICKSTART_CONFIG, stdlib_sources, write_pydoc_topics
from fmforge.runs import load_pretrained
from fmforge.train.loop import train


def quiet(_msg):
    pass


def train_quickstart_model(work: Path, files: int, steps: int) -> Path:
    """Quickstart's data (first ``files`` stdlib sources + the pydoc topics) and model, ``steps`` steps."""
    run = work / "run"
    if (run / "model.safetensors").is_file():
        return run
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    write_pydoc_topics(corpus / "pydoc_topics.jsonl")
    inputs = [str(p) for p in stdlib_sources()[:files]] + [str(corpus / "pydoc_topics.jsonl")]
    if not (work / "data" / "manifest.json").is_file():
        prepare_data(inputs, work / "data", vocab_size=4096, val_fraction=0.02, log=quiet)
    cfg = build_config(QUICKSTART_CONFIG, [f"data.path={work / 'data'}", f"train.out_dir={run}",
                                           f"train.max_steps={steps}", "log.tensorboard=false",
                                           "checkpoint.interval=0"])
    t0 = time.perf_counter()
    train(cfg, echo=quiet)
    print(f"trained {run} for {steps} steps in {time.perf_counter() - t0:.0f} s")
    return run


def perplexity(model, data_dir: Path, seq_len: int, batches: int) -> float:
    windows = TokenWindows(data_dir, "val", seq_len)
    res = evaluate_batches(model, eval_windows(windows, 8, batches), torch.device("cpu"))
    return math.exp(res["loss"])


def decode_tokens_per_s(model, prompt: list[int], new: int, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sample(model, prompt, new, temperature=0)
        best = min(best, time.perf_counter() - t0)
    return len(out) / best


def weights_mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished decoder run (default: train a quickstart-sized one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fmforge_quant_bench"))
    ap.add_argument("--files", type=int, default=400, help="stdlib sources to train on (without --run)")
    ap.add_argument("--steps", type=int, default=200, help="training steps (without --run)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = args.run or train_quickstart_model(args.work, args.files, args.steps)
    run_cfg = json.loads((run / "model.json").read_text())
    data_cfg = yaml.safe_load((run / "config.yaml").read_text())["data"]
    data_dir, seq_len = Path(data_cfg["path"]), int(data_cfg["seq_len"])
    windows = TokenWindows(data_dir, "val", seq_len)
    prompt = [int(t) for t in windows.window(0)[: args.prompt]]

    variants = {"fp32": (run, None), "bf16": (run, torch.bfloat16)}
    for method in ("int8", "int4"):
        variants[method] = (quantize(run, args.work / f"q_{method}", method=method, overwrite=True, echo=quiet), None)
    try:
        import torchao  # noqa: F401

        for method in ("int8", "int4"):
            variants[f"torchao-{method}"] = (quantize(run, args.work / f"ao_{method}", method=method,
                                                      backend="torchao", overwrite=True, echo=quiet), None)
    except ImportError:
        print("torchao not installed: skipping its rows")

    print(f"model {run}: {run_cfg['arch']} {run_cfg.get('size')} d_model={run_cfg['d_model']} "
          f"n_layer={run_cfg['n_layer']} vocab={run_cfg['vocab_size']}; decode batch 1, {len(prompt)} prompt + "
          f"{args.new} new tokens, {args.threads} thread(s); perplexity on {args.batches} x 8 x {seq_len} tokens")
    print(f"{'variant':<14} {'weights MiB':>11} {'decode tok/s':>12} {'perplexity':>10} {'vs fp32':>8}")
    rows = []
    for name, (path, dtype) in variants.items():
        model, _ = load_pretrained(path)
        if dtype is not None:
            model = model.to(dtype)
            tmp = args.work / "bf16.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
            size = weights_mib(tmp)
        else:
            size = weights_mib(path / "model.safetensors")
        with torch.inference_mode():
            ppl = perplexity(model, data_dir, seq_len, args.batches)
        tps = decode_tokens_per_s(model, prompt, args.new, args.repeats)
        rows.append({"variant": name, "weights_mib": size, "decode_tokens_per_s": tps, "perplexity": ppl})
        change = ppl / rows[0]["perplexity"] - 1
        print(f"{name:<14} {size:>11.2f} {tps:>12.1f} {ppl:>10.3f} {change * 100:>+7.2f}%")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
