"""Tables that name code as ``"package.module:attribute"`` strings, imported when used, so that a verb or an
objective pays only for what it runs (``fmforge train`` on text never imports torchvision).
``tests/test_layers.py`` counts these strings as imports when it checks the package layering."""

from __future__ import annotations

import importlib
from typing import Any


def resolve(target: str) -> Any:
    """``"package.module:attribute"`` -> the attribute."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
