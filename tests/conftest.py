"""Shared fixtures: a small real corpus (stdlib sources + pydoc topics) prepared once per session."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A fixed, varied slice of real code and prose: ~0.6 MB.
CORPUS_MODULES = ["argparse.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "heapq.py",
                  "bisect.py", "shlex.py", "fractions.py", "statistics.py", "csv.py", "difflib.py",
                  "functools.py", "glob.py", "fnmatch.py", "colorsys.py", "calendar.py", "dataclasses.py"]


def run_cli(*args, timeout=300, **kw):
    """Run ``python -m fmforge ARGS`` the way a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "fmforge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    import pydoc_data.topics

    d = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_MODULES:
        src = STDLIB / name
        (d / name.replace("/", "_")).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    with open(d / "topics.jsonl", "w") as f:
        for key in sorted(pydoc_data.topics.topics)[:40]:
            f.write(json.dumps({"text": pydoc_data.topics.topics[key]}) + "\n")
    return d


@pytest.fixture(scope="session")
def prepared(corpus_dir, tmp_path_factory) -> Path:
    """A prepared data dir: 512-token byte-level BPE, 10% of documents held out."""
    from fmforge.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_data([str(corpus_dir)], out, vocab_size=512, val_fraction=0.1, document_bytes=16384, log=None)
    return out


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    """A nano Llama that takes a few ms per step on CPU: for loop, resume and checkpoint behaviour."""
    base = {
        "model.arch": "llama", "model.size": "nano", "model.n_kv_head": 2, "data.seq_len": 64,
        "train.global_batch": 512, "train.micro_batch_size": 4, "train.max_steps": 40,
        "train.log_interval": 1, "train.eval_interval": 20, "train.eval_batches": 2, "train.threads": 1,
        "optim.warmup_steps": 5, "optim.lr": 3e-3, "checkpoint.interval": 10, "checkpoint.keep_last": 3,
        "log.tensorboard": False, "data.path": str(data), "train.out_dir": str(out),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def chat_base(prepared, tmp_path_factory) -> Path:
    """A nano Llama briefly pretrained on the prepared corpus: the base of the SFT and DPO tests."""
    from fmforge.config import build_config
    from fmforge.train.loop import train

    out = tmp_path_factory.mktemp("chat_base") / "run"
    train(build_config({}, tiny_overrides(prepared, out, **{"train.max_steps": 20, "checkpoint.interval": 0,
                                                            "data.seq_len": 64})), echo=lambda _msg: None)
    return out
