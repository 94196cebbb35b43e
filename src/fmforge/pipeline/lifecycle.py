"""``fmforge quickstart --task lifecycle``: the whole lifecycle as one pipeline on built-in data (the file ships in
the package as ``fmforge/pipeline/examples/lifecycle.yaml``; ``examples/lifecycle.yaml`` in a source checkout
links to it): prepare -> profile -> plan -> tune (2 trials) -> train -> eval + CrowS-Pairs bias -> gate
(beats the unigram baseline, bias within bounds) -> register (approved, champion if it beats the current
one) -> int8 quantize -> a one-request generation smoke test of the quantized model.

The corpus is a fixed slice of the Python standard library's sources plus ``pydoc_data.topics`` (on every
Python). A rerun into the same folder reuses every step in seconds; ``--minutes`` sets the training steps,
so changing it re-runs training and what follows only.
"""

from __future__ import annotations

import json
import pydoc_data.topics
import sysconfig
import time
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.pipeline.command import run_pipeline

# in a folder of its own: a step runs in its pipeline file's folder, which must hold no Python modules that
# would shadow others on the step's sys.path
EXAMPLE = Path(__file__).resolve().parent / "examples" / "lifecycle.yaml"
MARKER = ".fmforge-lifecycle"
# ~0.6 MB of real code and ~0.2 MB of English prose: enough for a tokenizer and a model that beats unigram.
MODULES = ("argparse.py", "textwrap.py", "string.py", "heapq.py", "bisect.py", "shlex.py", "fractions.py",
           "statistics.py", "csv.py", "difflib.py", "functools.py", "glob.py", "fnmatch.py", "calendar.py",
           "dataclasses.py", "json/decoder.py", "json/encoder.py", "colorsys.py")
TOPICS = 120
STEPS_PER_MINUTE = 16  # of the planned model on 2 CPU cores, with room for the other steps


def write_corpus(directory: Path) -> Path:
    """The built-in corpus (idempotent: the same bytes every time, so a rerun's data step is reused)."""
    directory.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in MODULES:
        source = stdlib / name
        if source.is_file():
            (directory / name.replace("/", "_")).write_bytes(source.read_bytes())
    topics = pydoc_data.topics.topics
    lines = [json.dumps({"text": topics[key]}) for key in sorted(topics)[:TOPICS]]
    (directory / "pydoc_topics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def _claim(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FmforgeError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FmforgeError(f"{out} exists and was not made by the lifecycle quickstart; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by fmforge quickstart --task lifecycle; a rerun reuses what is here\n")


def quickstart_lifecycle(out: str | Path = "runs/quickstart-lifecycle", minutes: float = 15.0, echo=print,
                         pipeline: str | Path = EXAMPLE, **params) -> dict:
    """Run the lifecycle pipeline into ``out`` (the pipeline's state and steps in ``out/pipeline``, the registry
    in ``out/registry.sqlite``); ``params`` override the pipeline's parameters. Returns the run summary."""
    if minutes <= 0:
        raise FmforgeError("--minutes must be positive")
    if not Path(pipeline).is_file():
        raise FmforgeError(f"the lifecycle pipeline {pipeline} is missing")
    out = Path(out)
    _claim(out)
    t0 = time.perf_counter()
    corpus = write_corpus(out / "corpus")
    values = {"corpus": str(corpus.resolve()), "train_steps": max(40, int(minutes * STEPS_PER_MINUTE)), **params}
    echo(f"== lifecycle pipeline {pipeline} into {out / 'pipeline'}")
    result = run_pipeline(pipeline, values, out / "pipeline", workers=2, registry=str(out / "registry.sqlite"),
                          echo=echo)
    result["minutes"] = (time.perf_counter() - t0) / 60
    echo(f"lifecycle {result['status']} in {result['minutes']:.1f} min: "
         + ", ".join(f"{name} {state}" for name, state in result["steps"].items()))
    for name, error in result["errors"].items():
        echo(f"  step {name}: {error}")
    echo(f"  next: fmforge pipeline show {out / 'pipeline'}")
    echo(f"        fmforge registry list --registry {out / 'registry.sqlite'}")
    echo(f"        fmforge pipeline lineage {values['group'] if 'group' in values else 'lifecycle-lm'}@champion "
         f"--registry {out / 'registry.sqlite'}")
    return result
