"""Sharded image preparation (``data prepare-images --engine``, ``launch/data_images.py``): the plan, one work
unit, and the merge. Unit and merge run wherever the engine puts them (processes, Ray tasks, Slurm jobs:
``python -m fmforge.launch.data_worker``), each given only the output directory and a unit name.

Plan (this process, ``plan_images``): read the inputs exactly as ``prepare-images`` does (class trees or
lists; the class index needs every label) and cut the records, in input order, into units of
``unit_records``; a unit's records are written to ``units/UNIT.records.jsonl`` in the work directory, and the
plan names each file with its sha256, so ``plan.json`` stays small however many images there are.

Unit (``run_unit``, one task per unit): pass 1 and pass 2 of ``prepare-images`` on the unit's records (read,
hash, decode-check with the same checks; re-read and write the kept ones), into the unit's own
``train_000000.tar`` / ``val_000000.tar`` (the split is a function of the image's sha256, so it does not
depend on the division), one sha256 per written sample beside them (``train.sha256``), its counts in
``unit.json``. Images are not deduplicated, as in ``prepare-images``: one image with several captions gives
several samples, all in the split of its hash.

Merge (``merge``, one task): the one split decision that needs every image (``image_prepare.moved_image``:
train never empty, val not empty when asked for), then the units' samples copied in unit order into the
final shards with the single-process keys and shard boundaries, and one ``index.json`` (plus an ``engine``
entry). The shards are byte-for-byte those of ``prepare-images`` whatever the engine or number of workers.
The copy reads and writes every stored image once, without decoding; the per-unit tars are deleted after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

from fmforge.data.engines import ENGINES, cpu_count
from fmforge.data.image_inputs import EXAMPLES_PER_REASON, Drops, Record
from fmforge.data.image_prepare import (
    OTHER_SPLIT,
    OUR_OUTPUTS,
    Gathered,
    TarShardWriter,
    build_index,
    check_some_train,
    clear_outputs,
    encoded_image,
    gather_inputs,
    input_mode,
    moved_image,
    nothing_usable,
    save_caption_tokenizer,
    split_of,
    target_bytes,
    validate_inputs,
    verify_all,
)
from fmforge.data.image_shards import INDEX
from fmforge.data.limits import MAX_PIXELS, MAX_RECORD_LINE_BYTES, check_limit
from fmforge.data.manifest import check_output_dir, write_json_atomic
from fmforge.data.tokenizer import load_tokenizer
from fmforge.data.workplan import DONE, PLAN_FORMAT, PLAN_VERSION, WorkDir, unit_name
from fmforge.errors import FmforgeError, clip
from fmforge.io.fs import sha256_file
from fmforge.io.paths import UnsafePath, confined

TASK = "fmforge.data.image_units:run_unit"
MERGE = "fmforge.data.image_units:merge"
DEFAULT_UNIT_RECORDS = 50_000
RECORDS = ".records.jsonl"
UNIT_SAMPLES = 1 << 62  # a unit writes one tar per split: the merge cuts the final shards
SPLITS = ("train", "val")
# Settings the merge alone uses: a rerun may change them without redoing any unit.
MERGE_SETTINGS = ("shard_samples", "shard_bytes", "tokenizer", "vocab_size")
CAPTIONS = "train_captions.jsonl"  # the merge's list of train captions, for the caption tokenizer


def plan_images(inputs: list[str], out: str | Path, *, engine: str = "local", unit_records: int = DEFAULT_UNIT_RECORDS,
                image_field: str = "image", caption_field: str = "caption", label_field: str | None = None,
                classes: list[str] | None = None, val_fraction: float = 0.05, shard_samples: int = 1000,
                shard_bytes: int | None = None, overwrite: bool = False, tokenizer: str | None = None,
                vocab_size: int = 4096, max_pixels: int = MAX_PIXELS, max_line_bytes: int = MAX_RECORD_LINE_BYTES,
                log: Callable[[str], None] | None = print) -> WorkDir:
    """Create (or resume) the work plan of a sharded image preparation: the inputs read as
    ``prepare_images`` reads them (same arguments), cut into units of ``unit_records`` consecutive records,
    each unit's records in its own file. A plan of other inputs or unit settings is refused unless
    ``overwrite``; the merge's settings (shard size, tokenizer) may change on a rerun."""
    say = log or (lambda _msg: None)
    if engine not in ENGINES:
        raise FmforgeError(f"unknown engine {clip(engine)}; choose one of {', '.join(ENGINES)}")
    if isinstance(unit_records, bool) or not isinstance(unit_records, int) or unit_records < 1:
        raise FmforgeError(f"--unit-records must be a positive integer, got {unit_records!r}")
    paths, out = [Path(i) for i in inputs], Path(out)
    check_limit(max_pixels, "max_pixels")
    check_limit(max_line_bytes, "max_line_bytes")
    validate_inputs(paths, val_fraction, shard_samples, shard_bytes)
    work = WorkDir(out)
    if overwrite:
        work.remove()
    if work.exists():
        if (out / INDEX).exists():
            raise FmforgeError(f"{out} already holds prepared images; pass --overwrite to replace it")
    else:
        check_output_dir(out, INDEX, OUR_OUTPUTS, "prepared images", overwrite)
        if overwrite and out.is_dir():
            clear_outputs(out)
    mode = input_mode(paths, label_field, tokenizer, classes)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None  # a bad path fails before any work
    g = gather_inputs(paths, mode, image_field, caption_field, label_field, classes, max_line_bytes)
    if not g.records:
        raise nothing_usable(g.read, g.drops)
    settings = {"mode": mode, "fields": g.fields, "classes": list(g.class_index) if mode == "classification" else None,
                "val_fraction": val_fraction, "max_pixels": max_pixels, "max_line_bytes": max_line_bytes,
                "unit_records": unit_records, "shard_samples": shard_samples, "shard_bytes": shard_bytes,
                "tokenizer": None if tokenizer is None else str(tokenizer), "vocab_size": vocab_size}
    slices = [g.records[i: i + unit_records] for i in range(0, len(g.records), unit_records)]
    units = []
    for i, chunk in enumerate(slices):
        data = _records_bytes(chunk)
        units.append({"id": unit_name(i), "files": [f"units/{unit_name(i)}{RECORDS}"], "bytes": len(data),
                      "records": len(chunk), "sha256": hashlib.sha256(data).hexdigest()})
    plan = {"format": PLAN_FORMAT, "format_version": PLAN_VERSION, "kind": "images", "engine": engine,
            "inputs": [str(i) for i in inputs], "settings": settings, "sources": g.sources,
            "dropped": dict(g.drops.counts), "dropped_examples": g.drops.examples, "units": units,
            "task": TASK, "merge": MERGE, "result": INDEX, "tokenizer_task": None}
    _start_or_resume(work, plan, say)
    for entry, chunk in zip(units, slices):  # after the plan: a run killed in between is resumed and fixed here
        path = work.path / entry["files"][0]
        if not (path.is_file() and sha256_file(path) == entry["sha256"]):
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            tmp.write_bytes(_records_bytes(chunk))
            os.replace(tmp, path)
    if tok is not None:
        tok.save(work.tokenizer_path)
    say(f"{len(g.records)} images in {len(units)} units of up to {unit_records:,} records"
        + (f" (dropped before any image was read: {sum(g.drops.counts.values())})" if g.drops.counts else ""))
    return work


def _records_bytes(records: list[Record]) -> bytes:
    # absolute paths: a unit may run in another working directory (a Ray worker); ASCII JSON keeps any
    # undecodable file name (surrogate escapes) intact
    return b"".join(json.dumps([os.path.abspath(r.path), r.source, r.target]).encode("ascii") + b"\n"
                    for r in records)


def _start_or_resume(work: WorkDir, plan: dict, say: Callable[[str], None]) -> None:
    if not work.exists():
        work.create(plan)
        return
    old = work.plan()
    if old.get("kind") != plan["kind"]:
        raise FmforgeError(f"{work.out} holds an unfinished {old.get('kind')} preparation, not images; pass "
                           "--overwrite to start over")
    same = {k: v for k, v in plan["settings"].items() if k not in MERGE_SETTINGS}
    before = {k: v for k, v in old["settings"].items() if k not in MERGE_SETTINGS}
    if (old["units"], before) != (plan["units"], same):
        changed = sorted(k for k in set(same) | set(before) if same.get(k) != before.get(k))
        what = f"settings {', '.join(changed)}" if changed else "inputs"
        raise FmforgeError(f"{work.out} holds an unfinished preparation of other {what}; run the same command to "
                           "resume it, or pass --overwrite to start over")
    done = len(old["units"]) - len(work.pending())
    say(f"resuming {work.out}: {done} of {len(old['units'])} units already done (not redone)")
    work.create({**old, "settings": {**old["settings"], **{k: plan["settings"][k] for k in MERGE_SETTINGS}},
                 "engine": plan["engine"]})


# --- one unit ------------------------------------------------------------------------------------------

def run_unit(out: str, unit_id: str) -> dict:
    """Both passes for one unit's records, built in a private directory and renamed into place; a finished
    unit is skipped."""
    work = WorkDir(out)
    if work.is_done(unit_id):
        return work.done_stats(unit_id)
    plan = work.plan()
    records = _unit_records(work, plan, unit_id)
    staged = work.staging_dir(unit_id)
    try:
        stats = _check_and_write(records, plan["settings"], staged)
        stats["unit"] = unit_id
        write_json_atomic(staged / DONE, stats, indent=1)
        work.commit(unit_id, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return stats


def _unit_records(work: WorkDir, plan: dict, unit_id: str) -> list[Record]:
    entry = next((u for u in plan["units"] if u["id"] == unit_id), None)
    if entry is None:
        raise FmforgeError(f"{work.plan_path} has no unit {clip(unit_id)}")
    try:
        path = confined(work.path, entry["files"][0], f"{work.plan_path} unit {unit_id}")
        with open(path, "rb") as f:
            data = f.read(int(entry["bytes"]) + 1)
    except (UnsafePath, OSError) as err:
        raise FmforgeError(f"cannot read the records of unit {unit_id}: {getattr(err, 'strerror', None) or err}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise FmforgeError(f"{path} changed since it was planned; run the same command again to rewrite it")
    return [Record(Path(p), source, target) for p, source, target in map(json.loads, data.splitlines())]


def _threads() -> int:
    """Decoding threads of one unit: the engine's share of the cores (the local engine sets OMP_NUM_THREADS for
    its workers, Ray to a task's CPUs); elsewhere the usable cores, at most 8 (Slurm: the task's CPUs)."""
    share = os.environ.get("OMP_NUM_THREADS", "")
    return int(share) if share.isdigit() and int(share) > 0 else min(8, cpu_count())


def _check_and_write(records: list[Record], s: dict, staged: Path) -> dict:
    start, started = time.perf_counter(), time.time()
    drops = Drops()
    checked = verify_all(records, _threads(), s["max_pixels"])
    for c in checked:
        if c.reason:
            drops.add(c.reason, c.record.source)
    kept = [c for c in checked if c.reason is None]
    splits = [split_of(c.u, s["val_fraction"]) for c in kept]
    class_index = {name: i for i, name in enumerate(s["classes"] or [])}
    target_ext = "cls" if s["mode"] == "classification" else "txt"
    writers = {split: TarShardWriter(staged, split, UNIT_SAMPLES, None) for split in SPLITS}
    hashes = {split: open(staged / f"{split}.sha256", "w", encoding="ascii") for split in SPLITS}
    try:
        for c, split in zip(kept, splits):
            try:
                image = encoded_image(c.record.path, c.ext, c.sha256)
            except Exception:  # deleted or changed between the passes
                drops.add("changed_during_prepare", c.record.source)
                continue
            w = writers[split]
            w.write(f"{w.samples:08d}", image, c.ext, target_ext, target_bytes(c.record, s["mode"], class_index),
                    c.record.source)
            hashes[split].write(c.sha256 + "\n")
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        for f in hashes.values():
            f.close()
    return {"records": len(records), "checked": {split: splits.count(split) for split in SPLITS},
            "written": {split: writers[split].samples for split in SPLITS},
            "u_min": min((c.u for c in kept), default=None), "u_max": max((c.u for c in kept), default=None),
            "dropped": dict(drops.counts), "dropped_examples": drops.examples,
            "seconds": time.perf_counter() - start, "started": started, "finished": time.time()}


# --- the merge -----------------------------------------------------------------------------------------

def merge(out: str, log: Callable[[str], None] | None = print) -> dict:
    """The final shards and ``index.json`` from the finished units (every unit must be done)."""
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    work = WorkDir(out)
    plan = work.plan()
    s = plan["settings"]
    work.require_done("data prepare-images")
    units = work.units()
    stats = [work.done_stats(u.id) for u in units]
    drops = Drops()
    for counts, examples in [(plan["dropped"], plan["dropped_examples"])] + [
            (st["dropped"], st["dropped_examples"]) for st in stats]:  # examples in input order, as one process
        drops.counts.update(counts)
        for reason, where in examples.items():
            shown = drops.examples.setdefault(reason, [])
            shown += where[:EXAMPLES_PER_REASON - len(shown)]
    class_index = {name: i for i, name in enumerate(s["classes"] or [])}
    g = Gathered(s["mode"], s["fields"], [], plan["sources"], class_index, drops,
                 sum(st["records"] for st in stats) + sum(plan["dropped"].values()))
    checked = {split: sum(st["checked"][split] for st in stats) for split in SPLITS}
    if not any(checked.values()):
        raise nothing_usable(g.read, drops)
    moved = moved_image({split for split, n in checked.items() if n},
                        min(st["u_min"] for st in stats if st["u_min"] is not None),
                        max(st["u_max"] for st in stats if st["u_max"] is not None), s["val_fraction"])
    say(f"copying {sum(sum(st['written'].values()) for st in stats):,} samples from {len(units)} units into the "
        f"final shards")
    target = Path(out)
    clear_outputs(target)  # shards of an interrupted merge: ours, no index claims them
    writers = {split: TarShardWriter(target, split, s["shard_samples"], s["shard_bytes"]) for split in SPLITS}
    captions = work.path / CAPTIONS if s["mode"] == "captions" and s["tokenizer"] is None else None
    t_copy = time.perf_counter()
    try:
        written = _copy_samples(work, units, stats, writers, moved, class_index, captions)
        written["shards"] = writers["train"].close() + writers["val"].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        clear_outputs(target)
        raise
    copy_seconds = time.perf_counter() - t_copy
    written["samples"] = {split: writers[split].samples for split in SPLITS}
    check_some_train(written["samples"], drops)
    tokenizer_entry = None
    if s["mode"] == "captions":
        tok = load_tokenizer(work.tokenizer_path) if s["tokenizer"] is not None else None
        tokenizer_entry = save_caption_tokenizer(target, tok, s["tokenizer"], _captions(captions), s["vocab_size"])
    index = build_index(g, written, tokenizer_entry, s["val_fraction"], s["max_pixels"], s["max_line_bytes"])
    index["engine"] = {"engine": plan["engine"], "units": len(units), "unit_records": s["unit_records"],
                       "merge_seconds": time.perf_counter() - start, "copy_seconds": copy_seconds,
                       "unit_seconds": sum(st["seconds"] for st in stats),
                       "units_wall_seconds": max(st["finished"] for st in stats) - min(st["started"] for st in stats)}
    write_json_atomic(target / INDEX, index)
    for u in units:  # the samples are in the final shards now; unit.json stays for `data status`
        for split in SPLITS:
            (work.unit_dir(u.id) / f"{split}_000000.tar").unlink(missing_ok=True)
            (work.unit_dir(u.id) / f"{split}.sha256").unlink(missing_ok=True)
    if captions is not None:
        captions.unlink(missing_ok=True)
    return index


def _copy_samples(work: WorkDir, units, stats: list[dict], writers: dict[str, TarShardWriter],
                  moved: float | None, class_index: dict[str, int], captions: Path | None) -> dict:
    """Every unit's samples, in unit order, to their split's final shards under the final keys; the samples
    of the ``moved`` image to the other split. Each writer receives its split's samples in input order (a
    moved image goes to a split that was empty), so the shards are the single-process ones."""
    class_counts = {split: [0] * len(class_index) for split in SPLITS} if class_index else None  # captions: none
    formats: Counter = Counter()
    with open(captions, "w", encoding="utf-8") if captions is not None else nullcontext() as caption_file:
        for u, st in zip(units, stats):
            for split in SPLITS:
                n = int(st["written"][split])
                count = 0
                for (ext, image, target_ext, target, source), sha in _unit_split(work.unit_dir(u.id), split, n):
                    dest = OTHER_SPLIT[split] if moved is not None and _position(sha) == moved else split
                    w = writers[dest]
                    w.write(f"{w.samples:08d}", image, ext, target_ext, target, source)
                    formats[ext] += 1
                    count += 1
                    if class_counts is not None:
                        class_counts[dest][int(target)] += 1
                    elif caption_file is not None and dest == "train":
                        caption_file.write(json.dumps(target.decode("utf-8")) + "\n")
                if count != n:
                    raise FmforgeError(f"{work.unit_dir(u.id)} is damaged: {count} {split} samples, its {DONE} says "
                                       f"{n}; delete that directory and run again")
    return {"class_counts": class_counts, "formats": formats}


def _position(sha256: str) -> float:
    """An image's place in [0, 1) from its sha256, as pass 1 computes it (``_Checked.u``)."""
    return int.from_bytes(bytes.fromhex(sha256)[:8], "little") / 2**64


def _unit_split(d: Path, split: str, n: int) -> Iterator[tuple[tuple[str, bytes, str, bytes, str], str]]:
    """((image ext, image, target ext, target, source), sha256) per sample of a unit's ``split``:
    ``TarShardWriter`` writes each sample as three members, image, target, then ``{"source": ...}``."""
    if n == 0:
        return
    path = d / f"{split}_000000.tar"
    try:
        hashes = (d / f"{split}.sha256").read_text(encoding="ascii").split()
        with tarfile.open(path, "r:") as tar:
            for sha in hashes:
                members = [tar.next(), tar.next(), tar.next()]
                if None in members or not all(m.isfile() for m in members):
                    raise ValueError(f"{path} holds fewer samples than {split}.sha256 names")
                image, target, meta = (tar.extractfile(m).read() for m in members)
                yield ((members[0].name.partition(".")[2], image, members[1].name.partition(".")[2], target,
                        json.loads(meta)["source"]), sha)
            if tar.next() is not None:
                raise ValueError(f"{path} holds more samples than {split}.sha256 names")
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as err:
        raise FmforgeError(f"{d} is damaged ({clip(str(err), 200)}); delete that directory and run again") from None


def _captions(path: Path | None) -> Iterator[str]:
    if path is not None:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
