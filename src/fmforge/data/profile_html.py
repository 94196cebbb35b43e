"""The ``data profile`` page: one self-contained HTML file from a profile.json document.

Same conventions as ``fmforge report`` (whose stylesheet, Content-Security-Policy, escaping and bar charts
it reuses): plots are PNGs embedded as ``data:`` URIs, there is no script, every text from the data
(words, tokens, masked examples, file names) is HTML-escaped and, in plots, kept out of mathtext.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.figure import Figure

from fmforge import __version__
from fmforge.io.html import CSP, CSS, esc, fmt
from fmforge.io.plots import Bars, bars_png, plain_text, run_colours

EXTRA_CSS = ".grid{display:flex;flex-wrap:wrap;gap:12px} .grid figure{margin:0} td.num{text-align:right}"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def figure(png: bytes, alt: str) -> str:
    return f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{esc(alt)}"></figure>'


def table(header: list[str], rows: list[list[object]]) -> str:
    """A table of plain values (escaped and formatted here); numbers right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{esc(fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def histogram_png(hist: dict, *, title: str, xlabel: str, colour: str = "#1f77b4",
                  other: dict | None = None, other_label: str = "reference") -> bytes:
    """A log-binned length histogram (share of documents per bin), optionally over a second one."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    for h, label, c, alpha in ((hist, "this data", colour, 0.75), (other, other_label, "#ff7f0e", 0.45)):
        if not h or not h.get("counts"):
            continue
        edges, counts = np.asarray(h["edges"], float), np.asarray(h["counts"], float)
        # one artist for the whole histogram (a bar per bin costs a patch each at draw time)
        ax.stairs(counts / max(1.0, counts.sum()), edges, fill=True, color=c, alpha=alpha, label=plain_text(label))
    ax.set_xscale("log")
    ax.set_xlabel(plain_text(xlabel))
    ax.set_ylabel("share of documents")
    ax.set_title(plain_text(title, 80))
    ax.grid(alpha=0.3)
    if other:
        ax.legend(frameon=False)
    return _png(fig)


def scatter_png(xs: list[int], ys: list[int], *, title: str) -> bytes:
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.scatter(xs, ys, s=8, alpha=0.5, color="#1f77b4")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(plain_text(title, 80))
    ax.grid(alpha=0.3)
    return _png(fig)


def _share_bars(shares: dict, title: str, ylabel: str = "share", limit: int = 12) -> bytes:
    items = list(shares.items())[:limit]
    return bars_png([k for k, _ in items], [Bars("share", run_colours(1)[0], [v["share"] for _, v in items])],
                    title=title, ylabel=ylabel)


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
        plots.append(figure(bars_png(names, [Bars("samples", run_colours(1)[0], [cb["classes"][n] for n in names])],
                                     title="class balance", ylabel="samples"), "class balance"))
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
