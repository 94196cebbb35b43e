"""Human evaluation, the book's human-in-the-loop step: export blinded generation tasks, serve a rating page,
report scores, win rates, Bradley–Terry strengths and inter-rater agreement.

The three verbs are imported when used: serving and reporting never load torch."""

from __future__ import annotations

from fmforge.lazy import resolve

_VERBS = {"export_human_tasks": "fmforge.eval.human.export:export_human_tasks",
          "serve_human": "fmforge.eval.human.server:serve_human",
          "human_report": "fmforge.eval.human.report:human_report"}

__all__ = list(_VERBS)


def __getattr__(name: str):
    if name in _VERBS:
        return resolve(_VERBS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
