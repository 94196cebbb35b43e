"""The pipeline's state in one SQLite file (``OUT/pipeline.sqlite``): runs, step executions, the step cache and
the lineage graph. Every change is one transaction, so a runner killed at any moment (``kill -9``) leaves the
file as it was before or after that change, never between. Content hashes of artifacts live here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import time
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.io.fs import sha256_file

STATE_FILE = "pipeline.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, pipeline TEXT, params TEXT, started REAL,
    finished REAL, status TEXT);
CREATE TABLE IF NOT EXISTS steps (run INTEGER, name TEXT, key TEXT, state TEXT, started REAL, finished REAL,
    reused INTEGER DEFAULT 0, error TEXT, outputs TEXT, upstream TEXT, PRIMARY KEY (run, name));
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, step TEXT, created REAL, outputs TEXT, files TEXT);
CREATE TABLE IF NOT EXISTS artifacts (id INTEGER PRIMARY KEY, path TEXT, hash TEXT, kind TEXT, run INTEGER,
    step TEXT, created REAL, UNIQUE (path, hash));
CREATE TABLE IF NOT EXISTS edges (parent INTEGER, child INTEGER, UNIQUE (parent, child));
"""
MAX_MANIFEST_FILES = 100_000
MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


# ---------------------------------------------------------------------------------------------------- hashing


def safetensors_digest(path: Path) -> str | None:
    """sha256 of a safetensors file's canonical form: its header JSON with sorted keys, then its tensor bytes.

    The Rust writer serialises the ``__metadata__`` mapping in hash-map order, which differs from process to
    process, so two files holding the same tensors and metadata can differ byte for byte; this digest does
    not. ``None`` when the file is not a well-formed safetensors file (it is then hashed as plain bytes)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                return None
            (length,) = struct.unpack("<Q", prefix)
            if not 2 <= length <= min(MAX_SAFETENSORS_HEADER, size - 8):
                return None
            header = json.loads(f.read(length).decode("utf-8"))
            if not isinstance(header, dict):
                return None
            digest = hashlib.sha256(b"safetensors\0")
            digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
            digest.update(b"\0")
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (ValueError, UnicodeDecodeError):
        return None
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 of a file's content: of its canonical form for ``*.safetensors``, else of its bytes."""
    if path.suffix == ".safetensors":
        digest = safetensors_digest(path)
        if digest is not None:
            return digest
    return sha256_file(path)


def file_manifest(path: Path) -> dict[str, str]:
    """``{relative name: content_hash}`` of a file (name ``""``) or of every regular file under a directory;
    symlinks are not followed (an artifact is what its producer wrote)."""
    if path.is_symlink():
        return {"": "symlink:" + os.readlink(path)}
    if path.is_file():
        return {"": content_hash(path)}
    if not path.is_dir():
        return {}
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            if full.is_symlink() or not full.is_file():
                continue
            out[str(full.relative_to(path))] = content_hash(full)
            if len(out) > MAX_MANIFEST_FILES:
                raise FmforgeError(f"{path} holds over {MAX_MANIFEST_FILES:,} files; too many to track as one artifact")
    return out


def manifest_hash(manifest: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def still_matches(path: Path, manifest: dict[str, str]) -> bool:
    """Every file recorded when the artifact was produced is still there with the same content (files a later
    step added, such as RUN_DIR/eval/, do not change the artifact)."""
    if not manifest:
        return False
    try:
        if "" in manifest:
            return file_manifest(path) == manifest
        return all(content_hash(path / name) == digest for name, digest in manifest.items())
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- store


class State:
    def __init__(self, out: Path):
        self.path = out / STATE_FILE
        self.db = connect(self.path)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def new_run(self, pipeline: str, params: dict) -> int:
        cur = self.db.execute("INSERT INTO runs (pipeline, params, started, status) VALUES (?, ?, ?, 'running')",
                              (pipeline, json.dumps(params), time.time()))
        return int(cur.lastrowid)

    def finish_run(self, run: int, status: str) -> None:
        self.db.execute("UPDATE runs SET finished=?, status=? WHERE id=?", (time.time(), status, run))

    def set_step(self, run: int, name: str, state: str, *, key: str | None = None, error: str | None = None,
                 outputs: dict | None = None, reused: bool = False, upstream: list[str] | None = None) -> None:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT started FROM steps WHERE run=? AND name=?", (run, name)).fetchone()
            if row is None:
                self.db.execute("INSERT INTO steps (run, name, state, upstream) VALUES (?, ?, ?, ?)",
                                (run, name, state, json.dumps(upstream or [])))
            started = row[0] if row and row[0] else (now if state == "running" or reused else None)
            finished = now if state in ("succeeded", "failed", "skipped", "reused", "stopped") else None
            self.db.execute("UPDATE steps SET state=?, key=COALESCE(?, key), started=?, finished=?, reused=?, "
                            "error=?, outputs=COALESCE(?, outputs) WHERE run=? AND name=?",
                            (state, key, started, finished, int(reused), error,
                             json.dumps(outputs) if outputs is not None else None, run, name))

    def steps(self, run: int) -> list[dict]:
        rows = self.db.execute("SELECT name, key, state, started, finished, reused, error, outputs, upstream "
                               "FROM steps WHERE run=? ORDER BY rowid", (run,)).fetchall()
        cols = ("name", "key", "state", "started", "finished", "reused", "error", "outputs", "upstream")
        return [dict(zip(cols, r)) for r in rows]

    def last_run(self) -> dict | None:
        row = self.db.execute("SELECT id, pipeline, params, started, finished, status FROM runs "
                              "ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return dict(zip(("id", "pipeline", "params", "started", "finished", "status"), row))

    # cache

    def cached(self, key: str, expire_s: float | None) -> dict | None:
        row = self.db.execute("SELECT created, outputs, files FROM cache WHERE key=?", (key,)).fetchone()
        if row is None or (expire_s is not None and time.time() - row[0] > expire_s):
            return None
        return {"outputs": json.loads(row[1]), "files": json.loads(row[2])}

    def remember(self, key: str, step: str, outputs: dict, files: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?)",
                        (key, step, time.time(), json.dumps(outputs), json.dumps(files)))

    # lineage

    def record_lineage(self, run: int, step: str, inputs: list[tuple[str, str, str]],
                       outputs: list[tuple[str, str, str]]) -> None:
        """``inputs``/``outputs``: (path, hash, kind). Outputs are produced by ``step``; each is derived from
        every input."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            ids_in = [self._artifact(p, h, k, None, None, now) for p, h, k in inputs]
            for p, h, k in outputs:
                child = self._artifact(p, h, k, run, step, now)
                for parent in ids_in:
                    if parent != child:
                        self.db.execute("INSERT OR IGNORE INTO edges VALUES (?, ?)", (parent, child))

    def _artifact(self, path: str, digest: str, kind: str, run: int | None, step: str | None, now: float) -> int:
        row = self.db.execute("SELECT id FROM artifacts WHERE path=? AND hash=?", (path, digest)).fetchone()
        if row:
            if step is not None:
                self.db.execute("UPDATE artifacts SET run=?, step=?, kind=? WHERE id=?", (run, step, kind, row[0]))
            return int(row[0])
        cur = self.db.execute("INSERT INTO artifacts (path, hash, kind, run, step, created) VALUES (?, ?, ?, ?, ?, ?)",
                              (path, digest, kind, run, step, now))
        return int(cur.lastrowid)

    def artifact(self, path: str, digest: str | None = None) -> dict | None:
        sql = "SELECT id, path, hash, kind, run, step, created FROM artifacts WHERE path=?"
        row = self.db.execute(sql + (" AND hash=?" if digest else "") + " ORDER BY created DESC, id DESC LIMIT 1",
                              (path, digest) if digest else (path,)).fetchone()
        return dict(zip(("id", "path", "hash", "kind", "run", "step", "created"), row)) if row else None

    def neighbours(self, artifact_id: int, up: bool) -> list[dict]:
        near, far = ("child", "parent") if up else ("parent", "child")
        rows = self.db.execute(f"SELECT a.id, a.path, a.hash, a.kind, a.run, a.step, a.created FROM edges e "
                               f"JOIN artifacts a ON a.id = e.{far} WHERE e.{near}=? ORDER BY a.path",
                               (artifact_id,)).fetchall()
        return [dict(zip(("id", "path", "hash", "kind", "run", "step", "created"), r)) for r in rows]


def open_state(out: Path, create: bool = False) -> State:
    if not create and not (out / STATE_FILE).is_file():
        raise FmforgeError(f"{out} holds no pipeline state ({STATE_FILE}); give the --out of `fmforge pipeline run`")
    return State(out)
