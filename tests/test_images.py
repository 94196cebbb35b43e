"""`fmforge data prepare-images`, the tar-shard reader and the image loader, on real bundled images."""

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from fmforge.data.builtin_images import (
    digits_pixels,
    skimage_photos,
    write_digits,
    write_lfw_faces,
    write_skimage_captions,
)
from fmforge.data.image_loader import EvalTransform, ImageBatchLoader, TrainTransform, eval_batches
from fmforge.data.image_prepare import prepare_images
from fmforge.data.image_shards import ImageShards, load_index
from fmforge.errors import FmforgeError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def digits(digits_dir, tmp_path_factory) -> Path:
    """Digits prepared into several shards per split."""
    out = tmp_path_factory.mktemp("prepared") / "digits"
    prepare_images([str(digits_dir)], out, shard_samples=400, val_fraction=0.1, log=None)
    return out


def _photo_jpeg(quality=90) -> bytes:
    buf = io.BytesIO()
    Image.open(next(f for name, f, _ in skimage_photos() if name == "chelsea")).convert("RGB").save(
        buf, "JPEG", quality=quality)
    return buf.getvalue()


def _sources(shards: ImageShards) -> list[str]:
    """The ``source`` each sample's KEY.json records, in sample order."""
    found = {}
    for n, file in enumerate(shards.files):
        with tarfile.open(shards.data_dir / file) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    found[n, m.name.split(".")[0]] = json.loads(tar.extractfile(m).read())["source"]
    return [found[int(shards.shard_of[i]), shards.keys[i]] for i in range(len(shards))]


def _loader(data, seed=7, rank=0, world_size=1, **kw):
    kw.setdefault("workers", 2)
    return ImageBatchLoader(ImageShards(data, "train"), global_batch=256, micro_batch=64, seed=seed, rank=rank,
                            world_size=world_size, transform=TrainTransform(16), **kw)


def _steps(loader, n):
    return [loader.next_step() for _ in range(n)]


def _assert_same_steps(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for (xa, ya), (xb, yb) in zip(step_a, step_b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- the shards hold exactly the source images ---------------------------------------------------------

def test_digits_round_trip_pixels_and_labels_equal_the_source(digits):
    from sklearn.datasets import load_digits

    reference = load_digits()
    pixels = digits_pixels(reference.images)
    index = load_index(digits)
    assert index["mode"] == "classification" and index["classes"] == [str(d) for d in range(10)]
    seen = set()
    for split in ("train", "val"):
        shards = ImageShards(digits, split)
        for i, source in enumerate(_sources(shards)):
            n = int(Path(source).stem)  # <label>/<n>.png
            image, label = Image.open(io.BytesIO(shards.raw(i)[0])), shards.target(i)
            assert image.format == "PNG"
            assert np.array_equal(np.asarray(image), pixels[n])
            assert np.array_equal(np.asarray(shards.image(i))[..., 1], pixels[n])  # gray → RGB, unchanged
            assert label == reference.target[n]
            seen.add(n)
    assert seen == set(range(len(reference.target)))  # every digit exactly once across the splits


def test_index_counts_equal_tar_contents(digits):
    index = load_index(digits)
    assert len(index["shards"]) >= 4
    for entry in index["shards"]:
        path = digits / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["bytes"]
        with tarfile.open(path) as tar:
            names = tar.getnames()
        per_key = Counter(n.split(".", 1)[0] for n in names)
        assert len(per_key) == entry["samples"] <= 400
        assert set(per_key.values()) == {3}  # KEY.png, KEY.cls, KEY.json
    totals = {s: sum(e["samples"] for e in index["shards"] if e["split"] == s) for s in ("train", "val")}
    assert totals == {"train": index["samples"]["train"], "val": index["samples"]["val"]}
    assert index["samples"]["kept"] == index["samples"]["read"] == 1797 and index["dropped"] == {}
    assert [sum(c) for c in (index["class_counts"]["train"], index["class_counts"]["val"])] == \
        [totals["train"], totals["val"]]
    assert 0.05 < totals["val"] / 1797 < 0.15


def test_prepare_is_reproducible_and_refuses_to_clobber_without_overwrite(tmp_path):
    faces = write_lfw_faces(tmp_path)
    a = prepare_images([str(faces)], tmp_path / "a", shard_samples=64, log=None)
    b = prepare_images([str(faces)], tmp_path / "b", shard_samples=64, log=None)
    assert a["classes"] == ["face", "non_face"] and a["samples"]["kept"] == 200
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    with pytest.raises(FmforgeError, match="--overwrite"):
        prepare_images([str(faces)], tmp_path / "a", log=None)
    c = prepare_images([str(faces)], tmp_path / "a", shard_samples=1000, overwrite=True, log=None)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        ["index.json"] + [s["file"] for s in c["shards"]])


# --- the loader: order, ranks, resume --------------------------------------------------------------------

def test_resume_mid_run_matches_uninterrupted_with_augmentation(digits):
    uninterrupted = _steps(_loader(digits), 9)  # 1.5k train images / 256 = 5 steps per epoch: crosses one
    first = _loader(digits)
    head = _steps(first, 4)
    state = first.state_dict()
    resumed = _loader(digits)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint would store it
    _assert_same_steps(head + _steps(resumed, 5), uninterrupted)
    x = uninterrupted[0][0][0]
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32


def test_augmentation_is_random_per_epoch_but_fixed_per_sample(digits):
    loader = _loader(digits)
    a0, b0, a1 = loader.sample(5, epoch=0)[0], loader.sample(5, epoch=0)[0], loader.sample(5, epoch=1)[0]
    assert torch.equal(a0, b0) and not torch.equal(a0, a1)
    torch.manual_seed(0)  # the model's random draws neither disturb nor are disturbed by augmentation
    before = torch.rand(3)
    torch.manual_seed(0)
    loader.sample(5, epoch=0)
    assert torch.equal(torch.rand(3), before)


def test_two_ranks_partition_each_global_batch(digits):
    whole = _steps(_loader(digits, workers=1), 2)
    ranks = [_steps(_loader(digits, rank=r, world_size=2), 2) for r in range(2)]
    for step, (r0, r1) in enumerate(zip(*ranks)):
        images = torch.cat([x for x, _ in r0 + r1])
        labels = torch.cat([y for _, y in r0 + r1])
        assert torch.equal(images, torch.cat([x for x, _ in whole[step]]))
        assert torch.equal(labels, torch.cat([y for _, y in whole[step]]))
        assert len(r0) == len(r1) == 2  # 128 images per rank in micro-batches of 64


def test_resume_refuses_a_different_order(digits):
    state = _loader(digits, seed=1).state_dict()
    with pytest.raises(FmforgeError, match="seed"):
        _loader(digits, seed=2).load_state_dict(state)


def test_damaged_shard_sample_is_replaced_by_the_next_and_counted(digits, tmp_path):
    import shutil

    data = tmp_path / "damaged"
    shutil.copytree(digits, data)
    shards = ImageShards(data, "val")
    offset, size = (int(v) for v in shards.offsets[3][:2])
    with open(data / shards.files[0], "r+b") as f:  # overwrite sample 3's PNG bytes in place
        f.seek(offset)
        f.write(b"\0" * size)
    warnings = []
    batches = list(eval_batches(ImageShards(data, "val"), 8, EvalTransform(8, resize=8), log=warnings.append))
    clean = list(eval_batches(ImageShards(digits, "val"), 8, EvalTransform(8, resize=8)))
    (x, y), (cx, cy) = batches[0], clean[0]
    assert torch.equal(x[3], cx[4]) and y[3] == cy[4]  # the next sample stands in for the damaged one
    assert torch.equal(x[:3], cx[:3]) and torch.equal(x[4:], cx[4:])
    assert len(warnings) == 1 and shards.keys[3] in warnings[0]


# --- bad records are counted, not fatal --------------------------------------------------------------------

def test_bad_images_and_records_are_counted_by_reason(tmp_path, digits_dir):
    root = tmp_path / "tree"
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for png in sorted((digits_dir / label).iterdir())[:5]:
            (root / label / png.name).write_bytes(png.read_bytes())
    jpeg = _photo_jpeg()
    (root / "0" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "1" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "1" / "empty.png").write_bytes(b"")
    (root / "1" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes((digits_dir / "0" / "0000.png").read_bytes())
    index = prepare_images([str(root)], tmp_path / "out", log=None)
    assert index["dropped"] == {"empty_file": 1, "non_image_file": 1, "not_an_image": 1,
                                "outside_class_folder": 1, "truncated_image": 1}
    assert index["samples"]["kept"] == 10 and index["samples"]["read"] == 15
    assert index["dropped_examples"]["truncated_image"] == ["0/truncated.jpg"]

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "photo.jpg").write_bytes(jpeg)
    (lists / "bad.jpg").write_bytes(jpeg[:2000])
    (lists / "pairs.csv").write_text(
        "image,caption\n"
        "photo.jpg,A cat on a chair.\n"
        "photo.jpg,\n"  # missing caption
        "gone.jpg,A file that does not exist.\n"
        ",No image path.\n"
        "bad.jpg,Truncated.\n"
        f'{lists / "photo.jpg"},"The same cat, by absolute path."\n', encoding="utf-8")
    index = prepare_images([str(lists / "pairs.csv")], tmp_path / "captions", log=None)
    assert index["mode"] == "captions"
    assert index["dropped"] == {"missing_caption": 1, "missing_file": 1, "missing_image_path": 1,
                                "truncated_image": 1}
    assert index["samples"] == {"read": 6, "kept": 2, "train": 2, "val": 0}  # one image: one split
    shards = ImageShards(tmp_path / "captions", "train")
    assert [shards.target(i) for i in range(2)] == ["A cat on a chair.", "The same cat, by absolute path."]
    assert shards.raw(0)[0] == jpeg and shards.exts[0] == "jpg"  # original bytes kept


def test_labels_from_a_jsonl_list_and_unknown_labels(tmp_path, digits_dir):
    rows = [{"image": str(p), "label": p.parent.name} for d in ("3", "5", "8") for p in
            sorted((digits_dir / d).iterdir())[:4]]
    rows += [{"image": str(digits_dir / "1" / "0001.png")}, {"image": 42, "label": "3"}]
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + "\n{not json\n", encoding="utf-8")
    index = prepare_images([str(path)], tmp_path / "out", label_field="label", classes=["5", "3"],
                           val_fraction=0, log=None)
    assert index["classes"] == ["5", "3"] and index["samples"]["kept"] == 8
    assert index["dropped"] == {"malformed_json": 1, "missing_image_path": 1, "missing_label": 1,
                                "unknown_label": 4}
    shards = ImageShards(tmp_path / "out", "train")
    assert sorted(shards.target(i) for i in range(len(shards))) == [0] * 4 + [1] * 4


def test_exotic_formats_are_reencoded_to_png_with_the_same_pixels(tmp_path):
    import skimage.data

    root = tmp_path / "tree" / "gif"
    root.mkdir(parents=True)
    gif = Path(skimage.data.__file__).parent / "no_time_for_that_tiny.gif"
    (root / "anim.gif").write_bytes(gif.read_bytes())
    Image.open(Path(skimage.data.__file__).parent / "page.png").save(root / "page.bmp")
    index = prepare_images([str(tmp_path / "tree")], tmp_path / "out", val_fraction=0, log=None)
    assert index["formats"] == {"png": 2}
    shards = ImageShards(tmp_path / "out", "train")
    sources = _sources(shards)
    decoded = {s: shards.image(i) for i, s in enumerate(sources)}
    assert np.array_equal(np.asarray(decoded["gif/page.bmp"]), np.asarray(Image.open(root / "page.bmp").convert("RGB")))
    assert np.array_equal(np.asarray(decoded["gif/anim.gif"]), np.asarray(Image.open(gif).convert("RGB")))


def test_captions_round_trip_on_skimage_photos(tmp_path):
    captions = write_skimage_captions(tmp_path)
    expected = {json.loads(line)["image"]: json.loads(line)["caption"] for line in captions.read_text().splitlines()}
    assert len(expected) >= 15 and expected["astronaut.png"].startswith("Color image of the astronaut")
    index = prepare_images([str(captions)], tmp_path / "out", val_fraction=0.2, shard_samples=8, log=None)
    assert index["samples"]["kept"] == len(expected) and index["samples"]["val"] >= 1
    got = {}
    for split in ("train", "val"):
        shards = ImageShards(tmp_path / "out", split)
        for i, source in enumerate(_sources(shards)):
            got[source] = shards.target(i)
            assert shards.raw(i)[0] == (captions.parent / source).read_bytes()
    assert got == expected
    loader = ImageBatchLoader(ImageShards(tmp_path / "out", "train"), global_batch=4, micro_batch=2, seed=0,
                              transform=TrainTransform(32))
    (x, texts), _ = loader.next_step()
    assert x.shape == (2, 3, 32, 32) and all(t in expected.values() for t in texts)


# --- user errors: one line, exit 2 ---------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_prepares_images_and_reports(tmp_path):
    faces = write_lfw_faces(tmp_path)
    r = run_cli("data", "prepare-images", faces, "--out", tmp_path / "out", "--shard-samples", "50")
    assert r.returncode == 0, r.stderr
    assert "kept 200" in r.stdout and load_index(tmp_path / "out")["samples"]["kept"] == 200


@pytest.mark.parametrize("case", ["missing_input", "nothing_usable", "missing_column"])
@pytest.mark.slow
def test_cli_user_errors_are_one_line(tmp_path, case):
    if case == "missing_input":
        inputs, expect = [tmp_path / "nope"], "input not found"
    elif case == "nothing_usable":
        (tmp_path / "tree" / "a").mkdir(parents=True)
        (tmp_path / "tree" / "a" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
        inputs, expect = [tmp_path / "tree"], "nothing usable"
    else:
        (tmp_path / "l.csv").write_text("path,text\nx.jpg,hi\n")
        inputs, expect = [tmp_path / "l.csv"], "no 'image' column"
    r = run_cli("data", "prepare-images", *inputs, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.startswith("fmforge: error: ") and expect in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_reader_errors_are_one_line(tmp_path, digits):
    with pytest.raises(FmforgeError, match="no index.json"):
        ImageShards(tmp_path, "train")
    (tmp_path / "index.json").write_text("{broken")
    with pytest.raises(FmforgeError, match="not valid JSON"):
        ImageShards(tmp_path, "train")
    with pytest.raises(FmforgeError, match="fewer than one global batch"):
        ImageBatchLoader(ImageShards(digits, "val"), global_batch=1024, micro_batch=8, seed=0)
