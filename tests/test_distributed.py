"""Multi-process training on CPU (gloo, 2 processes): the same global batch gives the same losses whatever
the world size or data-parallel mode, checkpoints move between world sizes, and failures are survived."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_metrics, tiny_overrides
from safetensors.torch import load_file

import fmforge.objectives.clm as clm
import fmforge.train.loop as loop
from fmforge.config import build_config
from fmforge.errors import FmforgeError
from fmforge.train.distributed import DistInfo, preflight

STEPS = {"train.max_steps": 20, "checkpoint.interval": 10, "train.eval_interval": 0}


def _cmd(prepared, out, nproc, *extra_args, **overrides):
    cfg = out.parent / "empty.yaml"
    cfg.write_text("{}\n")
    return [sys.executable, "-m", "fmforge", "train", str(cfg), *tiny_overrides(prepared, out, **{**STEPS, **overrides}),
            "--nproc-per-node", str(nproc), *extra_args]


def _run(prepared, out, nproc, *extra_args, **overrides):
    proc = subprocess.run(_cmd(prepared, out, nproc, *extra_args, **overrides), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run_dir):
    return np.array([m["loss"] for m in read_metrics(run_dir) if "loss" in m])


@pytest.fixture(scope="module")
def single(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "single"
    _run(prepared, out, 1)
    return out


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process_loss_for_loss(prepared, single, tmp_path, dp):
    out = tmp_path / dp
    proc = _run(prepared, out, 2, **{"parallel.dp": dp})
    assert f"{dp} x 2" in proc.stdout
    np.testing.assert_allclose(_losses(out), _losses(single), rtol=1e-5)


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_in_one_and_back(prepared, single, tmp_path):
    two = tmp_path / "fsdp2"
    _run(prepared, two, 2, **{"parallel.dp": "fsdp"})
    # 2 (FSDP) -> 1: continue from step 10 of the two-process run in one process.
    down = tmp_path / "down"
    proc = _run(prepared, down, 1, "--resume", str(two / "checkpoints" / "step_0000010"))
    assert "saved by 2 process(es), now 1" in proc.stdout
    np.testing.assert_allclose(_losses(down), _losses(single)[10:], rtol=1e-5)
    # 1 -> 2 (DDP): continue from step 10 of the one-process run in two.
    up = tmp_path / "up"
    proc = _run(prepared, up, 2, "--resume", str(single / "checkpoints" / "step_0000010"), **{"parallel.dp": "ddp"})
    assert "saved by 1 process(es), now 2" in proc.stdout
    np.testing.assert_allclose(_losses(up), _losses(single)[10:], rtol=1e-5)


def _grad_norms(run_dir):
    return np.array([m["grad_norm"] for m in read_metrics(run_dir) if "grad_norm" in m])


@pytest.mark.slow
def test_tensor_parallel_two_ranks_matches_one_process_forward_and_backward_and_resumes_in_one(
        prepared, single, tmp_path):
    tp = tmp_path / "tp2"
    proc = _run(prepared, tp, 2, **{"parallel.tp": 2})
    assert "tp 2" in proc.stdout
    np.testing.assert_allclose(_losses(tp), _losses(single), rtol=1e-5)  # forward
    np.testing.assert_allclose(_grad_norms(tp), _grad_norms(single), rtol=1e-4)  # backward
    # The DCP checkpoint of a tensor-parallel run reshards into one process.
    down = tmp_path / "down"
    _run(prepared, down, 1, "--resume", str(tp / "checkpoints" / "step_0000010"))
    np.testing.assert_allclose(_losses(down), _losses(single)[10:], rtol=1e-5)
    # ... and consolidates into the same safetensors the run wrote at its end.
    export = subprocess.run([sys.executable, "-m", "fmforge", "export", "safetensors",
                             str(tp / "checkpoints" / "step_0000020"), "--out", str(tmp_path / "export")],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    exported, final = load_file(tmp_path / "export" / "model.safetensors"), load_file(tp / "model.safetensors")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert (tmp_path / "export" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_tensor_parallel_gpt2_with_biases_and_tied_head_matches_one_process(prepared, tmp_path):
    gpt2 = {"model.arch": "gpt2", "model.n_kv_head": 4, "train.max_steps": 6}
    _run(prepared, tmp_path / "one", 1, **gpt2)
    _run(prepared, tmp_path / "tp2", 2, **gpt2, **{"parallel.tp": 2})
    np.testing.assert_allclose(_losses(tmp_path / "tp2"), _losses(tmp_path / "one"), rtol=1e-5)
    np.testing.assert_allclose(_grad_norms(tmp_path / "tp2"), _grad_norms(tmp_path / "one"), rtol=1e-4)


@pytest.mark.parametrize("layout", [{"parallel.dp": "fsdp", "parallel.tp": 2},
                                    {"parallel.dp": "hsdp", "parallel.dp_shard": 2}], ids=["fsdp2xtp2", "hsdp2x2"])
@pytest.mark.slow
def test_four_ranks_in_two_dimensions_match_one_process(prepared, single, tmp_path, layout):
    out = tmp_path / "four"
    # 8 sequences per step over 4 (hsdp) or 2 (fsdp x tp) data-parallel ranks: micro-batches of 2.
    _run(prepared, out, 4, **layout, **{"train.micro_batch_size": 2})
    np.testing.assert_allclose(_losses(out), _losses(single), rtol=1e-5)
    np.testing.assert_allclose(_grad_norms(out), _grad_norms(single), rtol=1e-4)


def test_a_tensor_parallel_degree_that_does_not_fit_is_refused_in_one_line(prepared, tmp_path):
    with pytest.raises(FmforgeError, match=r"parallel.tp \(2\) must divide the number of processes \(1\)"):
        loop.train(build_config({}, tiny_overrides(prepared, tmp_path / "run", **{"parallel.tp": 2})))


def test_out_of_memory_halves_the_micro_batch_and_the_run_matches_one_started_that_way(prepared, tmp_path,
                                                                                       monkeypatch):
    small = tmp_path / "small"
    loop.train(build_config({}, tiny_overrides(prepared, small, **{**STEPS, "train.micro_batch_size": 2})),
               echo=lambda *_: None)
    real = clm.clm_loss

    def oom_above_two(logits, targets):
        if logits.size(0) > 2:
            raise torch.OutOfMemoryError("injected")
        return real(logits, targets)

    monkeypatch.setattr(clm, "clm_loss", oom_above_two)
    messages, out = [], tmp_path / "big"
    loop.train(build_config({}, tiny_overrides(prepared, out, **STEPS)), echo=messages.append)  # micro-batch 4
    assert any("out of device memory at step 1: micro-batch 4 -> 2, accumulation 2 -> 4" in m for m in messages)
    np.testing.assert_array_equal(_losses(out), _losses(small))
    assert read_metrics(out)[0]["micro_batch_size"] == 2
    # A resumed run starts at the size that fitted instead of running out of memory again.
    messages.clear()
    loop.train(build_config({}, tiny_overrides(prepared, out, **{**STEPS, "train.max_steps": 22})),
               resume="auto", echo=messages.append)
    assert any("train.micro_batch_size 4 -> 2" in m for m in messages), messages
    assert not any("out of device memory" in m for m in messages)


@pytest.mark.slow
def test_out_of_memory_on_two_ranks_restarts_the_job_with_half_the_micro_batch(prepared, single, tmp_path):
    env = {**os.environ, "FMFORGE_TEST_OOM_ABOVE": "2",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "data" / "inject_oom"),
                                          os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "oom"
    proc = subprocess.run(_cmd(prepared, out, 2, "--max-restarts", "1", **{"parallel.dp": "ddp"}),
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "out of device memory at step 1 with micro-batch 4; the run restarts with 2" in proc.stderr + proc.stdout
    assert "train.micro_batch_size 4 -> 2" in proc.stdout
    np.testing.assert_allclose(_losses(out), _losses(single), rtol=1e-5)


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_run_ends_where_an_unfaulted_one_does(prepared, single, tmp_path):
    out = tmp_path / "faulty"
    log = open(tmp_path / "faulty.log", "w")  # a file, not a pipe: nobody reads a pipe while we wait
    proc = subprocess.Popen(_cmd(prepared, out, 2, "--max-restarts", "1", **{"parallel.dp": "ddp"}),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_0000010").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
            time.sleep(0.01)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, (tmp_path / "faulty.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "faulty.log").read_text()
    assert "resumed from" in output
    assert read_metrics(out)[-1]["step"] == 20
    np.testing.assert_allclose(_losses(out), _losses(single), rtol=1e-5)


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


def _workers(cli_pid: int) -> list[int]:
    """`fmforge train --nproc-per-node` becomes torchrun (exec); the workers are its children."""
    return _children(cli_pid)


def test_non_finite_loss_skips_the_update_and_the_run_goes_on(prepared, tmp_path, monkeypatch):
    real, calls = clm.clm_loss, []

    def poisoned(logits, targets):
        calls.append(1)
        loss = real(logits, targets)
        return loss * float("nan") if len(calls) == 5 else loss  # step 3's first micro-batch

    monkeypatch.setattr(clm, "clm_loss", poisoned)
    messages = []
    result = loop.train(build_config({}, tiny_overrides(prepared, tmp_path / "run", **{"train.max_steps": 8})),
                        echo=messages.append)
    assert result.step == 8 and np.isfinite(result.loss)
    assert any("step 3: non-finite" in m for m in messages), messages
    logged = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m.get("skipped_steps", 0) for m in logged] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(np.isfinite(m["grad_norm"]) for i, m in enumerate(logged) if i != 2)


def test_activation_checkpointing_changes_memory_not_results(prepared, tmp_path):
    runs = {}
    for ac in ("none", "full", "selective"):
        loop.train(build_config({}, tiny_overrides(prepared, tmp_path / ac, **{"train.max_steps": 4,
                                                                              "parallel.ac": ac})), echo=lambda *_: None)
        runs[ac] = _losses(tmp_path / ac)
    np.testing.assert_allclose(runs["full"], runs["none"], rtol=1e-6)
    np.testing.assert_allclose(runs["selective"], runs["none"], rtol=1e-6)


def test_preflight_names_the_rank_and_the_failed_check(tmp_path):
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    preflight(info, tmp_path / "ok", checkpoint_bytes=1)
    with pytest.raises(FmforgeError, match=r"preflight failed: rank 0: .* GB free .* a checkpoint needs"):
        preflight(info, tmp_path / "ok", checkpoint_bytes=10**18)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FmforgeError, match="rank 0: output .* is not writable"):
        preflight(info, blocker / "run", checkpoint_bytes=1)
    shutil.rmtree(tmp_path / "ok")


def test_a_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_the_offending_batches(prepared, tmp_path,
                                                                                       monkeypatch):
    real, calls = clm.clm_loss, []

    def spiky(logits, targets):
        calls.append(1)
        return real(logits, targets) * (30.0 if len(calls) == 49 else 1.0)  # step 25 (2 micro-batches a step)

    monkeypatch.setattr(clm, "clm_loss", spiky)
    messages = []
    out = tmp_path / "run"
    result = loop.train(build_config({}, tiny_overrides(prepared, out, **{
        "train.max_steps": 40, "checkpoint.interval": 10, "train.spike_threshold": 6, "train.spike_warmup": 10})),
        echo=messages.append)
    assert result.step == 40
    assert any("loss spike at step 25" in m and "rolling back to step 20" in m for m in messages), messages
    logged = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, 41))  # the abandoned steps 21-24 were replaced
    assert logged[-1]["rollbacks"] == 1 and max(m["loss"] for m in logged[20:]) < 10
    state = torch.load(out / "checkpoints" / "step_0000040" / "train_state.pt", weights_only=True)
    assert state["loader"]["cursor"] == (40 + 5) * 8  # batches 21..25 were skipped, not replayed
