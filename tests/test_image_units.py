"""Sharded image preparation (data prepare-images --engine): units, merge, resume, failures, on real digits."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from sklearn.datasets import load_digits

from fmforge import cli
from fmforge.data.builtin_images import DIGIT_CAPTIONS, DIGIT_NAMES, digits_pixels
from fmforge.data.engines import execute
from fmforge.data.image_prepare import prepare_images
from fmforge.data.image_shards import ImageShards, load_index
from fmforge.data.image_units import TASK, merge, plan_images, run_unit
from fmforge.data.verify import verify_prepared_data
from fmforge.data.workplan import UnitFailed, WorkDir
from fmforge.errors import FmforgeError
from fmforge.launch.data_images import prepare_images_command, prepare_images_sharded
from fmforge.launch.data_prepare import status

N_DIGITS = 600
TREE = {"val_fraction": 0.1, "shard_samples": 128}  # shard boundaries fall inside units, not at their ends
UNITS = 128  # records per unit: the tree is 5 units


def _digits(n: int):
    digits = load_digits()
    return list(zip(digits_pixels(digits.images[:n]), digits.target[:n]))


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """600 of scikit-learn's digits as class folders, plus records every pass drops (a truncated and an empty
    image, a non-image file, a file outside any class folder) and one image filed under two classes (its two
    samples sit in the first and the last unit)."""
    root = tmp_path_factory.mktemp("raw") / "digits"
    for i, (pixels, label) in enumerate(_digits(N_DIGITS)):
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
        (root / str(int(label)) / f"{i:04d}.png").write_bytes(_png(pixels))
    first = (root / "0" / "0000.png").read_bytes()
    (root / "3" / "truncated.png").write_bytes(first[: len(first) // 2])
    (root / "5" / "empty.png").write_bytes(b"")
    (root / "7" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(first)
    (root / "9" / "9999_also_zero.png").write_bytes(first)
    return root


@pytest.fixture(scope="module")
def single(tree, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single") / "digits"
    return out, prepare_images([str(tree)], out, log=None, **TREE)


def _tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def _same_as_single(out: Path, index: dict, ref: tuple[Path, dict]) -> None:
    """Byte-identical shards, and the same index but for its creation time and the engine entry."""
    assert _tars(out) == _tars(ref[0]) and _tars(out)
    assert {k: v for k, v in index.items() if k not in ("created", "engine")} == \
        {k: v for k, v in ref[1].items() if k != "created"}


def _units_here(out: Path, order=None) -> dict:
    """Each pending unit's task in this process (what a Slurm array task runs), then the merge."""
    for unit in order or WorkDir(out).pending():
        execute(str(out), unit, TASK)
    return merge(str(out), log=None)


def _mtimes(work: WorkDir, units) -> dict[str, int]:
    return {u: (work.unit_dir(u) / "unit.json").stat().st_mtime_ns for u in units}


def test_units_in_any_order_merge_into_the_single_process_shards_byte_for_byte(tree, single, tmp_path):
    out = tmp_path / "sharded"
    work = plan_images([str(tree)], out, unit_records=UNITS, log=None, **TREE)
    units = [u.id for u in work.units()]
    assert units == ["u00000", "u00001", "u00002", "u00003", "u00004"]
    index = _units_here(out, order=units[::-1])
    _same_as_single(out, index, single)
    assert index["dropped"] == {"empty_file": 1, "non_image_file": 1, "outside_class_folder": 1,
                                "truncated_image": 1}
    assert index["engine"]["units"] == 5 and index["engine"]["unit_records"] == UNITS
    assert len(load_index(out)["shards"]) > 5 and verify_prepared_data(out, log=None)["failed"] == 0
    shards = ImageShards(out, "train")
    assert len(shards) == index["samples"]["train"]
    # the per-unit shards are gone after the merge; unit.json stays for `data status`
    assert not list(work.units_dir.glob("*/*.tar")) and len(list(work.units_dir.glob("*/unit.json"))) == 5
    with pytest.raises(FmforgeError, match="already holds prepared images; pass --overwrite"):
        plan_images([str(tree)], out, unit_records=UNITS, log=None, **TREE)


def test_captions_of_one_image_in_several_units_share_its_split_and_the_tokenizer_matches(tmp_path):
    d = tmp_path / "captions"
    d.mkdir()
    rows = []
    for i, (pixels, label) in enumerate(_digits(240)):
        (d / f"{i:04d}.png").write_bytes(_png(pixels))
        rows.append({"image": f"{i:04d}.png", "caption": DIGIT_CAPTIONS[i % 5].format(DIGIT_NAMES[int(label)])})
    val_image = next(r["image"] for r in rows if _position(d / r["image"]) < 0.2)
    rows += [{"image": val_image, "caption": "the same image, captioned again in the last unit"},
             {"image": "gone.png", "caption": "a file that does not exist"}, {"image": "0001.png"}]
    (d / "list.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n", encoding="utf-8")
    settings = {"val_fraction": 0.2, "shard_samples": 1000, "shard_bytes": 20_000, "vocab_size": 300}
    ref = tmp_path / "single", prepare_images([str(d / "list.jsonl")], tmp_path / "single", log=None, **settings)
    out = tmp_path / "sharded"
    plan_images([str(d / "list.jsonl")], out, unit_records=50, log=None, **settings)
    index = _units_here(out)
    _same_as_single(out, index, ref)
    assert (out / "tokenizer.json").read_bytes() == (ref[0] / "tokenizer.json").read_bytes()
    assert index["dropped"] == {"missing_caption": 1, "missing_file": 1}
    val = ImageShards(out, "val")
    again = [i for i in range(len(val)) if val.target(i).startswith("the same image")]
    assert len(again) == 1 and val.raw(again[0])[0] == (d / val_image).read_bytes()


def _position(path: Path) -> float:
    return int.from_bytes(hashlib.sha256(path.read_bytes()).digest()[:8], "little") / 2**64


@pytest.mark.parametrize("empty", ["val", "train"])
def test_the_image_moved_into_an_empty_split_is_found_across_units(tmp_path, empty):
    root = tmp_path / "tree"
    for i, (pixels, label) in enumerate(_digits(6)):
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
        (root / str(int(label)) / f"{i}.png").write_bytes(_png(pixels))
    u = sorted(_position(p) for p in root.rglob("*.png"))
    # by hash alone every image would land in train (val_fraction below them all) or in val (above them all)
    settings = {"val_fraction": u[0] / 2 if empty == "val" else (u[-1] + 1) / 2, "shard_samples": 4}
    ref = tmp_path / "single", prepare_images([str(root)], tmp_path / "single", log=None, **settings)
    assert ref[1]["samples"][empty] == 1
    plan_images([str(root)], tmp_path / "sharded", unit_records=2, log=None, **settings)
    _same_as_single(tmp_path / "sharded", _units_here(tmp_path / "sharded"), ref)


def test_a_unit_whose_records_changed_fails_by_name_and_a_rerun_redoes_only_it(tree, single, tmp_path):
    out = tmp_path / "fail"
    work = plan_images([str(tree)], out, unit_records=UNITS, log=None, **TREE)
    records = work.path / "units" / "u00001.records.jsonl"
    records.write_bytes(b"".join(records.read_bytes().splitlines(keepends=True)[1:]))  # edited behind our back
    for unit in ("u00000", "u00002", "u00003", "u00004"):
        execute(str(out), unit, TASK)
    with pytest.raises(UnitFailed, match=r"^u00001: .*u00001\.records\.jsonl changed since it was planned"):
        execute(str(out), "u00001", TASK)
    assert "Traceback" in work.log_path("u00001").read_text() and work.failures().keys() == {"u00001"}
    with pytest.raises(FmforgeError, match=r"1 of 5 units are not done: u00001 \(.*u00001\.records\.jsonl changed since"):
        merge(str(out), log=None)
    assert not (out / "index.json").exists()
    done = _mtimes(work, ["u00000", "u00002", "u00003", "u00004"])
    lines: list[str] = []
    work = plan_images([str(tree)], out, unit_records=UNITS, log=lines.append, **{**TREE, "shard_samples": 1000})
    assert any("4 of 5 units already done (not redone)" in line for line in lines)
    assert work.pending() == ["u00001"]
    with pytest.raises(FmforgeError, match="other settings val_fraction"):
        plan_images([str(tree)], out, unit_records=UNITS, log=None, **{**TREE, "val_fraction": 0.2})
    assert run_unit(str(out), "u00001")["unit"] == "u00001"
    plan_images([str(tree)], out, unit_records=UNITS, log=None, **TREE)  # the merge's shard size may change
    index = merge(str(out), log=None)
    assert _mtimes(work, done) == done
    _same_as_single(out, index, single)


def test_engine_flags_and_bad_values_are_one_line_errors(tree, tmp_path):
    x = str(tmp_path / "x")
    with pytest.raises(FmforgeError, match="need --engine"):
        prepare_images_command([str(tree)], x, detach=True)
    with pytest.raises(FmforgeError, match="unknown engine"):
        prepare_images_sharded([str(tree)], x, engine="dask")
    with pytest.raises(FmforgeError, match="--workers must be at least 1"):
        prepare_images_sharded([str(tree)], x, engine="local", workers=0)
    with pytest.raises(FmforgeError, match="--unit-records must be a positive integer"):
        prepare_images_sharded([str(tree)], x, engine="local", unit_records=0)
    with pytest.raises(FmforgeError, match="bad --slurm-option"):
        prepare_images_command([str(tree)], x, engine="slurm", slurm_option=["partition"])
    with pytest.raises(FmforgeError, match="--detach applies to --engine slurm"):
        prepare_images_sharded([str(tree)], x, engine="local", detach=True)
    with pytest.raises(FmforgeError, match="neither a class-folder tree nor a .csv/.jsonl image list"):
        prepare_images_sharded([str(tree / "0" / "0000.png")], x, engine="local")
    assert not (tmp_path / "x").exists()


# ---- the local engine (spawned worker processes), from the function and from the command line ----------------------------------------------

@pytest.mark.slow
def test_one_and_three_local_workers_give_the_single_process_shards(tree, single, tmp_path):
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        index = prepare_images_sharded([str(tree)], out, engine="local", workers=workers, unit_records=UNITS,
                                       log=None, **TREE)
        assert index["engine"]["engine"] == "local" and index["engine"]["units"] == 5
        _same_as_single(out, index, single)


@pytest.mark.slow
def test_a_slurm_array_job_gives_the_single_process_shards_and_status_says_complete(slurm_cluster, tree, single,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    out = tmp_path / "slurm"
    index = prepare_images_sharded([str(tree)], out, engine="slurm", workers=2, unit_records=UNITS, log=None,
                                   slurm_options={"cpus_per_task": "1", "time": "00:05:00"}, **TREE)
    assert index["engine"]["units"] == 5
    _same_as_single(out, index, single)
    info = status(str(out), log=None)
    assert info["complete"] and len(info["done"]) == 5 and info["engine"] == "slurm"


@pytest.mark.slow
def test_the_command_resumes_after_a_unit_finished_without_redoing_it(tree, single, tmp_path, capsys):
    out = tmp_path / "resumed"
    plan_images([str(tree)], out, unit_records=UNITS, log=None, **TREE)
    run_unit(str(out), "u00002")  # as if a killed run had finished this one
    work = WorkDir(out)
    before = (work.unit_dir("u00002").stat().st_ino, _mtimes(work, ["u00002"]))
    cli.main(["data", "prepare-images", str(tree), "--out", str(out), "--engine", "local", "--workers", "2",
              "--unit-records", str(UNITS), "--val-fraction", str(TREE["val_fraction"]), "--shard-samples",
              str(TREE["shard_samples"])])
    shown = capsys.readouterr().out
    assert "1 of 5 units already done (not redone)" in shown and "5 units (" in shown
    assert (work.unit_dir("u00002").stat().st_ino, _mtimes(work, ["u00002"])) == before
    _same_as_single(out, load_index(out), single)
