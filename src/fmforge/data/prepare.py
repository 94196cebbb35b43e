"""``fmforge data prepare``: raw text → cleaned, deduplicated documents → tokenizer → token shards + manifest.

Two streaming passes, so the corpus never has to fit in memory:

1. read (large text files cut into documents, see ``textcut.py``), normalize, dedup; each kept document goes
   to a staging JSONL in the output directory. Then the split is chosen from the documents' content hashes
   and sizes (``splits.py``): the lowest hashes go to validation up to the requested share of bytes, and a
   split far from the request is an error unless ``allow_uneven_split``;
2. (after training the tokenizer on the staged train split, unless one was given) encode the staged
   documents in large batches — the Rust tokenizer spreads each batch over every core — and append
   ``[bos] + ids + [eos]`` to the shards of their split.

The manifest is written last and atomically: a directory with a manifest.json is complete.
"""

from __future__ import annotations

import json
import os
import re
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fmforge import __version__
from fmforge.data.augment import Augmenter, augment_manifest, describe, make_augmenter
from fmforge.data.clean import ExactDeduper, MinHashDeduper, normalize, text_digest
from fmforge.data.compression import ZSTANDARD_HINT
from fmforge.data.limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_LINE_BYTES
from fmforge.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_FILE,
    check_output_dir,
    format_reasons,
    write_json_atomic,
)
from fmforge.data.pii import redact, redacted_counts
from fmforge.data.shards import ShardWriter, shard_dtype
from fmforge.data.sources import DocumentReader, format_counts, resolve_inputs
from fmforge.data.splits import RULE, check_split, choose_val, shares
from fmforge.data.textcut import DEFAULT_DOCUMENT_BYTES
from fmforge.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer
from fmforge.errors import FmforgeError

STAGING = ".staging.jsonl"
ENCODE_BATCH_DOCS = 2048
ENCODE_BATCH_CHARS = 4_000_000  # bounds memory (each token is a Rust Encoding entry until converted)
# Exactly the names this module writes; nothing else in the output directory is ever deleted. Leftovers of
# an interrupted run (temp files, staging) are unmistakably ours; the final names could be a user's files.
_NAMES = r"((train|val)_\d{6}\.bin|manifest\.json|tokenizer\.json|special_tokens_map\.json|removed\.jsonl)"
OUR_OUTPUTS = re.compile(rf"^{_NAMES}$")
_OUR_LEFTOVERS = re.compile(rf"^{_NAMES}\.tmp(-\d+)?$|^\.staging\.jsonl$")  # -PID: write_json_atomic


@dataclass
class _Kept:
    """What pass 1 kept: per staged document its hash position in [0, 1) and its UTF-8 size."""

    count: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    dropped: Counter = field(default_factory=Counter)
    u: array = field(default_factory=lambda: array("d"))
    n_bytes: array = field(default_factory=lambda: array("q"))
    pii: Counter = field(default_factory=Counter)  # personal data redacted (--redact-pii), by kind
    near_checked: int = 0  # documents that reached the near-duplicate check (added counterfactuals do not)


def validate_request(out: Path, tokenizer: str | None, vocab_size: int, val_fraction: float, shard_tokens: int,
              overwrite: bool) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise FmforgeError(f"val_fraction must be at least 0 and below 1, got {val_fraction}")
    if tokenizer is None and vocab_size < 256 + 3:
        raise FmforgeError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least 259 "
                           "(256 bytes + 3 special tokens)")
    if shard_tokens < 1:
        raise FmforgeError(f"shard_tokens must be positive, got {shard_tokens}")
    check_output_dir(out, MANIFEST, OUR_OUTPUTS, "prepared data", overwrite)


def remove_our_files(out: Path) -> None:
    # The manifest goes first: from then on the directory no longer claims to hold complete data.
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_file() and (OUR_OUTPUTS.match(p.name) or _OUR_LEFTOVERS.match(p.name)):
            p.unlink()


def position(digest: bytes) -> float:
    """A document's place in [0, 1), a pure function of its content hash: the split's ordering (splits.py)."""
    return int.from_bytes(digest[:8], "little") / 2**64


def augmented(augmenter: Augmenter | None, text: str) -> Iterator[tuple[str, bytes, float | None]]:
    """The documents ``text`` becomes under ``--augment`` (itself without), each with its content hash and,
    for an added counterfactual copy, its original's split position (a pair stays on one side of the split)."""
    if augmenter is None:
        yield text, text_digest(text), None
        return
    original = None
    for doc, is_copy in augmenter.expand(text):
        digest = text_digest(doc)
        yield doc, digest, original if is_copy else None
        original = position(digest)


def choose_val_whole(u: array, n_bytes: array, val_fraction: float) -> np.ndarray:
    """``splits.choose_val``, moving a counterfactual copy (same position as its original) that the cut
    separated from its original into validation with it: a pair is never split."""
    is_val = choose_val(u, n_bytes, val_fraction)
    if is_val.any():
        pos = np.frombuffer(u, dtype=np.float64)
        is_val |= pos == pos[is_val].max()
    return is_val


def _clean_and_stage(reader: DocumentReader, staging: Path, drop_near: bool, redact_pii: bool = False,
                     augmenter: Augmenter | None = None) -> _Kept:
    """Pass 1: normalize (and redact personal data, and augment), drop exact duplicates, detect
    near-duplicates, stage kept documents."""
    kept = _Kept()
    exact, near = ExactDeduper(), MinHashDeduper()
    with open(staging, "w", encoding="utf-8") as f:
        for doc in reader:
            text = normalize(doc.text)
            if redact_pii:  # before hashing: documents differing only in personal data become duplicates
                text, found = redact(text)
                kept.pii.update(found)
            for doc_text, digest, copy_of in augmented(augmenter, text):
                if exact.is_duplicate(digest):
                    kept.exact_duplicates += 1
                    kept.dropped["exact_duplicate"] += 1
                    continue
                # a counterfactual copy is a near-duplicate of its original by design: never checked
                if copy_of is None:
                    kept.near_checked += 1
                    if near.is_near_duplicate(doc_text):
                        kept.near_duplicates += 1
                        if drop_near:
                            kept.dropped["near_duplicate"] += 1
                            continue
                kept.u.append(position(digest) if copy_of is None else copy_of)
                kept.n_bytes.append(len(doc_text.encode("utf-8")))
                f.write(json.dumps(doc_text, ensure_ascii=False) + "\n")
                kept.count += 1
    return kept


def _staged(staging: Path, is_val: np.ndarray) -> Iterator[tuple[str, str]]:
    with open(staging, encoding="utf-8") as f:
        for i, line in enumerate(f):
            yield ("val" if is_val[i] else "train"), json.loads(line)


def _encode_and_shard(tok: TextTokenizer, staged: Iterator[tuple[str, str]], writers: dict[str, ShardWriter],
                      n_bytes: Counter) -> None:
    """Pass 2: encode in big batches (parallel in Rust) and append each document with its delimiters."""
    prefix = [tok.bos_id] if tok.bos_id is not None else []
    suffix = [tok.eos_id]

    def flush(batch: list[tuple[str, str]]) -> None:
        ids = tok.encode_batch([text for _, text in batch])
        tokens: dict[str, list[int]] = {split: [] for split in writers}
        for (split, text), doc_ids in zip(batch, ids):
            out = tokens[split]
            out += prefix
            out += doc_ids
            out += suffix
            n_bytes[split] += len(text.encode("utf-8"))
        for split, toks in tokens.items():
            if toks:
                writers[split].write(np.array(toks, dtype=writers[split].dtype))

    batch: list[tuple[str, str]] = []
    chars = 0
    for split, text in staged:
        batch.append((split, text))
        chars += len(text)
        if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
            flush(batch)
            batch, chars = [], 0
    if batch:
        flush(batch)


def prepare_data(inputs: list[str], out: str | Path, *, tokenizer: str | None = None, vocab_size: int = 8192,
                 val_fraction: float = 0.01, text_field: str = "text", shard_tokens: int = 50_000_000,
                 overwrite: bool = False, drop_near_duplicates: bool = False,
                 max_document_bytes: int = MAX_DOCUMENT_BYTES, max_line_bytes: int = MAX_DOCUMENT_LINE_BYTES,
                 document_bytes: int = DEFAULT_DOCUMENT_BYTES, encoding_errors: str = "drop-line",
                 allow_uneven_split: bool = False, redact_pii: bool = False, augment: str | None = None,
                 augment_mode: str = "two-sided", augment_p: float | None = None, augment_seed: int = 0,
                 augment_names: bool = False, log: Callable[[str], None] | None = print) -> dict:
    """Turn raw text files into a prepared data directory: ``manifest.json``, ``tokenizer.json`` and
    ``train_*.bin`` / ``val_*.bin`` token shards. Returns the manifest.

    inputs: files, directories (recursive: .txt .md .py .rst .jsonl .csv .tsv, each optionally .gz .bz2 .xz
        .zst, and .parquet; every other file is counted by extension as skipped) or globs.
    tokenizer: a tokenizer.json or HF tokenizer directory to use; otherwise a byte-level BPE of
        ``vocab_size`` is trained on the train split.
    val_fraction: share of the data held out: the documents with the lowest content hashes, up to this
        share of bytes (deterministic). The realized share is reported and checked (see allow_uneven_split).
    text_field: the field (or CSV/TSV column) holding the text of .jsonl / .csv / .tsv / .parquet records.
    drop_near_duplicates: near-duplicates are always counted; this also removes them.
    max_document_bytes: a longer document (record text or unbreakable line, in UTF-8 bytes) is skipped as
        ``too_large``.
    max_line_bytes: a longer .jsonl/.csv/.tsv line is skipped as ``line_too_long`` without ever being held whole.
    document_bytes: text files over 4x this are cut at blank lines into documents of about this size (at line
        boundaries when a block is too large); 0 keeps every file one document.
    encoding_errors: what undecodable bytes cost: ``drop-line`` (the line is dropped), ``replace`` (U+FFFD)
        or ``latin-1-fallback`` (the line is decoded as Latin-1); affected lines are counted, files are kept.
    allow_uneven_split: accept a validation split whose token share is more than 2x off val_fraction, or
        empty when val_fraction > 0 (otherwise a one-line error).
    redact_pii: replace e-mail addresses, phone numbers, IP addresses, credit-card numbers and IBANs with
        ``<EMAIL>``, ``<PHONE>``, ``<IP>``, ``<CREDIT_CARD>``, ``<IBAN>`` (``pii.py``) before deduplication;
        the counts by kind go into the manifest as ``pii_redacted``.
    augment (``cda`` or ``cda=PAIRS_FILE``), augment_mode, augment_p, augment_seed, augment_names:
        counterfactual data augmentation before deduplication (``augment.py``); manifest entry ``augment``.
    Bad records (invalid UTF-8, binary, empty, malformed JSON/CSV, missing field, too large) are counted and
    skipped. Each shard's sha256 is recorded in the manifest (checked by staging and ``verify_prepared_data``).
    """
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    out = Path(out)
    validate_request(out, tokenizer, vocab_size, val_fraction, shard_tokens, overwrite)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None  # a bad path fails before any work
    augmenter = make_augmenter(augment, augment_mode, augment_p, augment_seed, augment_names)  # checks first
    skipped: Counter = Counter()
    reader = DocumentReader(resolve_inputs(inputs, skipped), text_field, max_document_bytes=max_document_bytes,
                            max_line_bytes=max_line_bytes, document_bytes=document_bytes,
                            encoding_errors=encoding_errors)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    remove_our_files(out)
    staging = out / STAGING
    wrote = False
    try:
        say(f"reading {len(reader.files)} files" + (f" (skipped {format_counts(skipped)})" if skipped else ""))
        kept = _clean_and_stage(reader, staging, drop_near_duplicates, redact_pii, augmenter)
        dropped = reader.dropped + kept.dropped
        if kept.count == 0:
            hint = f"; {ZSTANDARD_HINT}" if dropped["needs_zstandard"] else ""
            raise FmforgeError(f"nothing usable in the inputs: read {reader.read} documents, all dropped "
                               f"({format_reasons(dropped) or 'no records found'}){hint}")
        is_val = choose_val_whole(kept.u, kept.n_bytes, val_fraction)
        n_val = int(is_val.sum())
        n_train = kept.count - n_val
        val_bytes = int(np.frombuffer(kept.n_bytes, dtype=np.int64)[is_val].sum())
        byte_share = val_bytes / max(1, sum(kept.n_bytes))
        check_split(val_fraction, n_val, kept.count, byte_share, "bytes", allow_uneven_split)  # before the work
        if tok is None:
            say(f"training a {vocab_size}-token byte-level BPE on {n_train} train documents")
            tok = train_tokenizer((t for s, t in _staged(staging, is_val) if s == "train"), vocab_size)
        dtype = shard_dtype(tok.vocab_size)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        say(f"tokenizing {kept.count} documents on {cores} cores")
        t_encode = time.perf_counter()
        wrote = True
        writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split, n in
                   (("train", n_train), ("val", n_val)) if n}
        n_bytes: Counter = Counter()
        try:
            _encode_and_shard(tok, _staged(staging, is_val), writers, n_bytes)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        shards = [s for w in writers.values() for s in w.close()]
        encode_s = time.perf_counter() - t_encode
        tokens = {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in ("train", "val")}
        if tokens["train"] == 0:
            raise FmforgeError(f"nothing usable in the inputs: no train tokens "
                               f"({format_reasons(dropped) or 'no drops'})")
        check_split(val_fraction, n_val, kept.count, tokens["val"] / max(1, tokens["train"] + tokens["val"]),
                    "tokens", allow_uneven_split)
    except BaseException:
        if wrote:  # shards of a run that failed its checks: ours, and no manifest claims them
            remove_our_files(out)
        raise
    finally:
        staging.unlink(missing_ok=True)
        if created and not any(out.iterdir()):  # failed before writing anything: leave no trace
            out.rmdir()

    tok.save(out / TOKENIZER_FILE)
    write_json_atomic(out / SPECIAL_TOKENS_FILE, tok.special_tokens_map())
    totals = Totals(sources=[{"path": s.path, "bytes": s.bytes, "sha256": s.sha256} for s in reader.sources],
                    read=reader.read, kept=kept.count, exact_duplicates=kept.exact_duplicates,
                    near_duplicates=kept.near_duplicates,
                    near_checked=kept.near_checked, dropped=dropped,
                    dropped_lines=reader.dropped_lines, repaired_lines=reader.repaired_lines, skipped=skipped)
    settings = {"text_field": text_field, "val_fraction": val_fraction, "max_document_bytes": max_document_bytes,
                "max_line_bytes": max_line_bytes, "allow_uneven_split": allow_uneven_split,
                "document_bytes": document_bytes, "encoding_errors": encoding_errors}
    manifest = build_manifest(totals, {"train": n_train, "val": n_val}, tokens, n_bytes, tok, tokenizer, dtype,
                              shards, settings, reader.target_bytes, reader.hard_bytes)
    if redact_pii:
        manifest["pii_redacted"] = redacted_counts(kept.pii)
    if augmenter is not None:
        manifest["augment"] = augment_manifest(augmenter.settings, [augmenter.stats()])
    write_json_atomic(out / MANIFEST, manifest)
    summarize(say, out, manifest, time.perf_counter() - start, encode_s, drop_near_duplicates)
    if redact_pii:
        say(f"  personal data redacted: {format_reasons(kept.pii) or 'none found'}")
    return manifest


@dataclass
class Totals:
    """What reading and deduplication saw, for the manifest (one run, or the sum of a sharded run's units)."""

    sources: list[dict]
    read: int
    kept: int
    exact_duplicates: int
    near_duplicates: int
    near_checked: int  # documents that reached the near-duplicate check (valid, not exact duplicates)
    dropped: Counter
    dropped_lines: Counter
    repaired_lines: Counter
    skipped: Counter


def build_manifest(t: Totals, counts: dict[str, int], tokens: dict[str, int], n_bytes: Counter, tok: TextTokenizer,
                   tokenizer: str | None, dtype, shards: list[dict], settings: dict, target_bytes: int,
                   hard_bytes: int) -> dict:
    """The manifest of a prepared text directory. ``settings``: text_field, val_fraction, max_document_bytes,
    max_line_bytes, allow_uneven_split, document_bytes, encoding_errors."""
    val_fraction = settings["val_fraction"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fmforge_version": __version__,
        "sources": t.sources,
        "documents": {"read": t.read, "kept": t.kept, "train": counts["train"], "val": counts["val"],
                      "exact_duplicates": t.exact_duplicates, "near_duplicates": t.near_duplicates},
        "near_duplicate_rate": t.near_duplicates / max(1, t.near_checked),
        "dropped": dict(sorted(t.dropped.items())),
        "dropped_lines": dict(sorted(t.dropped_lines.items())),
        "repaired_lines": dict(sorted(t.repaired_lines.items())),
        "skipped_files": dict(sorted(t.skipped.items())),
        "tokens": tokens,
        "bytes": {"train": n_bytes["train"], "val": n_bytes["val"]},
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                      "trained": tokenizer is None, "source": None if tokenizer is None else str(tokenizer)},
        "dtype": dtype.name,
        "shards": shards,
        "normalization": "NFC",
        "text_field": settings["text_field"],
        "val_fraction": val_fraction,
        "limits": {"max_document_bytes": settings["max_document_bytes"],
                   "max_line_bytes": settings["max_line_bytes"]},
        "split": {"val_fraction": val_fraction, "rule": RULE, "allow_uneven_split": settings["allow_uneven_split"],
                  "realized": shares({"documents": counts["train"], "tokens": tokens["train"],
                                      "bytes": n_bytes["train"]},
                                     {"documents": counts["val"], "tokens": tokens["val"], "bytes": n_bytes["val"]})},
        "text_documents": {"document_bytes": settings["document_bytes"], "target_bytes": target_bytes,
                           "max_bytes": hard_bytes},
        "encoding_errors": settings["encoding_errors"],
    }


def summarize(say: Callable[[str], None], out: Path, m: dict, elapsed: float, encode_s: float,
               dropped_near: bool) -> None:
    docs, tokens = m["documents"], m["tokens"]
    action = "dropped" if dropped_near else "kept; --drop-near-duplicates removes them"
    rate = (tokens["train"] + tokens["val"]) / max(encode_s, 1e-9)
    say(f"prepared {out} in {elapsed:.1f}s")
    say(f"  documents: read {docs['read']}, kept {docs['kept']} (train {docs['train']}, val {docs['val']})")
    say(f"  dropped: {format_reasons(Counter(m['dropped'])) or 'none'}")
    if m["dropped_lines"] or m["repaired_lines"]:
        say(f"  lines ({m['encoding_errors']}): dropped {format_reasons(Counter(m['dropped_lines'])) or 'none'}; "
            f"repaired {format_reasons(Counter(m['repaired_lines'])) or 'none'}")
    if m["skipped_files"]:
        say(f"  skipped files: {format_counts(Counter(m['skipped_files']))}")
    if m["dropped"].get("needs_zstandard"):
        say(f"  {m['dropped']['needs_zstandard']} .zst files were not read: {ZSTANDARD_HINT}")
    say(f"  near-duplicates: {docs['near_duplicates']} ({m['near_duplicate_rate']:.2%}, {action})")
    say(f"  tokens: train {tokens['train']:,}, val {tokens['val']:,} in {len(m['shards'])} {m['dtype']} shards "
        f"({rate:,.0f} tokens/s)")
    if "augment" in m:
        say(f"  {describe(m['augment'])}")
    real = m["split"]["realized"]
    say(f"  validation share: asked {m['val_fraction']:.2%}; got documents {real['documents']:.2%}, "
        f"tokens {real['tokens']:.2%}, bytes {real['bytes']:.2%}")
