"""Verbs of one stage: ``pipeline``, ``registry``: pipelines with cached steps, the model registry, lineage (the table ``cli.py`` parses with)."""

from __future__ import annotations

from fmforge.cli_args import Verb

GROUPS: dict[str, tuple[str, str | None, str]] = {}
VERBS: tuple[Verb, ...] = ()
