"""What every launch target shares: the job spec, the option tables, and the torchrun command builder.

Every target runs the same thing on every node::

    python -m torch.distributed.run --nnodes N --nproc-per-node G --rdzv-backend c10d \\
        --rdzv-endpoint HOST:PORT --rdzv-id JOB --max-restarts R \\
        -m fmforge train CONFIG [--data DATA] --out RUN_DIR --resume auto [key=value ...]

``python -m torch.distributed.run`` rather than the ``torchrun`` script: the two are the same code (torchrun
is a console-script alias of that module), but ``-m`` pins the interpreter, so the launcher and the workers
come from the Python that has fmforge installed even when another env's ``torchrun`` is first on PATH
(module-loaded clusters, conda base images). ``--resume auto`` makes every restart of the job (Slurm requeue,
pod restart, spot recovery, torchrun's own ``--max-restarts``) continue from the newest valid checkpoint in
RUN_DIR, so the run directory must be a place that outlives the process: each target says where that is.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmforge.errors import FmforgeError, clip

REQUIRED = object()  # an option default meaning "the user must give it"

# What a string option may hold (``Option.text``). Every rule also bans control characters, Unicode line
# and paragraph separators, format characters and lone surrogates, and caps the length.
LINE = "line"  # one line of printable text
WORD = "word"  # one #SBATCH word: sbatch splits at whitespace, cuts at '#', and reads quotes and '\'
NAME = "name"  # a job or cluster name (JOB_NAME)
SCRIPT = "script"  # shell lines run as given: newlines and tabs allowed
ENV = "env"  # {NAME: value}: names as ENV_NAME, values as LINE
ARGS = "args"  # raw scheduler arguments: each item split at whitespace into WORDs starting with '-'


@dataclass(frozen=True)
class Option:
    default: Any
    type: type
    help: str
    text: str = LINE  # rule for the strings in the value (see LINE ... ARGS)


class LaunchValueError(FmforgeError):
    """An option or path that cannot go into a job artifact as given (it would change the artifact's
    structure: a new line, a new shell command, a new #SBATCH word)."""


def who(target: str) -> str:
    """The verb that names ``target`` in messages: a launch target (``slurm``) is ``launch slurm``; another
    verb that reuses these checks passes its own full name (``deploy k8s``)."""
    return target if " " in target else f"launch {target}"


# Options every target accepts; each target module adds its own table (``OPTIONS``).
COMMON_OPTIONS: dict[str, Option] = {
    "job_name": Option(None, str, "job / cluster / pod-name prefix (default: fmforge-<config file stem>); "
                                  "lowercase letters, digits and '-', at most 40 characters", NAME),
    "max_restarts": Option(3, int, "torchrun --max-restarts: worker-group restarts inside one job before "
                                   "it fails (each restart resumes from the newest checkpoint)"),
    "rdzv_port": Option(None, int, "TCP port of the c10d rendezvous store on the first node (default: "
                                   "29500; k8s 29400; Slurm 29500 + job id % 1000, so jobs sharing a "
                                   "node differ)"),
    "env": Option({}, dict, "extra environment variables for the training processes, e.g. "
                            "{NCCL_DEBUG: WARN}; not for secrets: they would be written in clear", ENV),
}

JOB_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")  # always fullmatch
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|API_KEY|KEY_ID", re.IGNORECASE)
MAX_TEXT_CHARS = 4096  # any one string value
MAX_SCRIPT_CHARS = 65536  # a SCRIPT value (setup lines)
MAX_DEPTH = 8  # nesting of dict/list option values
MAX_INT = 2**63  # integer options lie in [-MAX_INT, MAX_INT)
_BANNED_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")
_SBATCH_SPECIAL = "\"'#\\"



def _banned_char(text: str, allowed: str) -> tuple[int, str] | None:
    if text.isprintable():  # fast path: no control, format or separator character at all
        return None
    for i, ch in enumerate(text):
        if ch not in allowed and unicodedata.category(ch) in _BANNED_CATEGORIES:
            return i, ch
    return None


def check_text(target: str, what: str, value: str, rule: str = LINE) -> str:
    """Return ``value`` if it may go into an artifact under ``rule`` (LINE, WORD, NAME or SCRIPT), else raise
    LaunchValueError naming ``what`` ("option partition", "--data")."""
    limit = MAX_SCRIPT_CHARS if rule == SCRIPT else MAX_TEXT_CHARS
    if len(value) > limit:
        raise LaunchValueError(f"{who(target)}: {what} is {len(value)} characters long; at most {limit}")
    bad = _banned_char(value, "\n\t" if rule == SCRIPT else "")
    if bad is not None:
        pos, ch = bad
        kind = "control character other than newline and tab" if rule == SCRIPT else "control character"
        raise LaunchValueError(f"{who(target)}: {what} contains a {kind} (U+{ord(ch):04X}) at position "
                               f"{pos}; values written into a job artifact must be printable text")
    if rule == WORD:
        if not value:
            raise LaunchValueError(f"{who(target)}: {what} is empty")
        special = next((ch for ch in value if ch.isspace() or ch in _SBATCH_SPECIAL), None)
        if special is not None:
            raise LaunchValueError(f"{who(target)}: {what} must be one word for an #SBATCH line, without "
                                   f"whitespace, quotes, '#' or '\\' (sbatch splits or cuts there); "
                                   f"got {clip(value)}")
    if rule == NAME and not JOB_NAME.fullmatch(value):
        raise LaunchValueError(f"{who(target)}: {what} {clip(value)} must be 1-40 lowercase letters, "
                               f"digits or '-', starting and ending with a letter or digit (it names pods, "
                               f"clusters and jobs)")
    return value


def _check_nested(target: str, what: str, value: Any, depth: int = 0) -> None:
    """Every string in a dict/list option value (keys too) must be one LINE."""
    if depth > MAX_DEPTH:
        raise LaunchValueError(f"{who(target)}: {what} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        check_text(target, what, value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_nested(target, f"{what} key {clip(key)}", key, depth + 1)
            _check_nested(target, f"{what}[{clip(key)}]", item, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            _check_nested(target, f"{what}[{i}]", item, depth + 1)
    elif isinstance(value, int) and not -MAX_INT <= value < MAX_INT:
        raise LaunchValueError(f"{who(target)}: {what} is out of range")


def _check_env(target: str, env: dict) -> dict[str, str]:
    checked = {}
    for name, value in env.items():
        if not (isinstance(name, str) and ENV_NAME.fullmatch(name)):
            raise LaunchValueError(f"{who(target)}: option env: variable name {clip(name)} must match "
                                   f"{ENV_NAME.pattern}")
        if isinstance(value, (dict, list)):
            raise LaunchValueError(f"{who(target)}: option env[{name}] must be a plain value, "
                                   f"got {clip(value)}")
        _check_nested(target, f"option env[{name}]", value)  # an int too large to print, say
        checked[name] = check_text(target, f"option env[{name}]", str(value))
    return checked


def _check_args(target: str, key: str, items: list) -> list[str]:
    words = []
    for i, item in enumerate(items):
        what = f"option {key}[{i}]"
        if not isinstance(item, str):
            raise LaunchValueError(f"{who(target)}: {what} must be a string such as '--mail-type=END', "
                                   f"got {clip(item)}")
        for word in check_text(target, what, item).split():
            check_text(target, what, word, WORD)
            if not word.startswith("-"):
                raise LaunchValueError(f"{who(target)}: {what}: {clip(word)} is not an option "
                                       f"(options start with '-')")
            words.append(word)
    return words


def _check_value(target: str, key: str, value: Any, opt: Option) -> Any:
    if opt.text == ENV:
        return _check_env(target, value)
    if opt.text == ARGS:
        return _check_args(target, key, value)
    if isinstance(value, str):
        return check_text(target, f"option {key}", value, opt.text)
    _check_nested(target, f"option {key}", value)
    return value


def _parse_scalar(text: str) -> Any:
    """A command-line option value as YAML (``3`` an int, ``true`` a bool, ``{A: b}`` a dict); the text
    itself where YAML cannot read it."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a bad date or a huge int
        return text


def _coerce(target: str, key: str, value: Any, opt: Option) -> Any:
    """Options may arrive as strings from a command line (``--option time=04:00:00``): parse them as YAML
    scalars the way config overrides are parsed, then check the type."""
    if isinstance(value, str) and opt.type is not str:
        if len(value) > MAX_TEXT_CHARS:  # before parsing: YAML takes quadratic time on some long inputs
            raise LaunchValueError(f"{who(target)}: option {key} is {len(value)} characters long; "
                                   f"at most {MAX_TEXT_CHARS}")
        value = _parse_scalar(value)
        if opt.text == ARGS and isinstance(value, str):
            value = [value]  # sbatch_args=--mail-type=END
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, opt.type) and not (opt.type is int and isinstance(value, bool))
    if value is None and opt.default is None:
        ok = True
    if not ok:
        raise LaunchValueError(f"{who(target)}: option {key} must be {opt.type.__name__}, "
                               f"got {clip(value)}")
    if opt.type is int and value is not None and not -MAX_INT <= value < MAX_INT:
        raise LaunchValueError(f"{who(target)}: option {key} is out of range: {clip(value)}")
    if opt.type is float and value is not None and not math.isfinite(value):
        raise LaunchValueError(f"{who(target)}: option {key} must be a finite number, got {value}")
    return value


def resolve_options(target: str, table: dict[str, Option], given: dict | None,
                    base: dict[str, Option] = COMMON_OPTIONS) -> dict[str, Any]:
    """Merge ``given`` over the defaults of ``base`` (the launch targets' COMMON_OPTIONS) + ``table``,
    type-checked and validated (each option's ``text`` rule). Unknown keys, missing required options and
    values that would change an artifact's structure fail naming the key, before anything is written."""
    table = {**base, **table}
    given = dict(given or {})
    for key in given:
        if key not in table:
            raise LaunchValueError(f"{who(target)}: unknown option {clip(key)}; "
                                   f"known: {', '.join(sorted(table))}")
    resolved = {}
    for key, opt in table.items():
        if key in given:
            value = _coerce(target, key, given[key], opt)
            resolved[key] = value if value is None else _check_value(target, key, value, opt)
        elif opt.default is REQUIRED:
            raise LaunchValueError(f"{who(target)}: option {key} is required ({opt.help})")
        elif isinstance(opt.default, (dict, list)):
            resolved[key] = type(opt.default)(opt.default)  # a copy: one launch cannot leak into the next
        else:
            resolved[key] = opt.default
    return resolved


def option_words(items: list[str] | tuple[str, ...], flag: str = "--option") -> dict[str, str]:
    """``--option key=value`` words as {key: value} (the values still text: ``resolve_options`` parses them)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FmforgeError(f"bad {flag} {clip(item)}: expected key=value")
        settings[key] = value
    return settings


def check_job_text(target: str, *, config: str, data: str | None, run_dir: str | None, out: str,
                   overrides: list[str]) -> None:
    """The command-line values that reach an artifact besides the options: each must be one LINE."""
    for what, value in (("config path", config), ("--data", data), ("--run-dir", run_dir), ("--out", out)):
        if value is not None:
            check_text(target, what, value)
    for item in overrides:
        check_text(target, f"override {clip(item.partition('=')[0])}", item)


def secret_warning(target: str, env: dict[str, str], hint: str) -> str | None:
    """One warning line when env names look like secrets (they are written in clear), saying where
    ``target`` keeps secrets instead; None otherwise."""
    names = [name for name in env if SECRET_NAME.search(name)]
    if not names:
        return None
    verb = "looks like a secret and is" if len(names) == 1 else "look like secrets and are"
    return (f"fmforge: warning: launch {target}: env {', '.join(names)} {verb} written in clear into the job "
            f"artifact; {hint}")


def write_artifact(path: Path, text: str, *, executable: bool = False) -> None:
    """Write ``text`` to ``path`` (atomically) with the mode the process umask gives a new file; an
    ``executable`` script only gains the owner's execute bit."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if executable:
            tmp.chmod(tmp.stat().st_mode & 0o7777 | 0o100)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_artifacts(target: str, out_dir: Path, files: dict[str, str], *, executable: bool = False,
                    subdirs: tuple[str, ...] = ()) -> list[Path]:
    """Create ``out_dir`` (and ``subdirs`` in it) and write each ``{file name: text}`` there with
    ``write_artifact``; a filesystem error is one line naming the path. Returns the paths, in order."""
    paths = [out_dir / name for name in files]
    path = out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for sub in subdirs:
            (out_dir / sub).mkdir(exist_ok=True)
        for path, text in zip(paths, files.values(), strict=True):
            write_artifact(path, text, executable=executable)
    except OSError as err:
        raise FmforgeError(f"{who(target)}: cannot write {path}: {err.strerror or err}") from None
    return paths


@dataclass
class JobSpec:
    """One training job, independent of where it runs. Paths are as the user gave them; each target maps
    them to what the job will see (shared filesystem, ConfigMap, S3 channel, file mount)."""

    target: str
    config_path: Path  # absolute path of the user's config file on this machine
    config_text: str  # its contents, for targets that carry the config inside the artifact
    nodes: int
    gpus_per_node: int
    data: str | None  # --data as given (local path or URI); None: the config's data.path
    run_dir: str | None  # --out as given; None: each target picks a durable default
    overrides: list[str] = field(default_factory=list)
    job_name: str = "fmforge"
    max_restarts: int = 3
    rdzv_port: int | None = None  # None: the target's default
    env: dict[str, str] = field(default_factory=dict)


class Shell(str):
    """A command word that must reach the shell unquoted (it expands a variable, e.g. ``"$HEAD:29500"``).
    Only shell-script artifacts (sbatch, SkyPilot ``run``) may contain these."""


def is_uri(path: str) -> bool:
    return "://" in path


def local_path(path: str) -> Path:
    """``path`` on this machine, absolute; ``~`` and ``~user`` expanded where they can be (an unknown user
    stays as written, where ``Path.expanduser`` would raise)."""
    return Path(os.path.expanduser(path)).resolve()


def train_args(config: str, data: str | None, run_dir: str, overrides: list[str]) -> list[str]:
    """``fmforge train`` arguments (after ``-m fmforge``). Overrides go last: the train CLI accepts
    ``key=value`` words after its options."""
    args = ["train", config]
    if data is not None:
        args += ["--data", data]
    return [*args, "--out", run_dir, "--resume", "auto", *overrides]


def torchrun_argv(*, python: str, nnodes: int | str, nproc_per_node: int | str, endpoint: str, rdzv_id: str,
                  max_restarts: int, train: list[str], rdzv_conf: str | None = None) -> list[str]:
    """The launcher command every target runs on every node (c10d rendezvous: ranks are assigned by the
    store on ``endpoint``, so nodes need no rank of their own and a restarted node simply rejoins)."""
    argv = [python, "-m", "torch.distributed.run",
            "--nnodes", _word(nnodes), "--nproc-per-node", _word(nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
    if rdzv_conf is not None:
        argv += ["--rdzv-conf", rdzv_conf]
    return [*argv, "--max-restarts", str(max_restarts), "-m", "fmforge", *train]


def _word(value: int | str) -> str:
    return value if isinstance(value, str) else str(value)  # keeps Shell words Shell


def shell_join(argv: list[str], indent: str = "    ") -> str:
    """Render argv as one shell command, a line per ``--flag`` (and for ``-m fmforge``), quoting every
    word except ``Shell`` ones."""
    lines: list[list[str]] = [[]]
    for i, word in enumerate(argv):
        starts_line = word.startswith("--") or (word == "-m" and argv[i + 1:i + 2] == ["fmforge"])
        if starts_line and lines[-1]:
            lines.append([])
        lines[-1].append(word if isinstance(word, Shell) else shlex.quote(word))
    return (" \\\n" + indent).join(" ".join(line) for line in lines)


def default_job_name(config_path: Path) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", config_path.stem.lower()).strip("-")
    return ("fmforge-" + slug)[:40].rstrip("-") or "fmforge"


def require_tool(tool: str, what: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FmforgeError(f"cannot submit: {tool} not found on PATH ({what})")
    return path


def run_tool(argv: list[str], *, stream: bool = False) -> str:
    """Run a submit command; its failure becomes one user-facing line (the tool's last stderr line).
    ``stream``: let a slow tool (``sky launch`` provisions machines) print its progress as it goes."""
    if stream:
        proc = subprocess.run(argv)
        if proc.returncode != 0:
            raise FmforgeError(f"{Path(argv[0]).name} failed (exit {proc.returncode}); see its output above")
        return ""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        last = lines[-1] if lines else ""
        raise FmforgeError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {last}")
    return proc.stdout


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (scripts, embedded configs) as YAML literal blocks, so the artifact reads like
    the files it carries; no anchors/aliases for repeated values (plain YAML for kubectl and humans)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)
_BlockDumper.add_representer(Shell, _str_representer)


def dump_yaml(*docs: Any) -> str:
    return yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, width=110, allow_unicode=True)
