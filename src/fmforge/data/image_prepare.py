"""``fmforge data prepare-images``: image folders or (image, caption/label) lists → WebDataset tar shards.

Inputs are either class-folder trees (``ROOT/CLASS/.../file.jpg``: classification, one ``.cls`` label
index per sample) or ``.csv`` / ``.jsonl`` lists of image paths with a caption (``.txt``) or a label
(``.cls``); relative paths resolve against the list's folder. Every image is decoded with Pillow before it
is kept; bad records (missing or unreadable files, truncated or corrupt images, missing captions, unknown
labels ...) are counted by reason, skipped and reported, and fail the run only when nothing is left.

Bounds (``limits.py``): an image whose header says more than ``max_pixels`` pixels, or a file larger than
``MAX_IMAGE_FILE_BYTES``, is counted as ``too_large`` without being decoded; a list line longer than
``max_line_bytes`` is counted as ``line_too_long`` without being held whole. Pass 2 re-reads each image and
keeps it only if its bytes still have pass 1's sha256, so what was checked is what is written.

Two passes, so the images never have to fit in memory: pass 1 reads, hashes and verifies every image (on a
thread pool: Pillow decodes without the GIL) and decides its split from the sha256 of its bytes, so the
same image — e.g. one photo with several captions — always lands in the same split; pass 2 reads the kept
images again and appends them to the split's shards. JPEG, PNG and WebP keep their original bytes; other
formats Pillow reads (TIFF, BMP, GIF, ...) are re-encoded to PNG (first frame). Shards are byte-for-byte
reproducible (fixed member metadata) and written atomically; ``index.json`` is written last, so a
directory with an index is complete.

The inputs are read by ``image_inputs.py``; the format and its reader are ``image_shards.py``. With
``--engine``, the same passes run as parallel work units merged into the same shards (``launch/data_images.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from fmforge import __version__
from fmforge.data.image_inputs import Drops, Record, numeric_or_text_order, read_inputs
from fmforge.data.image_shards import FORMAT, FORMAT_VERSION, INDEX
from fmforge.data.limits import (
    MAX_IMAGE_FILE_BYTES,
    MAX_PIXELS,
    MAX_RECORD_LINE_BYTES,
    check_limit,
    pixels_problem,
)
from fmforge.data.manifest import (
    SPECIAL_TOKENS_FILE,
    TOKENIZER_FILE,
    check_output_dir,
    format_reasons,
    write_json_atomic,
)
from fmforge.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer
from fmforge.errors import FmforgeError

KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # what every image reader decodes
LIST_EXTENSIONS = (".csv", ".jsonl")
VERIFY_CHUNK = 512
_NAMES = r"((train|val)_\d{6}\.tar|index\.json|tokenizer\.json|special_tokens_map\.json)"
OUR_OUTPUTS = re.compile(rf"^{_NAMES}$")
_OUR_LEFTOVERS = re.compile(rf"^{_NAMES}\.tmp(-\d+)?$")  # -PID: write_json_atomic


@dataclass
class _Checked:
    record: Record
    reason: str | None = None  # why it is dropped; None when kept
    ext: str = ""
    u: float = 0.0  # uniform in [0, 1) from the image's sha256: decides the split
    sha256: str = ""


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


# --- verification and encoding -------------------------------------------------------------------------

def _decode_problem(data: bytes, max_pixels: int) -> tuple[str | None, str]:
    """(reason or None, Pillow format) after fully decoding ``data``; ``verify`` also checks PNG CRCs. The
    pixel count comes from the header, before anything is decoded."""
    if not data:
        return "empty_file", ""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            if pixels_problem(im.size, max_pixels):
                return "too_large", fmt
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return None, fmt
    except UnidentifiedImageError:
        return "not_an_image", ""
    except Image.DecompressionBombError:
        return "too_large", ""
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... on bad data
        return ("truncated_image" if "truncat" in str(err).lower() else "corrupt_image"), ""


def _read_image_file(path: Path) -> bytes | None:
    """The file's bytes, or None when it holds more than ``MAX_IMAGE_FILE_BYTES`` (never read whole). Only
    regular files are opened: a list may name a device or a pipe (``/dev/zero``), an OSError here."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"{path} is not a regular file")
    if info.st_size > MAX_IMAGE_FILE_BYTES:
        return None
    with open(path, "rb") as f:
        data = f.read(MAX_IMAGE_FILE_BYTES + 1)
    return data if len(data) <= MAX_IMAGE_FILE_BYTES else None


def _check(record: Record, max_pixels: int) -> _Checked:
    try:
        data = _read_image_file(record.path)
    except FileNotFoundError:
        return _Checked(record, "missing_file")
    except (IsADirectoryError, PermissionError, OSError):
        return _Checked(record, "unreadable_file")
    if data is None:
        return _Checked(record, "too_large")
    reason, fmt = _decode_problem(data, max_pixels)
    if reason:
        return _Checked(record, reason)
    digest = hashlib.sha256(data).digest()
    return _Checked(record, None, KEEP_FORMATS.get(fmt, "png"), int.from_bytes(digest[:8], "little") / 2**64,
                    digest.hex())


def encoded_image(path: Path, ext: str, sha256: str) -> bytes:
    """The bytes to store for an image pass 1 kept; a ValueError when the file changed since."""
    data = _read_image_file(path)
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} changed since it was checked")
    if ext != "png" or data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        frame = ImageOps.exif_transpose(im)  # the orientation tag does not survive into the PNG
        if frame.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            frame = frame.convert("RGBA" if "A" in frame.getbands() else "RGB")
        buf = io.BytesIO()
        frame.save(buf, "PNG")
    return buf.getvalue()


# --- shards --------------------------------------------------------------------------------------------

def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: reproducible shards
    return info, io.BytesIO(data)


class TarShardWriter:
    """Appends samples to ``{split}_NNNNNN.tar`` shards, starting a new one after ``shard_samples``
    samples or once ``shard_bytes`` is reached; each shard is written to a temp file and renamed when full."""

    def __init__(self, out: Path, split: str, shard_samples: int, shard_bytes: int | None):
        self.out, self.split, self.shard_samples, self.shard_bytes = out, split, shard_samples, shard_bytes
        self.shards: list[dict] = []
        self.samples = 0
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0

    def write(self, key: str, image: bytes, ext: str, target_ext: str, target: bytes, source: str) -> None:
        if self._tar is None:
            self._tmp = self.out / f"{self.split}_{len(self.shards):06d}.tar.tmp"
            self._file = open(self._tmp, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        meta = json.dumps({"source": source}, ensure_ascii=False).encode("utf-8")
        for name, data in ((f"{key}.{ext}", image), (f"{key}.{target_ext}", target), (f"{key}.json", meta)):
            self._tar.addfile(*_member(name, data))
        self._count += 1
        self.samples += 1
        if self._count >= self.shard_samples or (self.shard_bytes and self._tar.offset >= self.shard_bytes):
            self._finish()

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        size, sha = _file_digest(final)
        self.shards.append({"file": final.name, "split": self.split, "samples": self._count, "bytes": size,
                            "sha256": sha})
        self._tar = None

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


# --- prepare -------------------------------------------------------------------------------------------

@dataclass
class Gathered:
    """What the inputs hold, before any image is read (shared with the sharded path, ``image_units.py``)."""

    mode: str  # "classification" or "captions"
    fields: dict | None  # the list fields used; None for class folders
    records: list[Record]  # in input order; records of unknown classes already dropped
    sources: list[dict]
    class_index: dict[str, int]
    drops: Drops
    read: int  # records read, dropped ones included


def validate_inputs(inputs: list[Path], val_fraction: float, shard_samples: int, shard_bytes: int | None) -> None:
    if not inputs:
        raise FmforgeError("no inputs given: name class-folder trees or .csv/.jsonl image lists")
    for p in inputs:
        if not p.exists():
            raise FmforgeError(f"input not found: {p}")
        if p.is_file() and p.suffix.lower() not in LIST_EXTENSIONS:
            raise FmforgeError(f"{p} is neither a class-folder tree nor a .csv/.jsonl image list")
    if len({p.is_dir() for p in inputs}) > 1:
        raise FmforgeError("inputs mix class-folder trees and image lists; prepare them separately")
    if not 0.0 <= val_fraction < 1.0:
        raise FmforgeError(f"val_fraction must be at least 0 and below 1, got {val_fraction}")
    if shard_samples < 1 or (shard_bytes is not None and shard_bytes < 1):
        raise FmforgeError(f"shard size must be positive, got {shard_samples} samples / {shard_bytes} bytes")


def input_mode(inputs: list[Path], label_field: str | None, tokenizer: str | None, classes: list[str] | None) -> str:
    mode = "classification" if inputs[0].is_dir() or label_field else "captions"
    if tokenizer is not None and mode != "captions":
        raise FmforgeError("--tokenizer applies to captioned images (a caption list without --label-field)")
    if classes is not None and mode != "classification":
        raise FmforgeError("classes apply to labelled images: class folders, or lists with --label-field")
    return mode


def gather_inputs(inputs: list[Path], mode: str, image_field: str, caption_field: str, label_field: str | None,
                  classes: list[str] | None, max_line_bytes: int) -> Gathered:
    folders = inputs[0].is_dir()
    drops = Drops()
    fields = None if folders else {"image": image_field, ("label" if label_field else "caption"):
                                   label_field or caption_field}
    records, sources = read_inputs(inputs, folders, fields, drops, max_line_bytes)
    class_index = _class_index(records, classes, drops) if mode == "classification" else {}
    records = [r for r in records if mode != "classification" or r.target in class_index]
    return Gathered(mode, fields, records, sources, class_index, drops, len(records) + drops.counts.total())


def verify_all(records: list[Record], workers: int, max_pixels: int) -> list[_Checked]:
    """Pass 1 on a thread pool (Pillow decodes without the GIL), results in input order."""
    checked = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(records), VERIFY_CHUNK):  # bounded number of futures alive at once
            checked += pool.map(lambda r: _check(r, max_pixels), records[start: start + VERIFY_CHUNK])
    return checked


def split_of(u: float, val_fraction: float) -> str:
    return "val" if u < val_fraction else "train"


def moved_image(splits: set[str], u_min: float, u_max: float, val_fraction: float) -> float | None:
    """The position (``_Checked.u``) of the one image that changes split, or None: one moves when no image
    went to train, or none to val although val is asked for and there are two or more distinct images."""
    if "train" not in splits:
        return u_max
    if val_fraction > 0 and u_min != u_max and "val" not in splits:
        return u_min
    return None


def _assign_splits(kept: list[_Checked], val_fraction: float) -> list[str]:
    """Split by image hash; then guarantee a train image, and a val image when val is asked for and there
    are two or more distinct images, by moving the image closest to the boundary — with all its samples,
    so one image never sits in both splits (still a function of the data)."""
    splits = [split_of(c.u, val_fraction) for c in kept]
    moved = moved_image(set(splits), min(c.u for c in kept), max(c.u for c in kept), val_fraction)
    return [OTHER_SPLIT[s] if c.u == moved else s for c, s in zip(kept, splits)]


OTHER_SPLIT = {"train": "val", "val": "train"}


def nothing_usable(read: int, drops: Drops) -> FmforgeError:
    return FmforgeError(f"nothing usable in the inputs: read {read} records, all dropped "
                        f"({format_reasons(drops.counts) or 'no images found'})")


def prepare_images(inputs: list[str], out: str | Path, *, image_field: str = "image",
                   caption_field: str = "caption", label_field: str | None = None,
                   classes: list[str] | None = None, val_fraction: float = 0.05, shard_samples: int = 1000,
                   shard_bytes: int | None = None, workers: int | None = None, overwrite: bool = False,
                   tokenizer: str | None = None, vocab_size: int = 4096, max_pixels: int = MAX_PIXELS,
                   max_line_bytes: int = MAX_RECORD_LINE_BYTES, log: Callable[[str], None] | None = print) -> dict:
    """Turn images into a prepared image directory: ``train_*.tar`` / ``val_*.tar`` WebDataset shards and
    ``index.json``. Returns the index.

    inputs: class-folder trees (classification: one sub-folder per class, searched recursively), or
        ``.csv`` / ``.jsonl`` image lists — captions (``image_field`` + ``caption_field``) or, when
        ``label_field`` is given, labels. Relative image paths resolve against the list's folder.
    classes: the class names, in label-index order; samples of other classes are dropped as
        ``unknown_label``. Default: every class seen, sorted (numerically when all names are integers).
    val_fraction: share of images held out, chosen by the image's sha256 (deterministic).
    shard_samples / shard_bytes: a shard is closed at this many samples, or once it reaches this size.
    workers: threads that decode images for verification (default: the usable cores, at most 8).
    tokenizer / vocab_size (captions only): the caption tokenizer written as ``tokenizer.json`` beside the
        shards, for the text tower of a CLIP run: this tokenizer.json or HF tokenizer directory, or else a
        byte-level BPE of up to ``vocab_size`` tokens trained on the train split's captions.
    max_pixels: an image whose header says more pixels is dropped as ``too_large`` without being decoded.
    max_line_bytes: a longer line of a .csv/.jsonl list is dropped as ``line_too_long``.
    Bad records are counted by reason, skipped and listed (a few examples each) in the index.
    """
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    paths, out = [Path(i) for i in inputs], Path(out)
    check_limit(max_pixels, "max_pixels")
    check_limit(max_line_bytes, "max_line_bytes")
    validate_inputs(paths, val_fraction, shard_samples, shard_bytes)
    check_output_dir(out, INDEX, OUR_OUTPUTS, "prepared images", overwrite)
    mode = input_mode(paths, label_field, tokenizer, classes)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None  # a bad path fails before any work
    g = gather_inputs(paths, mode, image_field, caption_field, label_field, classes, max_line_bytes)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(8, cores) if workers is None else workers
    say(f"verifying {len(g.records)} images on {workers} threads")
    checked = verify_all(g.records, workers, max_pixels)
    for c in checked:
        if c.reason:
            g.drops.add(c.reason, c.record.source)
    kept = [c for c in checked if c.reason is None]
    if not kept:
        raise nothing_usable(g.read, g.drops)
    splits = _assign_splits(kept, val_fraction)
    written = _write_shards(out, kept, splits, mode, g.class_index, shard_samples, shard_bytes, g.drops)
    tokenizer_entry = None
    if mode == "captions":
        train_captions = (c.record.target for c, s in zip(kept, splits) if s == "train")
        tokenizer_entry = save_caption_tokenizer(out, tok, tokenizer, train_captions, vocab_size)
    index = build_index(g, written, tokenizer_entry, val_fraction, max_pixels, max_line_bytes)
    write_json_atomic(out / INDEX, index)
    summarize(say, out, index, time.perf_counter() - start)
    return index


def save_caption_tokenizer(out: Path, tok: TextTokenizer | None, source: str | None, train_captions: Iterable[str],
                           vocab_size: int) -> dict:
    """Write the caption tokenizer (``tok``, or one trained on ``train_captions``) beside the shards; returns
    the index's entry for it."""
    if tok is None:
        tok = train_tokenizer(train_captions, vocab_size)
    tok.save(out / TOKENIZER_FILE)
    write_json_atomic(out / SPECIAL_TOKENS_FILE, tok.special_tokens_map())
    return {"file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "trained": source is None,
            "source": None if source is None else str(source)}


def build_index(g: Gathered, written: dict, tokenizer_entry: dict | None, val_fraction: float, max_pixels: int,
                max_line_bytes: int) -> dict:
    """``index.json``: ``written`` is what the shard writing returns (shards, samples, class_counts, formats);
    the drops are ``g.drops`` as they stand after every pass."""
    n = written["samples"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fmforge_version": __version__,
        "mode": g.mode,
        "classes": list(g.class_index) if g.mode == "classification" else None,
        "samples": {"read": g.read, "kept": n["train"] + n["val"], "train": n["train"], "val": n["val"]},
        "class_counts": written["class_counts"],
        "dropped": dict(sorted(g.drops.counts.items())),
        "dropped_examples": dict(sorted(g.drops.examples.items())),
        "formats": dict(sorted(written["formats"].items())),
        "shards": written["shards"],
        "tokenizer": tokenizer_entry,
        "sources": g.sources,
        "fields": g.fields,
        "val_fraction": val_fraction,
        "split_by": "sha256 of the image bytes",
        "limits": {"max_pixels": max_pixels, "max_line_bytes": max_line_bytes},
    }


def _class_index(records: list[Record], classes: list[str] | None, drops: Drops) -> dict[str, int]:
    """Class name -> label index (``classes`` in order, or every class seen); records of other classes are
    dropped as ``unknown_label``."""
    names = classes if classes is not None else numeric_or_text_order(r.target for r in records)
    if len(set(names)) != len(names):
        raise FmforgeError(f"class names repeat: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
    class_index = {name: i for i, name in enumerate(names)}
    for r in records:
        if r.target not in class_index:
            drops.add("unknown_label", r.source)
    return class_index


def clear_outputs(out: Path) -> None:
    """Remove fmforge's own files from ``out``, the index first: from then on the directory no longer claims
    to be complete."""
    (out / INDEX).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_file() and (OUR_OUTPUTS.match(p.name) or _OUR_LEFTOVERS.match(p.name)):
            p.unlink()


def target_bytes(record: Record, mode: str, class_index: dict[str, int]) -> bytes:
    """What ``KEY.cls`` (the label index, ASCII) or ``KEY.txt`` (the caption, UTF-8) holds."""
    if mode == "classification":
        return str(class_index[record.target]).encode("ascii")
    return record.target.encode("utf-8")


def _write_shards(out: Path, kept: list[_Checked], splits: list[str], mode: str, class_index: dict[str, int],
                  shard_samples: int, shard_bytes: int | None, drops: Drops) -> dict:
    """Pass 2: append the kept images to their split's shards. Replaces only fmforge's own files in ``out``;
    on failure nothing half-written stays (and a directory this call created is removed again)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)
    writers = {s: TarShardWriter(out, s, shard_samples, shard_bytes) for s in ("train", "val")}
    target_ext = "cls" if mode == "classification" else "txt"
    class_counts = {s: [0] * len(class_index) for s in writers} if mode == "classification" else None
    formats: Counter = Counter()
    try:
        for c, split in zip(kept, splits):
            r = c.record
            try:
                image = encoded_image(r.path, c.ext, c.sha256)
            except Exception:  # deleted or changed between the passes
                drops.add("changed_during_prepare", r.source)
                continue
            w = writers[split]
            target = target_bytes(r, mode, class_index)
            if class_counts is not None:
                class_counts[split][int(target)] += 1
            w.write(f"{w.samples:08d}", image, c.ext, target_ext, target, r.source)
            formats[c.ext] += 1
        shards = writers["train"].close() + writers["val"].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    samples = {s: writers[s].samples for s in writers}
    check_some_train(samples, drops)
    return {"shards": shards, "samples": samples, "class_counts": class_counts, "formats": formats}


def check_some_train(samples: dict[str, int], drops: Drops) -> None:
    if samples["train"] == 0:
        raise FmforgeError(f"nothing usable in the inputs: no train images ({format_reasons(drops.counts)})")


def summarize(say: Callable[[str], None], out: Path, m: dict, elapsed: float) -> None:
    s = m["samples"]
    what = f"classification, {len(m['classes'])} classes" if m["mode"] == "classification" else "captions"
    say(f"prepared {out} in {elapsed:.1f}s ({what})")
    say(f"  images: read {s['read']}, kept {s['kept']} (train {s['train']}, val {s['val']}) in "
        f"{len(m['shards'])} shards; formats: {', '.join(f'{k} {v}' for k, v in m['formats'].items())}")
    say(f"  dropped: {format_reasons(Counter(m['dropped'])) or 'none'}")
    for reason, where in m["dropped_examples"].items():
        say(f"    {reason}: {', '.join(where)}{' ...' if m['dropped'][reason] > len(where) else ''}")
