"""``fmforge`` command line: a table of verbs, each parsed by argparse and handed to one plain function.

``VERBS`` maps every verb to its help, its arguments (shared groups are argparse parent parsers) and the
function it calls with typed keyword arguments: the argument names are the function's parameter names.
A ``*_command`` function, beside its stage's library code (``train/command.py``, ``eval/command.py``, ...), is
what a verb adds to the library call (printing a result, re-running under torchrun), so each verb imports only
its own stage. The tables live in ``verbs_build.py`` (plan, data, train, ...), ``verbs_use.py`` (eval, bias,
serve, ...) and one ``verbs_<stage>.py`` per later stage (``TABLES``), written with ``cli_args.py``; each holds
``VERBS`` and the ``GROUPS`` its grouped verbs (``pipeline run``) belong to. ``main`` parses, calls, and prints a
user error as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# The stages are imported when their verb runs (``resolve``), so `fmforge --help` and a mistyped flag answer
# at once instead of after importing torch and every stage library. Nothing imports this module, so the late
# imports cannot hide a cycle.
from fmforge import __version__, verbs_build, verbs_deploy, verbs_pipeline, verbs_prompt, verbs_use
from fmforge.cli_args import LAUNCH_TARGETS, Verb, _add  # noqa: F401 (LAUNCH_TARGETS: tests check it)
from fmforge.errors import FmforgeError
from fmforge.lazy import resolve

TABLES = (verbs_build, verbs_use, verbs_deploy, verbs_pipeline, verbs_prompt)
VERBS: tuple[Verb, ...] = tuple(verb for table in TABLES for verb in table.VERBS)
GROUPS: dict[str, tuple[str, str | None, str]] = {name: group for table in TABLES for name, group in table.GROUPS.items()}


# Parse and call


def build_parser() -> argparse.ArgumentParser:
    """The ``fmforge`` parser: one sub-parser per entry of ``VERBS``, in table order."""
    parser = argparse.ArgumentParser(
        prog="fmforge",
        description="Plan, prepare data for, train, fine-tune, evaluate, convert and sample foundation models "
                    "(language, vision, vision-language), from raw data to weights, on one CPU or a GPU cluster.",
        epilog="Start with `fmforge quickstart`: it trains a tiny language model on text every Python install "
               "carries, in a few minutes on a laptop CPU. Each verb has its own --help.")
    parser.add_argument("--version", action="version", version=f"fmforge {__version__}")
    verbs = parser.add_subparsers(dest="_verb", metavar="VERB", required=True)
    groups: dict[str, Any] = {}
    for verb in VERBS:
        *group, name = verb.name.split()
        where = verbs
        if group:
            if group[0] not in groups:
                help_, description, metavar = GROUPS[group[0]]
                group_parser = verbs.add_parser(group[0], help=help_, description=description)
                groups[group[0]] = group_parser.add_subparsers(dest="_action", metavar=metavar, required=True)
            where = groups[group[0]]
        sub = where.add_parser(name, help=verb.help, description=verb.description, parents=list(verb.parents))
        _add(sub, verb.args)
        sub.set_defaults(_run=verb.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "human"]:  # `fmforge eval human STEP` is `fmforge human STEP`
        argv = argv[1:]
    if argv[:1] == ["bias"] and len(argv) > 1 and argv[1] not in ("run", "data", "compare", "-h", "--help"):
        argv = ["bias", "run", *argv[1:]]  # `fmforge bias RUN_DIR` is `fmforge bias run RUN_DIR`
    # `train CFG --out DIR a.b=c`: argparse stops filling the overrides positional at the first option, so
    # key=value words after options arrive as extras; only verbs that take overrides accept them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    kwargs = {key: value for key, value in vars(args).items() if not key.startswith("_")}
    try:
        resolve(args._run)(**kwargs)
    except FmforgeError as err:
        print(f"fmforge: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("fmforge: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `fmforge generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
