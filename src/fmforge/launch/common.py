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

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmforge.errors import FmforgeError

REQUIRED = object()  # an option default meaning "the user must give it"


@dataclass(frozen=True)
class Option:
    default: Any
    type: type
    help: str


# Options every target accepts; each target module adds its own table (``OPTIONS``).
COMMON_OPTIONS: dict[str, Option] = {
    "job_name": Option(None, str, "job / cluster / pod-name prefix (default: fmforge-<config file stem>); "
                                  "lowercase letters, digits and '-', at most 40 characters"),
    "max_restarts": Option(3, int, "torchrun --max-restarts: worker-group restarts inside one job before "
                                   "it fails (each restart resumes from the newest checkpoint)"),
    "rdzv_port": Option(None, int, "TCP port of the c10d rendezvous store on the first node (default: "
                                   "29500; k8s 29400; Slurm 29500 + job id % 1000, so jobs sharing a "
                                   "node differ)"),
    "env": Option({}, dict, "extra environment variables for the training processes, e.g. "
                            "{NCCL_DEBUG: WARN}"),
}

JOB_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")


def _coerce(target: str, key: str, value: Any, opt: Option) -> Any:
    """Options may arrive as strings from a command line (``--option time=04:00:00``): parse them as YAML
    scalars the way config overrides are parsed, then check the type."""
    if isinstance(value, str) and opt.type is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, opt.type) and not (opt.type is int and isinstance(value, bool))
    if value is None and opt.default is None:
        ok = True
    if not ok:
        raise FmforgeError(f"launch {target}: option {key} must be {opt.type.__name__}, got {value!r}")
    return value


def resolve_options(target: str, table: dict[str, Option], given: dict | None) -> dict[str, Any]:
    """Merge ``given`` over the defaults of COMMON_OPTIONS + ``table``. Unknown keys and missing required
    options fail naming the key, before anything is written."""
    table = {**COMMON_OPTIONS, **table}
    given = dict(given or {})
    for key in given:
        if key not in table:
            raise FmforgeError(f"launch {target}: unknown option {key!r}; known: {', '.join(sorted(table))}")
    resolved = {}
    for key, opt in table.items():
        if key in given:
            resolved[key] = _coerce(target, key, given[key], opt)
        elif opt.default is REQUIRED:
            raise FmforgeError(f"launch {target}: option {key} is required ({opt.help})")
        else:
            # copy mutable defaults so one launch cannot leak into the next
            resolved[key] = dict(opt.default) if isinstance(opt.default, dict) else opt.default
    resolved["env"] = {str(k): str(v) for k, v in resolved["env"].items()}
    return resolved


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
