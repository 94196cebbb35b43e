"""Bias-suite throughput: examples per second of each ``fmforge bias`` suite on a finished run (CPU by default).

    python benchmarks/bias_throughput.py RUN_DIR [--suite crows-pairs,...] [--limit N] [--threads 2]

Runs ``bias_suites`` once (which also writes RUN_DIR/eval/bias.json) and prints, per suite, the items
scored, the seconds taken and items/s, then the headline metrics. An "item" is a CrowS pair, a StereoSet
triple, a BBQ question (3 options), a WinoBias item (pro + anti, 6 scores) or one counterfactual
continuation.
"""

import argparse
import time

import torch

from fmforge.bias.suites import ALL_SUITES, bias_suites

HEADLINE = ("crows-pairs.overall", "crows-pairs.gender", "stereoset.ss", "stereoset.lms", "stereoset.icat",
            "bbq.acc_ambig", "bbq.acc_disambig", "winobias.acc_pro", "winobias.acc_anti", "winobias.gap",
            "winobias.pro_pronoun_pref", "counterfactual.gender.gap", "counterfactual.race.gap",
            "counterfactual.religion.gap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--suite", default=ALL_SUITES)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    doc = bias_suites(args.run_dir, args.suite, limit=args.limit, device=args.device, batch_size=args.batch_size,
                      echo=lambda line: None if not line.startswith("note:") else print(line))
    total = time.perf_counter() - start
    print(f"{'suite':<16}{'items':>8}{'seconds':>10}{'items/s':>10}")
    for name, run in doc["suites"].items():
        print(f"{name:<16}{run['items']:>8}{run['seconds']:>10.1f}{run['items_per_s'] or 0:>10.1f}")
    print(f"total {total:.1f} s (scorer: {doc['scorer']}, {args.threads} threads, {args.device})")
    for key in HEADLINE:
        if key in doc["metrics"]:
            m = doc["metrics"]
            interval = f"  [{m[key + '_lo']:.3f}, {m[key + '_hi']:.3f}]" if key + "_lo" in m else ""
            print(f"{key:<30}{m[key]:8.3f}{interval}")


if __name__ == "__main__":
    main()
