"""HTML pages fmforge writes (the run report, the data profile): self-contained, no scripts, one style."""

from __future__ import annotations

import html
import json
import math

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font:15px/1.45 system-ui,sans-serif;color:#1d2330;margin:0 auto;max-width:1400px;padding:0 24px 48px}
header{border-bottom:2px solid #e3e6ee;margin-bottom:8px} h1{font-size:1.7em;margin:24px 0 4px}
h2{font-size:1.3em;margin:32px 0 8px;border-bottom:1px solid #e3e6ee} h3{font-size:1.1em;margin:24px 0 4px}
h4{margin:12px 0 4px;font-size:1em} nav a{margin-right:16px;color:#2a5db0;text-decoration:none}
.dim{color:#6b7385;font-size:.9em} .scroll{overflow-x:auto;margin:6px 0 12px}
.kind{font-size:.75em;font-weight:normal;background:#eef1f7;border-radius:4px;padding:2px 6px;color:#3d4658}
table{border-collapse:collapse;font-size:.9em} th{background:#f6f7fb;font-weight:600;white-space:nowrap}
th,td{border-bottom:1px solid #e3e6ee;padding:4px 10px;text-align:left;vertical-align:top}
table.num td+td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em} details{margin:6px 0}
pre{background:#f6f7fb;border:1px solid #e3e6ee;padding:10px;overflow:auto;max-height:480px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
figure{margin:0} img{max-width:100%;height:auto;border:1px solid #eef0f5} summary{cursor:pointer}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A number as a table shows it (4 significant digits, thousands separated); anything else as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if 1e3 <= abs(value) < 1e15:
            return f"{round(value):,}"
        return f"{value:.4g}"
    text = value if isinstance(value, str) else as_json(value)
    return text if len(text) <= 200 else text[:199] + "…"


def as_json(value) -> str:
    """A value as compact sorted JSON text, or ``<type>`` for what cannot be shown."""
    try:
        return json.dumps(value, default=str, sort_keys=True)
    except (ValueError, TypeError, RecursionError):  # a structure nested past what can be shown
        return f"<{type(value).__name__}>"
