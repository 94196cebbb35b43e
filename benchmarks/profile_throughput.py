"""``data profile`` throughput on the quickstart corpus: MB/s of text (UTF-8 bytes of the documents read).

The corpus is the one ``fmforge quickstart`` prepares: the standard library's sources
(``quickstart.stdlib_sources``) plus pydoc's topics as JSONL. Each configuration is profiled ``--rounds``
times and the median round is reported, so a burst of load on a shared machine does not decide the figure:

- ``full``: every statistic, MinHash near-duplicates included (the default ``data profile``);
- ``no-near``: ``--no-near-duplicates`` (MinHash signatures are the most expensive statistic);
- ``+tokenizer``: full, with the tokens counted by a 4,096-token BPE (``--tokenizer``);
- ``pii-only``: the personal-data scan alone on the same documents, for reference;
- ``minhash``: the MinHash signatures alone (``MinHashDeduper.signature``), and ``minhash-exact`` the same
  signatures computed with the exact split-multiply arithmetic in 4,096-shingle blocks (the implementation
  before the float-quotient fast path): the ratio of the two, measured in the same run, is the speedup, and
  the script checks that both give identical signatures.

Besides wall-clock MB/s, the CPU seconds used (this process and its workers) are reported: on a shared,
overloaded machine MB per CPU-second times the cores is what the same run would reach alone. Wall time
includes reading the files and writing profile.json + profile.html (the plots take a few seconds
on a loaded 2-core machine, whatever the corpus size). ``--workers`` sets the analysis processes.

    python benchmarks/profile_throughput.py                  # all configurations, 2 workers
    python benchmarks/profile_throughput.py --only full --rounds 1
    python benchmarks/profile_throughput.py --only minhash --only minhash-exact
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from fmforge.data.clean import _LOW32, MERSENNE, MinHashDeduper, _permute, normalize, shingles
from fmforge.data.pii import PiiScan
from fmforge.data.profile import profile_data
from fmforge.data.sources import DocumentReader
from fmforge.data.tokenizer import train_tokenizer
from fmforge.quickstart import stdlib_sources, write_pydoc_topics


def corpus(tmp: Path) -> list[str]:
    topics = tmp / "topics.jsonl"
    write_pydoc_topics(topics)
    return [str(p) for p in stdlib_sources()] + [str(topics)]


def exact_signatures(texts: list[str]) -> list:
    """MinHash signatures by the exact split-multiply arithmetic (``clean._permute``) in 4,096-shingle blocks."""
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


def same_signatures(texts: list[str]) -> bool:
    fast = [MinHashDeduper().signature(t) for t in texts]
    return all((f is None and e is None) or (f is not None and e is not None and (f == e).all())
               for f, e in zip(fast, exact_signatures(texts)))


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process and its finished workers) of one call."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


CONFIGS = ("full", "no-near", "+tokenizer", "pii-only", "minhash", "minhash-exact")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=CONFIGS, action="append")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = corpus(tmp)
        texts = [normalize(d.text) for d in DocumentReader(files)]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"quickstart corpus: {len(files)} files, {len(texts)} documents, {mb:.2f} MB of text; "
              f"{args.workers} workers, median of {args.rounds} rounds")
        tok_path = tmp / "tokenizer.json"
        wanted = args.only or list(CONFIGS)
        if "+tokenizer" in wanted:
            train_tokenizer(texts[:400], 4096).save(tok_path)
        runs = {
            "full": lambda: profile_data(files, tmp / "full", workers=args.workers, log=None),
            "no-near": lambda: profile_data(files, tmp / "nonear", workers=args.workers, near_duplicates=False,
                                            log=None),
            "+tokenizer": lambda: profile_data(files, tmp / "tok", tokenizer=str(tok_path), workers=args.workers,
                                               log=None),
            "pii-only": lambda: [PiiScan().add(t) for t in texts],
            "minhash": lambda: [MinHashDeduper().signature(t) for t in texts],
            "minhash-exact": lambda: exact_signatures(texts),
        }
        results = {}
        for name in wanted:
            rounds = sorted(timed(runs[name]) for _ in range(args.rounds))
            seconds, cpu = rounds[len(rounds) // 2]
            results[name] = {"seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2),
                             "cpu_seconds": round(cpu, 2), "mb_per_cpu_s": round(mb / cpu, 2)}
            print(f"  {name:11s} {seconds:7.2f} s  {mb / seconds:6.2f} MB/s wall   {cpu:7.2f} CPU-s  "
                  f"{mb / cpu:6.2f} MB per CPU-second")
        ratios = {}
        if "minhash" in results and "minhash-exact" in results:
            ratios["minhash_speedup_cpu"] = round(results["minhash-exact"]["cpu_seconds"]
                                                  / max(1e-9, results["minhash"]["cpu_seconds"]), 2)
            ratios["minhash_identical"] = same_signatures(texts)
            print(f"  MinHash fast path: {ratios['minhash_speedup_cpu']}x the exact arithmetic (CPU seconds), "
                  f"identical signatures: {ratios['minhash_identical']}")
        if "full" in results and "no-near" in results:
            ratios["near_duplicates_share_cpu"] = round(
                1 - results["no-near"]["cpu_seconds"] / max(1e-9, results["full"]["cpu_seconds"]), 2)
        print(json.dumps({"benchmark": "profile_throughput", "mb": round(mb, 2), "workers": args.workers,
                          "load_average": os.getloadavg()[0], "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
