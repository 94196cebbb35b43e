"""Tables for bias metrics: read CSV / JSONL / Parquet / labelled text, and turn columns into boolean facets.

A table is a list of row dicts plus its column names. Malformed rows are counted by reason and skipped, never
fatal; everything the user can get wrong (a missing column, a facet with one group, no positive label) is an
``FmforgeError`` naming what exists.
"""

import csv
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmforge.errors import FmforgeError, clip

TEXT_SUFFIXES = (".txt", ".cor", ".ft")
LABEL_PREFIX = "__label__"


@dataclass
class Table:
    """Rows of one input file, with the columns seen and the rows skipped (reason -> count)."""

    path: str
    columns: list[str]
    rows: list[dict]
    skipped: Counter = field(default_factory=Counter)


def read_table(path: str) -> Table:
    """Read ``path`` by its suffix: ``.csv``/``.tsv``, ``.jsonl``/``.json``, ``.parquet``, or labelled text
    (``.txt``/``.cor``/``.ft``: fastText-style ``__label__X text`` lines, or gensim's ``.cor``), which gives the
    columns ``label`` and ``text``."""
    source = Path(path)
    if not source.is_file():
        raise FmforgeError(f"no such file: {path}" if not source.exists() else f"not a file: {path}")
    if source.stat().st_size == 0:
        raise FmforgeError(f"{path} is empty")
    suffix = source.suffix.lower()
    if suffix in (".csv", ".tsv"):
        table = _read_csv(source, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json", ".ndjson"):
        table = _read_jsonl(source)
    elif suffix == ".parquet":
        table = _read_parquet(source)
    elif suffix in TEXT_SUFFIXES:
        table = _read_labelled_text(source)
    else:
        raise FmforgeError(f"{path}: unknown table format {suffix!r} (use .csv, .tsv, .jsonl, .parquet, "
                           ".txt/.cor with __label__ lines)")
    if not table.rows:
        reasons = ", ".join(f"{n} {why}" for why, n in table.skipped.items()) or "no data rows"
        raise FmforgeError(f"{path} has no usable rows ({reasons})")
    return table


def _read_csv(source: Path, delimiter: str) -> Table:
    skipped: Counter = Counter()
    rows = []
    with open(source, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise FmforgeError(f"{source} has no header row")
            columns = [h.strip() for h in header]
            for record in reader:
                if not record or all(not cell.strip() for cell in record):
                    continue
                if len(record) != len(columns):
                    skipped[f"rows with {len(record)} fields instead of {len(columns)}"] += 1
                    continue
                rows.append(dict(zip(columns, record)))
        except csv.Error as err:  # e.g. a field over the csv module's size limit: the rest cannot be parsed
            raise FmforgeError(f"{source}: line {reader.line_num}: not parseable as CSV ({err})") from err
    return Table(str(source), columns, rows, skipped)


def _read_jsonl(source: Path) -> Table:
    skipped: Counter = Counter()
    rows, columns = [], {}
    with open(source, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                skipped["lines that are not JSON"] += 1
                continue
            if not isinstance(record, dict):
                skipped["lines that are not JSON objects"] += 1
                continue
            rows.append(record)
            columns.update(dict.fromkeys(record))
    return Table(str(source), list(columns), rows, skipped)


def _read_parquet(source: Path) -> Table:
    try:
        import pyarrow.parquet as pq  # optional dependency, only for .parquet inputs
    except ImportError as err:
        raise FmforgeError("reading Parquet needs pyarrow: pip install 'fmforge[biasdata]'") from err
    try:
        data = pq.read_table(source)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise FmforgeError(f"{source}: not a readable Parquet file ({clip(str(err), 120)})") from err
    return Table(str(source), list(data.column_names), data.to_pylist(), Counter())


def _read_labelled_text(source: Path) -> Table:
    skipped: Counter = Counter()
    rows = []
    with open(source, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            head, _, text = line.strip().partition(" ")
            if not head.startswith(LABEL_PREFIX) or len(head) == len(LABEL_PREFIX):
                skipped["lines without a __label__ prefix"] += 1
                continue
            rows.append({"label": head[len(LABEL_PREFIX):], "text": text})
    return Table(str(source), ["label", "text"], rows, skipped)


# ---------------------------------------------------------------- values and facets

def normalise(value) -> str | None:
    """A cell as a comparable string: ``1``, ``"1"``, ``1.0``, ``true`` and ``"True"`` match (as do 0 and false);
    empty/None/NaN is None (missing)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            return {"true": "1", "false": "0"}.get(text.lower(), text)
    if math.isnan(number):
        return None
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


def as_number(value) -> float | None:
    text = normalise(value)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def require_column(table: Table, column: str, role: str) -> None:
    if column not in table.columns:
        shown = ", ".join(table.columns[:40]) + (" ..." if len(table.columns) > 40 else "")
        raise FmforgeError(f"{role} column {clip(column)} is not in {table.path}; columns: {shown}")


@dataclass
class Selector:
    """How one column's cell becomes True/False: a set of values, a threshold (``> x``), or terms in text."""

    column: str
    values: tuple[str, ...] = ()
    threshold: float | None = None
    terms: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.threshold is not None:
            return f"{self.column} > {self.threshold:g}"
        if self.terms:
            return f"{self.column} mentions any of {', '.join(self.terms)}"
        return f"{self.column} in {{{', '.join(self.values)}}}"

    def pattern(self) -> re.Pattern:
        words = "|".join(re.escape(t) for t in self.terms)
        return re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)

    def apply(self, cell, pattern: re.Pattern | None = None) -> bool | None:
        """True/False for one cell; None when the cell is missing or not usable (the row is skipped)."""
        if self.terms:
            return None if cell is None else bool(pattern.search(str(cell)))
        if self.threshold is not None:
            number = as_number(cell)
            return None if number is None else number > self.threshold
        text = normalise(cell)
        return None if text is None else text in self.values


def parse_values(spec: str | list[str] | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    parts = spec if isinstance(spec, list) else [spec]
    values = [normalise(v) for part in parts for v in str(part).split(",")]
    return tuple(v for v in values if v is not None)


def distinct_values(rows: list[dict], column: str, limit: int = 12) -> str:
    counts = Counter(normalise(r.get(column)) for r in rows)
    counts.pop(None, None)
    shown = ", ".join(f"{v} ({n})" for v, n in counts.most_common(limit))
    return shown + (" ..." if len(counts) > limit else "")


@dataclass
class Columns:
    """The boolean arrays the metrics take, with the rows that survived and why others were skipped."""

    facet: np.ndarray
    label: np.ndarray
    pred: np.ndarray | None
    group: np.ndarray | None
    rows: list[dict]
    skipped: Counter


def select(table: Table, facet: Selector, label: Selector, predicted: str | None = None,
           group: str | None = None) -> Columns:
    """Apply the facet and label selectors (and the prediction column, read with the label's rule) to every
    row; a row with a missing or unusable cell in any of them is counted and skipped."""
    for column, role in ((facet.column, "facet"), (label.column, "label"), (predicted, "predicted"),
                         (group, "group")):
        if column is not None:
            require_column(table, column, role)
    skipped = Counter(table.skipped)
    pattern = facet.pattern() if facet.terms else None
    kept, f_vals, y_vals, p_vals, g_vals = [], [], [], [], []
    for row in table.rows:
        f = facet.apply(row.get(facet.column), pattern)
        y = label.apply(row.get(label.column))
        p = label.apply(row.get(predicted)) if predicted else False
        g = normalise(row.get(group)) if group else ""
        if f is None or y is None or p is None or g is None:
            missing = [name for name, v in (("facet", f), ("label", y), ("predicted", p), ("group", g))
                       if v is None]
            skipped[f"rows with a missing or non-numeric {'/'.join(missing)} value"] += 1
            continue
        kept.append(row)
        f_vals.append(f)
        y_vals.append(y)
        p_vals.append(p)
        g_vals.append(g)
    if not kept:
        raise FmforgeError(f"{table.path}: no row has usable facet and label values")
    cols = Columns(np.array(f_vals, bool), np.array(y_vals, bool), np.array(p_vals, bool) if predicted else None,
                   np.array(g_vals, dtype=object) if group else None, kept, skipped)
    _check_groups(table, facet, label, cols)
    return cols


def _check_groups(table: Table, facet: Selector, label: Selector, cols: Columns) -> None:
    n_d = int(cols.facet.sum())
    if n_d == 0 or n_d == cols.facet.size:
        side = "no" if n_d == 0 else "every"
        hint = "" if facet.terms else f"; values of {facet.column}: {distinct_values(cols.rows, facet.column)}"
        raise FmforgeError(f"facet has one group only: {side} row matches {facet.describe()}{hint}")
    if not cols.label.any():
        raise FmforgeError(f"no positive label: no row has {label.describe()}; values of {label.column}: "
                           f"{distinct_values(cols.rows, label.column)}")


def numeric_features(cols: Columns, exclude: set[str]) -> np.ndarray | None:
    """The numeric columns (every kept row parses as a number) other than ``exclude``, as a float matrix; None
    when there are none. These are the flip test's neighbourhood features."""
    if not cols.rows:
        return None
    names = [c for c in cols.rows[0] if c not in exclude]
    matrix = []
    for name in names:
        column = [as_number(row.get(name)) for row in cols.rows]
        if all(v is not None for v in column):
            matrix.append(column)
    return np.array(matrix, dtype=float).T if matrix else None
