"""``fmforge rag index``: a retrieval index of documents, built with an fmforge encoder.

An index is a directory: ``index.json`` (format, the encoder's identity: family and sha256 of its weights
and of its tokenizer, chunking, sources with size and hash, dropped documents by reason), ``chunks.jsonl``
(each chunk's text, source, document number, character offsets and sha256) and ``embeddings.npy`` (float32
unit vectors, one row per chunk, read without pickle). Documents come through ``data prepare``'s readers
(text, JSONL, CSV/TSV, Parquet, compressed, ``s3://``), so an empty or unreadable document is counted, not
fatal. Building into an existing index is incremental: every chunk whose text is unchanged keeps its
embedding and only new or changed text is encoded; an index built with another encoder or tokenizer is
refused by hash. ``index.json`` is written last, so a killed build leaves the old index readable.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmforge.data.limits import bounded_lines
from fmforge.data.sources import DocumentReader, resolve_inputs
from fmforge.errors import FmforgeError
from fmforge.prompt.embed import TextEncoder
from fmforge.rag.chunking import Chunk, chunk_documents
from fmforge.runs import read_small_json, temporary_beside

FORMAT = "fmforge-rag-index"
VERSION = 1
META, CHUNKS, EMBEDDINGS = "index.json", "chunks.jsonl", "embeddings.npy"
MAX_CHUNK_LINE_BYTES = 1 << 20
MAX_CHUNKS = 50_000_000


@dataclass
class Index:
    path: Path
    meta: dict
    chunks: list[Chunk]
    embeddings: np.ndarray  # [n, d] float32, unit rows

    @property
    def encoder(self) -> dict:
        return self.meta["encoder"]


def _fingerprint_problem(stored: dict, encoder: TextEncoder) -> str | None:
    for key, what in (("family", "encoder family"), ("weights_sha256", "encoder weights"),
                      ("tokenizer_sha256", "tokenizer")):
        if stored.get(key) != encoder.fingerprint[key]:
            return what
    return None


def check_encoder(index: Index, encoder: TextEncoder) -> None:
    """Refuse to query (or extend) ``index`` with an encoder other than the one that built it."""
    problem = _fingerprint_problem(index.encoder, encoder)
    if problem:
        raise FmforgeError(f"index {index.path} was built with another {problem} (sha256 differs from "
                           f"{encoder.run_dir}'s): query it with the encoder it was built with, or rebuild it")


def read_meta(path: Path) -> dict:
    meta = read_small_json(path / META)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FmforgeError(f"{path} is not an fmforge retrieval index (version {VERSION})")
    n = meta.get("n_chunks")
    if not isinstance(n, int) or not 0 <= n <= MAX_CHUNKS or not isinstance(meta.get("encoder"), dict):
        raise FmforgeError(f"{path / META} is damaged (n_chunks, encoder)")
    return meta


def _read_chunks(path: Path, n: int) -> list[Chunk]:
    chunks = []
    with open(path, "rb") as f:
        for line in bounded_lines(f, MAX_CHUNK_LINE_BYTES):
            try:
                row = json.loads(line)
                chunk = Chunk(str(row["text"]), str(row["source"]), int(row["doc"]), int(row["start"]),
                              int(row["end"]))
            except (TypeError, ValueError, KeyError, RecursionError):
                raise FmforgeError(f"{path} is damaged: a line is not a chunk record") from None
            chunks.append(chunk)
            if len(chunks) > n:
                break
    return chunks


def load_index(path: str | Path) -> Index:
    """The index at ``path``, its three files checked against each other before use."""
    path = Path(path)
    if not (path / META).is_file():
        raise FmforgeError(f"no retrieval index at {path} (build one with `fmforge rag index`)")
    meta = read_meta(path)
    try:
        chunks = _read_chunks(path / CHUNKS, meta["n_chunks"])
        embeddings = np.load(path / EMBEDDINGS, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise FmforgeError(f"cannot read the index at {path}: {str(err).splitlines()[0]}") from None
    n = meta["n_chunks"]
    if len(chunks) != n or embeddings.dtype != np.float32 or embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise FmforgeError(f"the index at {path} is damaged: {n} chunks in {META}, {len(chunks)} in {CHUNKS}, "
                           f"embeddings of shape {list(embeddings.shape)} ({embeddings.dtype})")
    return Index(path, meta, chunks, np.ascontiguousarray(embeddings))


def read_documents(inputs: list[str], text_field: str) -> tuple[list[tuple[str, str, int]], DocumentReader,
                                                                 Counter]:
    skipped: Counter = Counter()
    reader = DocumentReader(resolve_inputs(inputs, skipped), text_field=text_field, document_bytes=0)
    per_source: Counter = Counter()
    documents = []
    for document in reader:
        documents.append((document.text, document.source, per_source[document.source]))
        per_source[document.source] += 1
    return documents, reader, skipped


def _claim(out: Path) -> dict | None:
    """The meta of the index already at ``out`` (None if ``out`` is new); refuse a directory fmforge did not
    make, so nothing of the user's is overwritten."""
    if (out / META).is_file():
        return read_meta(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FmforgeError(f"{out} exists and is not an fmforge retrieval index: choose a new --out")
    return None


def _write(out: Path, meta: dict, chunks: list[Chunk], embeddings: np.ndarray) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(out / CHUNKS)
    with open(tmp, "w", encoding="utf-8") as f:
        for chunk in chunks:
            f.write(json.dumps(chunk.to_json(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / CHUNKS)
    tmp = temporary_beside(out / EMBEDDINGS)
    with open(tmp, "wb") as f:
        np.save(f, embeddings.astype(np.float32), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / EMBEDDINGS)
    tmp = temporary_beside(out / META)
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / META)


def _reusable(out: Path, old_meta: dict | None, encoder: TextEncoder, settings: dict) -> dict[str, np.ndarray]:
    """sha256 of a chunk's text -> its stored embedding, from the index being updated."""
    if old_meta is None:
        return {}
    problem = _fingerprint_problem(old_meta["encoder"], encoder)
    if problem:
        raise FmforgeError(f"{out} was built with another {problem} (sha256 differs): choose a new --out to "
                           "index with this encoder")
    if any(old_meta.get(k) != v for k, v in settings.items()):
        return {}  # other chunking: nothing to reuse
    old = load_index(out)
    return {c.sha256: old.embeddings[i] for i, c in enumerate(old.chunks)}


def build_index(inputs: list[str], encoder: str | Path, out: str | Path, *, chunk_tokens: int = 200,
                overlap: int = 32, text_field: str = "text", batch_size: int = 32, device: str = "auto",
                echo=print) -> dict:
    """Index the documents of ``inputs`` with the encoder run ``encoder`` into ``out`` (created, or updated
    incrementally). Returns the index's meta plus ``embedded`` and ``reused`` chunk counts and
    ``chunks_per_s`` (of encoding)."""
    out = Path(out)
    old_meta = _claim(out)
    enc = TextEncoder(encoder, device=device, batch_size=batch_size)
    if chunk_tokens > enc.context - 2:
        raise FmforgeError(f"--chunk-tokens {chunk_tokens} does not fit the encoder's {enc.context}-token context "
                           "(with its two special tokens)")
    settings = {"chunk_tokens": chunk_tokens, "overlap": overlap, "text_field": text_field}
    reuse = _reusable(out, old_meta, enc, settings)
    documents, reader, skipped = read_documents(inputs, text_field)
    chunks = chunk_documents(enc.tokenizer, documents, chunk_tokens, overlap)
    if not chunks:
        raise FmforgeError(f"no text to index in {', '.join(inputs)} ({reader.read} document(s) read, dropped: "
                           f"{dict(reader.dropped) or 'none'})")
    hashes = [c.sha256 for c in chunks]
    todo = sorted({h: i for i, h in enumerate(hashes) if h not in reuse}.values())
    start = time.perf_counter()
    fresh = enc.encode([chunks[i].text for i in todo]) if todo else np.zeros((0, 0), np.float32)
    seconds = time.perf_counter() - start
    vectors = dict(reuse)
    vectors.update({hashes[i]: fresh[j] for j, i in enumerate(todo)})
    embeddings = np.stack([vectors[h] for h in hashes]).astype(np.float32)
    meta = {"format": FORMAT, "version": VERSION, "encoder": {"run_dir": str(Path(encoder).resolve()),
                                                              **enc.fingerprint},
            **settings, "n_chunks": len(chunks), "dim": int(embeddings.shape[1]), "documents": len(documents),
            "dropped": dict(reader.dropped), "skipped_files": dict(skipped),
            "sources": [{"path": s.path, "bytes": s.bytes, "sha256": s.sha256} for s in reader.sources]}
    _write(out, meta, chunks, embeddings)
    stats = {"embedded": len(todo), "reused": len(chunks) - len(todo),
             "chunks_per_s": len(todo) / seconds if todo and seconds > 0 else None}
    dropped = sum(reader.dropped.values())
    echo(f"indexed {len(documents)} document(s) as {len(chunks)} chunk(s) of <= {chunk_tokens} tokens "
         f"({stats['embedded']} embedded, {stats['reused']} reused) into {out}"
         + (f"; {dropped} document(s) dropped: {dict(reader.dropped)}" if dropped else ""))
    return {**meta, **stats}
