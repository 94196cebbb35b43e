"""Serving throughput: ``fmforge serve`` (continuous batching) against the same requests one by one.

A server subprocess on loopback serves one decoder; an asyncio client sends the same greedy completion
requests (streamed, with usage) at concurrency 1, 8 and 32 and reports output tokens/s (all tokens over
wall time), p50/p99 time to first token and p50/p99 end-to-end latency. Two baselines run the same
requests one after another in this process, with the same model on the same device: through
``fmforge.deploy.generate.sample`` (what ``fmforge generate`` calls), and through transformers'
``generate`` on the model ``fmforge export hf`` writes (greedy, KV cache). Greedy decoding gives the same
tokens, so the token counts of all sides match (up to floating-point ties). ``--load N`` adds a load test of N requests at 32 concurrent: status codes and
p50/p99 latency (the issue's 1,000 x 32 run: ``--load 1000``).

Without ``--run`` a quickstart-shaped model (Llama micro: 4 layers, d_model 128, context 256, a 4,096-token
BPE trained on pydoc's topics) is built with random weights: throughput does not depend on what it learned.

    python benchmarks/serve_throughput.py                      # 64 requests x 32 tokens per level (~2 min)
    python benchmarks/serve_throughput.py --requests 128 --max-tokens 64 --load 1000
    python benchmarks/serve_throughput.py --run runs/quickstart/run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pydoc_data.topics
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM

from fmforge.data.tokenizer import train_tokenizer
from fmforge.deploy.generate import sample
from fmforge.interop.hf.convert import export_hf
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.runs import load_pretrained, save_pretrained


def build_run(out: Path) -> Path:
    """A quickstart-shaped Llama with random weights and a real 4,096-token BPE."""
    tok = train_tokenizer(list(pydoc_data.topics.topics.values()), 4096)
    (out / "tok").mkdir(parents=True)
    tok.save(out / "tok" / "tokenizer.json")
    (out / "tok" / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map()))
    cfg = ModelConfig(arch="llama", size="micro", n_kv_head=2).resolved(vocab_size=tok.vocab_size, seq_len=256)
    torch.manual_seed(0)
    save_pretrained(GPT(cfg).state_dict(), cfg, out / "run", out / "tok")
    return out / "run"


def prompts(n: int) -> list[str]:
    """n real prompts of varied length (8 to ~80 words) from pydoc's topics."""
    texts = [t for t in pydoc_data.topics.topics.values() if len(t.split()) > 100]
    return [" ".join(texts[i % len(texts)].split()[:8 + (i * 13) % 72]) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, threads: int | None) -> subprocess.Popen:
    code = ("import torch, sys; from fmforge.deploy.serve import serve; "
            + (f"torch.set_num_threads({threads}); " if threads else "")
            + f"serve([{str(run)!r}], port={port}, device='cpu', max_running=32, max_waiting=2048, echo=print)")
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}  # the engine thread too
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "run", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, status = None, 0, 0
    async with client.stream("POST", url, json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk.get("choices") and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "e2e": time.perf_counter() - t0,
            "tokens": tokens, "status": status}


async def run_level(port: int, texts: list[str], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def gated(text):
            async with gate:
                return await one(client, url, text, max_tokens)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(gated(t) for t in texts))
    return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def in_worker(fn, *args) -> dict:
    """``fn(*args)`` in a worker thread, as the server's engine runs (on a loaded machine PyTorch's CPU thread
    pool behaves very differently in the main thread)."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(fn(*args)))
    worker.start()
    worker.join()
    return result


def _baseline(run: Path, texts: list[str], max_tokens: int, threads: int | None) -> dict:
    """The same requests one by one through ``generate``'s sampler."""
    if threads:
        torch.set_num_threads(threads)
    model, tok = load_pretrained(run, "cpu", family="decoder")
    ids = [[tok.bos_id] + tok.encode(t) for t in texts]
    sample(model, ids[0], 4, temperature=0)  # warm-up
    t0 = time.perf_counter()
    tokens = 0
    for row in ids:
        tokens += len(sample(model, row, max_tokens, temperature=0, eos_id=tok.eos_id, vocab_limit=tok.vocab_size))
    wall = time.perf_counter() - t0
    ttfts = []
    for row in ids[:16]:  # alone, a request's first token costs one prefill
        t = time.perf_counter()
        sample(model, row, 1, temperature=0, eos_id=tok.eos_id)
        ttfts.append(time.perf_counter() - t)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttfts, 0.5) * 1e3, "ttft_p99_ms": pct(ttfts, 0.99) * 1e3}


def _hf_baseline(run: Path, texts: list[str], max_tokens: int, threads: int | None) -> dict:
    """The same requests one by one through transformers' ``generate`` (greedy, KV cache) on the model
    ``fmforge export hf`` writes."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(run, Path(tmp) / "hf", echo=lambda _msg: None)
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
    _, tok = load_pretrained(run, "cpu", family="decoder")
    ids = [torch.tensor([[tok.bos_id] + tok.encode(t)]) for t in texts]
    opts = {"do_sample": False, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    with torch.inference_mode():
        model.generate(ids[0], max_new_tokens=4, **opts)  # warm-up
        t0 = time.perf_counter()
        tokens = 0
        for row in ids:
            out = model.generate(row, max_new_tokens=max_tokens, **opts)[0, row.size(1):].tolist()
            tokens += out.index(tok.eos_id) if tok.eos_id in out else len(out)
        wall = time.perf_counter() - t0
        ttfts = []
        for row in ids[:16]:
            t = time.perf_counter()
            model.generate(row, max_new_tokens=1, **opts)
            ttfts.append(time.perf_counter() - t)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": pct(ttfts, 0.5) * 1e3, "ttft_p99_ms": pct(ttfts, 0.99) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a decoder run directory (default: a quickstart-shaped random model)")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--load", type=int, default=0, help="also N requests at 32 concurrent (status codes)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads, both sides")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or build_run(Path(tmp))
        texts = prompts(args.requests)
        base = in_worker(_baseline, run, texts, args.max_tokens, args.threads)
        print(f"one by one (generate): {base['tokens_per_s']:.1f} tok/s, TTFT p50 {base['ttft_p50_ms']:.1f} ms "
              f"p99 {base['ttft_p99_ms']:.1f} ms ({base['tokens']} tokens in {base['wall_s']:.1f} s)")
        hf = in_worker(_hf_baseline, run, texts, args.max_tokens, args.threads)
        print(f"one by one (transformers generate): {hf['tokens_per_s']:.1f} tok/s, TTFT p50 "
              f"{hf['ttft_p50_ms']:.1f} ms p99 {hf['ttft_p99_ms']:.1f} ms ({hf['tokens']} tokens in "
              f"{hf['wall_s']:.1f} s)")
        port = free_port()
        proc = start_server(run, port, args.threads)
        report = {"baseline": base, "transformers": hf, "levels": {}}
        try:
            asyncio.run(run_level(port, texts[:4], 4, 4))  # warm-up
            for c in (int(x) for x in args.levels.split(",")):
                results, wall = asyncio.run(run_level(port, texts, c, args.max_tokens))
                tokens = sum(r["tokens"] for r in results)
                level = {"tokens_per_s": tokens / wall, "speedup": tokens / wall / base["tokens_per_s"],
                         "speedup_vs_transformers": tokens / wall / hf["tokens_per_s"],
                         "ttft_p50_ms": pct([r["ttft"] for r in results], 0.5) * 1e3,
                         "ttft_p99_ms": pct([r["ttft"] for r in results], 0.99) * 1e3,
                         "e2e_p50_ms": pct([r["e2e"] for r in results], 0.5) * 1e3,
                         "e2e_p99_ms": pct([r["e2e"] for r in results], 0.99) * 1e3,
                         "tokens": tokens, "non_200": sum(r["status"] != 200 for r in results)}
                report["levels"][c] = level
                print(f"serve, concurrency {c:>2}: {level['tokens_per_s']:.1f} tok/s ({level['speedup']:.2f}x one by "
                      f"one, {level['speedup_vs_transformers']:.2f}x transformers one by one), TTFT p50 {level['ttft_p50_ms']:.0f} ms p99 {level['ttft_p99_ms']:.0f} ms, "
                      f"e2e p50 {level['e2e_p50_ms']:.0f} ms p99 {level['e2e_p99_ms']:.0f} ms, "
                      f"{tokens} tokens, {level['non_200']} non-200")
            if args.load:
                results, wall = asyncio.run(run_level(port, prompts(args.load), 32, 8))
                codes = {}
                for r in results:
                    codes[r["status"]] = codes.get(r["status"], 0) + 1
                e2e = [r["e2e"] for r in results]
                report["load"] = {"requests": args.load, "statuses": codes, "e2e_p50_ms": pct(e2e, 0.5) * 1e3,
                                  "e2e_p99_ms": pct(e2e, 0.99) * 1e3, "wall_s": wall}
                print(f"load: {args.load} requests at 32 concurrent in {wall:.1f} s, statuses {codes}, "
                      f"p50 {pct(e2e, 0.5) * 1e3:.0f} ms p99 {pct(e2e, 0.99) * 1e3:.0f} ms")
        finally:
            proc.terminate()
            proc.wait(60)
        print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.stdout.reconfigure(line_buffering=True)
    main()
