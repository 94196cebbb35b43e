"""Data that fmforge did not write (issue 20, data side): huge images, unbounded lines and documents,
names that leave their directory, and shards that changed after preparation. Each test feeds the bad
input and checks for the counted skip or the one-line error, and that nothing outside the intended
directory was written or read."""

import io
import json
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from fmforge.data import limits, loader, staging
from fmforge.data.chat import read_chats
from fmforge.data.image_loader import EvalTransform, eval_batches
from fmforge.data.image_prepare import prepare_images
from fmforge.data.image_shards import ImageShards, ImageTooLarge, load_index
from fmforge.data.labelled import read_labelled
from fmforge.data.loader import TokenWindows, eval_windows
from fmforge.data.manifest import load_manifest
from fmforge.data.preferences import read_preferences
from fmforge.data.prepare import prepare_data
from fmforge.data.shards import HEADER_SIZE
from fmforge.data.verify import verify_prepared_data
from fmforge.errors import FmforgeError
from fmforge.io.paths import UnsafePath

MiB = 1 << 20


# ---- helpers ----


def _texts(n: int, size: int = 400) -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k][:size] for k in sorted(topics)[:n]]


def _write_docs(d: Path, n: int = 6) -> Path:
    d.mkdir(parents=True)
    for i, text in enumerate(_texts(n)):
        (d / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return d


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


def _png(path: Path, seed: int, size=(8, 8)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path, "PNG")


def _image_tree(root: Path, per_class: int = 4) -> Path:
    for c in ("0", "1"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            _png(root / c / f"{i}.png", seed=10 * int(c) + i)
    return root


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """A small prepared text directory with several shards per split, each with its sha256."""
    corpus = _write_docs(tmp_path_factory.mktemp("corpus") / "docs", 12)
    out = tmp_path_factory.mktemp("prepared") / "text"
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.2, shard_tokens=300, log=None)
    return out


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    tree = _image_tree(tmp_path_factory.mktemp("raw") / "tree", 6)
    out = tmp_path_factory.mktemp("prepared") / "images"
    prepare_images([str(tree)], out, val_fraction=0.0, shard_samples=4, log=None)
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(src: Path, name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy


@pytest.fixture
def memory_url():
    """A fresh prefix in fsspec's in-memory object store (a stand-in for s3://), removed afterwards."""
    bucket = f"fmforge-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{bucket}/data"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# ---- 4: small files, huge images ----


def test_small_png_that_decodes_to_60_megapixels_is_counted_too_large_without_being_decoded(tmp_path,
                                                                                           monkeypatch):
    tree = _image_tree(tmp_path / "tree")
    Image.new("1", (8000, 7500)).save(tree / "0" / "bomb.png", "PNG")  # 60 Mpx in a few KB
    assert (tree / "0" / "bomb.png").stat().st_size < 64 * 1024
    decoded = []
    for cls, name in ((ImageFile.ImageFile, "load"), (PngImagePlugin.PngImageFile, "verify")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, _o=original: (decoded.append(self.size), _o(self))[1])
    index = prepare_images([str(tree)], tmp_path / "out", val_fraction=0.0, log=None)
    assert index["dropped"] == {"too_large": 1}
    assert index["dropped_examples"]["too_large"] == ["0/bomb.png"]
    assert index["samples"]["kept"] == 8 and index["limits"]["max_pixels"] == limits.MAX_PIXELS
    assert (8000, 7500) not in decoded and (8, 8) in decoded  # the bomb's pixels were never decoded
    written = {p for p in _files(tmp_path) if not p.startswith("out/")}
    assert written == {f"tree/{p}" for p in _files(tree)}  # nothing written beside the output


def test_max_pixels_is_configurable_and_validated(tmp_path):
    tree = _image_tree(tmp_path / "tree")
    _png(tree / "1" / "big.png", seed=99, size=(20, 20))
    index = prepare_images([str(tree)], tmp_path / "out", max_pixels=100, val_fraction=0.0, log=None)
    assert index["dropped"] == {"too_large": 1} and index["samples"]["kept"] == 8
    with pytest.raises(FmforgeError, match="max_pixels must be a positive integer") as err:
        prepare_images([str(tree)], tmp_path / "out2", max_pixels=0, log=None)
    _one_line(err)
    assert not (tmp_path / "out2").exists()


def test_loader_skips_a_stored_image_over_its_pixel_limit_without_decoding_it(tmp_path, monkeypatch):
    tree = _image_tree(tmp_path / "tree")
    _png(tree / "1" / "big.png", seed=99, size=(40, 40))
    prepare_images([str(tree)], tmp_path / "out", val_fraction=0.0, log=None)  # default limit: all kept
    shards = ImageShards(tmp_path / "out", "train", max_pixels=100)
    sizes = [Image.open(io.BytesIO(shards.raw(i)[0])).size for i in range(len(shards))]
    big = sizes.index((40, 40))
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (decoded.append(self.size), original(self))[1])
    with pytest.raises(ImageTooLarge, match="40x40 = 1,600 pixels, above the limit of 100") as err:
        shards.image(big)
    _one_line(err)
    warnings = []
    batches = list(eval_batches(shards, 3, EvalTransform(8, resize=8), log=warnings.append))
    assert sum(len(y) for _, y in batches) == len(shards)  # the next sample stood in for it
    assert len(warnings) == 1 and "above the limit" in warnings[0] and shards.where(big) in warnings[0]
    assert (40, 40) not in decoded


# ---- 8: unbounded reads ----


def test_bounded_lines_never_hold_an_over_long_line_and_still_see_every_byte():
    data = b"first\n" + b"x" * (9 * MiB) + b"\nlast"
    pieces, seen = [], []

    class Spy(io.BytesIO):
        def readline(self, size=-1):
            line = super().readline(size)
            pieces.append(len(line))
            return line

    lines = list(limits.bounded_lines(Spy(data), 1000, seen.append))
    assert lines == [b"first\n", None, b"last"]
    assert max(pieces) <= 4 * MiB and b"".join(seen) == data


def test_prepare_counts_over_long_lines_and_documents_and_skips_them(tmp_path):
    docs = _write_docs(tmp_path / "in")
    big = "word " * 1000  # 5000 bytes
    (docs / "big.txt").write_text(big)
    with open(docs / "records.jsonl", "w") as f:
        f.write(json.dumps({"text": _texts(8)[7]}) + "\n")
        f.write(json.dumps({"text": "y" * 2500}) + "\n")  # a document over the limit, on a line under it
        f.write(json.dumps({"text": "z" * 5000}) + "\n")  # a line over the limit
    m = prepare_data([str(docs)], tmp_path / "out", vocab_size=300, max_document_bytes=2000,
                     max_line_bytes=3000, allow_uneven_split=True, log=None)  # 7 documents: no 1% split
    assert m["dropped"] == {"too_large": 2, "line_too_long": 1}
    assert m["documents"]["kept"] == 7 and m["documents"]["read"] == 10
    assert m["limits"] == {"max_document_bytes": 2000, "max_line_bytes": 3000}
    by_path = {Path(s["path"]).name: s for s in m["sources"]}  # skipped files are still hashed whole
    assert by_path["big.txt"]["bytes"] == 5000
    assert by_path["records.jsonl"]["bytes"] == (docs / "records.jsonl").stat().st_size
    with pytest.raises(FmforgeError, match="max_line_bytes must be a positive integer"):
        prepare_data([str(docs)], tmp_path / "out2", max_line_bytes=0, log=None)


def test_fine_tuning_rows_count_lines_over_one_mib_and_skip_them(tmp_path):
    huge = "h" * (limits.MAX_RECORD_LINE_BYTES + 10)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "x"}]}) + "\n")
    records, dropped = read_chats(tmp_path / "chat.jsonl")
    assert records == [chat["messages"]] and dropped == {"line_too_long": 1}

    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    (tmp_path / "pref.jsonl").write_text(json.dumps({**pair, "chosen": huge}) + "\n" + json.dumps(pair) + "\n")
    assert read_preferences(tmp_path / "pref.jsonl") == ([pair], {"line_too_long": 1})

    (tmp_path / "labelled.txt").write_text(f"__label__pos {huge}\n__label__neg a fine line\n")
    assert read_labelled(tmp_path / "labelled.txt") == ([("a fine line", "neg")], {"line_too_long": 1})


def test_image_lists_count_over_long_lines_and_rows_the_csv_module_refuses(tmp_path):
    _png(tmp_path / "a.png", seed=1)
    _png(tmp_path / "b.png", seed=2)
    long_caption = "c" * 200_000  # over the csv module's own field limit (128 KiB), under 1 MiB per line
    (tmp_path / "list.csv").write_text(
        "image,caption\n"
        "a.png,a fine caption\n"
        f"a.png,{'d' * 600}\n"  # over max_line_bytes below
        f'b.png,"{long_caption}"\n'
        "b.png,another fine caption\n", encoding="utf-8")
    index = prepare_images([str(tmp_path / "list.csv")], tmp_path / "out", max_line_bytes=500, val_fraction=0.0,
                           log=None)
    assert index["dropped"] == {"line_too_long": 2}  # both over 500 bytes
    index = prepare_images([str(tmp_path / "list.csv")], tmp_path / "out2", val_fraction=0.0, log=None)
    assert index["dropped"] == {"malformed_csv": 1} and index["samples"]["kept"] == 3
    rows = [{"image": "a.png", "caption": "x" * 800}, {"image": "b.png", "caption": "ok"},
            {"image": "/dev/zero", "caption": "an endless file is never read"}]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = prepare_images([str(tmp_path / "list.jsonl")], tmp_path / "out3", max_line_bytes=500,
                           val_fraction=0.0, log=None)
    assert index["dropped"] == {"line_too_long": 1, "unreadable_file": 1}
    assert index["dropped_examples"]["line_too_long"] == [f"{tmp_path / 'list.jsonl'}:1"]


# ---- 9: names that leave their directory ----


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "a/../../x.bin", 42, None, ["x"]])
def test_text_manifest_shard_name_outside_its_directory_or_not_a_string_is_a_one_line_error(
        text_data, copy_of, monkeypatch, bad):
    data = copy_of(text_data)
    _edit_json(data / "manifest.json", lambda m: m["shards"][0].update(file=bad))
    opened = []
    monkeypatch.setattr(loader, "read_shard", lambda p: opened.append(p))
    with pytest.raises(UnsafePath, match="manifest.json: shard entry 0") as err:
        TokenWindows(data, "train", 16)
    _one_line(err)
    assert opened == []  # refused before any shard was opened


def test_text_shard_symlinked_outside_its_directory_is_refused(text_data, copy_of, tmp_path):
    data = copy_of(text_data)
    first = load_manifest(data)["shards"][0]["file"]
    outside = tmp_path / "elsewhere.bin"
    (data / first).rename(outside)
    (data / first).symlink_to(outside)
    with pytest.raises(UnsafePath, match="leads outside .*through a symlink") as err:
        TokenWindows(data, "train", 16)
    _one_line(err)


def test_damaged_shard_entries_are_one_line_errors_not_type_errors(text_data, copy_of):
    data = copy_of(text_data)
    for edit, match in ((lambda m: m.update(shards=[7]), "shard entry 0 is not an object"),
                        (lambda m: m["shards"][0].update(split=None), "split None"),
                        (lambda m: m["shards"][0].update(tokens="many"), "tokens 'many' is not a count"),
                        (lambda m: m["shards"][0].update(sha256="abc"), "not 64 hex digits"),
                        (lambda m: m["tokenizer"].update(file="../../tok.json"), "tokenizer entry")):
        shutil.copy(text_data / "manifest.json", data / "manifest.json")
        _edit_json(data / "manifest.json", edit)
        with pytest.raises(FmforgeError, match=match) as err:
            load_manifest(data)
        _one_line(err)


@pytest.mark.parametrize("bad", ["../outside.tar", 3.5])
def test_image_index_shard_name_outside_its_directory_is_a_one_line_error(image_data, copy_of, bad):
    data = copy_of(image_data)
    _edit_json(data / "index.json", lambda m: m["shards"][0].update(file=bad))
    for open_it in (load_index, lambda d: ImageShards(d, "train")):
        with pytest.raises(UnsafePath, match="index.json: shard entry 0") as err:
            open_it(data)
        _one_line(err)


def test_staging_fetches_only_listed_names_and_refuses_names_that_leave_the_cache(text_data, memory_url,
                                                                                  tmp_path):
    staging.publish_prepared_data(text_data, memory_url)
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{memory_url}/unlisted.bin", b"not in the manifest")
    cache = tmp_path / "cache"
    local = staging.stage_prepared_data(memory_url, cache_dir=cache)
    assert not (local / "unlisted.bin").exists()
    assert _files(local) - {".lock"} == _files(text_data)

    manifest = json.loads((text_data / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../../escaped.bin"
    fs.pipe_file(f"{memory_url}/manifest.json", json.dumps(manifest).encode())
    before = _files(tmp_path)
    with pytest.raises(UnsafePath, match="shard entry 0") as err:
        staging.stage_prepared_data(memory_url, cache_dir=cache)
    _one_line(err)
    assert _files(tmp_path) == before  # nothing written, inside or outside the cache


# ---- 10: verification ----


def test_text_shards_record_their_sha256_and_verify_catches_a_same_size_change(text_data, copy_of):
    data = copy_of(text_data)
    shards = load_manifest(data)["shards"]
    assert all(len(s["sha256"]) == 64 for s in shards) and len(shards) >= 3
    result = verify_prepared_data(data, log=None)
    assert (result["kind"], result["verified"], result["unverified"], result["failed"]) == (
        "text", len(shards) + 1, 0, 0)  # the shards and the tokenizer

    vocab = load_manifest(data)["tokenizer"]["vocab_size"]
    tokens = np.memmap(data / shards[1]["file"], dtype="<u2", mode="r+", offset=HEADER_SIZE)
    tokens[1] = (int(tokens[1]) + 1) % vocab  # another valid id: same size, same header
    tokens.flush()
    del tokens
    lines = []
    with pytest.raises(FmforgeError, match=f"1 of {len(shards) + 1} files bad .*{shards[1]['file']} does not "
                                           "match its recorded sha256") as err:
        verify_prepared_data(data, log=lines.append)
    _one_line(err)
    assert any(shards[1]["file"] in line for line in lines)
    assert verify_prepared_data(data, strict=False, log=None)["failed"] == 1


def test_directory_prepared_before_shard_hashes_loads_and_verifies_as_unverified(text_data, copy_of):
    data = copy_of(text_data)
    _edit_json(data / "manifest.json", lambda m: [s.pop("sha256") for s in m["shards"]])
    windows = TokenWindows(data, "train", 16)
    assert len(windows.batch([0, 1])) == 2
    lines = []
    result = verify_prepared_data(data, log=lines.append)
    n = len(load_manifest(data)["shards"])
    assert (result["verified"], result["unverified"], result["failed"]) == (1, n, 0)
    assert {f["status"] for f in result["files"][1:]} == {"unverified"}
    assert "carry no sha256" in lines[-1]


def test_image_shard_changed_after_preparation_fails_verify(image_data, copy_of):
    data = copy_of(image_data)
    assert verify_prepared_data(data, log=None)["verified"] == len(load_index(data)["shards"])
    target = data / load_index(data)["shards"][0]["file"]
    raw = bytearray(target.read_bytes())
    raw[-1024] ^= 0xFF  # tar padding: the tar still reads, the hash does not match
    target.write_bytes(bytes(raw))
    with pytest.raises(FmforgeError, match="does not match its recorded sha256") as err:
        verify_prepared_data(data, log=None)
    _one_line(err)


def test_staging_rejects_a_remote_text_shard_whose_bytes_changed_but_size_and_header_did_not(
        text_data, memory_url, tmp_path):
    staging.publish_prepared_data(text_data, memory_url)
    name = load_manifest(text_data)["shards"][0]["file"]
    raw = bytearray((text_data / name).read_bytes())
    raw[-1] ^= 0x01
    fsspec.filesystem("memory").pipe_file(f"{memory_url}/{name}", bytes(raw))
    with pytest.raises(FmforgeError, match=f"is corrupt: {memory_url}/{name} does not match its recorded "
                                           "sha256 .*still bad") as err:
        staging.stage_prepared_data(memory_url, cache_dir=tmp_path / "cache")
    _one_line(err)
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # the copy never claims completeness


def test_image_data_is_staged_and_its_shard_hashes_are_checked(image_data, memory_url, tmp_path):
    staging.publish_prepared_data(image_data, memory_url)
    local = staging.stage_prepared_data(memory_url, cache_dir=tmp_path / "cache")
    assert len(ImageShards(local, "train")) == len(ImageShards(image_data, "train"))

    name = load_index(image_data)["shards"][0]["file"]
    raw = bytearray((image_data / name).read_bytes())
    raw[-1024] ^= 0xFF
    fsspec.filesystem("memory").pipe_file(f"{memory_url}/{name}", bytes(raw))
    (local / "index.json").unlink()  # as if the remote had been replaced: stage again
    with pytest.raises(FmforgeError, match=f"{memory_url}/{name} does not match its recorded sha256") as err:
        staging.stage_prepared_data(memory_url, cache_dir=tmp_path / "cache")
    _one_line(err)


def test_token_id_at_or_above_the_vocabulary_is_a_one_line_error_naming_the_shard(text_data, copy_of):
    data = copy_of(text_data)
    manifest = load_manifest(data)
    vocab = manifest["tokenizer"]["vocab_size"]
    train = [s["file"] for s in manifest["shards"] if s["split"] == "train"]
    tokens = np.memmap(data / train[0], dtype="<u2", mode="r+", offset=HEADER_SIZE)
    tokens[5] = vocab  # one past the last id: a device-side assert on a GPU
    tokens.flush()
    del tokens
    windows = TokenWindows(data, "train", 16)
    assert len(windows) > windows.starts[1]  # the second shard has windows of its own
    windows.batch([int(windows.starts[1])])  # shards without bad ids read fine
    with pytest.raises(FmforgeError, match=f"{train[0]} holds id {vocab} .*vocabulary has {vocab} ids") as err:
        windows.batch([0])
    _one_line(err)
    with pytest.raises(FmforgeError, match="vocabulary has 100 ids"):  # a smaller model vocabulary also counts
        list(eval_windows(TokenWindows(data, "train", 16, vocab_size=100), 4))
