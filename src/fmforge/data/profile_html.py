"""The ``data profile`` page: one self-contained HTML file from a profile.json document.

Same conventions as ``fmforge report`` (whose stylesheet, Content-Security-Policy and escaping it reuses):
plots are PNGs embedded as ``data:`` URIs, there is no script, every text from the data (words, tokens,
masked examples, file names) is HTML-escaped.

The plots are drawn with Pillow in matplotlib's own font (DejaVu Sans) rather than by matplotlib: the
profile's point is speed, and matplotlib's tick and text machinery costs ~1.5 ms per label, 0.1-0.3 s per
plot, more than the whole scan of a 10 MB corpus. Each plot here is a few rectangles, lines and labels on a
fixed layout whose margins come from the measured label widths, so no label is clipped; text is drawn as is
(no mathtext, no markup).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from matplotlib.font_manager import FontProperties, findfont
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageColor, ImageDraw, ImageFont

from fmforge import __version__
from fmforge.io.html import CSP, CSS, esc, fmt
from fmforge.io.plots import run_colours

EXTRA_CSS = ".grid{display:flex;flex-wrap:wrap;gap:12px} .grid figure{margin:0} td.num{text-align:right}"
WIDTH = 640  # every plot's width in pixels (as the report's 6.4 in at 100 dpi)
TEXT_PX, TITLE_PX, NOTE_PX = 14, 17, 12  # matplotlib's 10 pt, 12 pt and 9 pt at 100 dpi
INK, DIM, GRID = (0, 0, 0), (64, 64, 64), (225, 225, 225)
LABEL_CHARS = 24


@cache
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(findfont(FontProperties(family="DejaVu Sans")), px)


def _text_width(texts: list[str], px: int = TEXT_PX) -> int:
    """Width in pixels of the widest of ``texts``."""
    return math.ceil(max((_font(px).getlength(t) for t in texts), default=0.0))


def clip_label(text: object, limit: int = LABEL_CHARS) -> str:
    """``text`` on one line (whitespace runs become one space), clipped to ``limit`` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fit(text: str, width: float, px: int = TEXT_PX) -> str:
    """``text`` shortened (ending in an ellipsis) until it is at most ``width`` pixels wide."""
    while len(text) > 1 and _font(px).getlength(text) > width:
        text = text[:-2] + "…"
    return text


def _rgba(colour: str, alpha: float = 1.0) -> tuple[int, int, int, int]:
    return (*ImageColor.getrgb(colour)[:3], round(255 * alpha))


def _png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` reduced to a 64-colour palette: flat fills and anti-aliased text look the same,
    the file is a third of the size and encodes in half the time."""
    buf = io.BytesIO()
    image.quantize(64, method=Image.Quantize.FASTOCTREE).save(buf, format="png")
    return buf.getvalue()


def _vertical_text(image: Image.Image, centre: tuple[float, float], text: str) -> None:
    """``text`` rotated a quarter turn (read bottom to top) centred on ``centre``."""
    font = _font(TEXT_PX)
    left, top, right, bottom = font.getbbox(text)
    tile = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(tile).text((1 - left, 1 - top), text, font=font, fill=255)
    tile = tile.rotate(90, expand=True)
    x, y = round(centre[0] - tile.width / 2), round(centre[1] - tile.height / 2)
    image.paste(INK, (x, y, x + tile.width, y + tile.height), tile)


@dataclass
class _Axes:
    """The plotting area in pixels and the data range it shows, linear in both directions."""

    left: int
    top: int
    right: int
    bottom: int
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / ((self.x1 - self.x0) or 1.0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / ((self.y1 - self.y0) or 1.0) * (self.bottom - self.top)


def _axes(height: int, xticks: list[float], xlabels: list[str], yticks: list[float], ylabels: list[str], *,
          title: str, xlabel: str, ylabel: str, legend: list[tuple[str, tuple]] | None = None,
          ) -> tuple[Image.Image, ImageDraw.ImageDraw, _Axes]:
    """A white canvas with a title, an optional legend row under it, and a framed plotting area spanning the
    first to the last tick on each axis: grid lines, tick marks, tick labels and axis labels drawn, margins
    sized to fit them. Data is drawn afterwards through the returned ``_Axes``; ``_frame`` redraws the frame."""
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    font, title_font = _font(TEXT_PX), _font(TITLE_PX)
    top = 10 + TITLE_PX + 10 + (TEXT_PX + 10 if legend else 0)
    left = 8 + TEXT_PX + 8 + _text_width(ylabels) + 10
    right = WIDTH - max(14, _text_width(xlabels[-1:]) // 2 + 6)
    ax = _Axes(left, top, right, height - (8 + TEXT_PX + 6 + TEXT_PX + 10), xticks[0], xticks[-1], yticks[0],
               yticks[-1])
    for x, label in zip(xticks, xlabels):
        px = round(ax.px(x))
        draw.line([(px, ax.top), (px, ax.bottom)], fill=GRID)
        draw.line([(px, ax.bottom), (px, ax.bottom + 4)], fill=INK)
        draw.text((px, ax.bottom + 6), label, font=font, fill=INK, anchor="ma")
    for y, label in zip(yticks, ylabels):
        py = round(ax.py(y))
        draw.line([(ax.left, py), (ax.right, py)], fill=GRID)
        draw.line([(ax.left - 4, py), (ax.left, py)], fill=INK)
        draw.text((ax.left - 6, py), label, font=font, fill=INK, anchor="rm")
    draw.text(((ax.left + ax.right) / 2, height - 8), _fit(xlabel, ax.right - ax.left), font=font, fill=INK,
              anchor="md")
    _vertical_text(image, (8 + TEXT_PX / 2, (ax.top + ax.bottom) / 2), _fit(ylabel, ax.bottom - ax.top))
    draw.text(((ax.left + ax.right) / 2, 10), _fit(title, ax.right - ax.left, TITLE_PX), font=title_font, fill=INK,
              anchor="ma")
    if legend:
        widths = [12 + 6 + _text_width([label]) for label, _ in legend]
        x = (ax.left + ax.right - sum(widths) - 20 * (len(widths) - 1)) / 2
        y = 10 + TITLE_PX + 10 + TEXT_PX / 2
        for (label, rgba), w in zip(legend, widths):
            draw.rectangle([x, y - 6, x + 11, y + 5], fill=rgba)
            draw.text((x + 18, y), label, font=font, fill=INK, anchor="lm")
            x += w + 20
    return image, draw, ax


def _frame(draw: ImageDraw.ImageDraw, ax: _Axes) -> None:
    draw.rectangle([ax.left, ax.top, ax.right, ax.bottom], outline=INK)


def figure(png: bytes, alt: str) -> str:
    return f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{esc(alt)}"></figure>'


def table(header: list[str], rows: list[list[object]]) -> str:
    """A table of plain values (escaped and formatted here); numbers right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{esc(fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def decade_label(exponent: int) -> str:
    """``10**exponent`` as a short tick label: 1, 10, 100, 1k, 10k, 100k, 1M, ... 1G, ... 1T."""
    for power, suffix in ((12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if exponent >= power:
            return f"{10 ** (exponent - power)}{suffix}"
    return str(10 ** exponent)


def decade_ticks(*hists: dict | None) -> list[int]:
    """The decades (exponents of 10) a log-binned histogram's axis is ticked at: every one from the decade at
    or below the shortest bin's start to the decade at or above the longest bin's end, at least two."""
    edges = [np.log10(np.clip(np.asarray(h["edges"], float), 1.0, None)) for h in hists if h and h.get("counts")]
    lo = min((math.floor(e[0]) for e in edges), default=0)
    hi = max((math.ceil(e[-1]) for e in edges), default=1)
    return list(range(lo, max(hi, lo + 1) + 1))


def percent_ticks(top: float) -> tuple[list[float], list[str]]:
    """Round tick positions from 0 to at least ``top`` (a share; 0 shows 0-100%) and their labels as
    percentages."""
    top = top if top > 0 else 1.0
    ticks = [float(t) for t in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(0.0, top) if t >= 0]
    if len(ticks) < 2:
        ticks = [0.0, top]
    while ticks[-1] < top:
        ticks.append(2 * ticks[-1] - ticks[-2])
    return ticks, [f"{round(t * 100, 6):g}%" for t in ticks]


def histogram_png(hist: dict, *, title: str, xlabel: str, colour: str = "#1f77b4",
                  other: dict | None = None, other_label: str = "reference") -> bytes:
    """A log-binned length histogram (share of documents per bin), optionally over a second one, with this
    data's median marked. The x axis is log10 of the length, ticked and labelled at every decade (1, 10, 100,
    1k, ...) of ``decade_ticks``."""
    drawn = []
    for h, label, c, alpha in ((hist, "this data", colour, 0.75), (other, other_label, "#ff7f0e", 0.45)):
        if h and h.get("counts"):
            counts = np.asarray(h["counts"], float)
            drawn.append((np.log10(np.clip(np.asarray(h["edges"], float), 1.0, None)),
                          counts / max(1.0, counts.sum()), clip_label(label, 48), _rgba(c, alpha)))
    decades = decade_ticks(hist, other)
    yticks, ylabels = percent_ticks(max((float(s.max()) for _, s, *_ in drawn), default=0.0))
    legend = [(label, rgba) for _, _, label, rgba in drawn] if other and len(drawn) > 1 else None
    image, draw, ax = _axes(360, [float(d) for d in decades], [decade_label(d) for d in decades], yticks, ylabels,
                            title=clip_label(title, 80), xlabel=clip_label(xlabel, 60) + " (log scale)",
                            ylabel="share of documents", legend=legend)
    for edges, shares, _, rgba in drawn:
        xs = [ax.px(e) for e in edges]
        outline = [(xs[0], ax.py(0))]
        for i, share in enumerate(shares):
            outline += [(xs[i], ax.py(share)), (xs[i + 1], ax.py(share))]
        draw.polygon(outline + [(xs[-1], ax.py(0))], fill=rgba)
    median = (hist or {}).get("percentiles", {}).get("p50")
    if median and drawn:
        x = round(ax.px(math.log10(max(1.0, median))))
        for y in range(ax.top, ax.bottom, 8):
            draw.line([(x, y), (x, min(y + 4, ax.bottom))], fill=DIM)
        note = f"median {fmt(median)}"
        right = x + 4 + _text_width([note], NOTE_PX) < ax.right
        at, anchor = (x + 4 if right else x - 4, ax.top + 4), "la" if right else "ra"
        box = draw.textbbox(at, note, font=_font(NOTE_PX), anchor=anchor)
        draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(255, 255, 255, 200))
        draw.text(at, note, font=_font(NOTE_PX), fill=DIM, anchor=anchor)
    _frame(draw, ax)
    return _png(image)


def scatter_png(xs: list[int], ys: list[int], *, title: str) -> bytes:
    """One translucent dot per (width, height); axes from 0 to a round number above the largest value."""
    def ticks(values: list[int]) -> list[float]:
        return [float(t) for t in MaxNLocator(nbins=6, integer=True).tick_values(0, max(values, default=1) or 1)
                if t >= 0]

    xt, yt = ticks(xs), ticks(ys)
    image, draw, ax = _axes(360, xt, [f"{t:g}" for t in xt], yt, [f"{t:g}" for t in yt], title=clip_label(title, 80),
                            xlabel="width (px)", ylabel="height (px)")
    dot = _rgba("#1f77b4", 0.5)
    for x, y in zip(xs, ys):
        px, py = ax.px(x), ax.py(y)
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=dot)
    _frame(draw, ax)
    return _png(image)


def hbars_png(names: list[str], values: list[float], notes: list[str], *, title: str,
              colour: str = "#1f77b4") -> bytes:
    """Horizontal bars, first at the top, each with its name on the left and its note (the value as text) at
    its end. No value axis: the notes carry the numbers, so even a bar too short to see reads. The names'
    column is as wide as the widest name, and bars are scaled so the longest one's note fits."""
    labels = [clip_label(n) for n in names]
    n = max(1, len(labels))
    title_h = 10 + TITLE_PX + 10
    height = max(200, title_h + n * (26 if n <= 12 else 20) + 10)
    row = (height - title_h - 10) / n
    thick = min(0.7 * row, 20.0)
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font, note_font = _font(TEXT_PX), _font(NOTE_PX)
    left = 10 + _text_width(labels) + 8
    span = WIDTH - 10 - left - _text_width(notes, NOTE_PX) - 6
    heights = np.nan_to_num(np.asarray(values, float)).clip(0.0, None)
    scale = span / heights.max() if len(heights) and heights.max() > 0 else 0.0
    fill = ImageColor.getrgb(colour)
    for i, (label, h, note) in enumerate(zip(labels, heights, notes)):
        y = title_h + (i + 0.5) * row
        end = left + h * scale
        draw.text((left - 8, y), label, font=font, fill=INK, anchor="rm")
        if end >= left + 1:
            draw.rectangle([left, round(y - thick / 2), round(end), round(y + thick / 2)], fill=fill)
        draw.text((end + 5, y), note, font=note_font, fill=DIM, anchor="lm")
    draw.line([(left, title_h), (left, height - 10)], fill=INK)
    draw.text((WIDTH / 2, 10), _fit(clip_label(title, 80), WIDTH - 20, TITLE_PX), font=_font(TITLE_PX), fill=INK,
              anchor="ma")
    return _png(image)


def share_note(share: float, count: int | None = None) -> str:
    """A share as a percentage with the digits that matter (56.7%, 0.85%, 0.00081%, 99.998%), then the count."""
    p = 100.0 * share
    digits = 1 if p >= 1 or p <= 0 else min(9, 1 - math.floor(math.log10(p)))
    while p < 100 and round(p, digits) >= 100 and digits < 9:  # 99.9985% is not 100.0%
        digits += 1
    text = "0%" if p == 0 else f"{p:.{digits}f}%" if round(p, digits) > 0 else f"<{10.0 ** -digits:.{digits}f}%"
    return text if count is None else f"{text} ({count:,})"


def _share_bars(shares: dict, title: str, limit: int = 12) -> bytes:
    items = list(shares.items())[:limit]
    return hbars_png([k for k, _ in items], [v["share"] for _, v in items],
                     [share_note(v["share"], v.get("count")) for _, v in items], title=title,
                     colour=run_colours(1)[0])


def _text_section(t: dict) -> str:
    dup, lines = t["duplicates"], t["lines"]
    rows = [["documents", t["documents"]], ["characters", t["characters"]], ["bytes (UTF-8)", t["bytes"]],
            ["tokens", t["tokens"] if t["tokens"] is not None else "(no tokenizer)"],
            ["bytes per token", t["bytes_per_token"] if t["bytes_per_token"] else "(no tokenizer)"],
            ["exact duplicates", f"{dup['exact']:,} ({dup['exact_rate']:.2%})"],
            ["near-duplicates (MinHash, Jaccard ≥ 0.8)",
             f"{dup['near']:,} ({dup['near_rate']:.2%})" if dup["near"] is not None else "(not computed)"],
            ["lines", lines["total"]], ["binary lines (control characters)", lines["binary"]],
            ["garbled lines (U+FFFD, mojibake)", lines["garbled"]], ["bad line share", f"{lines['bad_share']:.3%}"]]
    if t.get("tokenizer"):
        rows.append(["tokenizer", f"{t['tokenizer']['sha256'][:12]} ({t['tokenizer']['vocab_size']:,} ids, "
                                  f"{t['tokenizer']['source']})"])
    plots = [figure(histogram_png(t["document_chars"], title="document length (characters)",
                                  xlabel="characters"), "document length (characters)")]
    if t.get("document_tokens"):
        plots.append(figure(histogram_png(t["document_tokens"], title="document length (tokens)", xlabel="tokens"),
                            "document length (tokens)"))
    plots.append(figure(_share_bars(t["character_classes"], "character classes"), "character classes"))
    if t["scripts"]:
        plots.append(figure(_share_bars(t["scripts"], "scripts (letters)"), "scripts"))
    grams = "".join(f"<div><h3>{esc(name)}</h3>{table([name, 'count'], [[w, n] for w, n in t[key][:15]])}</div>"
                    for name, key in (("words", "top_words"), ("word pairs", "top_bigrams")))
    return (f'<section id="text"><h2>Text</h2>{table(["measure", "value"], rows)}'
            f'<div class="grid">{"".join(plots)}</div><h3>Most frequent</h3><div class="grid">{grams}</div></section>')


def _pii_section(pii: dict) -> str:
    rows = [[kind, n, ", ".join(pii["examples"].get(kind, []))] for kind, n in pii["counts"].items()]
    return (f'<section id="pii"><h2>Personal data</h2><p>{pii["documents_with_pii"]:,} documents hold at least '
            'one match; examples are masked. <code>data prepare --redact-pii</code> replaces every match with its '
            f'placeholder (&lt;EMAIL&gt;, &lt;PHONE&gt;, …).</p>{table(["kind", "count", "masked examples"], rows)}'
            "</section>")


def _delta_section(d: dict, t: dict) -> str:
    rows = [["reference", d["reference"]], ["reference tokens", d["reference_tokens"]],
            ["Jensen–Shannon divergence (unigram tokens, base 2)", d["js_divergence"]],
            ["out-of-reference token rate", f"{d['out_of_reference_rate']:.3%}"],
            ["token types not in the reference", f"{d['out_of_reference_types']:,} of {d['types']:,}"],
            ["document length KS statistic (tokens)", d["length_ks"]],
            ["median document tokens (this / reference)", f"{fmt(d['length_median'])} / "
                                                          f"{fmt(d['reference_length_median'])}"]]

    def tokens(rows_: list[dict]) -> list[list]:
        return [[repr(r["token"]), r["log2_ratio"], f"{r['share']:.4%}", f"{r['reference_share']:.4%}"]
                for r in rows_]

    header = ["token", "log2 ratio", "share here", "share in reference"]
    return (f'<section id="delta"><h2>Compared with the reference</h2>{table(["measure", "value"], rows)}'
            f'<div class="grid"><div><h3>Over-represented</h3>{table(header, tokens(d["over_represented"]))}</div>'
            f'<div><h3>Under-represented</h3>{table(header, tokens(d["under_represented"]))}</div></div></section>')


def _images_section(im: dict) -> str:
    rows = [["samples", im["samples"]], ["mode", im["mode"]],
            ["splits", ", ".join(f"{k} {v:,}" for k, v in im["splits"].items())],
            ["sizes (min / median / max)", f"{im['size']['min']} / {im['size']['median']} / {im['size']['max']}"],
            ["distinct sizes", im["size"]["distinct"]],
            ["channels", ", ".join(f"{k}: {v:,}" for k, v in im["channels"].items())],
            ["formats", ", ".join(f"{k}: {v:,}" for k, v in im["formats"].items())],
            ["exact duplicates (sha256)", f"{im['exact_duplicates']:,} ({im['exact_duplicate_rate']:.2%})"],
            ["perceptual duplicates (dHash ≤ 3 bits)",
             f"{im['perceptual_duplicates']:,} ({im['perceptual_duplicate_rate']:.2%})"],
            ["corrupt", im["corrupt"]]]
    plots = []
    if im["class_balance"]:
        cb = im["class_balance"]
        rows.append(["largest / smallest class", cb["largest_to_smallest"]])
        rows.append(["class entropy (1 = balanced)", cb["normalized_entropy"]])
        names = list(cb["classes"])[:40]
        counts = [cb["classes"][n] for n in names]
        plots.append(figure(hbars_png(names, counts, [f"{c:,}" for c in counts], title="class balance (samples)",
                                      colour=run_colours(1)[0]), "class balance"))
    if im["widths"]:
        plots.append(figure(scatter_png(im["widths"], im["heights"], title="image sizes"), "image sizes"))
    corrupt = "".join(f"<li><code>{esc(e)}</code></li>" for e in im["corrupt_examples"])
    return (f'<section id="images"><h2>Images</h2>{table(["measure", "value"], rows)}'
            f'<div class="grid">{"".join(plots)}</div>{"<ul>" + corrupt + "</ul>" if corrupt else ""}</section>')


def render_profile(doc: dict) -> str:
    """The whole page for a profile document."""
    body = []
    if "text" in doc:
        body.append(_text_section(doc["text"]))
        body.append(_pii_section(doc["text"]["pii"]))
    if "delta" in doc:
        body.append(_delta_section(doc["delta"], doc["text"]))
    if "images" in doc:
        body.append(_images_section(doc["images"]))
    nav = "".join(f'<a href="#{k}">{label}</a>' for k, label in (("text", "Text"), ("pii", "Personal data"),
                                                                 ("delta", "Reference"), ("images", "Images"))
                  if (k in doc) or (k == "pii" and "text" in doc))
    title = doc.get("title", "Data profile")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{CSS}{EXTRA_CSS}</style></head><body>'
            f'<header><h1>{esc(title)}</h1><p class="dim">fmforge {esc(__version__)} · {esc(doc.get("created", ""))}'
            f' · {esc(doc.get("kind", ""))} · {fmt(doc.get("seconds", 0.0))} s</p><nav>{nav}</nav></header>'
            + "".join(body) + "</body></html>\n")
