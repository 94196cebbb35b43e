"""The verbs a pipeline step may call, with each verb's own argparse schema.

The verb tables are found by name (every ``fmforge.verbs_*`` module but this stage's own), so a verb a
colleague adds to any table is a valid step the moment it exists, with no change here. ``cli.py`` builds its
parser from the same tables; it is not imported, because ``cli`` sits above this package (it reaches the
pipeline verbs through ``verbs_pipeline``).

A step's ``args`` is a mapping from an argument's name (its dest, ``max_batches``, or its flag without
dashes, ``max-batches``) to a value: a string, number or boolean, or a list for repeatable and multi-value
arguments. ``to_argv`` checks it against the verb's parser and turns it into the command line.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache

import fmforge
from fmforge.cli_args import _add
from fmforge.errors import FmforgeError, clip

OWN_TABLE = "verbs_pipeline"  # a pipeline does not run pipelines or edit the registry through a subprocess


@dataclass(frozen=True)
class VerbSchema:
    name: str
    actions: dict[str, argparse.Action]  # every accepted key (dest and dash-less flag) -> its action
    positionals: tuple[argparse.Action, ...]

    def action(self, key: str) -> argparse.Action | None:
        return self.actions.get(key) or self.actions.get(key.replace("-", "_"))


def _tables():
    for info in pkgutil.iter_modules(fmforge.__path__):
        if info.name.startswith("verbs_") and info.name != OWN_TABLE:
            yield importlib.import_module(f"fmforge.{info.name}")


@lru_cache(maxsize=1)
def verb_schemas() -> dict[str, VerbSchema]:
    """Every verb (``"data prepare"``, ``"train"``, ...) -> its schema."""
    out = {}
    for table in _tables():
        for verb in table.VERBS:
            parser = argparse.ArgumentParser(prog=f"fmforge {verb.name}", add_help=False,
                                             parents=list(verb.parents))
            _add(parser, verb.args)
            actions: dict[str, argparse.Action] = {}
            for action in parser._actions:
                actions[action.dest] = action
                for flag in action.option_strings:
                    actions[flag.lstrip("-")] = action
            positionals = tuple(a for a in parser._actions if not a.option_strings)
            out[verb.name] = VerbSchema(verb.name, actions, positionals)
    return out


def schema(verb: object, where: str) -> VerbSchema:
    schemas = verb_schemas()
    if not isinstance(verb, str) or verb not in schemas:
        close = sorted(n for n in schemas if isinstance(verb, str) and (verb in n or n in verb))[:4]
        hint = f" (did you mean {', '.join(close)}?)" if close else f"; verbs: {', '.join(sorted(schemas))}"
        raise FmforgeError(f"{where}.verb: unknown fmforge verb {clip(verb)}{hint}")
    return schemas[verb]


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction))


def _multi(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")


def check_value(action: argparse.Action, value: object, where: str) -> None:
    """A literal value against its argument's type and choices (references are checked when resolved)."""
    if _is_flag(action):
        if not isinstance(value, bool):
            raise FmforgeError(f"{where}: expected true or false, got {clip(value)}")
        return
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not _multi(action):
        raise FmforgeError(f"{where}: takes one value, got a list")
    for item in values:
        if isinstance(item, (dict, list)) or item is None:
            raise FmforgeError(f"{where}: expected a value, got {clip(item)}")
        text = _word(item)
        if callable(action.type):
            try:
                converted = action.type(text)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
                raise FmforgeError(f"{where}: {clip(item)} is not a valid value ({err or action.type.__name__})") from None
        else:
            converted = text
        if action.choices is not None and converted not in action.choices:
            raise FmforgeError(f"{where}: {clip(item)} is not one of {', '.join(map(str, action.choices))}")


def _word(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_keys(verb: VerbSchema, args: dict, where: str) -> None:
    """Unknown keys and missing required arguments, named."""
    given = set()
    for key in args:
        action = verb.action(str(key))
        if action is None or action.dest in ("help",):
            known = sorted({a.dest for a in verb.actions.values() if a.dest != "help"})
            raise FmforgeError(f"{where}.args.{key}: `fmforge {verb.name}` has no such argument "
                               f"(it takes {', '.join(known)})")
        if action.dest in given:
            raise FmforgeError(f"{where}.args.{key}: given twice")
        given.add(action.dest)
    for action in verb.actions.values():
        required = action.required or (not action.option_strings and action.nargs not in ("*", "?"))
        if required and action.dest not in given:
            raise FmforgeError(f"{where}.args: `fmforge {verb.name}` needs {action.dest}")


def to_argv(verb: VerbSchema, args: dict) -> list[str]:
    """The command line of resolved ``args`` (positionals in the parser's order, then options)."""
    by_dest = {verb.action(str(k)).dest: v for k, v in args.items()}
    argv = verb.name.split()
    for action in verb.positionals:
        if action.dest in by_dest:
            value = by_dest.pop(action.dest)
            argv += [_word(v) for v in value] if isinstance(value, list) else [_word(value)]
    for dest, value in by_dest.items():
        action = next(a for a in verb.actions.values() if a.dest == dest)
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0] if value else action.option_strings[1])
        elif _is_flag(action):
            if value is (isinstance(action, argparse._StoreTrueAction)):
                argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value if isinstance(value, list) else [value]:
                argv.append(f"{flag}={_word(item)}")
        elif isinstance(value, list):
            argv += [flag, *map(_word, value)]
        else:
            argv.append(f"{flag}={_word(value)}")
    return argv


def accepts(verb: VerbSchema, dest: str) -> bool:
    return any(a.dest == dest for a in verb.actions.values())
