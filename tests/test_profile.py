"""``fmforge data profile``: raw files, prepared text and image directories, the delta against a reference,
personal data and ``data prepare --redact-pii`` (both preparation paths), the HTML page in headless Chromium,
and the user mistakes around it."""

import base64
import inspect
import io
import json
import os
import re
import shutil
import signal
import sys
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fmforge.data import text_units
from fmforge.data.image_prepare import prepare_images
from fmforge.data.image_shards import INDEX
from fmforge.data.prepare import prepare_data
from fmforge.data.profile import (
    CHUNK_CHARS,
    MIN_CHUNK_CHARS,
    chunked,
    js_divergence,
    ks_statistic,
    profile_data,
    worker_pool,
)
from fmforge.data.profile_images import dhash
from fmforge.data.shards import read_shard
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.launch.data_prepare import prepare_sharded

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PII_DOCS = [
    "Contact Jane at jane.roe@example.org or +44 20 7946 0958 about the invoice.",
    "Pay with 4111 1111 1111 1111 or to IBAN GB82 WEST 1234 5698 7654 32 before 2024-01-15.",
    "The server 192.168.10.20 runs version 1.2.3.4; order 4111 1111 1111 1112 is not a card.",
]


PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
# Each <img>: loaded, its natural size, and the spread of its grey levels drawn through a canvas (as test_report).
IMAGE_STATS = """
return Array.from(document.images).map(img => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let s = 0, s2 = 0, n = 0;
  for (let i = 0; i < d.length; i += 4) { const y = (d[i] + d[i+1] + d[i+2]) / 3; s += y; s2 += y * y; n++; }
  const mean = s / n;
  return {alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
          std: Math.sqrt(Math.max(0, s2 / n - mean * mean))};
});
"""


def quiet(_msg):
    pass


def embedded_pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in PNG.findall(page)]


def assert_not_blank(image: Image.Image) -> None:
    pixels = np.asarray(image.convert("L"), dtype=float)
    assert image.width >= 300 and image.height >= 200, image.size
    assert pixels.std() > 10, "a blank plot"


@pytest.fixture
def browser():
    """Headless Chromium through selenium and the system chromedriver, set up as tests/test_report.py does
    (importing that module would import the trainer: 40 s on a loaded machine)."""
    missing = [tool for tool in ("chromium", "chromedriver") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"headless Chromium not installed ({', '.join(missing)} missing): "
                    "apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install selenium")
    service = pytest.importorskip("selenium.webdriver.chrome.service")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=service.Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real code (json package), documents with personal data, one exact and one near-duplicate."""
    d = tmp_path_factory.mktemp("profile_corpus")
    for src in sorted((STDLIB / "json").glob("*.py")):
        shutil.copy(src, d / src.name)
    shutil.copy(STDLIB / "json" / "decoder.py", d / "decoder_copy.py")  # exact duplicate
    text = (STDLIB / "json" / "encoder.py").read_text()
    (d / "encoder_edit.py").write_text(text.replace("def ", "def  ", 1))  # near-duplicate
    with open(d / "people.jsonl", "w") as f:
        for doc in PII_DOCS:
            f.write(json.dumps({"text": doc}) + "\n")
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Another corpus (three files of the http package) prepared with its own 300-token BPE."""
    out = tmp_path_factory.mktemp("profile_ref") / "ref"
    files = [str(STDLIB / "http" / name) for name in ("__init__.py", "cookies.py", "client.py")]
    prepare_data(files, out, vocab_size=300, val_fraction=0.0, log=None)
    return out


@pytest.fixture(scope="module")
def prepared_same_tok(corpus, reference, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("profile_prep") / "data"
    prepare_data([str(corpus)], out, tokenizer=str(reference / "tokenizer.json"), val_fraction=0.0, log=None)
    return out


@pytest.fixture(scope="module")
def raw_profile(corpus, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("raw_profile")
    return profile_data([str(corpus)], out, workers=1, log=quiet), out


@pytest.fixture(scope="module")
def delta_profile(prepared_same_tok, reference, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("delta_profile")
    return profile_data([str(prepared_same_tok)], out, reference=str(reference), workers=1,
                        title="json package vs http package", log=quiet), out


def test_raw_files_get_sizes_duplicates_lines_words_and_personal_data(corpus, raw_profile):
    doc, out = raw_profile
    t = doc["text"]
    n_files = len(list(corpus.glob("*.py")))
    assert t["documents"] == n_files + len(PII_DOCS)
    assert t["characters"] < t["bytes"] or t["characters"] == t["bytes"]
    assert t["tokens"] is None and t["bytes_per_token"] is None  # no tokenizer given
    assert t["duplicates"]["exact"] == 1 and t["duplicates"]["near"] == 1
    assert t["character_classes"]["letter"]["share"] > 0.5 and "LATIN" in t["scripts"]
    assert dict(t["top_words"])["self"] > 50
    assert t["lines"]["binary"] == 0 and t["lines"]["total"] > 1000
    # the documents' one of each, and json/__init__.py's author address
    assert t["pii"]["counts"] == {"EMAIL": 2, "PHONE": 1, "IP": 1, "CREDIT_CARD": 1, "IBAN": 1}
    assert t["pii"]["documents_with_pii"] == 4
    assert t["pii"]["examples"]["CREDIT_CARD"] == ["**** **** **** 1111"]
    saved = json.loads((out / "profile.json").read_text())
    assert saved["text"]["documents"] == t["documents"] and saved["created"].endswith("+00:00")
    assert [s["sha256"] for s in saved["inputs"]["sources"]]  # the data's hashes
    page = (out / "profile.html").read_text()
    assert "<script" not in page.lower() and "jane.roe" not in page
    for png in embedded_pngs(page):
        assert_not_blank(png)


def test_garbled_and_binary_lines_and_scripts_are_counted(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "mixed.txt").write_text("Привет, мир\nplain line\ncafÃ© mojibake\nbad \ufffd byte\nnul\x01here\n日本語\n")
    t = profile_data([str(src)], tmp_path / "p", workers=1, log=quiet)["text"]
    assert t["lines"] == {"total": 6, "binary": 1, "garbled": 2, "bad_share": 0.5}
    assert {"LATIN", "CYRILLIC", "CJK"} <= set(t["scripts"])


def test_workers_end_on_sigterm_whatever_handler_the_caller_installed():
    """ray.init() leaves a SIGTERM handler that calls sys.exit in its caller; forked workers inheriting it
    caught the pool's SIGTERM and once never exited (a hung full suite). Workers restore the default."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    try:
        with worker_pool(2, None, False) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_two_workers_find_exactly_what_one_finds(corpus, raw_profile, tmp_path):
    two = profile_data([str(corpus)], tmp_path / "b", workers=2, log=quiet)["text"]
    assert json.loads(json.dumps(raw_profile[0]["text"])) == json.loads(json.dumps(two))


def test_a_prepared_directory_is_profiled_with_its_own_tokenizer_like_its_raw_files(corpus, prepared_same_tok,
                                                                                     delta_profile, tmp_path):
    prepared = delta_profile[0]["text"]
    # raw inputs with a reference and no --tokenizer are tokenized with the reference's tokenizer: the same one
    raw = profile_data([str(corpus)], tmp_path / "r", reference=str(delta_profile[0]["delta"]["reference"]),
                       workers=1, near_duplicates=False, log=quiet)
    assert raw["text"]["tokenizer"]["source"] == "the reference's" and raw["text"]["duplicates"]["near"] is None
    manifest = json.loads((prepared_same_tok / "manifest.json").read_text())
    kept = manifest["documents"]["kept"]
    assert prepared["documents"] == kept == raw["text"]["documents"] - 1  # prepare dropped the exact duplicate
    assert prepared["tokens"] == sum(manifest["tokens"].values()) - 2 * kept  # without [bos] / [eos]
    assert raw["text"]["tokens"] > prepared["tokens"]  # + the duplicate
    assert 1.0 < prepared["bytes_per_token"] < 4.0
    assert prepared["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    assert prepared["pii"]["counts"] == raw["text"]["pii"]["counts"]
    assert 0.0 < raw["delta"]["js_divergence"] < 1.0


def test_delta_against_a_reference(delta_profile, reference, tmp_path):
    delta = delta_profile[0]["delta"]
    assert 0.01 < delta["js_divergence"] < 0.5
    assert 0 <= delta["out_of_reference_rate"] < 0.05 and 0 < delta["length_ks"] <= 1
    assert delta["over_represented"][0]["log2_ratio"] > 1 > -1 > delta["under_represented"][0]["log2_ratio"]
    same = profile_data([str(reference)], tmp_path / "s", reference=str(reference), workers=1,
                        near_duplicates=False, log=quiet)["delta"]
    assert same["js_divergence"] == pytest.approx(0, abs=1e-12) and same["length_ks"] == 0
    assert same["out_of_reference_rate"] == 0 and same["over_represented"] == []
    assert "Compared with the reference" in (delta_profile[1] / "profile.html").read_text()


def test_divergence_and_ks_on_hand_computed_cases():
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    assert js_divergence(np.array([1, 1]), np.array([1, 1])) == 0
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = 1/2 (1/2 log2 (2/3) + 1/2 log2 2) + 1/2 log2 (4/3)
    expected = 0.5 * (0.5 * np.log2(2 / 3) + 0.5 * np.log2(2)) + 0.5 * np.log2(4 / 3)
    assert js_divergence(np.array([1, 1]), np.array([2, 0])) == pytest.approx(expected)
    assert ks_statistic([1, 2, 3, 4], [1, 2, 3, 4]) == 0
    assert ks_statistic([1, 2], [3, 4]) == 1 and ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5


def test_chunks_start_small_grow_to_the_cap_and_shrink_toward_the_end_of_a_known_input():
    sizes = [sum(map(len, c)) for c in chunked(iter(["x" * 10_000] * 1_040), len, 10_400_000, 2)]
    assert sum(sizes) == 10_400_000
    assert sizes[:4] == [MIN_CHUNK_CHARS, 2 * MIN_CHUNK_CHARS, 4 * MIN_CHUNK_CHARS, CHUNK_CHARS]
    assert max(sizes) == CHUNK_CHARS and sizes[-3:-1] == [MIN_CHUNK_CHARS] * 2 and sizes[-1] <= MIN_CHUNK_CHARS
    assert all(a >= b for a, b in zip(sizes[3:-1], sizes[4:-1]))  # never growing again after the peak
    unknown = [sum(map(len, c)) for c in chunked(iter(["x" * 10_000] * 1_040), len)]
    assert unknown[3:-1] == [CHUNK_CHARS] * (len(unknown) - 4)


def test_user_mistakes_are_one_line_errors(corpus, reference, prepared_same_tok, tmp_path):
    with pytest.raises(FmforgeError, match="input not found: .*nope"):
        profile_data([str(tmp_path / "nope")], tmp_path / "p", log=quiet)
    with pytest.raises(FmforgeError, match="input not found: .*nope"):  # among several inputs
        profile_data([str(corpus), str(tmp_path / "nope")], tmp_path / "p", log=quiet)
    assert not (tmp_path / "p").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "someone-else", "format_version": 1}))
    with pytest.raises(FmforgeError, match="not an fmforge text-data manifest"):
        profile_data([str(other)], tmp_path / "p", log=quiet)
    with pytest.raises(FmforgeError, match="not an fmforge text-data manifest"):
        profile_data([str(corpus)], tmp_path / "p", reference=str(other), log=quiet)
    own = tmp_path / "own_tok"
    prepare_data([str(STDLIB / "json")], own, vocab_size=280, val_fraction=0.0, log=None)
    for inputs, kw in (([str(own)], {}), ([str(corpus)], {"tokenizer": str(own / "tokenizer.json")})):
        with pytest.raises(FmforgeError, match="tokenized with another tokenizer") as err:
            profile_data(inputs, tmp_path / "p", reference=str(reference), log=quiet, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(FmforgeError, match="--tokenizer is for raw inputs"):
        profile_data([str(prepared_same_tok)], tmp_path / "p", tokenizer=str(own / "tokenizer.json"), log=quiet)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FmforgeError, match="not a directory"):
        profile_data([str(corpus)], tmp_path / "file", log=quiet)


# ------------------------------------------------------------------------------------------------- images


def _shape(kind: str, i: int) -> Image.Image:
    """A 16x16 grey drawing of a circle, square or cross over a seeded noise background (each one distinct)."""
    rng = np.random.default_rng([i, len(kind)])
    im = Image.fromarray(rng.integers(0, 160, (16, 16), dtype=np.uint8))
    draw = ImageDraw.Draw(im)
    x, y = i % 5, (3 * i) % 5
    box = (x, y, x + 10, y + 10)
    if kind == "circle":
        draw.ellipse(box, fill=250 - 3 * i)
    elif kind == "square":
        draw.rectangle(box, fill=250 - 3 * i)
    else:
        draw.line(box, fill=250 - 3 * i, width=2)
        draw.line((x, y + 10, x + 10, y), fill=250 - 3 * i, width=2)
    return im


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """24 drawn shapes in three classes (4/8/12), one exact copy, one re-encoded upscaled copy (a perceptual
    duplicate); one stored image is then damaged in its shard."""
    root = tmp_path_factory.mktemp("profile_images")
    src = root / "src"
    for kind, n in (("circle", 4), ("square", 8), ("cross", 12)):
        (src / kind).mkdir(parents=True)
        for i in range(n):
            _shape(kind, i).save(src / kind / f"{i}.png")
    first = src / "cross" / "0.png"
    shutil.copy(first, src / "cross" / "copy.png")
    Image.open(first).resize((48, 48), Image.Resampling.BICUBIC).save(src / "cross" / "big.png")
    out = root / "prepared"
    prepare_images([str(src)], out, val_fraction=0.0, workers=1, log=None)
    _damage_one_image(out)
    return out


def _damage_one_image(out: Path) -> None:
    shard = out / json.loads((out / INDEX).read_text())["shards"][0]["file"]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)


def test_image_directory_balance_sizes_duplicates_and_corrupt(image_dir, tmp_path):
    im = profile_data([str(image_dir)], tmp_path / "p", log=quiet)["images"]
    assert im["samples"] == 26 and im["corrupt"] == 1
    assert sum(im["class_balance"]["classes"].values()) == 25
    assert im["exact_duplicates"] == 1 and im["perceptual_duplicates"] == 1
    assert im["size"]["min"] == [16, 16] and im["size"]["max"] == [48, 48] and im["channels"] == {"1": 25}
    assert 0.8 < im["class_balance"]["normalized_entropy"] < 1
    page = (tmp_path / "p" / "profile.html").read_text()
    assert len(embedded_pngs(page)) == 2


def test_dhash_survives_resizing_and_tells_different_images_apart():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).resize((16, 16))
    b = a.resize((48, 48), Image.Resampling.BICUBIC)
    c = Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8))
    assert (dhash(a) ^ dhash(b)).bit_count() <= 3
    assert (dhash(a) ^ dhash(c)).bit_count() > 10


# ---------------------------------------------------------------------------------------------------- PII


def test_prepare_redact_pii_writes_placeholders_and_counts_into_the_manifest(corpus, reference, tmp_path):
    out = tmp_path / "redacted"
    manifest = prepare_data([str(corpus / "people.jsonl")], out, tokenizer=str(reference / "tokenizer.json"),
                            val_fraction=0.0, redact_pii=True, log=None)
    assert manifest["pii_redacted"] == {"EMAIL": 1, "PHONE": 1, "IP": 1, "CREDIT_CARD": 1, "IBAN": 1}
    tok = load_tokenizer(out / "tokenizer.json")
    text = tok.decode(np.concatenate([read_shard(p) for p in out.glob("train_*.bin")]).tolist())
    for placeholder in ("<EMAIL>", "<PHONE>", "<IP>", "<CREDIT_CARD>", "<IBAN>"):
        assert placeholder in text
    for secret in ("jane.roe", "7946", "4111 1111 1111 1111", "GB82", "192.168"):
        assert secret not in text
    assert "version 1.2.3.4" in text and "4111 1111 1111 1112" in text and "2024-01-15" in text
    again = profile_data([str(out)], tmp_path / "p", workers=1, near_duplicates=False, log=quiet)["text"]["pii"]
    assert sum(again["counts"].values()) == 0
    plain = prepare_data([str(corpus / "people.jsonl")], tmp_path / "plain", tokenizer=str(reference / "tokenizer.json"),
                         val_fraction=0.0, log=None)
    assert "pii_redacted" not in plain


def _unit_settings(redact: bool) -> dict:
    return {"text_field": "text", "max_document_bytes": 1 << 26, "max_line_bytes": 1 << 26,
            "document_bytes": 1 << 20, "encoding_errors": "drop-line", "redact_pii": redact, "val_fraction": 0.0}


def test_the_sharded_unit_pass_redacts_exactly_like_prepare(corpus, reference, tmp_path):
    files = [str(corpus / "people.jsonl"), str(corpus / "scanner.py")]
    single = prepare_data(files, tmp_path / "single", tokenizer=str(reference / "tokenizer.json"), val_fraction=0.0,
                          redact_pii=True, log=None)
    staged = tmp_path / "unit"
    staged.mkdir()
    tok = load_tokenizer(reference / "tokenizer.json")
    stats = text_units._encode_unit(files, _unit_settings(True), tok, staged)
    unit_tokens = np.fromfile(staged / "tokens.bin", dtype=np.dtype(stats["dtype"]))
    single_tokens = np.concatenate([read_shard(p) for p in sorted((tmp_path / "single").glob("train_*.bin"))])
    assert np.array_equal(unit_tokens, single_tokens)
    assert stats["pii_redacted"] == {k: v for k, v in single["pii_redacted"].items() if v}
    sample = list(text_units.sample_texts(files, _unit_settings(True), 1 << 20))
    assert any("<EMAIL>" in s for s in sample) and not any("jane.roe" in s for s in sample)


@pytest.mark.skipif("redact_pii" not in inspect.signature(prepare_sharded).parameters,
                    reason="launch/data_prepare.py does not pass --redact-pii to the sharded path yet")
def test_sharded_prepare_with_redaction_matches_single_process(corpus, reference, tmp_path):
    files = [str(corpus / "people.jsonl"), str(corpus / "scanner.py")]
    kw = {"tokenizer": str(reference / "tokenizer.json"), "val_fraction": 0.0, "redact_pii": True, "log": None}
    single = prepare_data(files, tmp_path / "single", **kw)
    sharded = prepare_sharded(files, tmp_path / "sharded", engine="local", workers=1, **kw)
    assert sharded["pii_redacted"] == single["pii_redacted"]
    assert [s["sha256"] for s in sharded["shards"]] == [s["sha256"] for s in single["shards"]]


# ------------------------------------------------------------------------------------------------ browser


def test_profile_page_renders_in_chromium_without_console_errors_and_with_plots(delta_profile, browser):
    browser.get((delta_profile[1] / "profile.html").resolve().as_uri())
    assert browser.title == "json package vs http package"
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == [], errors
    images = browser.execute_script(IMAGE_STATS)
    assert {"document length (characters)", "document length (tokens)", "character classes"} <= {
        i["alt"] for i in images}
    for img in images:
        assert img["complete"] and img["w"] >= 300 and img["h"] >= 200, img
        assert img["std"] > 10, f"blank plot: {img}"
    assert browser.execute_script("return document.scripts.length") == 0
    text = browser.find_element("tag name", "body").text
    for wanted in ("Personal data", "Jensen–Shannon divergence", "Over-represented", "CREDIT_CARD", "bytes per token"):
        assert wanted in text, wanted
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 100)
    if os.environ.get("FMFORGE_PROFILE_SCREENSHOT"):  # to look at the page: FMFORGE_PROFILE_SCREENSHOT=/tmp/x.png
        browser.save_screenshot(os.environ["FMFORGE_PROFILE_SCREENSHOT"])

