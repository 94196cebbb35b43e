"""`fmforge ladder` end to end on real data: a 3 x 3 grid whose rungs of one size branch their WSD cooldowns off
one trunk, killed in its last cooldown and resumed exactly, fitted, a larger held-out run predicted and trained;
reruns train nothing; bad inputs fail in one line."""

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_metrics, run_cli, tiny_overrides

from fmforge.config import OptimConfig
from fmforge.errors import FmforgeError
from fmforge.plan.fit import load_law
from fmforge.plan.ladder import run_ladder
from fmforge.plan.rungs import decay_start, ladder_cost, run_config, train_piece
from fmforge.train.optim import lr_factor

slow = pytest.mark.slow  # runs `fmforge ladder` (real training runs), most in a subprocess

# Tiny Llamas (~16k, 56k and 107k non-embedding parameters) x 15, 30 and 60 steps of 512 tokens.
GRID = ["--params", "2e4,5e4,1.2e5", "--tokens", "7680,15360,30720"]
# Held out: 3x the largest rung's parameters on 2x its tokens.
TARGET = ["--target-params", "3e5", "--target-tokens", "61440", "--run-target"]
BOOTSTRAP = ["--bootstrap", "20"]  # enough to exercise the intervals; 200 (the default) takes seconds more


def _overrides(prepared, **extra):
    base = {"train.micro_batch_size": 8, "train.eval_batches": 8, "log.progress": "none", **extra}
    return [o for o in tiny_overrides(prepared, prepared, **base) if not o.startswith(("data.path=", "train.out_dir="))]


def _config(tmp):
    path = tmp / "empty.yaml"
    path.write_text("{}\n")
    return path


def _records(out):
    return [json.loads(line) for line in (out / "ladder.jsonl").read_text().splitlines()]


def _ladder_process(**kwargs):
    """``run_ladder(**kwargs)`` in a fresh process (it takes options the command line may not have yet)."""
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    code = f"from fmforge.plan.ladder import run_ladder; run_ladder(**{kwargs!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _weights_mtimes(out):
    return {p.relative_to(out): p.stat().st_mtime_ns for p in out.glob("*/*/model.safetensors")}


@pytest.fixture(scope="module")
def ladder(prepared, tmp_path_factory):
    """Start the ladder, SIGKILL it once the cooldown of its last (largest) rung has a checkpoint of its own, run
    it with a target run to the end (a fit at a bound allowed: nine tiny runs may not pin E), then once more."""
    tmp = tmp_path_factory.mktemp("ladder")
    out = tmp / "ladder"
    args = ["ladder", _config(tmp), *_overrides(prepared), "--data", prepared, "--out", out, *GRID, *BOOTSTRAP]
    proc = subprocess.Popen([sys.executable, "-m", "fmforge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "ladder.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timed out"
        time.sleep(0.01)
    last = json.loads((out / "ladder.json").read_text())["rungs"][-1]  # cheapest first: the largest is last
    checkpoints = out / "rungs" / last["name"] / "checkpoints"
    while not any(checkpoints.glob("step_*")):  # written under a temporary name, renamed when complete
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timed out"
        time.sleep(0.002)
    proc.kill()
    killed_output = proc.communicate()[0]
    records_after_kill = _records(out)

    kwargs = {"config": _config(tmp), "overrides": _overrides(prepared), "data": prepared, "out": out,
              "params": [2e4, 5e4, 1.2e5], "tokens": [7680, 15360, 30720], "bootstrap": 20, "target_params": 3e5,
              "target_tokens": 61440, "run_target": True, "allow_bounded_fit": True}
    start = time.perf_counter()
    finished = _ladder_process(**kwargs)
    finish_s = time.perf_counter() - start
    assert finished.returncode == 0, finished.stderr[-3000:]
    weights = _weights_mtimes(out)
    records = (out / "ladder.jsonl").read_text()
    law = json.loads((out / "law.json").read_text())
    again = _ladder_process(**kwargs)
    assert again.returncode == 0, again.stderr[-3000:]
    print(f"\nladder finished in {finish_s:.1f} s after the kill:\n{finished.stdout}")
    return {"out": out, "last": last, "killed": killed_output, "prepared": prepared, "records_after_kill": records_after_kill,
            "finished": finished.stdout, "law": law, "records": records, "weights": weights, "again": again.stdout}


@slow
def test_ladder_fits_nine_real_runs_and_writes_law_for_plan(ladder):
    out, law = ladder["out"], ladder["law"]
    assert law["form"] == "E + A/N^alpha + B/D^beta" and len(law["points"]) == 9
    assert law["n_definition"] == "non-embedding parameters" and law["d_definition"] == "training tokens"
    for key in ("E", "A", "B", "alpha", "beta"):
        assert math.isfinite(law[key]) and law[key] >= 0
        lo, hi = law["ci"][key]
        assert lo <= hi
    assert len({p["N"] for p in law["points"]}) == 3 and sorted({p["D"] for p in law["points"]}) == [7680, 15360, 30720]
    assert all(4.0 < p["loss"] < 7.0 for p in law["points"])  # a 512-token vocabulary starts at ln 512 = 6.2
    records = [r for r in map(json.loads, ladder["records"].splitlines()) if r["kind"] == "rung"]
    assert sorted(r["steps"] for r in records) == [15] * 3 + [30] * 3 + [60] * 3
    # One WSD trunk per size; each budget's cooldown branched off it.
    assert len({r["trunk"] for r in records}) == 3 and len(list((out / "trunks").iterdir())) == 3
    assert load_law(out / "law.json").n_points == 9  # what `fmforge plan --law` reads
    assert (out / "ladder.png").stat().st_size > 10_000
    assert "fmforge ladder" in ladder["finished"] and "alpha" in ladder["finished"]
    # Nine tiny runs far from convergence may not pin down every constant; the user is told which.
    assert all(f"put {name}" in ladder["finished"] for name in law["at_bound"][:1])


@slow
def test_held_out_target_is_predicted_then_trained_and_its_error_recorded(ladder):
    target = ladder["law"]["target"]
    assert target["N"] > max(p["N"] for p in ladder["law"]["points"]) and target["D"] == 61440
    assert target["steps"] == 120 and target["model"]["n_layer"] >= 1
    for key in ("predicted", "actual", "error", "relative_error"):
        assert math.isfinite(target[key]), key
    assert target["error"] == pytest.approx(target["predicted"] - target["actual"])
    assert target["ci"][0] <= target["predicted"] <= target["ci"][1]
    assert (ladder["out"] / "target" / target["name"] / "model.safetensors").is_file()
    # The prediction comes before the target trains: it cannot have seen the answer.
    text = ladder["finished"]
    assert text.index("predicted val loss") < text.index("target run")
    print(f"\nheld-out target N={target['N']:,} D={target['D']:,}: predicted {target['predicted']:.4f} "
          f"{target['ci']}, actual {target['actual']:.4f}, error {target['error']:+.4f} ({target['relative_error']:+.2%})")


@slow
def test_branched_cooldown_killed_midway_resumes_exactly(ladder, tmp_path):
    out, last = ladder["out"], ladder["last"]
    name = last["name"]
    assert len(ladder["records_after_kill"]) == 8 and name not in {r["name"] for r in ladder["records_after_kill"]}
    assert "9 rungs, 8 finished, 1 to train" in ladder["finished"]
    assert f"{name}: resumed from {out / 'rungs' / name / 'checkpoints'}" in ladder["finished"]
    assert "stable phase" not in ladder["finished"]  # only the missing piece: no trunk trained again
    start = decay_start(60, 0.2)  # the trunk's stable phase ends at step 48; the cooldown is steps 49..60
    steps = [m["step"] for m in read_metrics(out / "rungs" / name) if "loss" in m]
    assert steps[0] == start + 1 and steps.count(start + 1) == 1 and steps[-1] == 60  # continued, not restarted
    lrs = {m["step"]: m["lr"] for m in read_metrics(out / "rungs" / name) if "lr" in m}
    assert lrs[start + 1] == pytest.approx(3e-3) and lrs[60] < lrs[55] < lrs[start + 1]  # decaying from the top
    # Uninterrupted: the same rung trained as one WSD run from step 0 gives the very same final loss.
    base = json.loads((out / "ladder.json").read_text())["base"]
    reference, _ = train_piece(run_config(base, last, tmp_path / "reference", schedule="wsd"), "reference", "ref")
    record = next(r for r in map(json.loads, ladder["records"].splitlines()) if r["name"] == name)
    assert record["val_loss"] == pytest.approx(reference.val_loss, abs=1e-6)
    assert record["train_loss"] == pytest.approx(reference.loss, abs=1e-6)
    print(f"\nkilled + resumed cooldown {name}: val {record['val_loss']:.6f}; one uninterrupted run: "
          f"{reference.val_loss:.6f}")


@slow
def test_cost_is_printed_up_front_with_and_without_branching(ladder):
    text = ladder["finished"]  # (the killed process's buffered output is lost with it)
    assert "cooldowns" in text and "separate runs: branching saves" in text and "still to train" in text
    assert text.index("cost:") < text.index("val loss")


@slow
def test_rerun_trains_nothing_and_refits_the_same_law(ladder):
    out = ladder["out"]
    assert "9 rungs, 9 finished, 0 to train" in ladder["again"]
    assert "target run" not in ladder["again"]
    assert (out / "ladder.jsonl").read_text() == ladder["records"]
    assert _weights_mtimes(out) == ladder["weights"] and len(ladder["weights"]) == 3 + 9 + 1  # trunks, rungs, target
    law = json.loads((out / "law.json").read_text())
    assert {k: law[k] for k in ("E", "A", "B", "alpha", "beta", "ci", "target")} == \
           {k: ladder["law"][k] for k in ("E", "A", "B", "alpha", "beta", "ci", "target")}


@slow
def test_fit_only_refits_finished_runs_without_training(ladder, prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ladder["out"], out)
    before = (out / "ladder.jsonl").read_text()
    # Run-only settings (threads, logging) may differ from the ladder's first command.
    result = run_ladder(_config(tmp_path), _overrides(prepared, **{"train.threads": 2}), data=str(prepared),
                        out=str(out), fit_only=True, bootstrap=0, target_params=3e5, target_tokens=61440,
                        allow_bounded_fit=True)
    assert result.law.n_points == 9 and result.law.ci == {}
    assert result.target["actual"] == ladder["law"]["target"]["actual"] and result.target["ci"] is None
    assert (out / "ladder.jsonl").read_text() == before


@slow
def test_target_is_not_predicted_from_a_fit_at_a_bound_unless_allowed(ladder, prepared, tmp_path):
    if not ladder["law"]["at_bound"]:
        pytest.skip("this ladder's fit pinned every constant")
    out = tmp_path / "copy"
    shutil.copytree(ladder["out"], out)
    name = ladder["law"]["at_bound"][0]
    with pytest.raises(FmforgeError, match=rf"refusing to predict from this fit: {name} = .* bound") as err:
        run_ladder(_config(tmp_path), _overrides(prepared), data=str(prepared), out=str(out), fit_only=True,
                   bootstrap=0, target_params=3e5, target_tokens=61440)
    assert "\n" not in str(err.value) and "--allow-bounded-fit" in str(err.value)
    assert "target" not in json.loads((out / "law.json").read_text())  # the law is written, the prediction not


@slow
def test_added_token_budget_trains_only_the_new_rungs(ladder, prepared, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(ladder["out"], out)
    result = run_ladder(_config(tmp_path), _overrides(prepared), data=str(prepared), out=str(out),
                        params=[2e4, 5e4, 1.2e5], tokens=[4096], bootstrap=0)
    printed = capsys.readouterr().out
    assert "3 rungs (the ladder has 12), 0 finished, 3 to train" in printed
    # Their decay start (step 7) is behind every trunk, whose checkpoint there is pruned: trained from step 0.
    assert printed.count("kept no checkpoint there; training this rung from step 0") == 3
    assert result.law.n_points == 12 and len(_records(out)) == 10 + 3


@slow
def test_ladder_in_another_mode_is_refused(ladder, prepared):
    with pytest.raises(FmforgeError, match="trained as branched WSD cooldowns"):
        run_ladder(None, _overrides(prepared), data=str(prepared), out=str(ladder["out"]), params=[2e4, 5e4],
                   tokens=[7680, 15360], branch=False)


@slow
def test_ladder_with_another_base_config_is_refused(ladder, prepared):
    with pytest.raises(FmforgeError, match=r"different base config \(optim.lr: 0.003 -> 0.001\)"):
        run_ladder(None, _overrides(prepared, **{"optim.lr": 1e-3}), data=str(prepared), out=str(ladder["out"]),
                   fit_only=True)


@slow
@pytest.mark.parametrize("args, message", [
    (["--tokens", "7680"], "empty ladder: give the model sizes"),
    (["--params", "2e4,5e4"], "empty ladder: give the training tokens"),
    (["--sizes", "nano,gigantic", "--tokens", "7680"], "unknown size 'gigantic'"),
    (["--sizes", "nano", "--params", "2e4", "--tokens", "7680"], "not both"),
    (["--sizes", "nano,micro", "--tokens", "100,7680"], "less than one global batch"),
    (["--sizes", "nano,micro", "--tokens", "7680"], "cannot be fitted"),
    (["--sizes", "nano,micro", "--tokens", "7680,15360", "--run-target"], "--run-target needs --target-params"),
    (["--fit-only"], "no ladder in"),
])
def test_bad_ladder_inputs_fail_in_one_line(prepared, tmp_path, args, message):
    r = run_cli("ladder", _config(tmp_path), *_overrides(prepared), "--data", prepared, "--out", tmp_path / "l", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "l" / "rungs").exists()


@slow
def test_missing_data_dir_fails_in_one_line(tmp_path):
    r = run_cli("ladder", _config(tmp_path), "--data", tmp_path / "nope", "--out", tmp_path / "l", *GRID)
    assert r.returncode == 2
    assert "data directory not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("steps, fraction", [(15, 0.2), (60, 0.2), (61, 0.1), (7, 0.5), (1000, 0.25), (3, 0.2)])
def test_wsd_stable_phase_is_the_constant_schedule_up_to_each_decay_start(steps, fraction):
    # Why a constant-schedule trunk can stand in for every budget's WSD run up to its decay start.
    wsd = OptimConfig(schedule="wsd", warmup_steps=3, decay_fraction=fraction, min_lr_ratio=0.1)
    const = OptimConfig(schedule="constant", warmup_steps=3)
    start = decay_start(steps, fraction)
    for step in range(start + 1):  # the step at the decay start itself still runs at the full rate
        assert lr_factor(step, wsd, steps) == lr_factor(step, const, start)
    if start + 1 < steps:
        assert lr_factor(start + 1, wsd, steps) < lr_factor(start, wsd, steps)


def test_branched_cost_is_one_trunk_plus_cooldowns_per_size():
    rungs = [{"trunk": t, "steps": s} for t in ("a", "b") for s in (10, 20, 40)]
    cost = ladder_cost(rungs, 0.2, 100, {"a": 1.0, "b": 2.0})
    # per size: separate 10 + 20 + 40 = 70 steps; branched: trunk to 32, cooldowns 2 + 4 + 8
    assert cost["separate"]["steps"] == 140 and cost["branched"]["steps"] == 2 * (32 + 14)
    assert cost["separate"]["tokens"] == 14_000 and cost["branched"]["flops"] == 46 * 100 * (1.0 + 2.0)
