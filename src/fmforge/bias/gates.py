"""Gates and drift for any metrics JSON: ``--fail-if "DPL > 0.2"`` conditions and ``bias compare OLD NEW``.

Results are nested dicts of numbers; a metric is addressed by its dotted path (``metrics.DPL``,
``crows-pairs.gender``) or by any unambiguous suffix of it (``DPL``). Infinities are saved as the strings
``"Infinity"``/``"-Infinity"`` (as Clarify writes them) so the files stay standard JSON.
"""

import json
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path

from fmforge.errors import FmforgeError, clip

OPERATORS = {">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le}
_CONDITION = re.compile(
    r"^\s*(?:(abs)\s*\(\s*(?P<inner>[\w.\-/:]+)\s*\)|(?P<name>[\w.\-/:]+))\s*(?P<op>>=|<=|>|<)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf)\s*$")


class GateFailed(FmforgeError):
    """One or more ``--fail-if`` conditions held; exit 1 (a finding, not a usage error)."""

    exit_code = 1


@dataclass(frozen=True)
class Condition:
    """``[abs(]metric[)] op threshold``; the gate fails when the condition is true."""

    metric: str
    op: str
    threshold: float
    absolute: bool = False

    def __str__(self) -> str:
        name = f"abs({self.metric})" if self.absolute else self.metric
        return f"{name} {self.op} {self.threshold:g}"

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](abs(value) if self.absolute else value, self.threshold)


def parse_condition(text: str) -> Condition:
    """``"DPL > 0.2"``, ``"abs(DPL) >= 0.1"``, ``"crows-pairs.gender > 0.6"`` -> Condition; else FmforgeError."""
    match = _CONDITION.match(text or "")
    if not match:
        raise FmforgeError(f"bad --fail-if condition {clip(text)}: write METRIC OP NUMBER or abs(METRIC) OP NUMBER "
                           f"with OP one of >, <, >=, <=")
    metric = match.group("inner") or match.group("name")
    return Condition(metric, match.group("op"), float(match.group("value")), bool(match.group("inner")))


def flatten(results: dict, prefix: str = "") -> dict[str, float | None]:
    """Every number (or null) in nested ``results`` by its dotted path; strings "Infinity" become floats."""
    flat: dict[str, float | None] = {}
    for key, value in results.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)) or value is None:
            flat[path] = None if value is None else float(value)
        elif value in ("Infinity", "-Infinity", "NaN"):
            flat[path] = float(value)
    return flat


def lookup(flat: dict[str, float | None], metric: str) -> str:
    """The one dotted path that is ``metric`` or ends with ``.metric``; FmforgeError if none or several."""
    if metric in flat:
        return metric
    hits = [path for path in flat if path.endswith("." + metric)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        shown = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in flat})[:40])
        raise FmforgeError(f"--fail-if names unknown metric {clip(metric)}; metrics: {shown}")
    raise FmforgeError(f"--fail-if metric {clip(metric)} is ambiguous: {', '.join(sorted(hits))}")


def check(conditions: list[str] | list[Condition], results: dict) -> list[str]:
    """Evaluate every condition against ``results``; return one line per failed gate (empty: all passed).

    A metric that could not be computed (null or NaN) fails its gate: a pipeline must not pass on a blind spot.
    """
    parsed = [c if isinstance(c, Condition) else parse_condition(c) for c in conditions]
    flat = flatten(results)
    failures = []
    for cond in parsed:
        path = lookup(flat, cond.metric)
        value = flat[path]
        if value is None or math.isnan(value):
            failures.append(f"{cond}: {path} was not computed")
        elif cond.holds(value):
            failures.append(f"{cond}: {path} = {value:.6g}")
    return failures


def enforce(conditions: list[str] | None, results: dict) -> None:
    """Raise GateFailed naming every failing metric when any ``--fail-if`` condition holds."""
    failures = check(conditions or [], results)
    if failures:
        raise GateFailed("bias gate failed: " + "; ".join(failures))


# ---------------------------------------------------------------- saving and comparing

def encode(value):
    """JSON-safe copy of ``value``: ±inf -> "Infinity"/"-Infinity", NaN -> null, numpy scalars -> floats."""
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
    return value


def dumps(results: dict) -> str:
    return json.dumps(encode(results), indent=2, allow_nan=False)


def load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FmforgeError(f"no such results file: {path}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FmforgeError(f"{path} is not a JSON results file ({clip(str(err), 100)})") from err
    if not isinstance(data, dict):
        raise FmforgeError(f"{path} is not a JSON results object")
    return data


def _delta(old: float | None, new: float | None) -> float | None:
    if old is None or new is None or math.isnan(old) or math.isnan(new):
        return None
    if math.isinf(old) and old == new:
        return 0.0
    return new - old


def drift(old: dict, new: dict, skip: tuple[str, ...] = ("input", "setup", "counts", "rows", "skipped")) -> list[dict]:
    """Metric-by-metric comparison of two results dicts: ``[{metric, old, new, delta}]`` over the union of
    numeric paths (a metric only in one file has the other side None). Bookkeeping sections are skipped."""
    flat_old, flat_new = flatten(old), flatten(new)
    rows = []
    for path in sorted(set(flat_old) | set(flat_new)):
        if path.split(".", 1)[0] in skip:
            continue
        a, b = flat_old.get(path), flat_new.get(path)
        rows.append({"metric": path, "old": a, "new": b, "delta": _delta(a, b)})
    return rows


def format_drift(rows: list[dict]) -> str:
    def show(x):
        return "-" if x is None else f"{x:.4g}"

    width = max([len(r["metric"]) for r in rows] + [6])
    lines = [f"{'metric':<{width}}  {'old':>10}  {'new':>10}  {'delta':>10}"]
    for r in rows:
        lines.append(f"{r['metric']:<{width}}  {show(r['old']):>10}  {show(r['new']):>10}  {show(r['delta']):>10}")
    return "\n".join(lines)


def compare(old_path: str, new_path: str, *, json_out: bool = False, fail_if: list[str] | None = None) -> list[dict]:
    """``fmforge bias compare OLD.json NEW.json``: print the drift table (or JSON); ``--fail-if`` conditions
    here apply to the deltas (``"DPL > 0.05"``: DPL grew by more than 0.05)."""
    rows = drift(load(old_path), load(new_path))
    if not rows:
        raise FmforgeError(f"{old_path} and {new_path} share no numeric metrics")
    print(dumps({"drift": rows}) if json_out else format_drift(rows))
    enforce(fail_if, {r["metric"]: r["delta"] for r in rows})
    return rows
