"""Training throughput of fmforge's GPT against Hugging Face transformers on the same shape, in one process.

Both models get the same shape, vocabulary, batch, data, dtype/autocast, SDPA attention, fused AdamW and
(with --compile) torch.compile. Ours computes its loss with ``fmforge.objectives.clm.clm_loss`` (what the
trainer uses); HF gets ``labels=`` as a user would pass them. Timed steps alternate between the two models
and tokens/s comes from the median step time, so machine noise hits both alike and bursts are ignored.

    python benchmarks/train_throughput.py --arch gpt2 --n-layer 4 --d-model 256 --n-head 4 \
        --seq-len 256 --batch 8 --vocab 8192 --dtype fp32            # CPU smoke shape
    python benchmarks/train_throughput.py --arch gpt2 --size gpt2-124m --batch 12 --seq-len 1024 \
        --dtype bf16 --compile                                       # the GPU comparison
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from fmforge.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.objectives.clm import clm_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Dense bf16 peak TFLOPS by device-name substring, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}


def build_hf(cfg: ModelConfig) -> torch.nn.Module:
    """The same architecture in transformers, built from an in-process config (no hub)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if cfg.arch == "gpt2":
        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
                            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                            attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, use_cache=False)
        return GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, attention_dropout=cfg.dropout,
                         tie_word_embeddings=cfg.tie_embeddings, use_cache=False)
    return LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")


def make_step(name: str, compiled: torch.nn.Module, loss_fn, opt: torch.optim.Optimizer, data: torch.Tensor,
              autocast):
    """One training step: forward, loss, backward, AdamW step."""
    inputs, targets = data[:, :-1], data[:, 1:]

    def step() -> torch.Tensor:
        with autocast():
            if name == "ours":
                loss = loss_fn(compiled(inputs), targets)
            else:
                loss = compiled(input_ids=inputs, labels=inputs).loss  # HF shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--size", help="a named size from fmforge.models.registry (e.g. gpt2-124m)")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-kv-head", type=int)
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary rows, identical for both models")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (tokens/s from the median step)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compilation happens here)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table for known GPUs)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's choice)")
    p.add_argument("--only", choices=["ours", "hf"], help="benchmark one side only (profiling)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = ModelConfig(arch=args.arch, size=args.size, n_layer=args.n_layer, d_model=args.d_model,
                      n_head=args.n_head, n_kv_head=args.n_kv_head, vocab_size=args.vocab,
                      max_seq_len=args.seq_len if args.size is None else None).resolved(seq_len=args.seq_len)
    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen).to(device)
    sides = [args.only] if args.only else ["ours", "hf"]
    steps, models = {}, {}
    for name in sides:
        torch.manual_seed(args.seed)
        model = (GPT(cfg) if name == "ours" else build_hf(cfg)).to(device).train()
        compiled = torch.compile(model) if args.compile else model
        # HF's loss runs inside its forward, so compiling HF compiles its loss; compile ours alike.
        loss_fn = torch.compile(clm_loss) if args.compile else clm_loss
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                fused=device.type in ("cuda", "cpu"))
        models[name] = model
        steps[name] = make_step(name, compiled, loss_fn, opt, data, autocast)
        for _ in range(args.warmup):
            steps[name]()
        sync(device)

    # One step of each model in turn, each timed alone: a burst of machine noise (shared CPUs) lands on both
    # sides, and the median step ignores it.
    times: dict[str, list[float]] = {name: [] for name in sides}
    losses = {}
    for _ in range(args.steps):
        for name in sides:
            sync(device)
            t0 = time.perf_counter()
            loss = steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            losses[name] = loss.item()

    tokens = args.batch * args.seq_len  # per step
    with torch.device("meta"):  # same architecture on both sides, so one FLOPs count serves both MFUs
        flops_per_token = GPT(cfg).flops_per_token(args.seq_len)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    result = {"arch": cfg.arch, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
              "n_kv_head": cfg.n_kv_head, "vocab": cfg.vocab_size, "batch": args.batch, "seq_len": args.seq_len,
              "dtype": args.dtype, "compile": args.compile, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "steps": args.steps,
              "params": sum(p.numel() for p in models[sides[0]].parameters())}
    print(f"{cfg.arch} L={cfg.n_layer} d={cfg.d_model} H={cfg.n_head}/{cfg.n_kv_head} V={cfg.vocab_size} "
          f"B={args.batch} T={args.seq_len} {args.dtype} compile={args.compile} on {result['device_name']} "
          f"({result['params'] / 1e6:.1f}M params, torch {torch.__version__})")
    print(f"{'model':<8}{'tokens/s':>12}{'ms/step':>10}{'MFU':>8}{'final loss':>12}")
    for name in sides:
        median = statistics.median(times[name])
        tps = tokens / median
        mfu = flops_per_token * tps / (peak * 1e12) if peak else None
        result[f"{name}_tokens_per_s"] = round(tps, 1)
        result[f"{name}_ms_per_step_median"] = round(1e3 * median, 2)
        result[f"{name}_ms_per_step_mean"] = round(1e3 * statistics.fmean(times[name]), 2)
        result[f"{name}_mfu"] = None if mfu is None else round(mfu, 4)
        result[f"{name}_loss"] = round(losses[name], 4)
        mfu_text = "-" if mfu is None else f"{100 * mfu:.1f}%"
        print(f"{name:<8}{tps:>12,.0f}{1e3 * median:>10.1f}{mfu_text:>8}{losses[name]:>12.4f}")
    if len(sides) == 2:
        result["ratio_ours_over_hf"] = round(result["ours_tokens_per_s"] / result["hf_tokens_per_s"], 3)
        print(f"ours / hf = {result['ratio_ours_over_hf']:.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
