"""Does a ladder predict? Fit a law on small real runs, predict a held-out run 4x the compute of the largest
rung, train that run, and print the prediction, its 95% interval and the error.

The ladder is ``fmforge ladder``'s own (``run_ladder``): WSD rungs whose cooldowns branch off one trunk per
size (Hägele et al. 2024), the Chinchilla approach-3 fit with bootstrap intervals. The target has twice the
largest rung's non-embedding parameters and twice its tokens (4x its 6ND compute) and is trained only after
the prediction is on disk (``OUT/law.json``).

    python benchmarks/ladder_predicts.py                         # quickstart corpus, ~30 min on 2 cores
    python benchmarks/ladder_predicts.py --mup                   # the same with model.mup.base_width
    python benchmarks/ladder_predicts.py --both                  # standard and muP side by side (2x time)
    python benchmarks/ladder_predicts.py --data DIR --smoke      # a couple of minutes: does it run

``--data`` takes any prepared text directory (``fmforge data prepare``); by default the quickstart corpus
(the Python standard library's sources + pydoc topics, 4k BPE, 2% held out, as ``fmforge quickstart``
builds it) is prepared once into ``--work``/data. ``--mup`` sets ``model.mup.base_width`` to the smallest
rung's width (one learning rate for every width); on an fmforge without ``model.mup`` it says so and runs
the standard parametrization. Each mode's ladder lives in ``--work``/ladder-{sp,mup}: rerunning resumes it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from fmforge.config import ModelConfig
from fmforge.data.manifest import load_manifest
from fmforge.data.prepare import prepare_data
from fmforge.errors import FmforgeError
from fmforge.plan.common import flatten
from fmforge.plan.ladder import run_ladder
from fmforge.plan.shapes import count_params, propose_model
from fmforge.quickstart import stdlib_sources, write_pydoc_topics

# Sizing, from a measured smoke-sized run (4k-token vocabulary ignored there: 512): ~2.3 GFLOP/s on a loaded
# 2-core VM. Here the ladder costs 1.8e12 FLOPs (3 sizes x 3 budgets, branched; the 4k vocabulary's head is
# most of it) and the 4x target 2.5e12: 18-31 min at 2.3-4 GFLOP/s. The ladder prints its cost before it starts.
BASE = {
    "model": {"arch": "llama"},
    "data": {"seq_len": 128},
    "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "wsd", "decay_fraction": 0.2, "min_lr_ratio": 0.05,
              "weight_decay": 0.1},
    "train": {"global_batch": 2048, "micro_batch_size": 16, "eval_batches": 64, "threads": 2, "log_interval": 50},
    "checkpoint": {"keep_last": 2},
    "log": {"tensorboard": False, "progress": "none"},
}
PARAMS = (2e4, 5e4, 1.2e5)
TOKENS = (8e4, 1.6e5, 3.2e5)
SMOKE = {"params": (2e4, 5e4, 1.2e5), "tokens": (3.2e4, 6.4e4, 1.28e5), "global_batch": 1024, "micro_batch_size": 8,
         "eval_batches": 8, "bootstrap": 20}


def prepare_quickstart(work: Path) -> Path:
    """The quickstart corpus prepared as ``fmforge quickstart`` does (once; reused when present)."""
    data = work / "data"
    if (data / "manifest.json").is_file():
        return data
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    write_pydoc_topics(corpus / "pydoc_topics.jsonl")
    inputs = [str(p) for p in stdlib_sources()] + [str(corpus / "pydoc_topics.jsonl")]
    prepare_data(inputs, data, vocab_size=4096, val_fraction=0.02, log=print)
    return data


def has_mup() -> bool:
    return "mup" in ModelConfig.model_fields


def proposed(data: Path, params: float, seq_len: int) -> ModelConfig:
    """The shape the ladder trains for ``params`` non-embedding parameters on this data."""
    vocab = int(load_manifest(data)["tokenizer"]["vocab_size"])
    fields = propose_model(params, BASE["model"]["arch"], vocab, seq_len)
    return ModelConfig(**fields).resolved(vocab_size=vocab, seq_len=seq_len)


def run_mode(args, data: Path, mup: bool) -> dict:
    """One ladder + target; returns the target report with the mode and wall time."""
    base = json.loads(json.dumps(BASE))
    params, tokens, bootstrap = args.params or PARAMS, args.tokens or TOKENS, args.bootstrap
    if args.smoke:  # smaller defaults; --params/--tokens still win
        params, tokens = args.params or SMOKE["params"], args.tokens or SMOKE["tokens"]
        bootstrap = min(bootstrap, SMOKE["bootstrap"])
        base["train"].update({k: SMOKE[k] for k in ("global_batch", "micro_batch_size", "eval_batches")})
    base["train"]["threads"] = args.threads
    overrides = [f"{k}={v}" for k, v in flatten(base).items()]
    mode = "sp"
    if mup:
        if has_mup():
            width = proposed(data, min(params), base["data"]["seq_len"]).d_model
            overrides.append(f"model.mup.base_width={width}")
            mode = "mup"
            print(f"muP: model.mup.base_width={width} (the smallest rung's width)")
        else:
            print("muP: this fmforge has no model.mup; running the standard parametrization")
    # 4x the largest rung's 6ND: twice its (proposed shape's) parameters on twice its tokens
    target_n = 2 * count_params(proposed(data, max(params), base["data"]["seq_len"]))[1]
    target_d = 2 * max(tokens)
    start = time.perf_counter()
    try:
        result = run_ladder(None, overrides, data=str(data), out=str(args.work / f"ladder-{mode}"),
                            params=list(params), tokens=list(tokens), target_params=target_n, target_tokens=target_d,
                            run_target=True, bootstrap=bootstrap, seed=0, allow_bounded_fit=args.allow_bounded_fit)
    except FmforgeError as err:  # e.g. a fit at a bound: the ladder says why it will not predict
        print(f"{mode}: {err}")
        return {"mode": mode, "minutes": (time.perf_counter() - start) / 60, "refused": str(err)}
    minutes = (time.perf_counter() - start) / 60
    report = {"mode": mode, "minutes": minutes, **result.target}
    largest = max(result.rungs, key=lambda r: r["N"] * r["D"])
    report["compute_ratio"] = report["N"] * report["D"] / (largest["N"] * largest["D"])
    return report


def show(reports: list[dict]) -> None:
    print(f"\n{'mode':5} {'target N':>10} {'target D':>11} {'x C':>5} {'predicted':>9} {'95% interval':>19} "
          f"{'actual':>8} {'error':>8} {'min':>6}")
    refused = [r for r in reports if "refused" in r]
    reports = [r for r in reports if "refused" not in r]
    for r in refused:
        print(f"{r['mode']}: no prediction ({r['refused']}) after {r['minutes']:.1f} min")
    for r in reports:
        ci = f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]" if r.get("ci") else "-"
        actual = r.get("actual", math.nan)
        error = r.get("relative_error", math.nan)
        print(f"{r['mode']:5} {r['N']:>10,} {r['D']:>11,} {r['compute_ratio']:>5.1f} {r['predicted']:>9.4f} "
              f"{ci:>19} {actual:>8.4f} {error:>+8.2%} {r['minutes']:>6.1f}")
    for r in reports:
        inside = r.get("ci") and r["ci"][0] <= r.get("actual", math.nan) <= r["ci"][1]
        verdict = "within 3%" if abs(r.get("relative_error", math.inf)) <= 0.03 else "outside 3%"
        print(f"{r['mode']}: error {r.get('relative_error', math.nan):+.2%} ({verdict}); actual "
              f"{'inside' if inside else 'outside'} the 95% interval")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="prepared text directory (default: the quickstart corpus)")
    parser.add_argument("--work", type=Path, default=Path("runs/ladder_predicts"), help="ladders and data go here")
    parser.add_argument("--params", type=lambda s: [float(x) for x in s.split(",")],
                        help=f"rung sizes, non-embedding parameters (default: {PARAMS})")
    parser.add_argument("--tokens", type=lambda s: [float(x) for x in s.split(",")],
                        help=f"rung token budgets (default: {TOKENS})")
    parser.add_argument("--mup", action="store_true", help="model.mup.base_width = the smallest rung's width")
    parser.add_argument("--both", action="store_true", help="standard and muP ladders side by side")
    parser.add_argument("--smoke", action="store_true", help="a tiny ladder (a couple of minutes): does it run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default: 2)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default: 200)")
    parser.add_argument("--allow-bounded-fit", action="store_true",
                        help="predict even when a fitted constant sits at its bound")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data if args.data is not None else prepare_quickstart(args.work)
    modes = [False, True] if args.both else [args.mup]
    reports = [run_mode(args, data, mup) for mup in modes]
    show(reports)
    (args.work / "ladder_predicts.json").write_text(json.dumps(reports, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
