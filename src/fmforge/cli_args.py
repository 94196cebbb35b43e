"""The pieces the verb tables are written with: argument specs, groups, the shared parent parsers, ``Verb``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, NamedTuple

LAUNCH_TARGETS = ("slurm", "k8s", "sagemaker", "skypilot")  # launch.cli.TARGETS (tests/test_cli.py checks)


# Argument specs and the shared parent parsers


class Arg(NamedTuple):
    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """One ``add_argument`` call, written down for later."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Group:
    """Arguments shown under their own ``title`` in --help, or (``exclusive``) of which at most one is given."""

    args: tuple[Arg, ...]
    title: str | None = None
    exclusive: bool = False


def _add(container: Any, specs: tuple[Arg | Group, ...]) -> None:
    """Add ``specs`` to ``container``: a parser, or one of its argument groups."""
    for spec in specs:
        if isinstance(spec, Group):
            group = container.add_mutually_exclusive_group() if spec.exclusive else container.add_argument_group(spec.title)
            _add(group, spec.args)
        else:
            container.add_argument(*spec.flags, **spec.options)


def parent(*specs: Arg | Group) -> argparse.ArgumentParser:
    """A parent parser (``parents=``): arguments several verbs share, defined once."""
    parser = argparse.ArgumentParser(add_help=False)
    _add(parser, specs)
    return parser


def run_config(out_metavar: str, out_help: str | None = None, *, out_required: bool = False,
               config_help: str | None = None,
               data_help: str = "prepared data directory (sets data.path)") -> argparse.ArgumentParser:
    """CONFIG.yaml + key.sub=value overrides + --data + --out: how every verb that trains names its run."""
    return parent(
        arg("config", metavar="CONFIG.yaml", help=config_help),
        arg("overrides", nargs="*", metavar="key.sub=value",
            help="config overrides, e.g. train.max_steps=200 optim.lr=1e-3 (also after the options)"),
        arg("--data", metavar="DATA_DIR", help=data_help),
        arg("--out", metavar=out_metavar, required=out_required, help=out_help))


TORCHRUN = parent(
    arg("--resume", metavar="auto|PATH",
        help="auto: continue from the newest valid checkpoint in RUN_DIR (fresh start if none); "
             "PATH: from that checkpoint directory"),
    arg("--nproc-per-node", type=int, default=1, metavar="N",
        help="data-parallel processes on this machine, started through torchrun (GPUs: one per GPU; "
             "CPU: gloo). Multi-node jobs: see `fmforge launch`"),
    arg("--max-restarts", type=int, default=0, metavar="R",
        help="restart all processes up to R times after a failure, resuming from the newest checkpoint "
             "(implies --resume auto)"))
PREPARED_OUT = parent(
    arg("--out", required=True, metavar="DATA_DIR", help="output directory"),
    arg("--overwrite", action="store_true", help="replace an existing prepared directory"))
# The engine settings of a sharded preparation (data prepare, data prepare-images).
ENGINE_ARGS = (
    arg("--retries", type=int, default=2, metavar="R",
        help="retries of a failed unit before it is reported by name (default: 2)"),
    arg("--ray-address", metavar="ADDR",
        help="Ray cluster to run on (e.g. auto or 10.0.0.1:6379; default: a local Ray of --workers CPUs, started "
             "and stopped for this run)"),
    arg("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
        help="an `fmforge launch slurm` option for the jobs: partition, account, qos, constraint, time, "
             "cpus_per_task, mem, python, setup, sbatch_args, job_name, env (repeatable)"),
    arg("--detach", action="store_true", help="slurm: submit the jobs and return; follow with `fmforge data status`"),
)
DEVICE = parent(arg("--device", default="auto", help="auto, cpu or cuda"))
JSON_OUT = parent(arg("--json", dest="json_out", action="store_true", help="print the result as JSON"))


def _number_list(text: str) -> list[float]:
    """``2e5,4e5,8e5`` → [200000.0, 400000.0, 800000.0]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _name_list(text: str) -> list[str]:
    """``a, b,,c`` → [a, b, c]."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _split_commas(text: str) -> list[str]:
    """``a, b,,c`` → [a, b, "", c]: every position counts (class names in label order)."""
    return [part.strip() for part in text.split(",")]


# The verbs


@dataclass(frozen=True)
class Verb:
    """``name`` is what the user types (``"data prepare"`` nests under ``data``); ``run`` is called with one
    keyword argument per parsed argument, named by its dest."""

    name: str
    run: str  # "package.module:function", imported when the verb runs
    help: str
    description: str | None = None
    parents: tuple[argparse.ArgumentParser, ...] = ()
    args: tuple[Arg | Group, ...] = ()


# Verbs whose sub-verbs sit below them: name -> (help, description, metavar of the sub-verb).
