"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

from typing import Any


class FmforgeError(Exception):
    """A mistake the user can fix (bad path, bad config, bad data). The CLI prints it as one line."""

    exit_code = 2


def clip(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a (possibly hostile) value safe in a one-line message."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
