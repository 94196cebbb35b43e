"""How does sharded data preparation scale? Tokens/s of ``data prepare --engine local`` with 1, 2 and 4
workers on this machine, the merge's cost, and from those an estimate for 1T tokens on a cluster.

    python benchmarks/prepare_scaling.py                      # ~12M tokens, a few minutes on 2 cores
    python benchmarks/prepare_scaling.py --copies 1 --workers 1,2

The corpus is the Python standard library's sources (as ``fmforge quickstart`` reads them), written
``--copies`` times with a distinct first line per copy so exact dedup keeps every copy (MinHash sees them
as near-duplicates and only counts them, as ``data prepare`` does by default). The tokenizer (8k BPE) is
trained once and given to every run, so each run times the units (read, clean, hash, MinHash, encode) and
the merge (global dedup, split, shard copy) only. A run with N workers is pinned to min(N, cores) cores
(``sched_setaffinity``, inherited by the workers, which size their tokenizer threads from it; the Rust
tokenizer encodes on the calling thread), so 1 worker means one core: scaling efficiency at N workers is tokens/s(N) / (min(N, cores) x tokens/s(1 worker, 1 core)),
measured on the unit phase — the strong-scaling efficiency of adding cores. The single-process
``data prepare`` (the Rust tokenizer on every core, no MinHash signatures stored) is timed on the same corpus
as the peer.

The estimate: 1T tokens over ``--nodes`` x ``--cores`` workers at the per-worker rate and efficiency
measured at the largest worker count here that does not exceed the cores, plus the merge at its measured
tokens/s (the merge is one process: at that scale it dominates unless it is sharded, which is stated).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from fmforge.data.engines import cpu_count
from fmforge.data.prepare import prepare_data
from fmforge.data.tokenizer import train_tokenizer
from fmforge.launch.data_prepare import prepare_sharded
from fmforge.quickstart import stdlib_sources


def write_corpus(work: Path, copies: int) -> Path:
    corpus = work / "corpus"
    if corpus.is_dir():
        return corpus
    tmp = work / "corpus.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for k in range(copies):
        d = tmp / f"copy{k}"
        d.mkdir(parents=True)
        for i, src in enumerate(stdlib_sources()):
            try:
                text = src.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            (d / f"{i:04d}_{src.name}").write_text(f"# copy {k} of {src.name}\n{text}", encoding="utf-8")
    tmp.rename(corpus)
    return corpus


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/prepare_scaling"))
    parser.add_argument("--copies", type=int, default=4, help="copies of the stdlib sources (default: 4)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to time (default: 1,2,4)")
    parser.add_argument("--unit-bytes", type=int, default=4 << 20, help="bytes per unit (default: 4 MiB)")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--cores", type=int, default=32)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(args.work, args.copies)
    tok_path = args.work / "tokenizer.json"
    if not tok_path.is_file():
        files = sorted((corpus / "copy0").iterdir())
        train_tokenizer((f.read_text(encoding="utf-8") for f in files), 8192).save(tok_path)

    out = args.work / "single"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    m = prepare_data([str(corpus)], out, tokenizer=str(tok_path), val_fraction=0.01, log=None)
    single_s = time.perf_counter() - t0
    tokens = m["tokens"]["train"] + m["tokens"]["val"]
    print(f"corpus: {len(m['sources'])} files, {sum(s['bytes'] for s in m['sources']) / 1e6:.1f} MB, "
          f"{tokens:,} tokens; {cpu_count()} cores here")
    print(f"peer: single-process data prepare {single_s:.1f}s = {tokens / single_s:,.0f} tokens/s")

    rows = []
    cores_here = sorted(os.sched_getaffinity(0))
    # The 1-worker run is this process (engine local runs one worker in place), whose tokenizer thread pool
    # the peer above started on every core, and an affinity set now binds only this thread: without this the
    # "one core" run would still tokenize on all of them. Spawned workers with one core each do the same.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for workers in [int(w) for w in args.workers.split(",")]:
        out = args.work / f"w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        os.sched_setaffinity(0, cores_here[:workers])
        try:
            t0 = time.perf_counter()
            m = prepare_sharded([str(corpus)], out, engine="local", workers=workers, unit_bytes=args.unit_bytes,
                                tokenizer=str(tok_path), val_fraction=0.01, log=None)
            wall = time.perf_counter() - t0
        finally:
            os.sched_setaffinity(0, cores_here)
        e = m["engine"]
        rows.append({"workers": workers, "cores": min(workers, len(cores_here)), "wall_s": wall, "units": e["units"], "units_s": e["units_wall_seconds"],
                     "merge_s": e["merge_seconds"], "tokens": tokens,
                     "tokens_per_s": tokens / e["units_wall_seconds"]})
    base = rows[0]["tokens_per_s"] / rows[0]["cores"]
    print(f"\n{'workers':>7} {'cores':>5} {'units':>5} {'units s':>8} {'tokens/s':>11} {'efficiency':>10} {'merge s':>8} "
          f"{'wall s':>7} {'vs peer':>7}")
    for r in rows:
        r["efficiency"] = r["tokens_per_s"] / (r["cores"] * base)
        print(f"{r['workers']:>7} {r['cores']:>5} {r['units']:>5} {r['units_s']:>8.1f} {r['tokens_per_s']:>11,.0f} "
              f"{r['efficiency']:>10.0%} {r['merge_s']:>8.1f} {r['wall_s']:>7.1f} {single_s / r['wall_s']:>6.2f}x")

    fit = [r for r in rows if r["workers"] <= cpu_count()] or rows[:1]
    ref = fit[-1]
    merge_tps = tokens / max(min(r["merge_s"] for r in rows), 1e-9)
    cores = args.nodes * args.cores
    units_h = 1e12 / (base * ref["efficiency"] * cores) / 3600
    merge_h = 1e12 / merge_tps / 3600
    print(f"\nestimate, 1T tokens on {args.nodes} nodes x {args.cores} cores: units {units_h:.1f} h "
          f"({base:,.0f} tokens/s per worker x {cores} workers x {ref['efficiency']:.0%} efficiency, as measured "
          f"at {ref['workers']} workers here) + merge {merge_h:.1f} h (one process at {merge_tps:,.0f} tokens/s) "
          f"= {units_h + merge_h:.1f} h; the same work on one such 32-core node: "
          f"{1e12 / (base * ref['efficiency'] * args.cores) / 86400:.1f} days")
    (args.work / "prepare_scaling.json").write_text(json.dumps(
        {"single_s": single_s, "tokens": tokens, "rows": rows, "estimate_hours": {"units": units_h,
                                                                               "merge": merge_h}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
