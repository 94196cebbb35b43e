"""What ``fmforge deploy k8s`` and ``fmforge deploy sagemaker`` share: the servable-run check, the options
every target takes, and the write / print / submit sequence.

Option values go through the same checks as ``fmforge launch``'s (``launch.common.resolve_options``: types,
no control characters, names as DNS-1123 labels) and the files are written the same way
(``launch.common.write_artifacts``: atomic, umask mode). Each target module (``artifacts_k8s``,
``artifacts_sagemaker``) provides ``TARGET``, ``OPTIONS``, ``SECRETS``, ``render``, ``how_to_submit`` and
``submit``.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fmforge.errors import FmforgeError
from fmforge.launch.common import (
    ENV,
    NAME,
    REQUIRED,
    Option,
    check_text,
    default_job_name,
    local_path,
    option_words,
    resolve_options,
    secret_warning,
    write_artifacts,
)
from fmforge.models.registry import family_of
from fmforge.runs import checked_run_model, read_model_config

# What ``fmforge serve`` loads (``serve.load_models``: decoders + ``serve.ENCODER_FAMILIES``). Written out
# rather than imported: serve.py pulls in the whole serving stack (FastAPI, the batching engine, image
# loaders), seconds of start-up for a verb that only writes files. tests/test_deploy_artifacts.py keeps
# the two equal.
SERVABLE = ("decoder", "bert", "clip")

# Options every deploy target takes (each target module adds its own ``OPTIONS``).
DEPLOY_OPTIONS: dict[str, Option] = {
    "image": Option(REQUIRED, str, "container image with fmforge[serve] installed"),
    "name": Option(None, str, "name of the deployment / endpoint (default: fmforge-<RUN_DIR name>); "
                              "lowercase letters, digits and '-', at most 40 characters", NAME),
    "env": Option({}, dict, "extra environment variables of the server, e.g. {HF_HUB_OFFLINE: 1}; not for "
                            "secrets: they would be written in clear", ENV),
}


@dataclass(frozen=True)
class ServedRun:
    """The run directory being deployed, checked on this machine."""

    path: Path  # absolute
    family: str  # decoder, bert or clip

    @property
    def model_name(self) -> str:
        """The name clients ask for: ``fmforge serve`` names a model after its directory."""
        return self.path.name


def servable_run(verb: str, run_dir: str | Path) -> ServedRun:
    """``run_dir`` if ``fmforge serve`` can load it (a decoder, BERT or CLIP run with weights that match its
    model.json and a tokenizer), else a one-line error. Only the weights' header is read."""
    path = local_path(str(run_dir))
    if not path.is_dir():
        raise FmforgeError(f"{verb}: run directory not found: {run_dir}")
    cfg = read_model_config(path)
    family = family_of(cfg)
    if family not in SERVABLE:
        raise FmforgeError(f"{verb}: {path} holds a {family} model; fmforge serve takes decoder, BERT and "
                           f"CLIP runs")
    checked_run_model(path, cfg)
    if not (path / "tokenizer.json").is_file():
        raise FmforgeError(f"{verb}: {path} has no tokenizer.json: the server could not read requests")
    return ServedRun(path, family)


def check_ranges(verb: str, opts: dict, ranges: tuple[tuple[str, int, int], ...]) -> None:
    """Each ``(key, low, high)``: the option, when set, lies in ``low..high``; else a one-line error."""
    for key, low, high in ranges:
        if opts[key] is not None and not low <= opts[key] <= high:
            raise FmforgeError(f"{verb}: option {key} must be in {low}..{high}, got {opts[key]}")


def sync_hint(run: ServedRun, uri: str) -> str:
    """How to put the run's files under an S3 prefix (the checkpoints stay behind: the server never reads them)."""
    return f"aws s3 sync {shlex.quote(str(run.path))} {shlex.quote(uri)} --exclude 'checkpoints/*'"


def deploy(module: ModuleType, run_dir: str | Path, *, out: str | Path | None = None, submit: bool = False,
           options: dict | None = None, echo=print) -> list[Path]:
    """Write ``module``'s deployment artifacts for serving ``run_dir`` into ``out`` (default
    ``./deploy/<target>/``), print how to apply them, and with ``submit`` apply them. Everything is
    checked before the first file is written. Returns the written paths."""
    verb = f"deploy {module.TARGET}"
    run = servable_run(verb, run_dir)
    opts = resolve_options(verb, module.OPTIONS, options, base=DEPLOY_OPTIONS)
    out_dir = Path(out) if out is not None else Path("deploy") / module.TARGET
    check_text(verb, "RUN_DIR", str(run.path))  # it reaches header comments and printed commands
    check_text(verb, "--out", str(out_dir))
    name = opts["name"] or default_job_name(run.path)
    files = module.render(run, name, opts, out_dir)  # may still refuse option combinations: nothing written
    paths = write_artifacts(verb, out_dir, files)
    warning = secret_warning(verb, opts["env"], module.SECRETS)
    if warning:
        print(warning, file=sys.stderr)
    echo(f"wrote {', '.join(map(str, paths))} ({verb}: {name} serves {run.model_name}, a {run.family} model)")
    for line in module.how_to_submit(paths, run, name, opts):
        echo(f"  {line}")
    if submit:
        module.submit(paths, name, opts, echo=echo)
    return paths


def deploy_command(module: ModuleType, run_dir: str, *, out: str | None = None, options: list[str] = (),
                   submit: bool = False) -> None:
    """A ``fmforge deploy TARGET`` verb: ``options`` are ``key=value`` words."""
    deploy(module, run_dir, out=out, submit=submit, options=option_words(options))
