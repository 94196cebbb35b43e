"""``fmforge pipeline show OUT``: the last run's DAG, each step coloured by its state and labelled with its
timing, as a PNG or SVG (by the file's suffix), plus a table on the terminal."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from fmforge.errors import FmforgeError
from fmforge.io.plots import plain_text
from fmforge.pipeline.state import open_state

COLOURS = {"succeeded": "#4caf50", "reused": "#90caf9", "failed": "#e53935", "running": "#ffb300",
           "stopped": "#bdbdbd", "skipped": "#eeeeee", "pending": "#ffffff"}


def layers(steps: list[dict]) -> dict[str, int]:
    """Each step's column: the length of the longest chain of steps it waits for."""
    upstream = {s["name"]: [u for u in json.loads(s["upstream"] or "[]")] for s in steps}
    depth: dict[str, int] = {}

    def of(name: str, seen: tuple = ()) -> int:
        if name not in depth:
            deps = [u for u in upstream.get(name, []) if u in upstream and u not in seen]
            depth[name] = 1 + max((of(u, seen + (name,)) for u in deps), default=-1)
        return depth[name]

    for name in upstream:
        of(name)
    return depth


def draw(steps: list[dict], path: Path, title: str) -> None:
    depth = layers(steps)
    columns: dict[int, list[str]] = {}
    for s in steps:
        columns.setdefault(depth[s["name"]], []).append(s["name"])
    tall = max(len(c) for c in columns.values())
    fig = Figure(figsize=(2.3 * len(columns) + 1, 1.1 * tall + 1.2))
    ax = fig.add_subplot()
    pos = {name: (col * 2.3, -(i - (len(names) - 1) / 2) * 1.1)
           for col, names in columns.items() for i, name in enumerate(names)}
    by_name = {s["name"]: s for s in steps}
    for s in steps:
        for u in json.loads(s["upstream"] or "[]"):
            if u in pos:
                ax.add_patch(FancyArrowPatch((pos[u][0] + 0.9, pos[u][1]), (pos[s["name"]][0] - 0.9, pos[s["name"]][1]),
                                             arrowstyle="-|>", mutation_scale=12, color="#555555"))
    for name, (x, y) in pos.items():
        s = by_name[name]
        took = (s["finished"] - s["started"]) if s["finished"] and s["started"] else None
        ax.add_patch(FancyBboxPatch((x - 0.9, y - 0.35), 1.8, 0.7, boxstyle="round,pad=0.05",
                                    facecolor=COLOURS.get(s["state"], "#ffffff"), edgecolor="#333333"))
        timing = f" {took:.1f}s" if took is not None and s["state"] != "reused" else ""
        ax.text(x, y, f"{plain_text(name, 20)}\n{s['state']}{timing}", ha="center", va="center", fontsize=8)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.1, max(xs) + 1.1)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.set_axis_off()
    ax.set_title(plain_text(title, 80))
    fig.savefig(path, format=path.suffix.lstrip(".").lower(), bbox_inches="tight")


def show_command(out: str, picture: str | None = None, json_out: bool = False) -> dict:
    """Print the last run's steps (state, time, error) and draw its DAG to ``picture`` (default OUT/dag.png)."""
    state = open_state(Path(out))
    try:
        run = state.last_run()
        if run is None:
            raise FmforgeError(f"{out}: no pipeline run recorded yet")
        steps = state.steps(run["id"])
    finally:
        state.close()
    target = Path(picture) if picture else Path(out) / "dag.png"
    if target.suffix.lower() not in (".png", ".svg"):
        raise FmforgeError(f"--picture {target}: a .png or .svg file")
    draw(steps, target, f"{run['pipeline']} run {run['id']}: {run['status']}")
    result = {"run": run, "steps": steps, "picture": str(target)}
    if json_out:
        print(json.dumps(result, indent=2, default=str))
        return result
    print(f"{run['pipeline']} run {run['id']}: {run['status']}")
    for s in steps:
        took = f"{s['finished'] - s['started']:8.1f}s" if s["finished"] and s["started"] else " " * 9
        print(f"  {s['name']:<16} {s['state']:<10} {took}  {s['error'] or ''}")
    print(f"DAG: {target}")
    return result
