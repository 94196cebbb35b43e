"""Trainer behaviour: learning, exact resume after SIGKILL, preemption, corrupt checkpoints, loader order."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_cli, tiny_overrides
from safetensors.torch import load_file

from fmforge.config import build_config
from fmforge.data.loader import GlobalBatchLoader, Prefetcher, TokenWindows
from fmforge.errors import FmforgeError
from fmforge.eval.perplexity import unigram_baseline
from fmforge.train.loop import train


def _train(prepared, out, resume=None, **extra):
    messages = []
    result = train(build_config({}, tiny_overrides(prepared, out, **extra)), resume=resume, echo=messages.append)
    return result, messages


def _empty_config(out):
    path = out.parent / "empty.yaml"
    path.write_text("{}\n")
    return path


def _start_cli_run(prepared, out, **extra):
    args = [sys.executable, "-m", "fmforge", "train", _empty_config(out), *tiny_overrides(prepared, out, **extra)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "training ended before the event the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    result, _ = _train(prepared, out, **{"train.max_steps": 60})
    return out, result


def test_loader_order_is_a_function_of_seed_and_epoch_only(prepared):
    windows = TokenWindows(prepared, "train", 64)
    a = GlobalBatchLoader(windows, 8, 4, seed=1)
    b = GlobalBatchLoader(windows, 8, 4, seed=1)
    c = GlobalBatchLoader(windows, 8, 4, seed=2)
    seq_a = [a.next_global_batch_indices() for _ in range(len(windows) // 8 + 3)]  # crosses an epoch
    seq_b = [b.next_global_batch_indices() for _ in range(len(seq_a))]
    assert all(np.array_equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not np.array_equal(seq_a[0], c.next_global_batch_indices())
    assert a.state.epoch == 1


def test_ranks_take_slices_of_the_same_global_batch(prepared):
    windows = TokenWindows(prepared, "train", 64)
    whole = GlobalBatchLoader(windows, 8, 2, seed=0).next_step()
    ranks = [GlobalBatchLoader(windows, 8, 2, seed=0, rank=r, world_size=2).next_step() for r in range(2)]
    joined = torch.cat([x for rank in ranks for x, _ in rank])
    assert torch.equal(joined, torch.cat([x for x, _ in whole]))


def test_loader_resumes_from_its_state(prepared):
    windows = TokenWindows(prepared, "train", 64)
    a = GlobalBatchLoader(windows, 8, 4, seed=3)
    for _ in range(5):
        a.next_step()
    b = GlobalBatchLoader(windows, 8, 4, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a.next_step(), b.next_step()))


def test_prefetching_reads_ahead_but_hands_out_and_checkpoints_the_same_order(prepared):
    windows = TokenWindows(prepared, "train", 64)
    inline = GlobalBatchLoader(windows, 8, 4, seed=5)
    expected = [inline.next_step() for _ in range(6)]
    ahead = Prefetcher(GlobalBatchLoader(windows, 8, 4, seed=5), depth=3)
    for i in range(3):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(ahead.next_step(), expected[i]))
    # Read-ahead steps are not in the state: a checkpoint taken now resumes at step 4.
    state = ahead.state_dict()
    assert state["cursor"] == 3 * 8
    ahead.close()
    resumed = Prefetcher(GlobalBatchLoader(windows, 8, 4, seed=5), depth=2)
    resumed.load_state_dict(state)
    for i in range(3, 6):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed.next_step(), expected[i]))
    resumed.set_micro_batch(2)  # same rows, split finer
    resumed.load_state_dict(state)
    rows = torch.cat([x for x, _ in resumed.next_step()])
    assert torch.equal(rows, torch.cat([x for x, _ in expected[3]]))
    resumed.close()


def test_a_failing_read_ahead_surfaces_in_the_training_process(prepared):
    windows = TokenWindows(prepared, "train", 64)
    loader = Prefetcher(GlobalBatchLoader(windows, 8, 4, seed=5), depth=2)

    def unreadable(indices):
        raise OSError("shard unreadable")

    windows.batch = unreadable
    with pytest.raises(OSError, match="shard unreadable"):
        loader.next_step()
    loader.close()


@pytest.mark.slow
def test_training_on_real_text_falls_below_the_unigram_baseline(prepared, tmp_path):
    result, _ = _train(prepared, tmp_path / "run", **{"model.size": "micro", "train.max_steps": 150,
                                                         "train.global_batch": 2048,
                                                         "train.micro_batch_size": 16,
                                                         "train.eval_interval": 0, "train.eval_batches": 8,
                                                         "checkpoint.interval": 0, "train.log_interval": 25})
    baseline = unigram_baseline(prepared)
    # ~300k tokens of training on a 0.9M-parameter model; measured 0.74 of the baseline.
    assert result.val_loss < 0.8 * baseline, (result.val_loss, baseline)
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] - 1.0
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb"):
        assert key in metrics[0]
    for name in ("config.yaml", "model.safetensors", "model.json", "tokenizer.json"):
        assert (tmp_path / "run" / name).is_file()


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(prepared, tmp_path, uninterrupted):
    full_dir, _ = uninterrupted
    out = tmp_path / "killed"
    proc = _start_cli_run(prepared, out, **{"train.max_steps": 60})
    _wait_for(lambda: (out / "checkpoints" / "step_0000030").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = run_cli("train", _empty_config(out), *tiny_overrides(prepared, out, **{"train.max_steps": 60}),
                      "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    # Bitwise: same data order, RNG and optimizer state, and deterministic CPU kernels.
    assert [m["loss"] for m in read_metrics(out) if "loss" in m] == \
           [m["loss"] for m in read_metrics(full_dir) if "loss" in m]
    a, b = load_file(out / "model.safetensors"), load_file(full_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_cleanly_and_resume_continues(prepared, tmp_path, uninterrupted):
    full_dir, _ = uninterrupted
    out = tmp_path / "preempted"
    proc = _start_cli_run(prepared, out, **{"train.max_steps": 60, "checkpoint.interval": 0})
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 12, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "SIGTERM: checkpoint written" in output
    saved = list((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and 12 <= int(saved[0].name[5:]) < 60
    assert not (out / "model.safetensors").exists()
    resumed = run_cli("train", _empty_config(out), *tiny_overrides(prepared, out, **{"train.max_steps": 60,
                                                                           "checkpoint.interval": 0}),
                      "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [m["loss"] for m in read_metrics(out) if "loss" in m] == \
           [m["loss"] for m in read_metrics(full_dir) if "loss" in m]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(prepared, tmp_path):
    out = tmp_path / "run"
    _train(prepared, out, **{"train.max_steps": 20})
    newest = out / "checkpoints" / "step_0000020" / "__0_0.distcp"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    result, messages = _train(prepared, out, resume="auto", **{"train.max_steps": 30})
    assert any("step_0000020" in m and "checksum" in m for m in messages), messages
    assert any("resumed from" in m and "step_0000010" in m for m in messages), messages
    assert result.step == 30
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, 31))  # lines the abandoned checkpoint's future had logged are replaced


def test_existing_run_is_not_overwritten_without_resume(prepared, tmp_path):
    out = tmp_path / "run"
    _train(prepared, out, **{"train.max_steps": 10})
    with pytest.raises(FmforgeError, match="already holds a run"):
        _train(prepared, out, **{"train.max_steps": 10})


def test_checkpoints_keep_only_the_last_k_and_point_to_the_latest(prepared, tmp_path):
    out = tmp_path / "run"
    _train(prepared, out, **{"train.max_steps": 50, "checkpoint.interval": 10, "checkpoint.keep_last": 2})
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert names == ["step_0000040", "step_0000050"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000050"
    meta = json.loads((out / "checkpoints" / "step_0000050" / "meta.json").read_text())
    assert meta["step"] == 50 and meta["world_size"] == 1
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "rng_0.pt", "train_state.pt"}


def test_gradient_accumulation_matches_one_big_micro_batch(prepared, tmp_path):
    a, _ = _train(prepared, tmp_path / "a", **{"train.max_steps": 3, "train.micro_batch_size": 8})
    b, _ = _train(prepared, tmp_path / "b", **{"train.max_steps": 3, "train.micro_batch_size": 2})
    la = [m["loss"] for m in read_metrics(tmp_path / "a") if "loss" in m]
    lb = [m["loss"] for m in read_metrics(tmp_path / "b") if "loss" in m]
    assert np.allclose(la, lb, rtol=1e-5)


def test_global_batch_that_does_not_divide_is_a_clear_error(prepared, tmp_path):
    with pytest.raises(FmforgeError, match="multiple of"):
        _train(prepared, tmp_path / "r", **{"train.global_batch": 500})
    with pytest.raises(FmforgeError, match="micro_batch_size"):
        _train(prepared, tmp_path / "r", **{"train.micro_batch_size": 3})


def test_resuming_from_an_older_checkpoint_sets_the_abandoned_future_aside(prepared, tmp_path):
    out = tmp_path / "run"
    _train(prepared, out, **{"train.max_steps": 30})
    ckpts = out / "checkpoints"
    result, messages = _train(prepared, out, resume=str(ckpts / "step_0000010"),
                              **{"train.max_steps": 25, "checkpoint.interval": 5, "checkpoint.keep_last": 2})
    assert result.step == 25 and any("moved 2 newer checkpoint(s)" in m for m in messages)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000020", "step_0000025"]
    assert (ckpts / "latest").read_text().strip() == "step_0000025"
    aside = next(ckpts.glob("abandoned_after_step_0000010_*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000020", "step_0000030"]  # kept, not deleted


def test_a_checkpoint_half_written_by_a_killed_process_is_ignored_and_cleaned(prepared, tmp_path):
    out = tmp_path / "run"
    _train(prepared, out, **{"train.max_steps": 10})
    stale = out / "checkpoints" / ".tmp_step_0000015"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    result, _ = _train(prepared, out, resume="auto", **{"train.max_steps": 20})
    assert result.step == 20 and not stale.exists()


@pytest.mark.slow
def test_run_dir_paths_are_taken_literally(prepared, tmp_path):
    out = tmp_path / "run #2"
    proc = run_cli("train", _empty_config(out), *tiny_overrides(prepared, tmp_path / "ignored",
                                                                 **{"train.max_steps": 2}), "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()
