"""Sharded text preparation (data prepare --engine): units, global dedup, merge, resume, failures, engines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from fmforge.data import text_units
from fmforge.data.loader import TokenWindows
from fmforge.data.prepare import prepare_data
from fmforge.data.shards import read_shard
from fmforge.data.workplan import WorkDir, plan_units
from fmforge.errors import FmforgeError
from fmforge.launch.data_prepare import prepare_command, prepare_sharded, status

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["argparse.py", "textwrap.py", "string.py", "heapq.py", "bisect.py", "shlex.py", "fractions.py",
           "statistics.py", "csv.py", "difflib.py", "functools.py", "glob.py"]
SETTINGS = {"val_fraction": 0.1, "document_bytes": 8192}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~0.5 MB of real code in 12 files, plus a copy of one file (an exact duplicate in another unit) and a
    lightly edited copy of another (a near-duplicate)."""
    d = tmp_path_factory.mktemp("sharded") / "corpus"
    d.mkdir()
    for name in MODULES:
        (d / name).write_text((STDLIB / name).read_text(encoding="utf-8"), encoding="utf-8")
    (d / "zz_heapq_copy.py").write_text((d / "heapq.py").read_text(encoding="utf-8"), encoding="utf-8")
    bisect = (d / "bisect.py").read_text(encoding="utf-8")
    (d / "zz_bisect_edited.py").write_text(bisect.replace("Bisection algorithms.", "Bisection algorithm."),
                                           encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    """The single-process reference (its tokenizer is given to the sharded runs)."""
    out = tmp_path_factory.mktemp("single") / "data"
    prepare_data([str(corpus)], out, vocab_size=512, log=None, **SETTINGS)
    return out


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*_*.bin"))}


def test_plan_units_are_consecutive_runs_of_files_bounded_by_unit_bytes_and_independent_of_workers(corpus):
    files = sorted(corpus.iterdir())
    units = plan_units(files, 60_000)
    assert [f for u in units for f in u.files] == [str(f) for f in files]  # input order, nothing lost
    assert all(u.bytes <= 60_000 or len(u.files) == 1 for u in units)
    assert [u.id for u in units] == [f"u{i:05d}" for i in range(len(units))]
    assert plan_units(files, 60_000) == units
    with pytest.raises(FmforgeError, match="unit_bytes must be a positive integer"):
        plan_units(files, 0)


def test_unit_tasks_and_merge_give_byte_identical_shards_to_the_single_process_path(corpus, single, tmp_path):
    out = tmp_path / "units"  # one worker: the units run in this process
    manifest = prepare_sharded([str(corpus)], out, engine="local", workers=1, unit_bytes=60_000,
                               tokenizer=str(single / "tokenizer.json"), log=None, **SETTINGS)
    ref = json.loads((single / "manifest.json").read_text())
    assert shard_bytes(out) == shard_bytes(single)
    assert (out / "tokenizer.json").read_bytes() == (single / "tokenizer.json").read_bytes()
    for key in ("documents", "tokens", "bytes", "dropped", "sources", "split", "near_duplicate_rate"):
        assert manifest[key] == ref[key], key
    assert manifest["engine"]["units"] == len(WorkDir(out).units()) > 3
    assert len(TokenWindows(out, "train", 64)) > 0  # training reads it as any prepared directory


def test_global_dedup_finds_duplicates_planted_in_different_units_and_records_them_by_source(corpus, single,
                                                                                             tmp_path):
    out = tmp_path / "dedup"
    manifest = prepare_sharded([str(corpus)], out, engine="local", workers=1, unit_bytes=60_000,
                               tokenizer=str(single / "tokenizer.json"), drop_near_duplicates=True, log=None,
                               **SETTINGS)
    work = WorkDir(out)
    unit_of = {Path(f).name: u.id for u in work.units() for f in u.files}
    assert unit_of["heapq.py"] != unit_of["zz_heapq_copy.py"]
    assert unit_of["bisect.py"] != unit_of["zz_bisect_edited.py"]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    exact = [r for r in removed if r["reason"] == "exact_duplicate"]
    near = [r for r in removed if r["reason"] == "near_duplicate"]
    assert any(r["source"].endswith("zz_heapq_copy.py") and r["duplicate_of"].endswith("heapq.py") for r in exact)
    assert any(r["source"].endswith("zz_bisect_edited.py") for r in near)
    assert manifest["dropped"]["near_duplicate"] == len(near) and manifest["documents"]["near_duplicates"] >= 1
    # the bulky per-unit files are gone after the merge; the unit records stay for `data status`
    assert not list(work.units_dir.glob("*/tokens.bin")) and len(list(work.units_dir.glob("*/unit.json"))) > 3


def test_tokenizer_sample_does_not_depend_on_how_the_work_is_divided(corpus, tmp_path):
    a = prepare_sharded([str(corpus)], tmp_path / "a", engine="local", workers=1, unit_bytes=60_000,
                        vocab_size=400, tokenizer_sample_bytes=200_000, log=None, **SETTINGS)
    b = prepare_sharded([str(corpus)], tmp_path / "b", engine="local", workers=1, unit_bytes=10**9,
                        vocab_size=400, tokenizer_sample_bytes=200_000, log=None, **SETTINGS)
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"] and a["tokenizer"]["trained"]
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert a["engine"]["units"] > 1 == b["engine"]["units"]


def test_a_rerun_resumes_with_new_merge_settings_but_refuses_other_unit_settings(corpus, single, tmp_path):
    out = tmp_path / "d"
    kw = {"engine": "local", "workers": 1, "unit_bytes": 60_000, "tokenizer": str(single / "tokenizer.json"),
          "val_fraction": 0.001, "document_bytes": 8192}
    with pytest.raises(FmforgeError, match="val_fraction 0.001 asks for 0.10% of the bytes"):
        prepare_sharded([str(corpus)], out, log=None, **kw)  # the merge's split check: the units stay done
    assert not WorkDir(out).pending()
    with pytest.raises(FmforgeError, match="other settings document_bytes"):
        prepare_sharded([str(corpus)], out, log=None, **{**kw, "document_bytes": 4096})
    lines: list[str] = []
    m = prepare_sharded([str(corpus)], out, log=lines.append, allow_uneven_split=True, **kw)
    assert any("units already done (not redone)" in line for line in lines)
    assert m["split"]["allow_uneven_split"] and m["documents"]["val"] >= 1
    with pytest.raises(FmforgeError, match="already holds prepared data"):
        prepare_sharded([str(corpus)], out, log=None, allow_uneven_split=True, **kw)


def test_engine_flags_without_an_engine_and_bad_values_are_one_line_errors(corpus, tmp_path):
    with pytest.raises(FmforgeError, match="need --engine"):
        prepare_command([str(corpus)], str(tmp_path / "x"), workers=2)
    with pytest.raises(FmforgeError, match="unknown engine"):
        prepare_sharded([str(corpus)], tmp_path / "x", engine="dask")
    with pytest.raises(FmforgeError, match="--workers must be at least 1"):
        prepare_sharded([str(corpus)], tmp_path / "x", engine="local", workers=0)
    with pytest.raises(FmforgeError, match="bad --slurm-option"):
        prepare_command([str(corpus)], str(tmp_path / "x"), engine="slurm", slurm_option=["partition"])
    with pytest.raises(FmforgeError, match="unknown option"):
        prepare_command([str(corpus)], str(tmp_path / "x"), engine="slurm", slurm_option=["nodes=3"])
    with pytest.raises(FmforgeError, match="--detach applies to --engine slurm"):
        prepare_sharded([str(corpus)], tmp_path / "x", engine="local", detach=True)
    assert not (tmp_path / "x").exists()


# ---- engines (spawned processes, Ray, Slurm) -------------------------------------------------------------

@pytest.mark.slow
def test_three_local_workers_and_ray_give_the_same_shards_as_one_worker(corpus, single, tmp_path):
    tok = str(single / "tokenizer.json")
    outs = {}
    sigterm = signal.getsignal(signal.SIGTERM)
    for name, engine, workers in (("w1", "local", 1), ("w3", "local", 3), ("ray", "ray", 2)):
        outs[name] = tmp_path / name
        m = prepare_sharded([str(corpus)], outs[name], engine=engine, workers=workers, unit_bytes=60_000,
                            tokenizer=tok, log=None, **SETTINGS)
        assert m["engine"]["engine"] == engine
    assert shard_bytes(outs["w1"]) == shard_bytes(outs["w3"]) == shard_bytes(outs["ray"]) == shard_bytes(single)
    assert signal.getsignal(signal.SIGTERM) is sigterm  # the Ray started for the run took its handler with it


@pytest.mark.slow
def test_a_failing_unit_is_retried_then_reported_by_name_and_a_rerun_does_only_that_unit(corpus, single, tmp_path):
    out = tmp_path / "fail"
    work = WorkDir(out)
    work.units_dir.mkdir(parents=True)
    (work.units_dir / "u00002").write_text("not a unit directory")  # the unit's commit (a rename) fails
    with pytest.raises(FmforgeError, match=r"1 of \d+ units failed after their retries \(u00002: ") as err:
        prepare_sharded([str(corpus)], out, engine="local", workers=2, unit_bytes=60_000, retries=1,
                        tokenizer=str(single / "tokenizer.json"), log=None, **SETTINGS)
    assert "run the same command again" in str(err.value)
    log = work.log_path("u00002").read_text()
    assert "attempt 1" in log and "attempt 2" in log and "attempt 3" not in log  # 1 + retries
    done = {u: (work.unit_dir(u) / "unit.json").stat().st_mtime_ns for u in (u.id for u in work.units())
            if u != "u00002"}
    assert status(str(out), log=None)["failed"].keys() == {"u00002"}
    (work.units_dir / "u00002").unlink()
    lines: list[str] = []
    prepare_sharded([str(corpus)], out, engine="local", workers=2, unit_bytes=60_000,
                    tokenizer=str(single / "tokenizer.json"), log=lines.append, **SETTINGS)
    assert {u: (work.unit_dir(u) / "unit.json").stat().st_mtime_ns for u in done} == done  # not redone
    assert shard_bytes(out) == shard_bytes(single)


@pytest.mark.slow
def test_killing_the_job_mid_way_and_rerunning_redoes_only_the_missing_units(corpus, single, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "fmforge", "data", "prepare", str(corpus), "--out", str(out), "--engine", "local",
            "--workers", "1", "--unit-bytes", "20000", "--tokenizer", str(single / "tokenizer.json"),
            "--val-fraction", "0.1", "--document-bytes", "8192"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = WorkDir(out)
    deadline = time.monotonic() + 120
    while not (work.units_dir.is_dir() and len(list(work.units_dir.glob("*/unit.json"))) >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in work.units_dir.glob("*/unit.json")}
    assert 2 <= len(done) < len(work.units())
    assert not (out / "manifest.json").exists()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(done)} of {len(work.units())} units already done" in result.stdout
    assert {u: (work.unit_dir(u) / "unit.json").stat().st_mtime_ns for u in done} == done
    assert shard_bytes(out) == shard_bytes(single)
    shown = subprocess.run([sys.executable, "-m", "fmforge", "data", "status", str(out)], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "complete" in shown.stdout


@pytest.mark.slow
def test_slurm_array_job_with_tokenizer_job_and_merge_gives_the_local_result(slurm_cluster, corpus, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    kw = {"unit_bytes": 60_000, "vocab_size": 400, "tokenizer_sample_bytes": 200_000, "log": None, **SETTINGS}
    local = prepare_sharded([str(corpus)], tmp_path / "local", engine="local", workers=2, **kw)
    lines: list[str] = []
    m = prepare_sharded([str(corpus)], tmp_path / "slurm", engine="slurm", workers=2,
                        slurm_options={"cpus_per_task": "1", "time": "00:05:00"}, **{**kw, "log": lines.append})
    assert any(line.startswith("submitted Slurm jobs: tokenizer") for line in lines)
    assert m["tokenizer"]["sha256"] == local["tokenizer"]["sha256"]  # the sample: the same on every engine
    assert shard_bytes(tmp_path / "slurm") == shard_bytes(tmp_path / "local")
    work = WorkDir(tmp_path / "slurm")
    assert list((work.path / "slurm").glob("*.out"))  # Slurm's own logs, beside the per-unit ones
    assert all(work.log_path(u.id).is_file() for u in work.units())


def test_status_reports_units_done_failed_and_left(corpus, single, tmp_path):
    out = tmp_path / "st"
    prepare_sharded([str(corpus)], out, engine="local", workers=1, unit_bytes=60_000,
                    tokenizer=str(single / "tokenizer.json"), log=None, **SETTINGS)
    lines: list[str] = []
    info = status(str(out), log=lines.append)
    assert info["complete"] and len(info["done"]) == info["units"] and not info["failed"]
    assert "units" in lines[0] and "complete" in lines[0]
    shutil.rmtree(WorkDir(out).path)
    assert status(str(out), log=None) == {"complete": True, "units": None}
    with pytest.raises(FmforgeError, match="neither prepared data nor a sharded preparation"):
        status(str(tmp_path), log=None)


def test_merge_refuses_while_units_are_missing_naming_them(corpus, single, tmp_path):
    out = tmp_path / "m"
    prepare_sharded([str(corpus)], out, engine="local", workers=1, unit_bytes=60_000,
                    tokenizer=str(single / "tokenizer.json"), log=None, **SETTINGS)
    work = WorkDir(out)
    shutil.rmtree(work.unit_dir("u00001"))
    before = read_shard(out / "train_000000.bin")
    (out / "manifest.json").unlink()
    with pytest.raises(FmforgeError, match="units are not done: u00001"):
        text_units.merge(str(out))
    assert np.array_equal(read_shard(out / "train_000000.bin"), before)  # nothing touched before the check
