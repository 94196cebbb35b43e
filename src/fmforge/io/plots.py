"""The report's figures, drawn by matplotlib's Agg renderer straight to PNG bytes.

A bare ``Figure`` renders without pyplot's global state or a display, so building a report never changes the
backend of a process that also plots interactively. Text that comes from files (run names, metric keys) is
kept out of matplotlib's mathtext: a ``$`` in a run name is drawn as a dollar sign, not parsed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

# More points than a 640-pixel-wide plot can show are thinned (evenly, keeping the last one).
MAX_POINTS = 2000
# A positive curve that spans a decade or more is drawn on a log axis (early loss would dwarf late loss).
LOG_SPAN = 10.0
LABEL_CHARS = 48
# Values this large (or inf, nan) are drawn as gaps: an axis cannot place ticks out there.
DRAWABLE = 1e100
# Training curves longer than this are smoothed (step-to-step noise would hide the trend and the other runs).
SMOOTH_ABOVE = 200
# Noisy step-to-step measurements; a schedule (lr) or a running maximum (peak memory) is drawn as logged.
NOISY = {"loss", "tokens_per_s", "samples_per_s", "mfu", "grad_norm", "data_wait_frac", "step_time_max",
         "step_time_min"}
THROUGHPUT = ("tokens_per_s", "samples_per_s")
CURVE_LABELS = {"loss": "train", "val_loss": "validation", "grad_norm": "gradient norm",
                "peak_mem_gb": "peak memory (GB)", "data_wait_frac": "time waiting for data",
                "step_time_max": "slowest rank's step time (s)", "step_time_min": "fastest rank's step time (s)"}


@dataclass
class Line:
    """One curve: a run's scalar over steps."""

    label: str
    steps: list[float]
    values: list[float]
    colour: str
    dashed: bool = False


@dataclass
class Bars:
    """One run's bars over the groups of a bar chart; ``low``/``high`` are the error bar ends (or None)."""

    label: str
    colour: str
    values: list[float | None]
    low: list[float | None] = field(default_factory=list)
    high: list[float | None] = field(default_factory=list)


def run_colours(n: int) -> list[str]:
    """One distinct colour per run: tab10 up to ten runs, tab20 up to twenty, then tab20 again."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(n)]


def plain_text(text: str, limit: int = LABEL_CHARS) -> str:
    """``text`` safe for a matplotlib label: clipped, with ``$`` escaped so mathtext never parses it."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return text.replace("$", r"\$")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _thin(steps: list[float], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    y[~(np.abs(y) < DRAWABLE)] = np.nan  # a spike's inf or nan is a gap in the line, not a broken axis
    if len(x) > MAX_POINTS:
        keep = np.unique(np.r_[np.linspace(0, len(x) - 1, MAX_POINTS).astype(int), len(x) - 1])
        x, y = x[keep], y[keep]
    return x, y


def wants_log(values: list[float]) -> bool:
    finite = [v for v in values if abs(v) < DRAWABLE]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= LOG_SPAN


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, gaps (nan) ignored, shorter windows at the ends."""
    ok = np.isfinite(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(float), kernel, mode="same")
    return np.where(count > 0, total / np.maximum(count, 1.0), np.nan)


def curves_png(lines: list[Line], *, title: str, ylabel: str, log_y: bool | None = None,
               percent: bool = False, smoothed: bool = False) -> bytes:
    """Curves over steps, one colour per run, validation dashed with markers; ``log_y=None`` decides by span.
    ``smoothed``: a training curve of more than SMOOTH_ABOVE points is drawn faint, under its moving average."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    for line in lines:
        x, y = _thin(line.steps, line.values)
        style = {"color": line.colour, "ls": "--" if line.dashed else "-", "lw": 1.5}
        if len(x) <= 60:
            style.update(marker="o" if line.dashed else ".", ms=4 if line.dashed else 3)
        if smoothed and len(line.values) > SMOOTH_ABOVE and not line.dashed:
            ax.plot(x, y, color=line.colour, lw=0.8, alpha=0.25)
            y = smooth(y, max(5, len(x) // 50))
        ax.plot(x, y, label=plain_text(line.label), **style)
    if log_y is None:
        log_y = wants_log([v for line in lines for v in line.values])
    if log_y:
        ax.set_yscale("log")
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(plain_text(ylabel) + (" (log scale)" if log_y else ""))
    ax.set_title(plain_text(title, 80))
    ax.grid(alpha=0.3, which="both" if log_y else "major")
    if len(lines) > 1:
        _legend(ax, len(lines))
    return _png(fig)


def _legend(ax, entries: int) -> None:
    # Up to four entries fit inside the axes; more would hide the curves, so they go to the right of it.
    if entries <= 4:
        ax.legend(fontsize="small", loc="best")
    else:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def bars_png(groups: list[str], bars: list[Bars], *, title: str, ylabel: str,
             baseline: list[float | None] | None = None, baseline_label: str = "chance") -> bytes:
    """Grouped bars (one colour per run) with error bars and an optional per-group baseline tick."""
    n_runs = max(1, len(bars))
    width = min(0.8 / n_runs, 0.35)
    fig = Figure(figsize=(max(6.4, min(18.0, 0.55 * len(groups) * max(1.0, n_runs / 1.5) + 2)), 4.0),
                 layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups), dtype=float)
    for i, bar in enumerate(bars):
        offset = (i - (n_runs - 1) / 2) * width
        heights = _drawable(bar.values)
        ax.bar(x + offset, np.nan_to_num(heights), width, color=bar.colour, label=plain_text(bar.label))
        err = _error_bars(heights, bar.low, bar.high)
        if err is not None:
            ax.errorbar(x + offset, heights, yerr=err, fmt="none", ecolor="#333333", capsize=3, lw=1)
    baseline = [b if b is not None and abs(b) < DRAWABLE else None for b in baseline or []]
    if any(b is not None for b in baseline):
        half = 0.45
        for j, b in enumerate(baseline):
            if b is not None:
                ax.hlines(b, x[j] - half, x[j] + half, colors="black", linestyles=":", lw=1.5,
                          label=baseline_label if j == next(k for k, v in enumerate(baseline) if v is not None)
                          else None)
    ax.set_xticks(x, [plain_text(g, 24) for g in groups], rotation=30 if len(groups) > 5 else 0,
                  ha="right" if len(groups) > 5 else "center")
    ax.set_ylabel(plain_text(ylabel))
    ax.set_title(plain_text(title, 80))
    ax.grid(axis="y", alpha=0.3)
    if len(bars) > 1 or any(b is not None for b in baseline):
        _legend(ax, 99)  # bars fill the axes: the legend always goes beside them
    return _png(fig)


def _drawable(values: list[float | None]) -> np.ndarray:
    out = np.array([np.nan if v is None else v for v in values], dtype=float)
    out[~(np.abs(out) < DRAWABLE)] = np.nan
    return out


def _error_bars(heights: np.ndarray, low: list, high: list) -> np.ndarray | None:
    if not low or not high or all(v is None for v in low):
        return None
    lo, hi = _drawable(low), _drawable(high)
    err = np.vstack([heights - lo, hi - heights])
    err[~np.isfinite(err)] = 0.0
    return np.clip(err, 0.0, None)


# ---------------------------------------------------------------------------------------- training curves


def training_figures(runs) -> tuple[list[tuple[str, bytes]], list[str]]:
    """((title, PNG) of every training plot, lines that explain how to read them) for ``runs`` (objects with
    ``name``, ``colour`` and ``series``: metrics.jsonl key -> steps and values); each plot overlays every run
    that logged its keys."""
    present = {k for run in runs for k in run.series}
    figures, failed = [], []
    for title, keys, ylabel, options in plot_specs(present):
        lines = _curve_lines(runs, keys)
        try:
            if lines:
                figures.append((title, curves_png(lines, title=title, ylabel=ylabel, **options)))
        except (ValueError, OverflowError) as err:  # values no axis can hold; the rest of the page still renders
            failed.append(f"{title}: {err}")
    legend = [f"Not drawn: {'; '.join(failed)}"] if failed else []
    if any(k.startswith("val_") for k in present):
        legend.append("Solid lines: training steps; dashed lines with dots: validation.")
    if any(len(s.values) > SMOOTH_ABOVE for run in runs for k, s in run.series.items() if k in NOISY):
        legend.append(f"Noisy training curves of more than {SMOOTH_ABOVE} points: faint, as logged; solid, a "
                      "moving average.")
    return figures, legend


def _curve_lines(runs: list, keys: list[str]) -> list[Line]:
    """One line per (run, key) present; labelled by run when several runs share the plot, by key when
    several keys do (train and validation loss), by both when both."""
    lines = []
    for run in runs:
        for key in keys:
            if key in run.series:
                series = run.series[key]
                label = CURVE_LABELS.get(key, key) if len(keys) > 1 else run.name
                if len(runs) > 1 and len(keys) > 1:
                    label = f"{run.name}: {label}"
                lines.append(Line(label, series.steps, series.values, run.colour, dashed=key.startswith("val_")))
    return lines


def plot_specs(present: set[str]) -> list[tuple[str, list[str], str, dict]]:
    """(title, keys, y label, options) of every training plot: the standard ones first, then one plot per
    other scalar (training, then validation)."""
    specs = [("loss", ["loss", "val_loss"], "loss", {"smoothed": True}),
             ("learning rate", ["lr"], "learning rate", {"log_y": False})]
    specs += [(f"throughput ({k.removesuffix('_per_s')}/s)", [k], f"{k.removesuffix('_per_s')} per second",
               {"log_y": False, "smoothed": True}) for k in THROUGHPUT]
    specs.append(("model FLOPs utilization", ["mfu"], "MFU", {"log_y": False, "percent": True, "smoothed": True}))
    shown = {k for _, keys, _, _ in specs for k in keys}
    for key in sorted(present - shown, key=lambda k: (k.startswith("val_"), k)):
        label = CURVE_LABELS.get(key, key)
        options = {"log_y": False, "percent": True} if key.endswith("_frac") else {}
        specs.append((label, [key], label, {**options, "smoothed": key in NOISY}))
    return specs
