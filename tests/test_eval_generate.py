"""The eval and generate verbs on a trained run directory, through the CLI a user types."""

import json
import math

import pytest
from conftest import run_cli, tiny_overrides

from fmforge.config import build_config
from fmforge.train.loop import train


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
    manifest = json.loads((prepared / "manifest.json").read_text())
    # Every val target token is predicted once (windows overlap by their one shifted token), so the bytes
    # behind the evaluated targets are close to the bytes of the val text.
    assert 0 < res["bits_per_byte"] < 8
    assert res["tokens"] <= manifest["tokens"]["val"]
    assert res["val_loss"] < res["unigram_loss"] * 1.2


def test_eval_on_an_explicit_data_dir_matches_the_default(run_dir, prepared):
    a = json.loads(run_cli("eval", run_dir, "--json").stdout.strip().splitlines()[-1])
    b = json.loads(run_cli("eval", run_dir, "--data", prepared, "--json", "--max-batches", "2").stdout.splitlines()[-1])
    assert b["tokens"] <= a["tokens"]


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
