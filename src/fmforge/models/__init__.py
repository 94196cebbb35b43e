"""Model families built from one shared transformer block (``blocks.py``); ``registry.py`` is the dispatch
table. A leaf package: it imports torch, pydantic and itself only (plus ``fmforge.errors``)."""

from fmforge.models.registry import build_model

__all__ = ["build_model"]
