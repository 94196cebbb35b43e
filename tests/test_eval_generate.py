"""The eval and generate verbs on a trained run directory, through the CLI a user types."""

import json
import math

import numpy as np
import pytest
from conftest import run_cli, tiny_overrides

from fmforge.config import build_config
from fmforge.data.loader import TokenWindows
from fmforge.data.prepare import prepare_data
from fmforge.data.tokenizer import load_tokenizer
from fmforge.train.loop import train

pytestmark = pytest.mark.slow  # every test runs the eval/generate CLI in a subprocess


@pytest.fixture(scope="module")
def run_dir(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "trained"
    train(build_config({}, tiny_overrides(prepared, out, **{"train.max_steps": 30})), echo=lambda *_: None)
    return out


def test_eval_reports_loss_perplexity_and_bits_per_byte(run_dir, prepared):
    proc = run_cli("eval", run_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["perplexity"] == pytest.approx(math.exp(res["val_loss"]))
    # Bits per byte = total nats / ln 2 / UTF-8 bytes of exactly the predicted target tokens: the val
    # windows step by seq_len, so the targets are tokens 1 .. n_windows * seq_len of each val shard.
    windows = TokenWindows(prepared, "val", 64)
    token_bytes = load_tokenizer(prepared / "tokenizer.json").token_bytes()
    n_bytes = sum(int(token_bytes[np.asarray(s[1: (len(s) - 1) // 64 * 64 + 1])].sum()) for s in windows.shards)
    assert res["tokens"] == len(windows) * 64
    assert res["bits_per_byte"] == pytest.approx(res["val_loss"] * res["tokens"] / math.log(2) / n_bytes, rel=1e-9)
    assert res["val_loss"] < res["unigram_loss"] * 1.2


def test_eval_on_an_explicit_data_dir_matches_the_default(run_dir, prepared, corpus_dir, tmp_path):
    a = json.loads(run_cli("eval", run_dir, "--json").stdout.strip().splitlines()[-1])
    b = json.loads(run_cli("eval", run_dir, "--data", prepared, "--json").stdout.strip().splitlines()[-1])
    assert (a["val_loss"], a["tokens"]) == (b["val_loss"], b["tokens"])
    capped = json.loads(run_cli("eval", run_dir, "--json", "--max-batches", "2", "--batch-size", "3").stdout
                        .strip().splitlines()[-1])
    assert capped["tokens"] == 2 * 3 * 64
    other = tmp_path / "other"
    prepare_data([str(corpus_dir)], other, vocab_size=300, val_fraction=0.1, log=None)
    proc = run_cli("eval", run_dir, "--data", other)
    assert proc.returncode == 2 and "different tokenizer" in proc.stderr


def test_eval_with_an_unknown_device_is_a_one_line_error(run_dir):
    proc = run_cli("eval", run_dir, "--device", "tpu")
    assert proc.returncode == 2 and "unknown device" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_is_deterministic_for_a_fixed_seed(run_dir):
    args = ("generate", run_dir, "--prompt", "def ", "--max-new-tokens", "30", "--temperature", "1.0", "--seed", "7")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("def ")
    other = run_cli("generate", run_dir, "--prompt", "def ", "--max-new-tokens", "30", "--temperature", "1.0",
                    "--seed", "8")
    assert other.stdout != first.stdout


def test_eval_and_generate_on_a_missing_run_are_one_line_errors(tmp_path):
    for verb in (("eval", tmp_path / "nope"), ("generate", tmp_path / "nope", "--prompt", "x")):
        proc = run_cli(*verb)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
