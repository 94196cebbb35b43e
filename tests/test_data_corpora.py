"""Real corpora as they come: large files cut into documents, splits that honour the request, compressed and
tabular inputs, skipped files reported, and undecodable bytes costing only their lines."""

import bz2
import csv
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import pydoc_data.topics
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from fmforge.data.compression import zstandard_module
from fmforge.data.manifest import load_manifest
from fmforge.data.prepare import prepare_data
from fmforge.data.sources import DocumentReader, resolve_inputs
from fmforge.data.textcut import DEFAULT_DOCUMENT_BYTES, HARD_BOUND_FACTOR, bounds, cut_documents
from fmforge.data.verify import verify_prepared_data
from fmforge.errors import FmforgeError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOPICS = pydoc_data.topics.topics
PROSE = "\n\n".join(TOPICS[k] for k in sorted(TOPICS))  # ~465 KB of English documentation
# Lines of PROSE that Latin-1 can encode and that are not ASCII ("max-temp °F", "ß"): a Latin-1 file's lines.
LATIN1_LINES = [line for line in PROSE.splitlines() if any(127 < ord(c) < 256 for c in line)
                and all(ord(c) < 256 for c in line)]


def _prep(inputs, out, **kw):
    kw.setdefault("vocab_size", 300)
    kw.setdefault("log", None)
    return prepare_data([str(i) for i in inputs], out, **kw)


def _stdlib_bytes(limit: int) -> bytes:
    """Real code: the standard library's top-level modules, concatenated, cut to ``limit`` bytes."""
    data = b"".join(p.read_bytes() + b"\n\n" for p in sorted(STDLIB.glob("*.py")))
    assert len(data) >= limit
    return data[:limit]


def _texts(files, **kw) -> list[str]:
    return [d.text for d in DocumentReader(files, **kw)]


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "code.txt"
    path.write_bytes(_stdlib_bytes(2_000_000))
    return path


# --- large files are cut into documents ----------------------------------------------------------------------

def test_a_large_file_is_cut_into_bounded_documents_that_join_back_to_its_bytes(big_file):
    docs = _texts([big_file])
    target, hard = bounds(DEFAULT_DOCUMENT_BYTES, 1 << 30)
    sizes = [len(d.encode()) for d in docs]
    assert "".join(docs).encode() == big_file.read_bytes()
    assert len(docs) >= 2_000_000 // hard and max(sizes) <= hard
    assert sorted(sizes)[len(sizes) // 2] <= target  # most documents are merged blocks up to the target


def test_a_file_up_to_the_hard_bound_stays_one_document_and_zero_turns_cutting_off(tmp_path, big_file):
    small = tmp_path / "small.txt"
    small.write_bytes(big_file.read_bytes()[:HARD_BOUND_FACTOR * DEFAULT_DOCUMENT_BYTES])
    assert len(_texts([small])) == 1
    assert len(_texts([big_file], document_bytes=0)) == 1
    reader = DocumentReader([big_file], document_bytes=0, max_document_bytes=1_000_000)
    assert list(reader) == [] and reader.dropped == {"too_large": 1}


def test_a_block_without_blank_lines_is_cut_at_line_boundaries():
    lines = [line + b"\n" for line in _stdlib_bytes(300_000).split(b"\n") if line.strip()]  # one block
    docs = list(cut_documents(lines, 10_000, 40_000))
    assert [line for doc in docs for line in doc] == lines  # nothing lost, nothing cut inside a line
    assert len(docs) > 25 and all(9_000 < sum(map(len, doc)) <= 10_000 for doc in docs[:-1])


# --- splits honour the request -----------------------------------------------------------------------------

def test_one_large_file_splits_near_the_requested_share(big_file, tmp_path):
    m = _prep([big_file], tmp_path / "out", val_fraction=0.05)
    real = m["split"]["realized"]
    assert 0.025 <= real["tokens"] <= 0.10 and 0.025 <= real["bytes"] <= 0.10
    assert m["documents"]["val"] >= 1 and m["documents"]["train"] >= 20
    assert real["tokens"] == m["tokens"]["val"] / (m["tokens"]["train"] + m["tokens"]["val"])
    assert m["split"]["val_fraction"] == m["val_fraction"] == 0.05


def test_two_files_of_very_different_size_no_longer_put_the_big_one_in_validation(big_file, tmp_path):
    small = tmp_path / "news.txt"
    small.write_text(TOPICS["assignment"] + "\n\n" + TOPICS["calls"], encoding="utf-8")  # ~25 KB vs 2 MB
    m = _prep([small, big_file], tmp_path / "out", val_fraction=0.05)
    assert 0.025 <= m["split"]["realized"]["tokens"] <= 0.10  # before: one file each, ~99% in validation
    assert m["bytes"]["train"] > 0.9 * big_file.stat().st_size


def test_an_impossible_split_is_one_line_error_unless_allowed(tmp_path):
    one_block = tmp_path / "textwrap.py"
    one_block.write_bytes((STDLIB / "textwrap.py").read_bytes())
    with pytest.raises(FmforgeError, match=r"val_fraction 0.5 asks for a validation split, but it is empty.*"
                                           r"--allow-uneven-split") as err:
        _prep([one_block], tmp_path / "out", val_fraction=0.5)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    m = _prep([one_block], tmp_path / "out", val_fraction=0.5, allow_uneven_split=True)
    assert (m["documents"]["train"], m["documents"]["val"]) == (1, 0) and m["split"]["allow_uneven_split"]
    assert m["split"]["realized"] == {"documents": 0.0, "tokens": 0.0, "bytes": 0.0}


def test_the_split_is_deterministic_down_to_the_shard_bytes(tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text(PROSE, encoding="utf-8")
    runs = [_prep([prose], tmp_path / name, val_fraction=0.1, document_bytes=16384) for name in "ab"]
    assert runs[0]["shards"] == runs[1]["shards"] and runs[0]["split"] == runs[1]["split"]
    assert 0.05 <= runs[0]["split"]["realized"]["tokens"] <= 0.2
    for s in runs[0]["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()


# --- undecodable bytes cost only their lines -----------------------------------------------------------------

@pytest.fixture
def latin1_file(tmp_path) -> Path:
    """PROSE in UTF-8, except its few Latin-1-encodable non-ASCII lines, written in Latin-1."""
    assert len(LATIN1_LINES) >= 3
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"".join(line.encode("latin-1" if line.rstrip("\n") in LATIN1_LINES else "utf-8")
                              for line in PROSE.splitlines(keepends=True)))
    return path


def test_latin1_lines_are_dropped_alone_and_counted_by_reason(latin1_file):
    reader = DocumentReader([latin1_file])
    kept = "".join(d.text for d in reader)
    expected = "".join(line for line in PROSE.splitlines(keepends=True) if line.rstrip("\n") not in LATIN1_LINES)
    assert kept == expected
    assert reader.dropped_lines == {"invalid_utf8": len(LATIN1_LINES)} and reader.dropped == {}


@pytest.mark.parametrize("policy, repaired", [("latin-1-fallback", "invalid_utf8_as_latin1"),
                                              ("replace", "invalid_utf8_replaced")])
def test_latin1_lines_can_be_repaired_instead(latin1_file, policy, repaired):
    reader = DocumentReader([latin1_file], encoding_errors=policy)
    kept = "".join(d.text for d in reader)
    assert reader.repaired_lines == {repaired: len(LATIN1_LINES)} and not reader.dropped_lines
    if policy == "latin-1-fallback":
        assert kept == PROSE
    else:
        assert kept.count("\ufffd") >= len(LATIN1_LINES) and len(kept.splitlines()) == len(PROSE.splitlines())


def test_the_labelled_sentences_with_six_latin1_lines_keep_their_other_194():
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        pytest.skip("gensim is not installed (its wheel ships pang_lee_polarity.cor)")
    path = Path(spec.origin).parent / "test" / "test_data" / "pang_lee_polarity.cor"
    reader = DocumentReader([path])
    docs = list(reader)
    assert len(docs) == 1 and docs[0].text.count("\n") == 194  # before: the whole file dropped as invalid_utf8
    assert reader.dropped_lines == {"invalid_utf8": 6} and reader.dropped == {}


def test_prepare_records_line_counts_and_the_policy(latin1_file, tmp_path):
    m = _prep([latin1_file], tmp_path / "out", val_fraction=0.1, document_bytes=16384)
    assert m["dropped_lines"] == {"invalid_utf8": len(LATIN1_LINES)} and m["dropped"] == {}
    assert m["encoding_errors"] == "drop-line" and m["repaired_lines"] == {}
    with pytest.raises(FmforgeError, match="encoding_errors must be one of drop-line, replace, latin-1-fallback"):
        _prep([latin1_file], tmp_path / "bad", encoding_errors="ignore")


# --- compressed and tabular inputs -------------------------------------------------------------------------

def _zstd_compress(data: bytes) -> bytes:
    return zstandard_module().ZstdCompressor().compress(data)


COMPRESSORS = {".gz": lambda b: gzip.compress(b, mtime=0), ".bz2": bz2.compress, ".xz": lzma.compress,
               ".zst": _zstd_compress}
NO_ZSTD = pytest.mark.skipif(zstandard_module() is None, reason="zstandard is not installed (pip install zstandard)")


@pytest.fixture
def plain_corpus(tmp_path) -> Path:
    """Real text as .txt (cut into documents), .jsonl, .csv and .tsv."""
    d = tmp_path / "plain"
    d.mkdir()
    (d / "prose.txt").write_text(PROSE, encoding="utf-8")
    keys = sorted(TOPICS)[:30]
    with open(d / "topics.jsonl", "w") as f:
        for key in keys:
            f.write(json.dumps({"id": key, "text": TOPICS[key]}) + "\n")
    for name, delimiter in (("topics.csv", ","), ("topics.tsv", "\t")):
        with open(d / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["id", "text"])
            writer.writerows([key, TOPICS[key]] for key in keys)
    return d


@pytest.mark.parametrize("ext", [".gz", ".bz2", ".xz", pytest.param(".zst", marks=NO_ZSTD)])
def test_compressed_copies_give_the_same_documents_as_the_plain_files(plain_corpus, tmp_path, ext):
    plain = sorted(plain_corpus.iterdir())
    packed = []
    for p in plain:
        packed.append(tmp_path / (p.name + ext))
        packed[-1].write_bytes(COMPRESSORS[ext](p.read_bytes()))
    expected = _texts(plain)
    assert len(expected) > 90 and _texts(packed) == expected
    reader = DocumentReader(packed)
    list(reader)
    assert [(s.bytes, s.sha256) for s in reader.sources] == \
        [(p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in packed]  # as stored


def test_csv_and_tsv_rows_are_documents_and_a_missing_column_is_counted(plain_corpus, tmp_path):
    keys = sorted(TOPICS)[:30]
    for name in ("topics.csv", "topics.tsv"):
        assert _texts([plain_corpus / name]) == [TOPICS[k] for k in keys]
    reader = DocumentReader([plain_corpus / "topics.csv"], text_field="body")
    assert list(reader) == [] and reader.dropped == {"missing_text_field": 30}


def test_a_truncated_gzip_keeps_what_was_read_and_is_counted(plain_corpus, tmp_path):
    packed = gzip.compress((plain_corpus / "topics.jsonl").read_bytes(), mtime=0)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    reader = DocumentReader([tmp_path / "cut.jsonl.gz"])
    docs = list(reader)
    assert 0 < len(docs) < 30 and reader.dropped == {"corrupt_compressed": 1}


def test_zst_without_zstandard_is_counted_and_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    (tmp_path / "a.txt.zst").write_bytes(b"(\xb5/\xfd not really zstd")
    reader = DocumentReader([tmp_path / "a.txt.zst"])
    assert list(reader) == [] and reader.dropped == {"needs_zstandard": 1} and len(reader.sources) == 1
    with pytest.raises(FmforgeError, match="needs_zstandard 1.*fmforge\\[zstd\\]"):
        _prep([tmp_path / "a.txt.zst"], tmp_path / "out")


def test_every_file_a_directory_walk_skips_is_reported_by_extension(plain_corpus, tmp_path):
    d = tmp_path / "mixed"
    (d / ".git").mkdir(parents=True)
    (d / "a.txt.gz").write_bytes(gzip.compress((plain_corpus / "prose.txt").read_bytes(), mtime=0))
    (d / "b.jsonl").write_bytes((plain_corpus / "topics.jsonl").read_bytes())
    (d / "b.jsonl.gz").write_bytes(gzip.compress((d / "b.jsonl").read_bytes(), mtime=0))
    (d / "c.csv").write_bytes((plain_corpus / "topics.csv").read_bytes())
    (d / "notes.log").write_text("not a known extension")
    (d / "dump.json.gz").write_bytes(gzip.compress(b"[]"))
    (d / "README").write_text("no extension")
    (d / ".DS_Store").write_bytes(b"\x00")
    (d / ".git" / "config").write_text("[core]")
    skipped = Counter()
    files = resolve_inputs([str(d)], skipped)
    assert [p.name for p in files] == ["a.txt.gz", "b.jsonl", "b.jsonl.gz", "c.csv"]
    assert skipped == {".log": 1, ".json.gz": 1, "(none)": 1, "(hidden)": 2}
    lines = []
    m = _prep([d], tmp_path / "out", val_fraction=0.1, log=lines.append)
    assert m["skipped_files"] == {"(hidden)": 2, "(none)": 1, ".json.gz": 1, ".log": 1}
    assert "reading 4 files (skipped (hidden) 2, (none) 1, .json.gz 1, .log 1)" in lines
    assert any(line.startswith("  skipped files: ") for line in lines)
    assert any(line.startswith("  validation share: asked 10.00%; got documents") for line in lines)
    assert m["dropped"] == {"exact_duplicate": 60}  # b.jsonl.gz and c.csv repeat b.jsonl's 30 topics


def test_one_file_named_several_ways_is_read_once(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("one file\n")
    (d / "link.txt").symlink_to(d / "a.txt")
    os.link(d / "a.txt", d / "hard.txt")
    (d / "b.txt").write_text("another file\n")
    named = [str(d / "a.txt"), str(d / "." / "a.txt"), str(d / "link.txt"), str(d / "hard.txt"), str(d / "b.txt")]
    assert [p.name for p in resolve_inputs(named)] == ["a.txt", "b.txt"]


# --- compatibility ---------------------------------------------------------------------------------------------

def test_a_directory_prepared_before_these_fields_still_loads_and_verifies(tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text(PROSE, encoding="utf-8")
    out = tmp_path / "out"
    _prep([prose], out, val_fraction=0.1, document_bytes=16384)
    m = json.loads((out / "manifest.json").read_text())
    for key in ("split", "skipped_files", "dropped_lines", "repaired_lines", "text_documents", "encoding_errors"):
        del m[key]
    (out / "manifest.json").write_text(json.dumps(m))
    assert load_manifest(out)["tokens"] == m["tokens"]
    verify_prepared_data(out, log=None)


def test_an_input_that_cannot_be_looked_at_is_a_one_line_error_naming_it(tmp_path):
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)  # stat fails with ELOOP, not "no such file"
    with pytest.raises(FmforgeError, match=r"cannot read input .*loop\.txt: Too many levels of symbolic links"):
        resolve_inputs([str(loop)])
    with pytest.raises(FmforgeError, match=r"input not found: .*missing\.txt$"):
        resolve_inputs([str(tmp_path / "missing.txt")])
