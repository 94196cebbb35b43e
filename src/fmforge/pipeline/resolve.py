"""Reference resolution, the step cache key, and comparisons of conditions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fmforge import __version__
from fmforge.errors import FmforgeError, clip
from fmforge.pipeline.spec import REF, Pipeline, Step
from fmforge.pipeline.state import file_manifest, manifest_hash


class MissingValue(FmforgeError):
    """A reference names a JSON path its step's output does not hold: a mistake in the pipeline file, found
    only once that step has run. The runner stops (exit 2) and records nothing for the step that made it."""


class Scope:
    """What references resolve against during a run: parameters, finished steps' outputs and their hashes."""

    def __init__(self, pipe: Pipeline, out: Path):
        self.pipe = pipe
        self.out = out
        self.values: dict[str, dict[str, Any]] = {}  # step -> output -> value (path string or JSON)
        self.hashes: dict[str, dict[str, str]] = {}  # step -> output -> artifact hash

    def step_out(self, step: str) -> Path:
        return (self.out / "steps" / step / "out").resolve()

    def lookup(self, expr: str, step: Step, where: str, used: dict) -> Any:
        parts = expr.strip().split(".")
        if parts == ["out"]:
            return str(self.step_out(step.name))
        if parts[0] == "params":
            return self.pipe.params[parts[1]]
        other, output, path = parts[1], parts[2], parts[3:]
        value = self.values[other][output]
        if self.pipe.steps[other].outputs[output].kind == "path":
            used[value] = (self.hashes[other][output], "artifact")
        while path:
            # a key may itself hold dots (bias metrics: "crows-pairs.overall"): the longest one that exists
            n = next((n for n in range(len(path), 0, -1) if isinstance(value, dict) and ".".join(path[:n]) in value), 0)
            key = ".".join(path[:max(n, 1)])
            if n:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                raise MissingValue(self._missing(expr, step, where, other, output, value))
            path = path[max(n, 1):]
        return value

    def _missing(self, expr: str, step: Step, where: str, other: str, output: str, value: Any) -> str:
        declared = self.pipe.steps[other].outputs[output]
        source = f"{other}'s {Path(declared.path).name if declared.kind == 'json' else 'stdout'}"
        if isinstance(value, dict):
            keys = [k if k.isprintable() and len(k) <= 40 else clip(k, 40) for k in map(str, value)]
            within = f"keys: {', '.join(keys[:12])}{', ...' if len(keys) > 12 else ''}"
        elif isinstance(value, list):
            within = f"a list of {len(value)} items there"
        else:
            within = f"{clip(value)} there, not a mapping"
        field = where.removeprefix(f"steps.{step.name}.")
        return (f"pipeline: step {step.name!r} field {field!r}: ${{{expr}}} not found in {source} "
                f"(output {output!r}; {within})")

    def resolve(self, value: Any, step: Step, where: str, used: dict) -> Any:
        """``value`` with every reference replaced; ``used`` collects upstream artifacts (path -> hash)."""
        if isinstance(value, list):
            return [self.resolve(v, step, f"{where}[{i}]", used) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.resolve(v, step, f"{where}.{k}", used) for k, v in value.items()}
        if not isinstance(value, str):
            return value
        whole = REF.fullmatch(value)
        if whole:
            return self.lookup(whole.group(1), step, where, used)
        return REF.sub(lambda m: _text(self.lookup(m.group(1), step, where, used)), value)


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def external_inputs(args: dict, used: dict, cwd: Path, out: Path) -> dict[str, tuple[str, str]]:
    """Literal arguments that name existing local files or directories (a config, a corpus): inputs whose
    content is hashed into the key, as upstream artifacts are. Paths inside the pipeline's own output
    directory (a step's ``${out}``, upstream artifacts) or holding it are not external inputs."""
    out = out.resolve()
    found = {}

    def visit(value: Any) -> None:
        if isinstance(value, list):
            for v in value:
                visit(v)
        elif isinstance(value, str) and value and len(value) < 4096 and "\n" not in value and value not in used:
            path = (cwd / value).resolve()
            if path.exists() and not path.is_relative_to(out) and not out.is_relative_to(path) \
                    and not any(path.is_relative_to(u) for u in used):
                found[str(path)] = (manifest_hash(file_manifest(path)), "input")

    for value in args.values():
        visit(value)
    return found


def step_key(kind: str, what: Any, inputs: dict[str, tuple[str, str]]) -> str:
    """Hash of the step's verb (or kind), its resolved arguments, its inputs' content hashes and the fmforge
    version: equal keys mean the step would do exactly the same work."""
    blob = json.dumps({"kind": kind, "what": what, "inputs": {p: h for p, (h, _) in sorted(inputs.items())},
                       "fmforge": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def compare(left: Any, op: str, right: Any, where: str) -> bool:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
    if not numbers and not (type(left) is type(right) and isinstance(left, (str, bool))):
        raise FmforgeError(f"{where}: cannot compare {clip(left)} {op} {clip(right)} (two numbers, or two strings)")
    if op in ("==", "!="):
        return (left == right) == (op == "==")
    if isinstance(left, bool):
        raise FmforgeError(f"{where}: booleans compare only with == and !=")
    return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]
