"""Verbs of one stage: ``deploy k8s|sagemaker``: deployment artifacts for a served run (the table ``cli.py`` parses with)."""

from __future__ import annotations

from fmforge.cli_args import Verb

GROUPS: dict[str, tuple[str, str | None, str]] = {}
VERBS: tuple[Verb, ...] = ()
