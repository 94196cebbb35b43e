"""The ``data profile`` page's plots: valid PNGs of a fixed width, axes that cover the data, labels that fit,
and cheap enough that drawing them is a small part of profiling a corpus."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from fmforge.data.profile_html import (
    WIDTH,
    clip_label,
    decade_label,
    decade_ticks,
    hbars_png,
    histogram_png,
    percent_ticks,
    scatter_png,
    share_note,
)
from fmforge.data.profile_text import histogram

BAR = 0.75 * np.array([31, 119, 180]) + 0.25 * 255  # this data's bars: 75% blue over white
REFERENCE = 0.45 * np.array([255, 127, 14]) + 0.55 * 255  # the reference's: 45% orange over white


def image(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    im = Image.open(io.BytesIO(png))
    im.load()
    return im


def columns_of(im: Image.Image, colour: np.ndarray) -> np.ndarray:
    """x of every pixel of ``colour`` below the title and legend rows."""
    rgb = np.asarray(im.convert("RGB"), dtype=int)[70:]
    return np.nonzero(np.abs(rgb - colour).sum(axis=2) < 30)[1]


def ink_columns(im: Image.Image) -> np.ndarray:
    """Which columns hold anything but white."""
    return (np.asarray(im.convert("L")) < 250).any(axis=0)


def test_decade_ticks_reach_the_decade_above_the_longest_document():
    hist = histogram([3, 40, 5_000, 999_999])
    ticks = decade_ticks(hist)
    assert ticks == [0, 1, 2, 3, 4, 5, 6]
    assert [decade_label(t) for t in ticks] == ["1", "10", "100", "1k", "10k", "100k", "1M"]
    assert decade_label(9) == "1G" and decade_label(10) == "10G"
    assert decade_ticks(hist, histogram([5, 20_000_000]))[-1] == 8  # a reference's longer documents widen the axis
    assert decade_ticks({"edges": [], "counts": []}) == [0, 1]


def test_percent_ticks_start_at_zero_and_reach_the_tallest_bin():
    for top in (0.003, 0.117, 0.45, 1.0):
        ticks, labels = percent_ticks(top)
        assert ticks[0] == 0.0 and ticks[-1] >= top and len(ticks) <= 7
        assert labels[0] == "0%" and all(label.endswith("%") for label in labels)
    assert percent_ticks(0.117)[1] == ["0%", "2.5%", "5%", "7.5%", "10%", "12.5%"]


def test_histogram_is_a_640_by_360_png_with_bars_where_the_documents_are():
    rng = np.random.default_rng(0)
    short = histogram(rng.integers(10, 100, 500).tolist())
    long = histogram(rng.integers(100_000, 1_000_000, 500).tolist())
    alone = image(histogram_png(short, title="short", xlabel="characters"))
    both = image(histogram_png(long, title="long", xlabel="characters", other=short, other_label="ref $x$"))
    assert alone.size == both.size == (WIDTH, 360)
    assert len(columns_of(alone, BAR)) > 1000 and len(columns_of(alone, REFERENCE)) == 0
    long_x, short_x = columns_of(both, BAR), columns_of(both, REFERENCE)
    assert len(long_x) > 1000 and len(short_x) > 1000
    assert short_x.max() < WIDTH / 2 < long_x.min(), "1-100 and 100k-1M sit at the two ends of a 1-1M axis"


def test_share_bars_fit_long_names_and_notes_and_grow_with_the_rows():
    names = [f"{n}_SUPPLEMENTAL_EXTENDED_NAME" for n in ("CJK_UNIFIED_IDEOGRAPHS", "ARABIC", "HANGUL", "THAI")]
    shares = [0.7, 0.2, 0.099, 0.001]
    few = image(hbars_png(names, shares, [share_note(s, 10**6) for s in shares], title="scripts"))
    many = image(hbars_png([f"class {i}" for i in range(40)], list(range(40)), [f"{i:,}" for i in range(40)],
                           title="class balance"))
    one = image(hbars_png(["LATIN"], [1.0], ["100.0%"], title="scripts"))
    assert few.width == many.width == one.width == WIDTH
    assert one.height >= 200 and few.height >= 200 and many.height > 40 * 15
    for im in (few, many, one):
        ink = ink_columns(im)
        assert ink.any() and not ink[0] and not ink[-1], "a label or note touches the image border"


def test_bars_of_nothing_or_of_nan_still_draw():
    assert image(hbars_png([], [], [], title="none")).size == (WIDTH, 200)
    assert image(hbars_png(["a", "b"], [float("nan"), 0.0], ["?", "0%"], title="nan")).size == (WIDTH, 200)
    assert image(histogram_png({"edges": [], "counts": [], "percentiles": {}}, title="empty",
                               xlabel="tokens")).size == (WIDTH, 360)
    assert image(scatter_png([], [], title="no images")).size == (WIDTH, 360)


def test_share_notes_keep_tiny_and_near_total_shares_apart_from_zero_and_all():
    assert share_note(0.5674, 5_907_910) == "56.7% (5,907,910)"
    assert share_note(0.0085) == "0.85%"
    assert share_note(3.4e-7) == "0.000034%"
    assert share_note(0.9999853) == "99.999%"
    assert share_note(1.0) == "100.0%" and share_note(0.0) == "0%"
    assert share_note(1e-15).startswith("<")


def test_labels_from_data_are_one_line_and_clipped():
    assert clip_label("a\nb\t c") == "a b c"
    assert clip_label("x" * 30) == "x" * 23 + "…"
    assert clip_label("$10$ cost") == "$10$ cost"


def test_the_text_plots_of_a_profile_take_a_small_fraction_of_a_second():
    rng = np.random.default_rng(1)
    hist = histogram(rng.lognormal(8, 2, 2000).astype(int).tolist())
    classes = {k: {"count": n, "share": n / 1000} for k, n in (("letter", 560), ("space", 310), ("digit", 130))}
    scripts = {"LATIN": {"count": 999, "share": 0.999}, "GREEK": {"count": 1, "share": 0.001}}

    def plots() -> None:
        histogram_png(hist, title="document length (characters)", xlabel="characters")
        for shares in (classes, scripts):
            hbars_png(list(shares), [v["share"] for v in shares.values()],
                      [share_note(v["share"], v["count"]) for v in shares.values()], title="shares")

    plots()
    best = min(_seconds(plots) for _ in range(3))
    assert best < 0.3, f"three plots took {best:.3f} s (matplotlib drew them in ~0.5 s)"


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
