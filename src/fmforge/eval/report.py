"""``fmforge report``: one self-contained HTML page about one or more run directories.

The page holds each run's resolved config (collapsible), its training curves (loss and validation loss, learning
rate, throughput, MFU and every other scalar in ``metrics.jsonl``), and every evaluation result saved in
``RUN_DIR/eval/*.json``. Several runs are compared side by side: one colour per run in every plot, one column
per run in every table, and a table of the config keys on which they differ.

Plots are PNGs embedded as ``data:`` URIs, the styling is inline and there is no script: the file can be mailed
or attached to a ticket and opens offline. A Content-Security-Policy forbids anything else, so even a page
built from hostile files cannot fetch or run anything; all text from files is HTML-escaped anyway. The run
directories are only read; the page is written to a temporary file beside ``--out`` and renamed onto it.
"""

from __future__ import annotations

import base64
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from fmforge import __version__
from fmforge.errors import FmforgeError, clip
from fmforge.eval.results import EVAL_DIR, load_results
from fmforge.io.html import CSP, CSS, as_json, esc, fmt
from fmforge.io.paths import confined
from fmforge.io.plots import THROUGHPUT, Bars, bars_png, run_colours, training_figures

MAX_CONFIG_BYTES = 1 << 20
# metrics.jsonl keys beyond this many are not plotted (a hand-written file could hold thousands).
MAX_SERIES = 40
MAX_DIFF_ROWS = 200
# Running totals of what was consumed: a straight line over steps, nothing to read from a plot.
COUNTERS = {"step", "tokens", "samples"}
# The measure a bar chart shows for grouped results (benchmark tasks, human-eval models), best first.
PRIMARY_MEASURES = ("acc", "acc_norm", "exact_match", "em", "f1", "rouge_l", "bleu", "win_rate", "mean",
                    "score", "accuracy", "top1")
BASELINES = ("chance", "random", "baseline")
# Companion keys folded into their measure's cell: "acc_stderr" -> "acc ± s", "mean_lo/_hi" -> "mean [lo, hi]".
STDERR_SUFFIXES = ("_stderr", "_se")
INTERVAL_SUFFIXES = (("_lo", "_hi"), ("_low", "_high"), ("_ci_low", "_ci_high"), ("_ci_lo", "_ci_hi"))
INTERVAL_LIST_SUFFIXES = ("_ci", "_interval")
HEADER_FIELDS = {"kind", "name", "created", "fmforge_version", "metrics"}


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Series:
    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Run:
    path: Path
    name: str = ""
    colour: str = ""
    config_text: str = ""
    config: dict = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)
    metric_lines: int = 0
    malformed: int = 0
    results: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_run(path: str | Path) -> Run:
    """Read one run directory; a directory that is not a run is a one-line error."""
    run = Run(Path(path))
    if not run.path.is_dir():
        raise FmforgeError(f"not a run directory (no such directory): {path}")
    config = run.path / "config.yaml"
    if not config.is_file():
        raise FmforgeError(f"not a run directory (no config.yaml): {path}")
    # A run directory may come from someone else: its files are read only where they stay inside it.
    _read_config(run, confined(run.path, "config.yaml", str(run.path)))
    metrics = run.path / "metrics.jsonl"
    if metrics.is_file() and confined(run.path, "metrics.jsonl", str(run.path)):
        _read_metrics(run, metrics)
    else:
        run.notes.append("no metrics.jsonl: no training curves")
    _read_results(run)
    return run


def _read_config(run: Run, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise FmforgeError(f"cannot read {path}: {err.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        run.notes.append(f"config.yaml is larger than {MAX_CONFIG_BYTES >> 20} MiB: only its start is shown")
        raw = raw[:MAX_CONFIG_BYTES]
    run.config_text = raw.decode("utf-8", errors="replace")
    try:
        loaded = yaml.safe_load(run.config_text)
    except (yaml.YAMLError, RecursionError, ValueError):
        loaded = None
    if isinstance(loaded, dict):
        run.config = loaded
    else:
        run.notes.append("config.yaml is not a YAML mapping: shown as text only")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _read_metrics(run: Run, path: Path) -> None:
    dropped: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            run.metric_lines += 1
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # a torn last line, a huge integer, garbage
                run.malformed += 1
                continue
            step = _number(record.get("step")) if isinstance(record, dict) else None
            if step is None or not math.isfinite(step):
                run.malformed += 1
                continue
            for key, value in record.items():
                value = _number(value)
                if key in COUNTERS or value is None:
                    continue
                if key not in run.series and len(run.series) >= MAX_SERIES:
                    dropped.add(key)
                    continue
                series = run.series.setdefault(key, Series())
                series.steps.append(step)
                series.values.append(value)
    if run.malformed:
        run.notes.append(f"{run.malformed} malformed line(s) of {run.metric_lines} in metrics.jsonl skipped")
    if dropped:
        run.notes.append(f"{len(dropped)} more metrics.jsonl key(s) not plotted (over {MAX_SERIES})")
    if not run.series:
        run.notes.append("metrics.jsonl holds no logged steps: no training curves")


def _read_results(run: Run) -> None:
    run.results = load_results(run.path)
    on_disk = len(list((run.path / EVAL_DIR).glob("*.json"))) if (run.path / EVAL_DIR).is_dir() else 0
    if on_disk > len(run.results):
        run.notes.append(f"{on_disk - len(run.results)} unreadable file(s) in {EVAL_DIR}/ skipped")
    if not run.results:
        run.notes.append(f"no evaluation results in {EVAL_DIR}/ (run `fmforge eval` to add some)")


def load_runs(run_dirs: list[str]) -> list[Run]:
    """Every run, named by its directory (more of the path where two names collide), one colour each."""
    seen, runs = set(), []
    for d in run_dirs:
        key = Path(d).resolve()
        if key not in seen:
            seen.add(key)
            runs.append(load_run(d))
    names = [r.path.resolve().name or str(r.path) for r in runs]
    if len(set(names)) < len(names):
        names = ["/".join(r.path.resolve().parts[-2:]) for r in runs]
    for i, (run, colour) in enumerate(zip(runs, run_colours(len(runs)))):
        run.name = names[i] if names.count(names[i]) == 1 else f"{names[i]} #{i + 1}"
        run.colour = colour
    return runs


# ------------------------------------------------------------------------------------------------ helpers


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}"></figure>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _run_head(run: Run) -> str:
    return f'<span class="swatch" style="background:{run.colour}"></span>{esc(run.name)}'


def _yaml_scalar(value) -> str:
    """A config value as its YAML spelling (null, true, 0.0003): exact, unlike a table's rounded numbers."""
    return fmt(value if isinstance(value, str) else as_json(value))


def _flatten(tree, prefix: str = "", depth: int = 0) -> dict[str, object]:
    if isinstance(tree, dict) and tree and depth < 32:
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key), depth + 1))
        return out
    return {prefix: tree}


# ---------------------------------------------------------------------------------------------- sections


def _typical(series: Series | None) -> float | None:
    """The median of a logged rate, past the first step (which pays for warm-up and compilation)."""
    finite = [v for v in (series.values[1:] or series.values) if math.isfinite(v)] if series else []
    return statistics.median(finite) if finite else None


def _summary(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        s, model = run.series, run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
        steps = max((max(x.steps) for x in s.values() if x.steps), default=None)
        loss = s.get("loss")
        val = [(v, step) for v, step in zip(s["val_loss"].values, s["val_loss"].steps)
               if math.isfinite(v)] if "val_loss" in s else []
        best = min(val) if val else None
        unit = next((k for k in THROUGHPUT if k in s), None)
        speed, mfu = _typical(s.get(unit)), _typical(s.get("mfu"))
        model_name = " ".join(fmt(model[k]) for k in ("arch", "size") if model.get(k) is not None)
        rows.append([
            _run_head(run), f"<code>{esc(run.path)}</code>", esc(model_name),
            esc(fmt(int(steps)) if steps is not None else ""),
            esc(fmt(loss.values[-1]) if loss else ""),
            esc(f"{fmt(best[0])} @ {fmt(int(best[1]))}" if best else ""),
            esc(f"{fmt(speed)} {unit.removesuffix('_per_s')}/s" if speed is not None else ""),
            esc(f"{mfu:.1%}" if mfu is not None else ""),
            esc(len(run.results)),
            "<br>".join(esc(n) for n in run.notes)])
    header = ["run", "directory", "model", "steps", "final loss", "best val loss @ step", "throughput (median)",
              "MFU (median)", "eval results", "notes"]
    if not any(run.notes for run in runs):
        header, rows = header[:-1], [row[:-1] for row in rows]
    return '<section id="runs"><h2>Runs</h2>' + _table(header, rows) + "</section>"


def _config_section(runs: list[Run]) -> str:
    parts = ['<section id="config"><h2>Configuration</h2>']
    if len(runs) > 1:
        flat = [_flatten(r.config) for r in runs]
        keys = sorted({k for f in flat for k in f})
        missing = "\0missing"
        differ = [k for k in keys if len({as_json(f[k]) if k in f else missing for f in flat}) > 1]
        if differ:
            rows = [[f"<code>{esc(k)}</code>"] + [esc(_yaml_scalar(f[k])) if k in f else '<span class="dim">—</span>'
                                                  for f in flat] for k in differ[:MAX_DIFF_ROWS]]
            parts.append("<h3>Where the configs differ</h3>" + _table(["key"] + [_run_head(r) for r in runs], rows))
            if len(differ) > MAX_DIFF_ROWS:
                parts.append(f'<p class="dim">… and {len(differ) - MAX_DIFF_ROWS} more keys</p>')
        else:
            parts.append("<p>The runs' configs are identical.</p>")
    for run in runs:
        parts.append(f"<details><summary>{_run_head(run)}: config.yaml</summary>"
                     f"<pre>{esc(run.config_text)}</pre></details>")
    return "".join(parts) + "</section>"


def _training_section(runs: list[Run]) -> str:
    present = {k for r in runs for k in r.series}
    parts = ['<section id="training"><h2>Training</h2>']
    if not present:
        return "".join(parts) + '<p class="dim">No run has logged training steps.</p></section>'
    figures, legend = training_figures(runs)
    parts += [f'<p class="dim">{esc(line)}</p>' for line in legend]
    parts.append('<div class="grid">' + "".join(_img(png, title) for title, png in figures) + "</div>")
    return "".join(parts) + "</section>"


# ------------------------------------------------------------------------------------ evaluation results


def _grouped(doc: dict) -> tuple[str, dict[str, dict[str, object]], dict[str, object]]:
    """(what the groups are, {group: {measure: value}}, the flat metrics left over) of one result.

    Groups come from a structured field (``"tasks": {task: {acc: ...}}``, ``"models": {...}``, any field
    holding a mapping of mappings) or else from ``GROUP/MEASURE`` metric keys; lm-eval's ``acc,none`` measure
    names lose their ``,none`` filter suffix."""
    metrics = doc.get("metrics", {})
    order = ["tasks", "models"] + [k for k in doc if k not in HEADER_FIELDS and k not in ("tasks", "models")]
    for key in order:
        value = doc.get(key)
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            groups = {str(g): {str(m).removesuffix(",none"): v for m, v in row.items() if _cell_value(v)}
                      for g, row in value.items()}
            flat = {k: v for k, v in metrics.items() if "/" not in str(k)}
            return key, groups, flat
    groups: dict[str, dict[str, object]] = {}
    flat = {}
    for key, value in metrics.items():
        group, sep, measure = str(key).partition("/")
        if sep and group and measure:
            groups.setdefault(group, {})[measure.removesuffix(",none")] = value
        else:
            flat[key] = value
    if len(groups) < 1 or sum(len(g) for g in groups.values()) < 2:
        return "", {}, metrics
    return "tasks" if doc.get("kind") in ("benchmark", "lm_eval") else "groups", groups, flat


def _cell_value(value) -> bool:
    return (_number(value) is not None or isinstance(value, str)
            or (isinstance(value, list) and len(value) == 2 and all(_number(v) is not None for v in value)))


def _companions(measures: list[str]) -> dict[str, tuple[str, ...]]:
    """measure -> the keys folded into its cell: ('stderr', key) or ('interval', lo, hi) or ('list', key)."""
    folded: dict[str, tuple[str, ...]] = {}
    names = set(measures)
    for m in measures:
        for suffix in STDERR_SUFFIXES:
            if m + suffix in names:
                folded[m] = ("stderr", m + suffix)
        for lo, hi in INTERVAL_SUFFIXES:
            if m + lo in names and m + hi in names:
                folded[m] = ("interval", m + lo, m + hi)
        for suffix in INTERVAL_LIST_SUFFIXES:
            if m + suffix in names:
                folded[m] = ("list", m + suffix)
    return folded


def _interval(row: dict, measure: str, how: tuple[str, ...] | None) -> tuple[float | None, float | None, str]:
    """(low, high, text) of ``measure``'s error bar in ``row``, from its folded companions."""
    if how is None:
        return None, None, ""
    if how[0] == "stderr":
        centre, spread = _number(row.get(measure)), _number(row.get(how[1]))
        if centre is None or spread is None:
            return None, None, ""
        return centre - spread, centre + spread, f" ± {fmt(spread)}"
    pair = row.get(how[1]) if how[0] == "list" else [row.get(how[1]), row.get(how[2])]
    lo, hi = (_number(pair[0]), _number(pair[1])) if isinstance(pair, list) and len(pair) == 2 else (None, None)
    if lo is None or hi is None:
        return None, None, ""
    return lo, hi, f" [{fmt(lo)}, {fmt(hi)}]"


def _pivot_columns(groups: dict[str, dict]) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    measures = list(dict.fromkeys(m for row in groups.values() for m in row))
    folded = _companions(measures)
    hidden = {k for how in folded.values() for k in how[1:]}
    columns = [m for m in measures if m not in hidden]
    rank = {m: i for i, m in enumerate(PRIMARY_MEASURES)}
    columns.sort(key=lambda m: (m in BASELINES or m in ("n", "examples", "count"), rank.get(m, len(rank))))
    return columns, folded


def _pivot_table(what: str, groups: dict[str, dict]) -> str:
    columns, folded = _pivot_columns(groups)
    rows = []
    for group, row in groups.items():
        cells = [f"<code>{esc(group)}</code>"]
        for m in columns:
            text = fmt(_number(row[m]) if _number(row.get(m)) is not None else row.get(m)) if m in row else ""
            cells.append(esc(text + _interval(row, m, folded.get(m))[2]))
        rows.append(cells)
    return _table([esc(what.rstrip("s") or "group")] + [esc(m) for m in columns], rows, "num")


def _primary(groups_by_run: list[dict[str, dict]]) -> str | None:
    present = {m for groups in groups_by_run for row in groups.values() for m in row}
    return next((m for m in PRIMARY_MEASURES if m in present), None)


def _grouped_plot(name: str, runs: list[Run], groups_by_run: list[dict[str, dict]], measure: str) -> str:
    order = list(dict.fromkeys(g for groups in groups_by_run for g in groups))
    bars, errors = [], set()
    for run, groups in zip(runs, groups_by_run):
        folded = _companions(list(dict.fromkeys(m for row in groups.values() for m in row)))
        if measure in folded:
            errors.add("± stderr" if folded[measure][0] == "stderr" else "interval")
        values, low, high = [], [], []
        for g in order:
            row = groups.get(g, {})
            values.append(_number(row.get(measure)))
            lo, hi, _ = _interval(row, measure, folded.get(measure))
            low.append(lo)
            high.append(hi)
        bars.append(Bars(run.name, run.colour, values, low, high))
    baseline_key = next((b for b in BASELINES if any(b in row for gs in groups_by_run for row in gs.values())), None)
    baseline = None
    if baseline_key:
        baseline = [next((_number(gs[g][baseline_key]) for gs in groups_by_run if baseline_key in gs.get(g, {})),
                         None) for g in order]
    ylabel = f"{measure} (error bars: {' / '.join(sorted(errors))})" if errors else measure
    try:
        png = bars_png(order, bars, title=f"{name}: {measure}", ylabel=ylabel, baseline=baseline,
                       baseline_label=baseline_key or "chance")
    except (ValueError, OverflowError) as err:  # values no axis can hold: the tables below still show them
        return f'<p class="dim">{esc(measure)} not drawn: {esc(err)}</p>'
    return _img(png, f"{name}: {measure} per group")


def _result_block(name: str, runs: list[Run], docs: list[dict | None]) -> str:
    having = [(r, d) for r, d in zip(runs, docs) if d is not None]
    kinds = sorted({str(d.get("kind")) for _, d in having})
    parts = [f'<article><h3>{esc(name)} <span class="kind">{esc(", ".join(kinds))}</span></h3>',
             '<p class="dim">' + "; ".join(f"{esc(r.name)}: {esc(d.get('created', '?'))}" for r, d in having)
             + "</p>"]
    split = [_grouped(d) for _, d in having]
    groups_by_run = [g for _, g, _ in split]
    if any(groups_by_run):
        parts.append(_grouped_block(name, having, split))
    flats = [flat for _, _, flat in split]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    if keys:
        rows = [[f"<code>{esc(k)}</code>"] + [esc(fmt(flat[k])) if k in flat else '<span class="dim">—</span>'
                                              for flat in flats] for k in keys]
        parts.append(_table(["metric"] + [_run_head(r) for r, _ in having], rows, "num"))
    parts.append(_extra_fields(having, split))
    return "".join(parts) + "</article>"


def _grouped_block(name: str, having: list[tuple[Run, dict]], split: list[tuple]) -> str:
    """A grouped result (benchmark tasks, human-eval models): the bar chart of its main measure; for one run
    the full table; for several a side-by-side table of the main measure, the full tables folded away."""
    what = next(w for w, g, _ in split if g)
    groups_by_run = [g for _, g, _ in split]
    measure = _primary(groups_by_run)
    parts = [_grouped_plot(name, [r for r, _ in having], groups_by_run, measure)] if measure else []
    if len(having) == 1:
        return "".join(parts) + _pivot_table(what, groups_by_run[0])
    if measure:
        parts.append(_comparison_table(what, measure, having, groups_by_run))
    tables = "".join(f"<h4>{_run_head(run)}</h4>{_pivot_table(what, groups)}"
                     for (run, _), groups in zip(having, groups_by_run) if groups)
    parts.append(f"<details><summary>every measure, per run</summary>{tables}</details>")
    return "".join(parts)


def _comparison_table(what: str, measure: str, having: list[tuple[Run, dict]],
                      groups_by_run: list[dict[str, dict]]) -> str:
    order = list(dict.fromkeys(g for groups in groups_by_run for g in groups))
    baseline = next((b for b in BASELINES if any(b in row for gs in groups_by_run for row in gs.values())), None)
    folded = [_companions(list(dict.fromkeys(m for row in gs.values() for m in row))) for gs in groups_by_run]
    rows = []
    for g in order:
        cells = [f"<code>{esc(g)}</code>"]
        for groups, how in zip(groups_by_run, folded):
            row = groups.get(g, {})
            value = _number(row.get(measure))
            cells.append(esc(fmt(value) + _interval(row, measure, how.get(measure))[2]) if value is not None
                         else '<span class="dim">—</span>')
        if baseline:
            cells.append(esc(fmt(next((gs[g][baseline] for gs in groups_by_run if baseline in gs.get(g, {})), ""))))
        rows.append(cells)
    header = [esc(what.rstrip("s") or "group")] + [f"{_run_head(r)}<br>{esc(measure)}" for r, _ in having]
    return _table(header + ([esc(baseline)] if baseline else []), rows, "num")


def _extra_fields(having: list[tuple[Run, dict]], split: list[tuple]) -> str:
    rows = []
    for (run, doc), (what, _, _) in zip(having, split):
        for key, value in doc.items():
            if key in HEADER_FIELDS or key == what:
                continue
            if isinstance(value, (list, dict)):
                value = f"({'list' if isinstance(value, list) else 'mapping'} of {len(value)})"
            rows.append([_run_head(run), f"<code>{esc(key)}</code>", esc(fmt(value))])
    if not rows:
        return ""
    return "<details><summary>other fields</summary>" + _table(["run", "field", "value"], rows) + "</details>"


def _eval_section(runs: list[Run]) -> str:
    by_name: dict[str, list[dict | None]] = {}
    for i, run in enumerate(runs):
        for doc in run.results:
            name = str(doc.get("name") or doc.get("kind"))
            while name in by_name and by_name[name][i] is not None:  # two files that claim one name
                name += "'"
            by_name.setdefault(name, [None] * len(runs))[i] = doc
    parts = ['<section id="eval"><h2>Evaluation</h2>']
    if not by_name:
        parts.append(f'<p class="dim">No evaluation results found (RUN_DIR/{EVAL_DIR}/*.json).</p>')
    for name in sorted(by_name):
        parts.append(_result_block(name, runs, by_name[name]))
    return "".join(parts) + "</section>"


# ------------------------------------------------------------------------------------------------ page

# No script, nothing fetched: images only from data: URIs, styles only inline.



def render_page(runs: list[Run], title: str) -> str:
    """The whole HTML page for already-loaded runs."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [_summary(runs), _config_section(runs), _training_section(runs), _eval_section(runs)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{CSS}</style></head><body>'
            f'<header><h1>{esc(title)}</h1><p class="dim">fmforge {esc(__version__)} · {when} · '
            f'{len(runs)} run{"s" if len(runs) > 1 else ""}</p>'
            '<nav><a href="#runs">Runs</a><a href="#config">Configuration</a><a href="#training">Training</a>'
            '<a href="#eval">Evaluation</a></nav></header>' + "".join(body) + "</body></html>\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a link at `path` is replaced, never written through
    finally:
        tmp.unlink(missing_ok=True)


def write_report(run_dirs: list[str], out: str, *, title: str | None = None, echo=print) -> Path:
    """Write the HTML report on ``run_dirs`` to ``out`` (an .html file, replaced atomically); return its path."""
    if not run_dirs:
        raise FmforgeError("give at least one run directory")
    path = Path(out)
    if path.suffix.lower() not in (".html", ".htm"):
        raise FmforgeError(f"--out must name an .html file, got {clip(str(out))}")
    if path.is_dir():
        raise FmforgeError(f"--out is a directory: {out}")
    runs = load_runs(run_dirs)
    if title is None:
        title = f"fmforge report: {runs[0].name}" if len(runs) == 1 else f"fmforge report: {len(runs)} runs"
    page = render_page(runs, title)
    try:
        _write_atomic(path, page)
    except OSError as err:
        raise FmforgeError(f"cannot write {out}: {err.strerror}") from None
    for run in runs:
        for note in run.notes:
            echo(f"{run.name}: {note}")
    echo(f"report on {len(runs)} run{'s' if len(runs) > 1 else ''} written to {path} ({len(page) / 1024:.0f} KiB)")
    return path


def report_command(run_dirs: list[str], *, out: str, title: str | None = None) -> None:
    """``fmforge report RUN_DIR [RUN_DIR...] --out report.html [--title T]``."""
    write_report(run_dirs, out, title=title)
