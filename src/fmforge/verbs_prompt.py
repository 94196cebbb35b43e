"""Verbs of one stage: ``prompt``, ``rag``: measured prompt templates, injection defences, retrieval (the table ``cli.py`` parses with)."""

from __future__ import annotations

from fmforge.cli_args import Verb

GROUPS: dict[str, tuple[str, str | None, str]] = {}
VERBS: tuple[Verb, ...] = ()
