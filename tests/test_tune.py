"""Hyperparameter search: pruning, a best config `fmforge train` accepts, resume after SIGKILL, clear errors."""

import csv
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from conftest import run_cli, tiny_overrides

from fmforge.config import config_to_dict, load_config
from fmforge.errors import FmforgeError
from fmforge.plan.tune import STUDY_NAME, default_space, load_space, tune

FAST = {"train.max_steps": 12, "train.eval_interval": 3, "optim.warmup_steps": 2, "checkpoint.interval": 0,
        "log.progress": "none"}


def _overrides(prepared, tmp_path, **extra):
    # tune sets data.path and each trial's out_dir itself: drop the two tiny_overrides fills in
    return [o for o in tiny_overrides(prepared, tmp_path, **{**FAST, **extra})
            if not o.startswith(("data.path=", "train.out_dir="))]


def _space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _empty_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def _load(out):
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.slow
def test_median_pruner_prunes_bad_trials_and_best_yaml_trains(prepared, tmp_path, capsys):
    # lr over five decades: with seed 0 the first two trials complete and later, slower-learning ones fall
    # behind their median at the first validation.
    space = _space(tmp_path, "optim.lr: {low: 1e-6, high: 1e-1, log: true}\n")
    out = tmp_path / "study"
    result = tune(None, _overrides(prepared, tmp_path), data=str(prepared), out=str(out), trials=5,
                  space=str(space), pruner="median", seed=0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert len(lines) == 5  # one line per trial

    states = [t.state.name for t in _load(out).trials]
    assert len(states) == 5 and states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2
    pruned = [r for r in result.trials if r["state"] == "PRUNED"]
    assert all(r["steps"] < 12 for r in pruned)
    assert all(r["steps"] == 12 for r in result.trials if r["state"] == "COMPLETE")
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == states and "optim.lr" in rows[0]
    assert (out / "tune.png").stat().st_size > 10_000

    best = load_config(out / "best.yaml")
    assert best.optim.lr == result.best_params["optim.lr"]
    assert result.best_value == min(r["val_loss"] for r in result.trials if r["state"] == "COMPLETE")
    assert best.train.out_dir is None and best.data.path == str(prepared.resolve())
    retrain = tmp_path / "retrain"
    proc = run_cli("train", out / "best.yaml", "--out", retrain, "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert (retrain / "model.safetensors").is_file()


def _states(db):
    """{number: (state, param count)} read straight from the SQLite file while tune writes it."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return {n: (s, p) for n, s, p in con.execute(
                "SELECT number, state, (SELECT COUNT(*) FROM trial_params p WHERE p.trial_id = t.trial_id) "
                "FROM trials t")}
    except sqlite3.OperationalError:  # not created yet, or mid-write
        return {}


@pytest.mark.slow
def test_study_resumes_after_sigkill_and_retries_the_running_trial(prepared, tmp_path):
    out = tmp_path / "study"
    args = ["tune", _empty_config(tmp_path), *_overrides(prepared, tmp_path), "--data", prepared, "--out", out,
            "--trials", 3, "--pruner", "none", "--seed", 3]
    proc = subprocess.Popen([sys.executable, "-m", "fmforge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    n_params = len(default_space(config_to_dict(load_config(None, _overrides(prepared, tmp_path)))))
    deadline = time.monotonic() + 120
    while True:  # kill once trial 0 is done and trial 1 is training with its parameters drawn
        states = _states(out / "study.db")
        if states.get(0, ("",))[0] == "COMPLETE" and states.get(1) == ("RUNNING", n_params):
            break
        assert proc.poll() is None, "tune ended before the moment the test kills it:\n" + proc.stdout.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_params = _load(out).trials[1].params

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "trial 1 was left running" in again.stdout
    trials = _load(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == killed_params and trials[2].user_attrs["retry_of"] == 1
    assert trials[3].params != killed_params
    assert (out / "trials" / "trial_0002" / "model.safetensors").is_file()


def test_resume_refuses_another_base_config_or_space(prepared, tmp_path):
    out = tmp_path / "study"
    tune(None, _overrides(prepared, tmp_path), data=str(prepared), out=str(out), trials=1, pruner="none")
    with pytest.raises(FmforgeError, match=r"another base config \(train.max_steps: 12 -> 20\)"):
        tune(None, _overrides(prepared, tmp_path, **{"train.max_steps": 20}), data=str(prepared), out=str(out),
             trials=2)
    space = _space(tmp_path, "optim.lr: {low: 1e-4, high: 1e-2, log: true}\n")
    with pytest.raises(FmforgeError, match="another search space"):
        tune(None, _overrides(prepared, tmp_path), data=str(prepared), out=str(out), trials=2, space=str(space))
    assert len(_load(out).trials) == 1


@pytest.mark.slow
def test_bad_space_key_is_one_line_error_with_exit_code_2(prepared, tmp_path):
    space = _space(tmp_path, "optim.lrr: {low: 1e-4, high: 1e-2, log: true}\n")
    proc = run_cli("tune", _empty_config(tmp_path), "--data", prepared, "--out", tmp_path / "s", "--space", space)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fmforge: error: space {space}: optim.lrr: unknown key"]
    assert not (tmp_path / "s").exists()  # refused before any study was made


@pytest.mark.slow
def test_zero_trials_is_one_line_error_with_exit_code_2(prepared, tmp_path):
    proc = run_cli("tune", _empty_config(tmp_path), "--data", prepared, "--out", tmp_path / "s", "--trials", 0)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fmforge: error: --trials must be at least 1, got 0"]


def test_missing_data_dir_is_refused(tmp_path):
    with pytest.raises(FmforgeError, match="data directory not found"):
        tune(None, [], data=str(tmp_path / "nope"), out=str(tmp_path / "s"), trials=1)


@pytest.mark.parametrize("text, message", [
    ("optim.lr: {low: 1e-2, high: 1e-4}\n", r"optim.lr: low \(0.01\) must be below high \(0.0001\)"),
    ("optim.lr: {low: 0, high: 1e-2, log: true}\n", "optim.lr: a log scale needs low > 0"),
    ("optim.lr: 0.001\n", r"optim.lr: expected \{low, high"),
    ("optim.lr: {low: 1e-4, hi: 1e-2}\n", "optim.lr: unknown field"),
    ("optim.lr: {choices: []}\n", "optim.lr: choices must be a non-empty list"),
    ("optim.warmup_steps: {low: 0.5, high: 3, int: true}\n", "optim.warmup_steps: int ranges need whole-number"),
    ("optim.schedule: {choices: [cosine, linear]}\n", "optim.schedule: Input should be"),
    ("optim.warmup_steps: {choices: [1, 40]}\n", r"every choice must be below train.max_steps \(12\)"),
    ("train.global_batch: {choices: [512, 600]}\n", "not a multiple of data.seq_len x"),
    ("train.out_dir: {choices: [a, b]}\n", "train.out_dir is set by tune"),
    ("- optim.lr\n", "expected a mapping of config keys"),
])
def test_bad_space_entries_name_the_key(tmp_path, text, message):
    base = config_to_dict(load_config(None, _overrides(tmp_path, tmp_path)))
    with pytest.raises(FmforgeError, match=message):
        load_space(_space(tmp_path, text), base)


def test_warmup_range_is_clipped_below_max_steps(tmp_path, capsys):
    base = config_to_dict(load_config(None, _overrides(tmp_path, tmp_path)))
    space = load_space(_space(tmp_path, "optim.warmup_steps: {low: 0, high: 50, int: true}\n"), base)
    assert space["optim.warmup_steps"]["high"] == 11
    assert "clipped to 11" in capsys.readouterr().out
    with pytest.raises(FmforgeError, match="leaves no warmup below"):
        load_space(_space(tmp_path, "optim.warmup_steps: {low: 11, high: 50, int: true}\n"), base)


def test_default_space_batches_are_whole_micro_batches_around_the_base(tmp_path):
    base = config_to_dict(load_config(None, _overrides(tmp_path, tmp_path)))  # 512 tokens, seq 64, micro 4
    space = default_space(base)
    assert space["train.global_batch"] == {"choices": [256, 512, 1024]}
    assert set(space) == {"optim.lr", "optim.warmup_steps", "train.global_batch", "optim.weight_decay"}
    assert load_space(None, base) == space


def test_a_second_tune_on_the_same_study_is_refused(prepared, tmp_path):
    import fcntl

    out = tmp_path / "study"
    out.mkdir()
    with open(out / "tune.lock", "w") as held:  # as a running tune holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FmforgeError, match="another `fmforge tune` is running on"):
            tune(None, _overrides(prepared, tmp_path), data=str(prepared), out=str(out), trials=1)
    assert not (out / "study.db").exists()
