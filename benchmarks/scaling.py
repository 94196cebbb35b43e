"""Data-parallel scaling of ``fmforge train``: the real trainer, launched the way users launch it.

Each case is one ``fmforge train`` run (``--nproc-per-node N``, the CLI's own torchrun path) on the same
prepared data, model and global batch; tokens/s is the median of the logged intervals after warm-up
(validation and checkpoint time excluded by the trainer), with MFU and peak memory from the same log.

CPU (the default): 1 process vs N processes with one intra-op thread each, so N processes use N cores;
scaling efficiency = tokens/s(N) / (N x tokens/s(1)). One process using all N cores through its own
threads is reported beside it, since that is the alternative a user has on one machine.

    python benchmarks/scaling.py                                    # CPU: 1 vs 2 processes, DDP and FSDP2

GPU (one or more cards): a matrix of modes x compile for named sizes, each beside Hugging Face
transformers of the same shape in the same run (``train_throughput.py --only hf``, single process):

    python benchmarks/scaling.py --device cuda --sizes gpt2-124m llama-1b --modes ddp fsdp fsdp+ac \
        --compile both --seq-len 1024 --global-batch-tokens 524288 --micro-batch 8 --hf

The data is the Python standard library's source (what ``fmforge quickstart`` uses), prepared once into
``--data`` (default: a cache directory) with an 8k-token BPE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare(data_dir: Path) -> Path:
    if (data_dir / "manifest.json").is_file():
        return data_dir
    from fmforge.data.prepare import prepare_data
    from fmforge.quickstart import stdlib_sources

    prepare_data([str(p) for p in stdlib_sources()], str(data_dir), vocab_size=8192, val_fraction=0.01)
    return data_dir


def run_case(data: Path, out: Path, nproc: int, mode: str, compile: bool, args) -> dict:
    dp, _, extra = mode.partition("+")
    overrides = {
        "model.arch": args.arch_of(args.size), "model.size": args.size, "data.seq_len": args.seq_len,
        "train.global_batch": args.global_batch_tokens, "train.micro_batch_size": args.micro_batch,
        "train.max_steps": args.steps, "train.log_interval": args.log_interval, "train.eval_interval": 0,
        "train.eval_batches": 1, "train.compile": compile, "train.device": args.device,
        "checkpoint.interval": 0, "log.tensorboard": False, "log.progress": "plain",
        "parallel.dp": dp, "parallel.ac": "full" if extra == "ac" else "none",
        "data.path": str(data), "train.out_dir": str(out),
    }
    if args.threads:
        overrides["train.threads"] = args.threads
    if args.peak_tflops:
        overrides["train.peak_tflops"] = args.peak_tflops
    cfg = out.parent / "empty.yaml"
    cfg.write_text("{}\n")
    cmd = [sys.executable, "-m", "fmforge", "train", str(cfg), *(f"{k}={v}" for k, v in overrides.items())]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                          if args.device == "cpu" else None)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > args.warmup_steps]
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    result = {"tokens_per_s": tps, "peak_mem_gb": max(r["peak_mem_gb"] for r in timed), "wall_s": wall,
              "data_wait_frac": statistics.median(r["data_wait_frac"] for r in timed)}
    if "mfu" in timed[-1]:
        result["mfu"] = statistics.median(r["mfu"] for r in timed)
    return result


def run_hf(args, compile: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--only", "hf",
           "--arch", args.arch_of(args.size), "--size", args.size, "--seq-len", str(args.seq_len),
           "--batch", str(args.micro_batch), "--vocab", "8192", "--dtype", "bf16" if args.device == "cuda" else "fp32",
           "--steps", "20", "--warmup", "5", "--device", args.device]
    if compile:
        cmd.append("--compile")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else "failed"}
    j = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {"tokens_per_s": j["hf_tokens_per_s"]}
    if j.get("hf_mfu") is not None:
        out["mfu"] = j["hf_mfu"]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", nargs="+", default=None, help="named sizes (default: micro on CPU)")
    p.add_argument("--nproc", nargs="+", type=int, default=None, help="process counts (default: 1 2 on CPU, "
                                                                      "every visible GPU on CUDA)")
    p.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], help="ddp, fsdp, hsdp, fsdp+ac, ...")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch-tokens", type=int, default=16384)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=10, help="logged steps up to here are not timed")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per process (CPU default: 1)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--hf", action="store_true", help="also time transformers on each size (one process)")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fmforge-bench-stdlib-8k")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.device == "cpu":
        args.threads = args.threads or 1
        args.sizes = args.sizes or ["micro"]
        args.nproc = args.nproc or [1, 2]
    else:
        import torch

        args.sizes = args.sizes or ["gpt2-124m"]
        args.nproc = args.nproc or [torch.cuda.device_count()]
    args.arch_of = lambda size: "gpt2" if size.startswith("gpt2") else "llama"
    data = prepare(args.data)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            args.size = size
            for compile in compiles:
                for nproc in args.nproc:
                    for mode in args.modes if nproc > 1 or args.device == "cuda" else ["single"]:
                        out = Path(tmp) / f"{size}-{mode}-{nproc}-{int(compile)}"
                        r = run_case(data, out, nproc, "ddp" if mode == "single" else mode, compile, args)
                        results.append({"size": size, "mode": mode, "nproc": nproc, "compile": compile, **r})
                        print(json.dumps(results[-1]), flush=True)
                if args.device == "cpu" and args.threads == 1 and max(args.nproc) > 1:
                    # The single-process alternative: one process using every core through intra-op threads.
                    cores = max(args.nproc)
                    saved, args.threads = args.threads, cores
                    r = run_case(data, Path(tmp) / f"{size}-threads-{int(compile)}", 1, "ddp", compile, args)
                    args.threads = saved
                    results.append({"size": size, "mode": f"1 process x {cores} threads", "nproc": 1,
                                    "compile": compile, **r})
                    print(json.dumps(results[-1]), flush=True)
                if args.hf:
                    r = run_hf(args, compile)
                    results.append({"size": size, "mode": "hf transformers (1 process)", "nproc": 1,
                                    "compile": compile, **r})
                    print(json.dumps(results[-1]), flush=True)
    _table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _table(results: list[dict]) -> None:
    base = {(r["size"], r["compile"]): r["tokens_per_s"] for r in results
            if r["mode"] == "single" and "tokens_per_s" in r}
    print(f"\n{'size':<12}{'mode':<30}{'procs':>6}{'compile':>9}{'tok/s':>12}{'MFU':>8}{'peak GB':>9}{'efficiency':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['size']:<12}{r['mode']:<30}{r['nproc']:>6}{str(r['compile']):>9}  error: {r['error']}")
            continue
        tps = r.get("tokens_per_s")
        eff = ""
        one = base.get((r["size"], r["compile"]))
        if one and r["mode"] not in ("single",) and r["nproc"] > 1:
            eff = f"{tps / (r['nproc'] * one):.0%}"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        peak = f"{r['peak_mem_gb']:.2f}" if "peak_mem_gb" in r else ""
        print(f"{r['size']:<12}{r['mode']:<30}{r['nproc']:>6}{str(r['compile']):>9}{tps:>12,.0f}{mfu:>8}{peak:>9}{eff:>12}")


if __name__ == "__main__":
    main()
