"""Sharded text preparation (``data prepare --engine``): the tokenizer sample, one work unit, and the merge.

Pass 1, one task per unit (``run_unit``, in parallel on any engine): read the unit's files with the same
readers as ``data prepare``, normalize, drop exact duplicates within the unit, compute each document's
content hash and MinHash signature, encode with the shared tokenizer, and write ``tokens.bin`` (the
documents' ``[bos] + ids + [eos]`` back to back), ``docs.npy`` (per document: hash, bytes, tokens, source),
``sigs.npy`` (the signatures), ``removed.jsonl`` and ``unit.json`` (the unit's partial manifest).

Pass 2, one task (``merge``): global deduplication from the stored hashes and signatures, in unit order, so
the text is never read again (exact duplicates by content hash; near-duplicates by MinHash with LSH banding,
the same detector and the same document order as a single-process ``data prepare``); then the split, chosen
from the kept documents' hashes and sizes exactly as ``data prepare`` chooses it; then the final shards,
copied token ranges in document order, and one manifest. With the same tokenizer the output is byte-for-byte
the single-process one, whatever the engine or the number of workers.

Memory of the merge: about 600 bytes per kept document (hash set, signatures, LSH buckets) — 10M documents
need ~6 GB. Corpora of billions of documents need the dedup sharded by band (left for later).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from fmforge.data.augment import Augmenter, augment_manifest
from fmforge.data.clean import NUM_PERM, ExactDeduper, MinHashDeduper, normalize
from fmforge.data.manifest import (
    MANIFEST,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_FILE,
    format_reasons,
    write_json_atomic,
)
from fmforge.data.pii import redact, redacted_counts
from fmforge.data.prepare import (
    ENCODE_BATCH_CHARS,
    ENCODE_BATCH_DOCS,
    Totals,
    augmented,
    build_manifest,
    choose_val_whole,
    position,
    remove_our_files,
)
from fmforge.data.shards import ShardWriter, shard_dtype
from fmforge.data.sources import DocumentReader
from fmforge.data.splits import check_split
from fmforge.data.tokenizer import load_tokenizer, train_tokenizer
from fmforge.data.workplan import DONE, WorkDir
from fmforge.errors import FmforgeError

TASK = "fmforge.data.text_units:run_unit"
MERGE = "fmforge.data.text_units:merge"
TOKENIZER_TASK = "fmforge.data.text_units:train_sample_tokenizer"
# u: the split position (the content hash's, or an added counterfactual copy's original's); copy: an added
# counterfactual copy (--augment two-sided), which the near-duplicate check skips as data prepare does.
DOCS = np.dtype([("digest", "V16"), ("n_bytes", "<i8"), ("n_tokens", "<i8"), ("source", "<i4"),
                 ("has_sig", "?"), ("u", "<f8"), ("copy", "?")])
REMOVED = "removed.jsonl"
SAMPLE_FILE_SHARE = 16  # one file gives at most 1/16 of the tokenizer sample


def _reader(files: list[str], s: dict) -> DocumentReader:
    return DocumentReader(files, s["text_field"], max_document_bytes=s["max_document_bytes"],
                          max_line_bytes=s["max_line_bytes"], document_bytes=s["document_bytes"],
                          encoding_errors=s["encoding_errors"])


def _augmenter(s: dict) -> Augmenter | None:
    return Augmenter(s["augment"]) if s.get("augment") else None


def sample_texts(files: list[str], s: dict, sample_bytes: int):
    """The tokenizer's training sample: files in the order of a hash of their name (a deterministic shuffle
    that does not depend on how the work is divided), up to ``sample_bytes / 16`` of documents from each,
    ``sample_bytes`` in all. Documents hashed into the lowest ``val_fraction`` of the hash space, where the
    validation split is drawn from, are left out."""
    order = sorted(files, key=lambda f: hashlib.blake2b(f.encode(), digest_size=8).digest())
    per_file, total = max(1, sample_bytes // SAMPLE_FILE_SHARE), 0
    augmenter = _augmenter(s)
    for f in order:
        taken = 0
        for doc in _reader([f], s):
            text = normalize(doc.text)
            if s.get("redact_pii"):  # the tokenizer learns from what the shards will hold
                text = redact(text)[0]
            for doc_text, digest, copy_of in augmented(augmenter, text):
                if (position(digest) if copy_of is None else copy_of) < s["val_fraction"]:
                    continue
                n = len(doc_text.encode("utf-8"))
                yield doc_text
                taken, total = taken + n, total + n
            if taken >= per_file or total >= sample_bytes:
                break
        if total >= sample_bytes:
            return


def train_sample_tokenizer(out: str) -> dict:
    """The tokenizer job: train a byte-level BPE on the sample into the work directory (once)."""
    work = WorkDir(out)
    if work.tokenizer_path.is_file():
        return {"tokenizer": str(work.tokenizer_path), "trained": False}
    plan = work.plan()
    s = plan["settings"]
    files = [f for u in plan["units"] for f in u["files"]]
    start = time.perf_counter()
    tok = train_tokenizer(sample_texts(files, s, int(s["tokenizer_sample_bytes"])), int(s["vocab_size"]))
    tok.save(work.tokenizer_path)
    return {"tokenizer": str(work.tokenizer_path), "trained": True, "seconds": time.perf_counter() - start}


def run_unit(out: str, unit_id: str) -> dict:
    """Pass 1 for one unit, built in a private directory and renamed into place; a finished unit is skipped."""
    work = WorkDir(out)
    if work.is_done(unit_id):
        return work.done_stats(unit_id)
    s = work.plan()["settings"]
    unit = work.unit(unit_id)
    tok = load_tokenizer(work.tokenizer_path)
    staged = work.staging_dir(unit_id)
    try:
        stats = _encode_unit(unit.files, s, tok, staged)
        stats.update(unit=unit_id, files=len(unit.files), stored_bytes=unit.bytes)
        write_json_atomic(staged / DONE, stats, indent=1)
        work.commit(unit_id, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return stats


def _encode_unit(files: list[str], s: dict, tok, staged: Path) -> dict:
    start, started = time.perf_counter(), time.time()
    reader = _reader(files, s)
    exact, near = ExactDeduper(), MinHashDeduper()
    dtype = shard_dtype(tok.vocab_size)
    prefix = [tok.bos_id] if tok.bos_id is not None else []
    docs: list[tuple] = []
    sigs: list[np.ndarray] = []
    first_source: dict[bytes, str] = {}
    sources: dict[str, int] = {}
    batch: list[tuple[str, bytes, int, float | None]] = []
    chars = tokens_total = produced = 0  # produced: documents after augmentation, before deduplication
    pii: Counter = Counter()
    augmenter = _augmenter(s)
    with open(staged / "tokens.bin", "wb") as tokens_file, open(staged / REMOVED, "w", encoding="utf-8") as removed:
        def flush() -> None:
            nonlocal tokens_total
            ids = tok.encode_batch([text for text, _, _, _ in batch])
            out = []
            for (text, digest, src, copy_of), doc_ids in zip(batch, ids):
                n = len(prefix) + len(doc_ids) + 1
                out += prefix
                out += doc_ids
                out.append(tok.eos_id)
                sig = near.signature(text) if copy_of is None else None
                sigs.append(sig if sig is not None else np.zeros(NUM_PERM, dtype=np.uint32))
                docs.append((digest, len(text.encode("utf-8")), n, src, sig is not None,
                             position(digest) if copy_of is None else copy_of, copy_of is not None))
                tokens_total += n
            np.asarray(out, dtype=dtype).tofile(tokens_file)
            batch.clear()

        for doc in reader:
            text = normalize(doc.text)
            if s.get("redact_pii"):  # as data prepare's pass 1 does: before hashing
                text, found = redact(text)
                pii.update(found)
            src = sources.setdefault(doc.source, len(sources))
            for doc_text, digest, copy_of in augmented(augmenter, text):
                produced += 1
                if exact.is_duplicate(digest):
                    removed.write(json.dumps({"reason": "exact_duplicate", "source": doc.source,
                                              "duplicate_of": first_source[digest], "sha": digest.hex()}) + "\n")
                    continue
                first_source[digest] = doc.source
                batch.append((doc_text, digest, src, copy_of))
                chars += len(doc_text)
                if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
                    flush()
                    chars = 0
        if batch:
            flush()
    table = np.array(docs, dtype=DOCS) if docs else np.empty(0, dtype=DOCS)
    np.save(staged / "docs.npy", table)
    np.save(staged / "sigs.npy", np.stack(sigs) if sigs else np.empty((0, NUM_PERM), dtype=np.uint32))
    exact_dups = produced - len(docs)
    return {
        "read": reader.read, "kept": len(docs), "exact_duplicates": exact_dups,
        "dropped": dict(reader.dropped), "dropped_lines": dict(reader.dropped_lines),
        "repaired_lines": dict(reader.repaired_lines),
        "sources": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in reader.sources],
        "source_names": sorted(sources, key=sources.get), "tokens": tokens_total,
        "text_bytes": int(table["n_bytes"].sum()) if len(table) else 0, "dtype": dtype.name,
        "seconds": time.perf_counter() - start, "started": started, "finished": time.time(), "target_bytes": reader.target_bytes, "hard_bytes": reader.hard_bytes,
        "pii_redacted": dict(pii), "augment": augmenter.stats() if augmenter else None,
    }


def merge(out: str, log=print) -> dict:
    """Pass 2 and the final shards + manifest (every unit must be done)."""
    start = time.perf_counter()
    work = WorkDir(out)
    plan = work.plan()
    s = plan["settings"]
    work.require_done("data prepare")
    tok = load_tokenizer(work.tokenizer_path)
    dtype = shard_dtype(tok.vocab_size)
    units = work.units()
    stats = [work.done_stats(u.id) for u in units]
    remove_our_files(Path(out))  # shards of an interrupted merge: ours, no manifest claims them
    labels, u_all, nb_all, t = _dedup(work, units, stats, s, Path(out) / REMOVED)
    is_val = choose_val_whole(u_all, nb_all, s["val_fraction"])
    n_val = int(is_val.sum())
    n_kept = len(u_all)
    if n_kept == 0:
        raise FmforgeError(f"nothing usable in the inputs: read {t.read} documents, all dropped "
                           f"({format_reasons(t.dropped) or 'no records found'})")
    val_bytes = int(np.frombuffer(nb_all, dtype=np.int64)[is_val].sum())
    check_split(s["val_fraction"], n_val, n_kept, val_bytes / max(1, sum(nb_all)), "bytes", s["allow_uneven_split"])
    writers = {split: ShardWriter(out, split, dtype, int(s["shard_tokens"])) for split, n in
               (("train", n_kept - n_val), ("val", n_val)) if n}
    n_bytes: Counter = Counter()
    t_copy = time.perf_counter()
    try:
        _copy_tokens(work, units, labels, is_val, dtype, writers, n_bytes)
    except BaseException:
        for w in writers.values():
            w.abort()
        remove_our_files(Path(out))
        raise
    shards = [sh for w in writers.values() for sh in w.close()]
    tokens = {split: sum(sh["tokens"] for sh in shards if sh["split"] == split) for split in ("train", "val")}
    check_split(s["val_fraction"], n_val, n_kept, tokens["val"] / max(1, sum(tokens.values())), "tokens",
                s["allow_uneven_split"])
    tok.save(Path(out) / TOKENIZER_FILE)
    write_json_atomic(Path(out) / SPECIAL_TOKENS_FILE, tok.special_tokens_map())
    manifest = build_manifest(t, {"train": n_kept - n_val, "val": n_val}, tokens, n_bytes, tok, s["tokenizer"],
                              dtype, shards, s, stats[0]["target_bytes"], stats[0]["hard_bytes"])
    manifest["engine"] = {"engine": plan["engine"], "units": len(units), "unit_bytes": s["unit_bytes"],
                          "removed": REMOVED, "merge_seconds": time.perf_counter() - start,
                          "copy_seconds": time.perf_counter() - t_copy,
                          "unit_seconds": sum(st["seconds"] for st in stats),
                          "units_wall_seconds": max(st["finished"] for st in stats) - min(st["started"] for st in stats)}
    if s["tokenizer"] is None:
        manifest["tokenizer"]["sample_bytes"] = s["tokenizer_sample_bytes"]
    if s.get("redact_pii"):
        found = sum((Counter(st.get("pii_redacted", {})) for st in stats), Counter())
        manifest["pii_redacted"] = redacted_counts(found)
    if s.get("augment"):
        manifest["augment"] = augment_manifest(s["augment"], [st["augment"] for st in stats])
    write_json_atomic(Path(out) / MANIFEST, manifest)
    for u in units:  # the per-unit tokens and signatures are in the shards now; unit.json stays for status
        for name in ("tokens.bin", "sigs.npy", "docs.npy"):
            (work.unit_dir(u.id) / name).unlink(missing_ok=True)
    return manifest


def _current(docs: np.ndarray) -> np.ndarray:
    """A unit's document table in today's ``DOCS`` layout: a unit finished before ``u`` and ``copy`` existed
    (a preparation resumed across an upgrade) gets them from its hashes (no copies then)."""
    if docs.dtype.names is None or "u" in docs.dtype.names:
        return docs
    out = np.zeros(len(docs), dtype=DOCS)
    for name in docs.dtype.names:
        out[name] = docs[name]
    out["u"] = [position(bytes(d)) for d in docs["digest"]]
    return out


def _dedup(work: WorkDir, units, stats: list[dict], s: dict, removed_path: Path):
    """Global exact and near-duplicate detection over the units' stored hashes and signatures, in order.
    Returns per-unit keep masks, the kept documents' hash positions and sizes, and the totals."""
    seen: dict[bytes, str] = {}
    near = MinHashDeduper()
    drop_near = bool(s["drop_near_duplicates"])
    u_all, nb_all = array("d"), array("q")
    labels: list[np.ndarray] = []
    dropped, dropped_lines, repaired_lines = Counter(), Counter(), Counter()
    exact_dups = near_dups = near_checked = 0
    with open(removed_path, "w", encoding="utf-8") as removed:
        for u, st in zip(units, stats):
            unit_dir = work.unit_dir(u.id)
            dropped.update(st["dropped"])
            dropped_lines.update(st["dropped_lines"])
            repaired_lines.update(st["repaired_lines"])
            with open(unit_dir / REMOVED, encoding="utf-8") as f:
                for line in f:
                    removed.write(line)
            exact_dups += st["exact_duplicates"]
            docs = _current(np.load(unit_dir / "docs.npy", allow_pickle=False))
            sigs = np.load(unit_dir / "sigs.npy", allow_pickle=False, mmap_mode="r")
            if len(docs) != st["kept"] or sigs.shape != (len(docs), NUM_PERM):
                raise FmforgeError(f"{unit_dir} is damaged: {len(docs)} documents, {sigs.shape} signatures, "
                                   f"unit.json says {st['kept']}; delete that directory and run again")
            names = st["source_names"]
            keep = np.ones(len(docs), dtype=bool)
            for i, d in enumerate(docs):
                digest = bytes(d["digest"])
                source = names[d["source"]]
                if digest in seen:
                    keep[i] = False
                    exact_dups += 1
                    removed.write(json.dumps({"reason": "exact_duplicate", "source": source,
                                              "duplicate_of": seen[digest], "sha": digest.hex()}) + "\n")
                    continue
                seen[digest] = source
                if d["copy"]:  # an added counterfactual copy: not near-duplicate checked (as in prepare.py)
                    u_all.append(float(d["u"]))
                    nb_all.append(int(d["n_bytes"]))
                    continue
                near_checked += 1
                if near.is_near_duplicate_signature(np.asarray(sigs[i]) if d["has_sig"] else None):
                    near_dups += 1
                    if drop_near:
                        keep[i] = False
                        removed.write(json.dumps({"reason": "near_duplicate", "source": source,
                                                  "sha": digest.hex()}) + "\n")
                        continue
                u_all.append(float(d["u"]))
                nb_all.append(int(d["n_bytes"]))
            labels.append(keep)
    dropped["exact_duplicate"] += exact_dups
    if drop_near and near_dups:
        dropped["near_duplicate"] += near_dups
    dropped = +dropped
    t = Totals(sources=[src for st in stats for src in st["sources"]], read=sum(st["read"] for st in stats),
               kept=len(u_all), exact_duplicates=exact_dups, near_duplicates=near_dups, near_checked=near_checked,
               dropped=dropped, dropped_lines=dropped_lines, repaired_lines=repaired_lines,
               skipped=Counter(work.plan()["skipped"]))
    return labels, u_all, nb_all, t


def _copy_tokens(work: WorkDir, units, labels: list[np.ndarray], is_val: np.ndarray, dtype, writers: dict,
                 n_bytes: Counter) -> None:
    """Each kept document's tokens to its split's shards, in unit and document order, in contiguous runs."""
    k = 0  # index into the kept documents (is_val)
    for u, keep in zip(units, labels):
        docs = np.load(work.unit_dir(u.id) / "docs.npy", allow_pickle=False)
        tokens = np.fromfile(work.unit_dir(u.id) / "tokens.bin", dtype=dtype)
        ends = np.cumsum(docs["n_tokens"])
        if len(docs) and ends[-1] != tokens.size:
            raise FmforgeError(f"{work.unit_dir(u.id)} is damaged: tokens.bin holds {tokens.size} tokens, its "
                               f"documents {int(ends[-1])}; delete that directory and run again")
        starts = ends - docs["n_tokens"]
        label = np.full(len(docs), -1, dtype=np.int8)  # -1 dropped, 0 train, 1 val
        label[keep] = is_val[k:k + int(keep.sum())]
        k += int(keep.sum())
        for split, code in (("train", 0), ("val", 1)):
            mine = label == code
            n_bytes[split] += int(docs["n_bytes"][mine].sum())
        # runs of equal labels are contiguous token ranges; each run goes to its split's writer in order
        edges = np.flatnonzero(np.diff(label)) + 1
        for a, b in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(docs)]])):
            if b > a and label[a] >= 0:
                writers["val" if label[a] == 1 else "train"].write(tokens[starts[a]:ends[b - 1]])

