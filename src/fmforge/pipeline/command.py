"""``fmforge pipeline run``: validate the file, run it, print a summary (exit 1 when a step failed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from fmforge.errors import FmforgeError
from fmforge.pipeline.mlflow_hook import MlflowHook
from fmforge.pipeline.runner import Runner
from fmforge.pipeline.spec import load_pipeline


def parse_pairs(pairs: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FmforgeError(f"{what} {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def run_pipeline(pipeline: str | Path, params: dict | None = None, out: str | Path | None = None, *, workers: int = 2,
                 no_cache: bool = False, backend: str = "local", slurm_options: dict | None = None,
                 registry: str | None = None, mlflow: str | None = None, echo=print,
                 console: Console | None | bool = None) -> dict:
    """Validate and run ``pipeline`` into ``out`` (default ``runs/pipeline-NAME``); returns the run summary.

    Progress is a live table on ``console``; by default (``None``) on stdout when it is a terminal and
    ``echo`` prints there, else (or with ``False``) one ``echo``-ed line per step state change."""
    if workers < 1:
        raise FmforgeError(f"--workers must be at least 1 (got {workers})")
    pipe = load_pipeline(pipeline, {k: str(v) for k, v in (params or {}).items()})
    out = Path(out) if out else Path("runs") / f"pipeline-{pipe.name}"
    hook = MlflowHook(mlflow, f"fmforge-{pipe.name}", out / "mlflow-artifacts") if mlflow else None
    if console is None:
        console = echo is print and sys.stdout.isatty()
    runner = Runner(pipe, out, workers=workers, backend=backend, use_cache=not no_cache, registry=registry,
                    slurm_options=slurm_options, mlflow=hook, echo=echo,
                    console=Console() if console is True else console or None)
    return runner.run()


def run_command(pipeline: str, param: list[str] | None = None, out: str | None = None, workers: int = 2,
                no_cache: bool = False, backend: str = "local", slurm_option: list[str] | None = None,
                registry: str | None = None, mlflow: str | None = None, json_out: bool = False) -> dict:
    result = run_pipeline(pipeline, parse_pairs(param, "--param"), out, workers=workers, no_cache=no_cache,
                          backend=backend, slurm_options=parse_pairs(slurm_option, "--slurm-option") or None,
                          registry=registry, mlflow=mlflow, echo=(lambda m: print(m, file=sys.stderr)) if json_out else print)
    if json_out:
        print(json.dumps(result, indent=2, default=str))
    else:
        counts: dict[str, int] = {}
        for state in result["steps"].values():
            counts[state] = counts.get(state, 0) + 1
        print(f"pipeline {result['status']} in {result['seconds']:.1f} s: "
              + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        for name, error in result["errors"].items():
            print(f"  step {name} failed: {error}")
        print(f"  fmforge pipeline show {result['out']}")
    if result["status"] != "succeeded":
        sys.exit(1)
    return result
