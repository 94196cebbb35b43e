"""A pipeline file: typed parameters, steps, references between them; all validated before anything runs.

::

    params:
      lr: {type: float, default: 0.003}
      steps: 40                              # shorthand: the type is the default's
    steps:
      data:
        verb: data prepare
        args: {inputs: [corpus/], out: "${out}/data", vocab_size: 512}
        outputs: {dir: {path: "${out}/data"}, manifest: {json: "${out}/data/manifest.json"}}
      train:
        verb: train
        args: {config: tiny.yaml, data: "${steps.data.dir}", out: "${out}/run", overrides: ["optim.lr=${params.lr}"]}
        outputs: {run_dir: {path: "${out}/run"}}
      eval:
        verb: eval
        args: {run_dir: "${steps.train.run_dir}", json: true}
        outputs: {metrics: stdout}           # the JSON the verb prints
      gate:
        condition: [{left: "${steps.eval.metrics.val_loss}", op: "<", right: "${steps.eval.metrics.unigram_loss}"}]
        if: [register]
        else: [stop]
      register: {register: {model: "${steps.train.run_dir}", group: tiny-lm, metrics: "${steps.eval.metrics}"}}
      stop: {fail: "the model does not beat the unigram baseline"}

``${params.NAME}``, ``${steps.STEP.OUTPUT}`` (a path output, or a JSON output with ``.key.key`` into it) and
``${out}`` (the step's own output directory). A string that is exactly one reference takes the referenced
value's type; references inside a longer string are written into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmforge.errors import FmforgeError, clip
from fmforge.pipeline import verbs as verb_table

MAX_PIPELINE_BYTES = 1 << 20
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
REF = re.compile(r"\$\{([^}]*)\}")
PARAM_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
OPS = ("<", "<=", ">", ">=", "==", "!=")
STEP_KEYS = {"verb", "args", "outputs", "depends_on", "cache", "cache_expire_s", "condition", "if", "else",
             "register", "fail", "description"}
REGISTER_KEYS = {"model", "group", "metrics", "beats_champion", "approve", "alias", "description", "copy"}


@dataclass
class Output:
    kind: str  # "path" | "json" | "stdout" (the JSON the verb prints) | "text" (what it prints, as a string)
    path: str | None = None


@dataclass
class Step:
    name: str
    kind: str  # "verb" | "condition" | "register" | "fail"
    verb: str | None = None
    args: dict = field(default_factory=dict)
    outputs: dict[str, Output] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    cache: bool = True
    cache_expire_s: float | None = None
    conditions: list[dict] = field(default_factory=list)
    if_steps: list[str] = field(default_factory=list)
    else_steps: list[str] = field(default_factory=list)
    register: dict = field(default_factory=dict)
    message: str = ""
    upstream: set[str] = field(default_factory=set)  # every step this one waits for
    value_refs: set[str] = field(default_factory=set)  # steps whose JSON values this one reads


@dataclass
class Pipeline:
    name: str
    path: Path
    params: dict[str, Any]  # resolved values
    param_types: dict[str, type]
    steps: dict[str, Step]
    order: list[str]  # topological
    gated_by: dict[str, tuple[str, bool]]  # step -> (condition step, branch it needs)


def refs_in(value: Any):
    """Every reference expression inside ``value`` (strings, lists, mappings)."""
    if isinstance(value, str):
        yield from REF.findall(value)
    elif isinstance(value, list):
        for item in value:
            yield from refs_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from refs_in(item)


def load_yaml(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_PIPELINE_BYTES:
            raise FmforgeError(f"{path} is larger than {MAX_PIPELINE_BYTES:,} bytes; not a pipeline file")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise FmforgeError(f"cannot read pipeline {path}: {err.strerror or err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise FmforgeError(f"{path}: malformed YAML{at}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise FmforgeError(f"{path}: a pipeline file is a mapping with params and steps")
    unknown = set(data) - {"name", "params", "steps", "description"}
    if unknown:
        raise FmforgeError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (name, params, steps)")
    return data


def _parse_param(name: str, spec: Any) -> tuple[type, Any]:
    where = f"params.{name}"
    if not NAME.match(str(name)):
        raise FmforgeError(f"{where}: a parameter name is letters, digits, _ and -")
    if isinstance(spec, dict):
        unknown = set(spec) - {"type", "default", "description"}
        if unknown:
            raise FmforgeError(f"{where}: unknown key {sorted(unknown)[0]!r} (type, default, description)")
        if spec.get("type") not in PARAM_TYPES:
            raise FmforgeError(f"{where}.type: one of {', '.join(PARAM_TYPES)}, got {clip(spec.get('type'))}")
        kind = PARAM_TYPES[spec["type"]]
        if "default" not in spec:
            return kind, None
        return kind, coerce_param(name, kind, spec["default"])
    if isinstance(spec, bool):
        return bool, spec
    for kind in (int, float, str):
        if isinstance(spec, kind):
            return kind, spec
    raise FmforgeError(f"{where}: a default value (number, string, boolean) or {{type, default}}")


def coerce_param(name: str, kind: type, value: Any) -> Any:
    """``value`` (from the file, or a ``--param`` string) as ``kind``, else a one-line error."""
    if isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FmforgeError(f"params.{name}: expected {kind.__name__}, got {clip(value)}")
    return value


def _parse_outputs(where: str, raw: Any) -> dict[str, Output]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FmforgeError(f"{where}.outputs: a mapping of NAME: stdout | text | {{path: P}} | {{json: FILE}}")
    outputs = {}
    for name, spec in raw.items():
        if not NAME.match(str(name)):
            raise FmforgeError(f"{where}.outputs.{name}: an output name is letters, digits, _ and -")
        if spec in ("stdout", "text"):
            outputs[name] = Output(spec)
        elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("path", "json") \
                and isinstance(next(iter(spec.values())), str):
            kind, path = next(iter(spec.items()))
            outputs[name] = Output(kind, path)
        else:
            raise FmforgeError(f"{where}.outputs.{name}: stdout (its JSON), text (as a string), {{path: P}} or "
                               f"{{json: FILE}}, got {clip(spec)}")
    return outputs


def _names(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FmforgeError(f"{where}: a list of step names")
    return list(value)


def _parse_step(name: str, raw: Any) -> Step:
    where = f"steps.{name}"
    if not NAME.match(str(name)):
        raise FmforgeError(f"{where}: a step name is letters, digits, _ and - (at most 64)")
    if not isinstance(raw, dict):
        raise FmforgeError(f"{where}: a mapping with verb, condition, register or fail")
    unknown = set(raw) - STEP_KEYS
    if unknown:
        raise FmforgeError(f"{where}: unknown key {sorted(unknown)[0]!r} ({', '.join(sorted(STEP_KEYS))})")
    kinds = [k for k in ("verb", "condition", "register", "fail") if k in raw]
    if len(kinds) != 1:
        raise FmforgeError(f"{where}: exactly one of verb, condition, register, fail")
    step = Step(name, kinds[0], depends_on=_names(f"{where}.depends_on", raw.get("depends_on")))
    step.cache = raw.get("cache", True)
    if not isinstance(step.cache, bool):
        raise FmforgeError(f"{where}.cache: true or false")
    expire = raw.get("cache_expire_s")
    if expire is not None and (isinstance(expire, bool) or not isinstance(expire, (int, float)) or expire <= 0):
        raise FmforgeError(f"{where}.cache_expire_s: a positive number of seconds")
    step.cache_expire_s = expire
    if step.kind == "verb":
        schema = verb_table.schema(raw["verb"], where)
        step.verb = schema.name
        args = raw.get("args") or {}
        if not isinstance(args, dict):
            raise FmforgeError(f"{where}.args: a mapping of argument name to value")
        verb_table.check_keys(schema, args, where)
        for key, value in args.items():
            if not list(refs_in(value)):
                verb_table.check_value(schema.action(str(key)), value, f"{where}.args.{key}")
        step.args = args
        step.outputs = _parse_outputs(where, raw.get("outputs"))
    elif step.kind == "condition":
        step.conditions = _parse_conditions(where, raw["condition"])
        step.if_steps = _names(f"{where}.if", raw.get("if"))
        step.else_steps = _names(f"{where}.else", raw.get("else"))
    elif step.kind == "register":
        reg = raw["register"]
        if not isinstance(reg, dict) or not {"model", "group"} <= set(reg) or set(reg) - REGISTER_KEYS:
            raise FmforgeError(f"{where}.register: a mapping with model and group (and {', '.join(sorted(REGISTER_KEYS - {'model', 'group'}))})")
        step.register = reg
    else:
        if not isinstance(raw["fail"], str):
            raise FmforgeError(f"{where}.fail: the message to stop with")
        step.message = raw["fail"]
    return step


def _parse_conditions(where: str, raw: Any) -> list[dict]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for i, item in enumerate(items):
        at = f"{where}.condition[{i}]"
        if not isinstance(item, dict) or set(item) - {"left", "op", "right"} or not {"left", "op", "right"} <= set(item):
            raise FmforgeError(f"{at}: a mapping {{left, op, right}}")
        if item["op"] not in OPS:
            raise FmforgeError(f"{at}.op: one of {' '.join(OPS)}, got {clip(item['op'])}")
        out.append(item)
    return out


def _check_refs(pipe: Pipeline, step: Step, value: Any, where: str) -> None:
    for expr in refs_in(value):
        parts = expr.strip().split(".")
        if parts == ["out"]:
            if step.kind != "verb":
                raise FmforgeError(f"{where}: ${{out}} is a verb step's own output directory")
            continue
        if parts[0] == "params" and len(parts) == 2:
            if parts[1] not in pipe.param_types:
                raise FmforgeError(f"{where}: ${{{expr}}} names no parameter (params: {', '.join(pipe.param_types) or 'none'})")
            continue
        if parts[0] != "steps" or len(parts) < 3:
            raise FmforgeError(f"{where}: bad reference ${{{expr}}} (${{params.NAME}}, ${{steps.STEP.OUTPUT}}, ${{out}})")
        other, output = parts[1], parts[2]
        if other not in pipe.steps:
            raise FmforgeError(f"{where}: ${{{expr}}} names no step {other!r}")
        if other == step.name:
            raise FmforgeError(f"{where}: ${{{expr}}} refers to the step itself")
        declared = pipe.steps[other].outputs
        if output not in declared:
            raise FmforgeError(f"{where}: ${{{expr}}}: step {other!r} declares no output {output!r} "
                               f"(outputs: {', '.join(declared) or 'none'})")
        if declared[output].kind == "path" and len(parts) > 3:
            raise FmforgeError(f"{where}: ${{{expr}}}: {other}.{output} is a path, not JSON")
        step.upstream.add(other)
        if declared[output].kind != "path":
            step.value_refs.add(other)


def _topological(steps: dict[str, Step]) -> list[str]:
    state: dict[str, int] = {}
    order: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise FmforgeError(f"steps.{name}: dependency cycle {' -> '.join(cycle)}")
        state[name] = 1
        for dep in sorted(steps[name].upstream):
            visit(dep, path + [name])
        state[name] = 2
        order.append(name)

    for name in steps:
        visit(name, [])
    return order


def load_pipeline(path: str | Path, overrides: dict[str, str] | None = None) -> Pipeline:
    """Parse and validate the whole file (and ``--param`` overrides); the first problem is one error."""
    path = Path(path)
    data = load_yaml(path)
    types, values = {}, {}
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise FmforgeError(f"{path}: params is a mapping of NAME: default or {{type, default}}")
    for name, spec in raw_params.items():
        types[name], values[name] = _parse_param(str(name), spec)
    for name, text in (overrides or {}).items():
        if name not in types:
            raise FmforgeError(f"--param {name}: the pipeline has no such parameter ({', '.join(types) or 'none'})")
        values[name] = coerce_param(name, types[name], text)
    missing = [n for n, v in values.items() if v is None]
    if missing:
        raise FmforgeError(f"params.{missing[0]}: has no default; pass --param {missing[0]}=VALUE")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, dict) or not raw_steps:
        raise FmforgeError(f"{path}: steps is a non-empty mapping of step name to step")
    steps = {str(name): _parse_step(str(name), raw) for name, raw in raw_steps.items()}
    pipe = Pipeline(str(data.get("name") or path.stem), path, values, types, steps, [], {})
    for step in steps.values():
        where = f"steps.{step.name}"
        for dep in step.depends_on:
            if dep not in steps:
                raise FmforgeError(f"{where}.depends_on: no step {dep!r}")
            step.upstream.add(dep)
        _check_refs(pipe, step, step.args, f"{where}.args")
        for name, out in step.outputs.items():
            _check_refs(pipe, step, out.path, f"{where}.outputs.{name}")
        _check_refs(pipe, step, step.conditions, f"{where}.condition")
        _check_refs(pipe, step, step.register, f"{where}.register")
        _check_refs(pipe, step, step.message, f"{where}.fail")
        for branch, names in ((True, step.if_steps), (False, step.else_steps)):
            for name in names:
                if name not in steps or name == step.name:
                    raise FmforgeError(f"{where}.{'if' if branch else 'else'}: no step {name!r}")
                if name in pipe.gated_by:
                    raise FmforgeError(f"steps.{name}: is already a branch of {pipe.gated_by[name][0]!r}")
                pipe.gated_by[name] = (step.name, branch)
                steps[name].upstream.add(step.name)
    pipe.order = _topological(steps)
    return pipe
