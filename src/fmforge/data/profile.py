"""``fmforge data profile``: what is in a corpus before anyone trains on it.

Inputs are raw files (read by the same readers as ``data prepare``: ``sources.py``, normalized as
``clean.py`` does), a prepared text directory (its shards decoded with its own tokenizer) or a prepared image
directory. The output directory gets ``profile.json`` (every figure, with the inputs' hashes and a timestamp)
and ``profile.html`` (one self-contained page, plots embedded as PNG, no scripts).

Text is analysed in chunks by worker processes (``profile_text.analyze_chunk``); the chunks' statistics are
merged in input order, so the duplicate counts are exactly those a single pass would find. ``--reference``
compares the corpus with a prepared text directory tokenized by the same tokenizer: Jensen-Shannon divergence
of the unigram token distributions (base 2, so in [0, 1]), the out-of-reference vocabulary rate, the
Kolmogorov-Smirnov statistic between document lengths in tokens, and the most over- and under-represented
tokens (log2 ratio of add-0.5 smoothed probabilities).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np

from fmforge import __version__
from fmforge.data.compression import split_compression
from fmforge.data.fastscan import warm_up
from fmforge.data.image_shards import INDEX, load_index
from fmforge.data.manifest import MANIFEST, load_manifest, write_json_atomic
from fmforge.data.profile_html import render_profile
from fmforge.data.profile_images import profile_images
from fmforge.data.profile_text import TextStats, analyze_chunk, summarize
from fmforge.data.shards import read_shard
from fmforge.data.sources import DocumentReader, format_counts, resolve_inputs
from fmforge.data.tokenizer import TextTokenizer, load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.io.paths import confined

PROFILE_JSON = "profile.json"
PROFILE_HTML = "profile.html"
CHUNK_DOCS = 512
CHUNK_CHARS = 2_000_000
MIN_CHUNK_CHARS = 250_000
TOP_TOKENS = 20
MIN_TOKEN_COUNT = 5  # over/under-represented tokens: only those seen this often in the two corpora together

_worker: dict = {}
POOL_EXIT_THREAD = "fmforge-profile-pool-exit"  # stops a finished pool's workers in the background


def _init_worker(tokenizer_path: str | None, near_duplicates: bool) -> None:
    # A forked worker inherits the parent's Python-level signal handlers (a training loop's stop flag, a
    # server's graceful shutdown): with one of those, the SIGTERM that ends a pool would be caught and ignored.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _worker["tok"] = load_tokenizer(tokenizer_path) if tokenizer_path else None
    _worker["near"] = near_duplicates
    # A first, tiny chunk while the main process reads the first real one: a forked worker's first pass
    # otherwise pays for faulting in its copy of the parent's pages and the kernels' dispatch.
    analyze_chunk(["Warm up, 1 2 3 — naïve ünïcode\nmail a@b.example 10.0.0.1 +44 20 7946 0958"], None, True)


def _run_chunk(items: list) -> TextStats:
    return analyze_chunk(items, _worker["tok"], _worker["near"])


@contextmanager
def worker_pool(workers: int, tokenizer_path: str | None, near: bool) -> Iterator[Pool | None]:
    """``workers`` processes analysing chunks (None for one: the chunks are analysed in this process). Open it
    before reading the inputs: the workers start (fork, warm up) while the first chunk is read."""
    warm_up()  # compile (or load) the kernels once, before forking: the workers inherit them
    if workers <= 1:
        _init_worker(tokenizer_path, near)
        yield None
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, _init_worker, (tokenizer_path, near))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    # Done: the workers are stopped (SIGTERM, then joined) in the background while the results are summarised.
    threading.Thread(target=pool.terminate, name=POOL_EXIT_THREAD).start()


def in_order(chunks: Iterator[list], pool: Pool | None, workers: int) -> Iterator[TextStats]:
    """Each chunk's statistics, in input order; at most 2 chunks per worker in flight (bounded memory)."""
    if pool is None:
        yield from map(_run_chunk, chunks)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_run_chunk, (chunk,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def chunk_target(index: int, done: int, total: int | None, workers: int) -> int:
    """Characters for chunk ``index`` once ``done`` characters are chunked, of about ``total`` (None: unknown).

    Sizes double from MIN_CHUNK_CHARS up to CHUNK_CHARS, so every worker starts on a small first chunk instead
    of waiting for the main process to read a full one; with the input's size known they shrink again to a
    quarter of the rest per worker, so the workers finish together instead of one waiting on the other's last
    chunk."""
    tail = (total - done) // (2 * workers) if total is not None and done < total else CHUNK_CHARS
    return max(MIN_CHUNK_CHARS, min(CHUNK_CHARS, MIN_CHUNK_CHARS << min(index, 16), tail))


def chunked(items: Iterator, size_of: Callable[[object], int], total: int | None = None,
             workers: int = 1) -> Iterator[list]:
    chunk, size, done, index = [], 0, 0, 0
    target = chunk_target(0, 0, total, workers)
    for item in items:
        chunk.append(item)
        size += size_of(item)
        if len(chunk) >= CHUNK_DOCS or size >= target:
            yield chunk
            done, index = done + size, index + 1
            chunk, size = [], 0
            target = chunk_target(index, done, total, workers)
    if chunk:
        yield chunk


def _local_size(files: list) -> int | None:
    """The bytes of uncompressed local files (about their characters), or None when that says little."""
    if any(isinstance(f, str) or split_compression(f.name)[1] for f in files):
        return None
    try:
        return sum(os.stat(f).st_size for f in files)
    except OSError:
        return None


def _documents_of(tokens: np.ndarray, tok: TextTokenizer) -> Iterator[np.ndarray]:
    """The documents of a shard: ``[bos] + ids + [eos]`` runs, delimiters stripped."""
    ends = np.flatnonzero(tokens == tok.eos_id)
    start = 0
    for end in ends.tolist():
        doc = tokens[start:end]
        if tok.bos_id is not None and len(doc) and doc[0] == tok.bos_id:
            doc = doc[1:]
        yield np.asarray(doc)
        start = end + 1


def _prepared_docs(data_dir: Path, manifest: dict, tok: TextTokenizer) -> Iterator[np.ndarray]:
    for entry in manifest["shards"]:
        tokens = read_shard(confined(data_dir, entry["file"], f"{data_dir / MANIFEST} shard"))
        yield from _documents_of(tokens, tok)


def _tokenizer_info(tok: TextTokenizer, source: str) -> dict:
    return {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "source": source}


def _prepared_tokenizer(data_dir: Path, manifest: dict) -> tuple[TextTokenizer, Path]:
    path = confined(data_dir, manifest["tokenizer"]["file"], f"{data_dir / MANIFEST} tokenizer")
    return load_tokenizer(path), path


def kind_of(inputs: list[str]) -> str:
    """``text-dir``, ``image-dir`` or ``raw``; a missing path is a one-line error (for raw inputs, from
    ``resolve_inputs``, which stats each file anyway)."""
    if len(inputs) == 1 and not any(c in inputs[0] for c in "*?[") and "://" not in inputs[0] \
            and not Path(inputs[0]).exists():
        raise FmforgeError(f"input not found: {inputs[0]}")
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        d = Path(inputs[0])
        if (d / MANIFEST).is_file():
            return "text-dir"
        if (d / INDEX).is_file():
            return "image-dir"
    return "raw"


def _reference(reference: str | None) -> tuple[Path, dict, TextTokenizer, Path] | None:
    if reference is None:
        return None
    ref = Path(reference)
    if ref.is_dir() and (ref / INDEX).is_file() and not (ref / MANIFEST).is_file():
        raise FmforgeError(f"--reference {ref} is a prepared image directory; it takes a prepared text directory")
    manifest = load_manifest(ref)
    tok, path = _prepared_tokenizer(ref, manifest)
    return ref, manifest, tok, path


def _text_stats(inputs: list[str], kind: str, tokenizer: str | None, ref_tok: Path | None, text_field: str,
                near_duplicates: bool, workers: int, say) -> tuple[TextStats, dict | None, dict]:
    """Run the analysis over raw inputs or a prepared directory; returns the statistics, the tokenizer entry
    and a description of the inputs."""
    if kind == "text-dir":
        data_dir = Path(inputs[0])
        manifest = load_manifest(data_dir)
        tok, path = _prepared_tokenizer(data_dir, manifest)
    else:
        path = Path(tokenizer) if tokenizer else ref_tok
        tok = load_tokenizer(path) if path else None
    with worker_pool(workers, str(path) if path else None, near_duplicates) as pool:
        if kind == "text-dir":
            items: Iterator = _prepared_docs(data_dir, manifest, tok)
            expected = None
            info = _tokenizer_info(tok, "prepared data")
            source = {"prepared": str(data_dir), "sources": manifest.get("sources", [])}
            say(f"profiling prepared data {data_dir} ({sum(manifest['tokens'].values()):,} tokens)")
        else:
            skipped: Counter = Counter()
            reader = DocumentReader(resolve_inputs(inputs, skipped), text_field)
            info = _tokenizer_info(tok, "--tokenizer" if tokenizer else "the reference's") if tok else None
            items = (d.text for d in reader)
            expected = _local_size(reader.files)
            source = {"raw": list(inputs), "reader": reader, "skipped": skipped}
            say(f"profiling {len(reader.files)} files" + (f" (skipped {format_counts(skipped)})" if skipped else ""))
        total = TextStats()
        for part in in_order(chunked(items, len, expected, workers), pool, workers):
            total.merge(part)
    if "reader" in source:
        reader = source.pop("reader")
        source.update(sources=[{"path": s.path, "bytes": s.bytes, "sha256": s.sha256} for s in reader.sources],
                      read=reader.read, dropped=dict(reader.dropped), skipped=dict(source.pop("skipped")))
    return total, info, source


def _special_ids(tok: TextTokenizer) -> list[int]:
    return [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]


def _reference_counts(ref: Path, manifest: dict, tok: TextTokenizer) -> tuple[np.ndarray, list[int]]:
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    lengths: list[int] = []
    for entry in manifest["shards"]:
        tokens = read_shard(confined(ref, entry["file"], f"{ref / MANIFEST} shard"))
        if tokens.size:
            counts += np.bincount(tokens, minlength=tok.vocab_size)[:tok.vocab_size]
        lengths += [len(d) for d in _documents_of(tokens, tok)]
    counts[_special_ids(tok)] = 0
    return counts, lengths


def ks_statistic(a: list[int], b: list[int]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    x, y = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    if not len(x) or not len(y):
        return float("nan")
    grid = np.concatenate([x, y])
    return float(np.abs(np.searchsorted(x, grid, "right") / len(x) - np.searchsorted(y, grid, "right") / len(y)).max())


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two count vectors over the same ids."""
    p, q = p_counts / max(1, p_counts.sum()), q_counts / max(1, q_counts.sum())
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def delta(stats: TextStats, ref: Path, manifest: dict, tok: TextTokenizer) -> dict:
    """The ``delta`` section: how this corpus differs from the reference, token by token."""
    ref_counts, ref_lengths = _reference_counts(ref, manifest, tok)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    if stats.token_counts is not None:
        counts += stats.token_counts[:tok.vocab_size]
    counts[_special_ids(tok)] = 0
    total, ref_total = max(1, int(counts.sum())), max(1, int(ref_counts.sum()))
    unseen = (counts > 0) & (ref_counts == 0)
    p = (counts + 0.5) / (total + 0.5 * tok.vocab_size)
    q = (ref_counts + 0.5) / (ref_total + 0.5 * tok.vocab_size)
    ratio = np.log2(p / q)
    frequent = np.flatnonzero(counts + ref_counts >= MIN_TOKEN_COUNT)
    order = frequent[np.argsort(ratio[frequent], kind="stable")]

    def row(i: int) -> dict:
        return {"id": int(i), "token": tok.decode([int(i)]), "log2_ratio": float(ratio[i]),
                "share": float(counts[i] / total), "reference_share": float(ref_counts[i] / ref_total)}

    return {
        "reference": str(ref), "reference_tokens": int(ref_counts.sum()), "reference_documents": len(ref_lengths),
        "js_divergence": js_divergence(counts, ref_counts),
        "out_of_reference_rate": float(counts[unseen].sum() / total),
        "out_of_reference_types": int(unseen.sum()), "types": int((counts > 0).sum()),
        "length_ks": ks_statistic(stats.doc_tokens, ref_lengths),
        "length_median": float(np.median(stats.doc_tokens)) if stats.doc_tokens else None,
        "reference_length_median": float(np.median(ref_lengths)) if ref_lengths else None,
        "over_represented": [row(i) for i in order[::-1][:TOP_TOKENS] if ratio[i] > 0],
        "under_represented": [row(i) for i in order[:TOP_TOKENS] if ratio[i] < 0],
    }


def _check_reference_tokenizer(info: dict | None, ref_tok: TextTokenizer, reference: str) -> None:
    if info is not None and info["sha256"] != ref_tok.sha256:
        raise FmforgeError(f"--reference {reference} was tokenized with another tokenizer "
                           f"({ref_tok.sha256[:12]}, this data: {info['sha256'][:12]}); the delta compares "
                           "token distributions, so both need the same one")


def profile_data(inputs: list[str], out: str | Path, *, reference: str | None = None, tokenizer: str | None = None,
                 text_field: str = "text", near_duplicates: bool = True, workers: int | None = None,
                 title: str | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Profile a corpus into ``out/profile.json`` and ``out/profile.html``; returns the profile.

    inputs: raw files/directories/globs (as ``data prepare`` reads them), or one prepared text or image directory.
    reference: a prepared text directory to compare with (same tokenizer as the profiled data).
    tokenizer: a tokenizer.json for raw inputs (token counts, bytes per token); with raw inputs and a
        reference but no tokenizer, the reference's tokenizer is used.
    near_duplicates: also count MinHash near-duplicates (the most expensive statistic).
    workers: processes for the text analysis (default: the usable cores).
    """
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    if not inputs:
        raise FmforgeError("no inputs given: name files, directories or a prepared data directory")
    kind = kind_of(inputs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FmforgeError(f"output {out} exists and is not a directory")
    ref = _reference(reference)
    if kind == "image-dir" and ref is not None:
        raise FmforgeError("--reference compares token distributions; it does not apply to an image directory")
    if tokenizer is not None and kind != "raw":
        raise FmforgeError("--tokenizer is for raw inputs; a prepared directory is profiled with its own tokenizer")
    if tokenizer is not None and ref is not None:
        _check_reference_tokenizer(_tokenizer_info(load_tokenizer(tokenizer), "--tokenizer"), ref[2], reference)
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    doc: dict = {"format": "fmforge-profile", "format_version": 1, "fmforge": __version__, "kind": kind,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "title": title or f"Data profile: {', '.join(inputs)[:80]}"}
    if kind == "image-dir":
        doc["inputs"] = {"prepared": inputs[0], "index": load_index_hashes(inputs[0])}
        doc["images"] = profile_images(inputs[0])
    else:
        if kind == "text-dir" and ref is not None:
            manifest = load_manifest(inputs[0])
            _check_reference_tokenizer({"sha256": manifest["tokenizer"]["sha256"]}, ref[2], reference)
        stats, info, source = _text_stats(inputs, kind, tokenizer, ref[3] if ref else None, text_field,
                                          near_duplicates, workers, say)
        if stats.documents == 0:
            raise FmforgeError(f"nothing to profile: no documents in {', '.join(inputs)[:200]}")
        doc["inputs"] = source
        doc["text"] = summarize(stats, near_duplicates, info)
        if ref is not None:
            doc["delta"] = delta(stats, ref[0], ref[1], ref[2])
    doc["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / PROFILE_JSON, doc)
    html = render_profile(doc)
    tmp = out / (PROFILE_HTML + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out / PROFILE_HTML)
    say(f"profiled in {doc['seconds']:.1f}s: {out / PROFILE_JSON}, {out / PROFILE_HTML}")
    return doc


def load_index_hashes(data_dir: str) -> list[dict]:
    """The image shards' names and recorded sha256 (what identifies the profiled data)."""
    return [{"file": s["file"], "sha256": s.get("sha256")} for s in load_index(data_dir)["shards"]]


def profile_command(inputs: list[str], *, out: str, reference: str | None = None, tokenizer: str | None = None,
                    text_field: str = "text", near_duplicates: bool = True, workers: int | None = None) -> None:
    """CLI entry: ``fmforge data profile INPUT... --out DIR [--reference DATA_DIR] [--tokenizer FILE]
    [--text-field NAME] [--no-near-duplicates] [--workers N]``."""
    profile_data(inputs, out, reference=reference, tokenizer=tokenizer, text_field=text_field,
                 near_duplicates=near_duplicates, workers=workers)
