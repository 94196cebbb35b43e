"""How a running pipeline shows its progress: a live table on a terminal, one line per state change elsewhere.

On a TTY, ``fmforge pipeline run`` redraws a table (rich's ``Live``) with each step's state and elapsed time
a few times a second, and other messages (a condition's comparison, a resumed attempt) print above it. When
stdout is not a terminal (a file, a pipe, CI) every state change is one plain line, which tools can read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

# what the runner records -> what the table shows
LABELS = {"pending": "pending", "running": "running", "reused": "cached", "succeeded": "done",
          "failed": "failed", "skipped": "skipped", "stopped": "stopped"}
STYLES = {"pending": "dim", "running": "bold yellow", "cached": "cyan", "done": "green", "failed": "bold red",
          "skipped": "dim", "stopped": "red"}
MAX_NOTE = 100


@dataclass(frozen=True)
class StepView:
    """One row: a step's recorded state, when it started and finished (``time.time()``), and an error."""

    name: str
    state: str
    started: float | None = None
    finished: float | None = None
    note: str = ""


def elapsed(view: StepView, now: float) -> str:
    """Seconds a step has run (still running: until ``now``); empty before it starts, ``-`` when reused."""
    if view.state == "reused":
        return "-"
    if view.started is None:
        return ""
    return f"{(view.finished if view.finished is not None else now) - view.started:.1f}s"


def progress_table(steps: list[StepView], now: float, title: str = "") -> Table:
    """The table of ``steps`` at time ``now``: step, state (pending/running/cached/done/failed/skipped/stopped),
    elapsed time and the error of a failed or stopped step; the caption counts steps by state."""
    table = Table(title=title or None, title_justify="left", expand=False)
    table.add_column("step", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("elapsed", justify="right", no_wrap=True)
    table.add_column("note", overflow="fold")
    counts: dict[str, int] = {}
    for view in steps:
        label = LABELS.get(view.state, view.state)
        counts[label] = counts.get(label, 0) + 1
        note = view.note if len(view.note) <= MAX_NOTE else view.note[:MAX_NOTE - 3] + "..."
        table.add_row(Text(view.name), Text(label, style=STYLES.get(label, "")), elapsed(view, now), Text(note))
    table.caption = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
    table.caption_justify = "left"
    return table


def transition_line(name: str, state: str, seconds: float, board: dict[str, int], note: str = "") -> str:
    """The plain log line of one state change: time since the run began, the step, its state, and how many
    steps are in each state."""
    counts = " ".join(f"{n} {s}" for s, n in sorted(board.items()))
    return f"[{seconds:7.1f}s] {name:<16} {state:<10} | {counts}" + (f"  ({note})" if note else "")


@contextmanager
def live_table(console: Console | None, snapshot: Callable[[], list[StepView]], title: str) -> Iterator[bool]:
    """While the block runs, keep ``progress_table(snapshot())`` drawn on ``console`` (left on screen at the
    end). Yields whether a table is shown: with ``console`` None nothing is drawn and the caller logs lines."""
    if console is None:
        yield False
        return
    with Live(console=console, refresh_per_second=4, transient=False,
              get_renderable=lambda: progress_table(snapshot(), time.time(), title)):
        yield True
