"""Names read from files become paths only through here.

A checkpoint's ``meta.json``, an HF ``weight_map``, a data manifest or an object-store listing may come from
someone else; every name such a file gives must stay inside the directory it describes. ``relative_name``
checks the name itself (a string, relative, no ``..``, no empty or control-character parts, no
backslashes); ``confined`` also resolves symlinks and checks that the result is still inside the directory.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from fmforge.errors import FmforgeError


class UnsafePath(FmforgeError):
    """A name read from an artifact would leave its directory (or is not a name at all)."""


def relative_name(name: object, what: str) -> str:
    """``name`` if it is a safe relative POSIX path (``a.bin``, ``shards/a.bin``), else ``UnsafePath``."""
    if not isinstance(name, str):
        raise UnsafePath(f"{what}: expected a file name, got {type(name).__name__} {str(name)[:80]!r}")
    shown = repr(name[:120])
    if not name or len(name) > 1024:
        raise UnsafePath(f"{what}: bad file name {shown}")
    if any(ord(c) < 32 or c == "\x7f" for c in name) or "\\" in name:
        raise UnsafePath(f"{what}: file name {shown} has a control character or backslash")
    parts = name.split("/")
    if PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise UnsafePath(f"{what}: file name {shown} is not a plain relative name inside its directory")
    return name


def confined(root: str | Path, name: object, what: str) -> Path:
    """``root / name`` for a safe relative ``name`` whose resolved path (symlinks followed) stays in ``root``."""
    path = Path(root) / relative_name(name, what)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise UnsafePath(f"{what}: {name!r} leads outside {root} (through a symlink)")
    return path
