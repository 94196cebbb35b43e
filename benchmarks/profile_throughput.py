"""``data profile`` throughput on the quickstart corpus: MB/s of text (UTF-8 bytes of the documents read).

The corpus is the one ``fmforge quickstart`` prepares: the standard library's sources
(``quickstart.stdlib_sources``) plus pydoc's topics as JSONL. Each configuration is profiled ``--rounds``
times and the median round is reported, so a burst of load on a shared machine does not decide the figure:

- ``full``: every statistic, MinHash near-duplicates included (the default ``data profile``);
- ``no-near``: ``--no-near-duplicates`` (MinHash signatures are the most expensive statistic);
- ``+tokenizer``: full, with the tokens counted by a 4,096-token BPE (``--tokenizer``);
- ``pii-only``: the personal-data scan alone on the same documents, for reference.

Besides wall-clock MB/s, the CPU seconds used (this process and its workers) are reported: on a shared,
overloaded machine MB per CPU-second times the cores is what the same run would reach alone. Wall time
includes reading the files and writing profile.json + profile.html (the plots take a few seconds
on a loaded 2-core machine, whatever the corpus size). ``--workers`` sets the analysis processes.

    python benchmarks/profile_throughput.py                  # all configurations, 2 workers
    python benchmarks/profile_throughput.py --only full --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from fmforge.data.clean import normalize
from fmforge.data.pii import PiiScan
from fmforge.data.profile import profile_data
from fmforge.data.sources import DocumentReader
from fmforge.data.tokenizer import train_tokenizer
from fmforge.quickstart import stdlib_sources, write_pydoc_topics


def corpus(tmp: Path) -> list[str]:
    topics = tmp / "topics.jsonl"
    write_pydoc_topics(topics)
    return [str(p) for p in stdlib_sources()] + [str(topics)]


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process and its finished workers) of one call."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("full", "no-near", "+tokenizer", "pii-only"), action="append")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = corpus(tmp)
        texts = [normalize(d.text) for d in DocumentReader(files)]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(f"quickstart corpus: {len(files)} files, {len(texts)} documents, {mb:.2f} MB of text; "
              f"{args.workers} workers, median of {args.rounds} rounds")
        tok_path = tmp / "tokenizer.json"
        wanted = args.only or ["full", "no-near", "+tokenizer", "pii-only"]
        if "+tokenizer" in wanted:
            train_tokenizer(texts[:400], 4096).save(tok_path)
        runs = {
            "full": lambda: profile_data(files, tmp / "full", workers=args.workers, log=None),
            "no-near": lambda: profile_data(files, tmp / "nonear", workers=args.workers, near_duplicates=False,
                                            log=None),
            "+tokenizer": lambda: profile_data(files, tmp / "tok", tokenizer=str(tok_path), workers=args.workers,
                                               log=None),
            "pii-only": lambda: [PiiScan().add(t) for t in texts],
        }
        results = {}
        for name in wanted:
            rounds = sorted(timed(runs[name]) for _ in range(args.rounds))
            seconds, cpu = rounds[len(rounds) // 2]
            results[name] = {"seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2),
                             "cpu_seconds": round(cpu, 2), "mb_per_cpu_s": round(mb / cpu, 2)}
            print(f"  {name:11s} {seconds:7.2f} s  {mb / seconds:6.2f} MB/s wall   {cpu:7.2f} CPU-s  "
                  f"{mb / cpu:6.2f} MB per CPU-second")
        print(json.dumps({"benchmark": "profile_throughput", "mb": round(mb, 2), "workers": args.workers,
                          "load_average": os.getloadavg()[0], "results": results}))


if __name__ == "__main__":
    main()
