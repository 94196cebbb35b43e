"""``data profile`` throughput on the quickstart corpus: MB/s of text (UTF-8 bytes of the documents read).

The corpus is the one ``fmforge quickstart`` prepares: the standard library's sources
(``quickstart.stdlib_sources``) plus pydoc's topics as JSONL. Each configuration is profiled ``--rounds``
times and the median round is reported, so a burst of load on a shared machine does not decide the figure:

- ``full``: every statistic, MinHash near-duplicates included (the default ``data profile``), timed inside a
  fresh interpreter that imports only what ``fmforge data profile`` imports (this script also imports torch
  through ``data prepare``, and forking the workers from a process that big costs more), after one untimed
  round there; ``full-first`` is that first round (loading the compiled kernels and the plot font once);
- ``cli``: ``fmforge data profile`` as a command, interpreter start and imports included;
- ``analysis``: the same statistics without reading files or writing profile.json/profile.html: the chunks
  analysed by ``--workers`` processes and merged, what grows with the corpus (the page's plots are a fixed
  cost of a few seconds whatever the corpus size);
- ``no-near``: ``--no-near-duplicates``;
- ``+tokenizer``: full, with the tokens counted by a 4,096-token BPE (``--tokenizer``): the Rust tokenizer's
  encoding, one thread per worker, then bounds the rate (``tokenize-only`` times it alone on the same texts);
- ``prepared``: a prepared directory of the same corpus (``data prepare``, not timed), profiled with its own
  tokenizer: its shards decoded back to text, then every statistic;
- component pairs, each the compiled path against its plain reference on the same documents in the same run
  (the ratio is the speedup; the script checks they agree):
  ``minhash`` (``fastscan.minhash_min``) vs ``minhash-numpy`` (the exact split-multiply arithmetic vectorised
  in numpy, 4,096-shingle blocks: fmforge's implementation before the kernel), ``words`` (``fastscan.count_words``:
  words and pairs counted by hash in one pass) vs ``words-counter`` (``re.findall`` + ``collections.Counter``), ``pii`` (patterns run
  around digit runs only) vs ``pii-full-scan`` (every pattern over the whole text).

Besides wall-clock MB/s, the CPU seconds used (this process and its workers) are reported: on a shared,
overloaded machine MB per CPU-second times the cores is what the same run would reach alone.

    python benchmarks/profile_throughput.py                  # all configurations, 2 workers
    python benchmarks/profile_throughput.py --only full --only analysis --rounds 3
    python benchmarks/profile_throughput.py --only full --only analysis --copies 4   # 41.6 MB
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from fmforge.data.clean import MERSENNE, MinHashDeduper, normalize, shingles
from fmforge.data.fastscan import warm_up
from fmforge.data.pii import find_pii
from fmforge.data.prepare import prepare_data
from fmforge.data.profile import POOL_EXIT_THREAD, chunked, in_order, profile_data, worker_pool
from fmforge.data.profile_text import TextStats
from fmforge.data.profile_words import chunk_words
from fmforge.data.sources import DocumentReader
from fmforge.data.tokenizer import load_tokenizer, train_tokenizer
from fmforge.quickstart import stdlib_sources, write_pydoc_topics

_P = np.uint64(MERSENNE)
_LOW32 = np.uint64(0xFFFFFFFF)


def corpus(tmp: Path) -> list[str]:
    topics = tmp / "topics.jsonl"
    write_pydoc_topics(topics)
    return [str(p) for p in stdlib_sources()] + [str(topics)]


def _fold(v: np.ndarray) -> None:
    high = v >> np.uint64(61)
    v &= _P
    v += high


def _permute(a_hi: np.ndarray, a_lo: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(a*x + b) mod 2^61-1 for 32-bit x, exactly, vectorised in uint64 (split multiplication)."""
    hi = a_hi * x
    q = hi >> np.uint64(29)
    hi &= np.uint64(2**29 - 1)
    hi <<= np.uint64(32)
    hi += q
    lo = a_lo * x
    _fold(lo)
    hi += lo
    hi += b
    _fold(hi)
    hi += (hi + np.uint64(1)) >> np.uint64(61)
    hi &= _P
    return hi


def numpy_signatures(texts: list[str]) -> list:
    """MinHash signatures by the numpy split-multiply arithmetic in 4,096-shingle blocks (the peer)."""
    d = MinHashDeduper()
    a_hi, a_lo, b = (d.a >> np.uint64(32))[:, None], (d.a & _LOW32)[:, None], d.b[:, None]
    out = []
    for text in texts:
        x = shingles(text)
        sig = np.full(d.num_perm, MERSENNE, dtype=np.uint64)
        for i in range(0, x.size, 4096):
            np.minimum(sig, _permute(a_hi, a_lo, b, x[None, i:i + 4096]).min(axis=1), out=sig)
        out.append(sig.astype(np.uint32) if x.size else None)
    return out


def kernel_signatures(texts: list[str]) -> list:
    d = MinHashDeduper()
    return [d.signature(t) for t in texts]


def same(a: list, b: list) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and (x == y).all())
               for x, y in zip(a, b))


def counter_words(texts: list[str]) -> tuple[Counter, Counter]:
    words, pairs = Counter(), Counter()
    for text in texts:
        w = re.findall(r"\w+", text.lower())
        words.update(w)
        pairs.update(map(" ".join, zip(w, w[1:])))
    return words, pairs


def hashed_words(texts: list[str]) -> TextStats:
    total = TextStats()
    for i in range(0, len(texts), 512):
        part = TextStats()
        part.words, part.bigrams, part.names = chunk_words(texts[i:i + 512])
        total.merge(part)
    return total


def analysis(texts: list[str], workers: int) -> TextStats:
    total = TextStats()
    with worker_pool(workers, None, True) as pool:
        for part in in_order(chunked(iter(texts), len), pool, workers):
            total.merge(part)
    total.top_words(30)
    total.top_bigrams(30)
    return total


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process and its workers) of one call. The worker pool is stopped in
    the background after the call returns: its end is waited for after the wall time is taken, so that the
    workers' CPU counts (a finished process's CPU is known once it is joined)."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    wall = time.perf_counter() - start
    join_pool_exit()
    return wall, cpu_seconds() - cpu


def join_pool_exit() -> None:
    for t in threading.enumerate():
        if t.name == POOL_EXIT_THREAD:
            t.join()


# Rounds of profile_data in a fresh interpreter (imports as the CLI's): the first reported apart.
CHILD = """
import json, resource, sys, threading, time
from fmforge.data.profile import POOL_EXIT_THREAD, profile_data
files, out, rounds, workers = json.loads(sys.argv[1])
def cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
times = []
for _ in range(rounds + 1):
    start, used = time.perf_counter(), cpu()
    profile_data(files, out, workers=workers, log=None)
    wall = time.perf_counter() - start
    for t in threading.enumerate():  # the pool's end (in the background): its workers' CPU counts once joined
        if t.name == POOL_EXIT_THREAD:
            t.join()
    times.append((wall, cpu() - used))
print(json.dumps(times))
"""


def child_rounds(files: list[str], out: Path, rounds: int, workers: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``rounds + 1`` profiles in a fresh interpreter, the first one first."""
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps([files, str(out), rounds, workers])],
                          capture_output=True, text=True, check=True)
    return [tuple(r) for r in json.loads(done.stdout)]


def cli_round(files: list[str], out: Path, workers: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), cpu_seconds()
    subprocess.run([sys.executable, "-m", "fmforge", "data", "profile", *files, "--out", str(out),
                    "--workers", str(workers)], capture_output=True, check=True)
    return time.perf_counter() - start, cpu_seconds() - cpu


CONFIGS = ("full", "full-first", "cli", "analysis", "no-near", "+tokenizer", "tokenize-only", "prepared", "minhash", "minhash-numpy", "words", "words-counter", "pii",
           "pii-full-scan")
PAIRS = (("minhash", "minhash-numpy"), ("words", "words-counter"), ("pii", "pii-full-scan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=CONFIGS, action="append")
    ap.add_argument("--copies", type=int, default=1,
                    help="read the corpus this many times (a larger input: fixed costs such as the page's plots "
                         "and the worker pool's start weigh less; the copies are exact duplicates)")
    args = ap.parse_args()
    warm_up()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = corpus(tmp)
        files = list(base)
        for i in range(1, args.copies):  # real copies: the same path twice is read once
            (tmp / f"copy{i}").mkdir()
            files += [str(shutil.copy(f, tmp / f"copy{i}" / f"{n:05d}_{Path(f).name}")) for n, f in enumerate(base)]
        texts = [normalize(d.text) for d in DocumentReader(files)]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"quickstart corpus: {len(files)} files, {len(texts)} documents, {mb:.2f} MB of text; "
              f"{args.workers} workers, median of {args.rounds} rounds")
        tok_path = tmp / "tokenizer.json"
        wanted = args.only or list(CONFIGS)
        if "+tokenizer" in wanted or "tokenize-only" in wanted:
            train_tokenizer(texts[:400], 4096).save(tok_path)
        if "prepared" in wanted:
            prepare_data(files, tmp / "prepared", vocab_size=4096, log=None)
        runs = {
            "analysis": lambda: analysis(texts, args.workers),
            "no-near": lambda: profile_data(files, tmp / "nonear", workers=args.workers, near_duplicates=False,
                                            log=None),
            "+tokenizer": lambda: profile_data(files, tmp / "tok", tokenizer=str(tok_path), workers=args.workers,
                                               log=None),
            "tokenize-only": lambda: load_tokenizer(tok_path).encode_batch(texts),
            "prepared": lambda: profile_data([str(tmp / "prepared")], tmp / "prep", workers=args.workers, log=None),
            "minhash": lambda: kernel_signatures(texts),
            "minhash-numpy": lambda: numpy_signatures(texts),
            "words": lambda: hashed_words(texts),
            "words-counter": lambda: counter_words(texts),
            "pii": lambda: [find_pii(t) for t in texts],
            "pii-full-scan": lambda: [find_pii(t, [(0, len(t))]) for t in texts],
        }
        if "full" in wanted or "full-first" in wanted:
            child = child_rounds(files, tmp / "full", args.rounds, args.workers)
        results = {}
        for name in wanted:
            if name == "full":
                rounds = sorted(child[1:])
            elif name == "full-first":
                rounds = child[:1]
            elif name == "cli":
                rounds = sorted(cli_round(files, tmp / "cli", args.workers) for _ in range(args.rounds))
            else:
                rounds = sorted(timed(runs[name]) for _ in range(args.rounds))
            seconds, cpu = rounds[len(rounds) // 2]
            results[name] = {"seconds": round(seconds, 3), "mb_per_s": round(mb / seconds, 2),
                             "cpu_seconds": round(cpu, 3), "mb_per_cpu_s": round(mb / cpu, 2)}
            print(f"  {name:13s} {seconds:7.2f} s  {mb / seconds:6.2f} MB/s wall   {cpu:7.2f} CPU-s  "
                  f"{mb / cpu:6.2f} MB per CPU-second")
        ratios = {}
        checks = {"minhash": lambda: same(kernel_signatures(texts), numpy_signatures(texts)),
                  "words": lambda: _same_words(texts), "pii": lambda: runs["pii"]() == runs["pii-full-scan"]()}
        for fast, peer in PAIRS:
            if fast in results and peer in results:
                ratios[f"{fast}_speedup_cpu"] = round(results[peer]["cpu_seconds"]
                                                      / max(1e-9, results[fast]["cpu_seconds"]), 2)
                ratios[f"{fast}_identical"] = checks[fast]()
                print(f"  {fast}: {ratios[f'{fast}_speedup_cpu']}x {peer} (CPU seconds), identical: "
                      f"{ratios[f'{fast}_identical']}")
        if "full" in results and "no-near" in results:
            ratios["near_duplicates_share_cpu"] = round(
                1 - results["no-near"]["cpu_seconds"] / max(1e-9, results["full"]["cpu_seconds"]), 2)
        print(json.dumps({"benchmark": "profile_throughput", "mb": round(mb, 2), "workers": args.workers,
                          "copies": args.copies,
                          "load_average": os.getloadavg()[0], "results": results, "ratios": ratios}))


def _same_words(texts: list[str]) -> bool:
    words, pairs = counter_words(texts)
    total = hashed_words(texts)
    return (total.top_words(100) == sorted(words.items(), key=lambda r: (-r[1], r[0]))[:100]
            and total.top_bigrams(100) == sorted(pairs.items(), key=lambda r: (-r[1], r[0]))[:100])


if __name__ == "__main__":
    main()
