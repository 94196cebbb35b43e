"""``fmforge launch``: write (and optionally submit) the job artifact that trains CONFIG on a cluster."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from fmforge.config import load_config
from fmforge.errors import FmforgeError, clip
from fmforge.launch import kubernetes, sagemaker, skypilot, slurm
from fmforge.launch.common import (
    COMMON_OPTIONS,
    JobSpec,
    check_job_text,
    default_job_name,
    local_path,
    option_words,
    resolve_options,
    secret_warning,
    write_artifacts,
)

TARGETS: dict[str, ModuleType] = {
    "slurm": slurm, "k8s": kubernetes, "sagemaker": sagemaker, "skypilot": skypilot,
}


def target_options(target: str) -> dict:
    """The documented options of ``target`` (common + target-specific): {key: Option(default, type, help)}."""

    return {**COMMON_OPTIONS, **_module(target).OPTIONS}


def _module(target: str) -> ModuleType:
    if target not in TARGETS:
        raise FmforgeError(f"launch: unknown target {clip(target)}; choose one of {', '.join(TARGETS)}")
    return TARGETS[target]


def launch(target: str, config: str, *, nodes: int = 1, gpus_per_node: int = 8, out: str | None = None,
           submit: bool = False, data: str | None = None, run_dir: str | None = None,
           overrides: list[str] | tuple[str, ...] = (), options: dict | None = None, echo=print) -> Path:
    """Write the job artifact that runs ``fmforge train CONFIG --resume auto`` under torchrun on ``nodes``
    machines with ``gpus_per_node`` GPUs each, print how to submit it, and with ``submit`` submit it.

    target: ``slurm`` (sbatch script), ``k8s`` (Kubeflow PyTorchJob manifest), ``sagemaker``
    (CreateTrainingJob request, JSON), ``skypilot`` (task YAML). The config and overrides are validated
    first: a bad config fails before anything is written. ``data`` / ``run_dir`` become ``--data`` /
    ``--out`` of the job (each target explains which paths its nodes can see). ``options`` holds the
    target's settings (partition, image, role ARN, ...): see ``target_options(target)``; unknown keys fail.
    Every value that reaches the artifact is checked first (``common.resolve_options``, ``check_job_text``):
    no control characters, one word per #SBATCH value, names and env names as their rules say. An env name
    that looks like a secret gets a warning on stderr. ``out``: directory for the artifact (default
    ``./launch/<target>/``), written with the umask's mode. Returns the artifact's path.
    """
    module = _module(target)
    if nodes < 1:
        raise FmforgeError(f"launch: nodes must be at least 1, got {nodes}")
    if gpus_per_node < 1:
        raise FmforgeError(f"launch: gpus_per_node must be at least 1, got {gpus_per_node}")
    overrides = list(overrides)
    load_config(config, overrides)  # the job would fail at its first step: fail here, before any artifact
    opts = resolve_options(target, module.OPTIONS, options)
    config_path = local_path(config)
    out_dir = Path(out) if out is not None else Path("launch") / target
    check_job_text(target, config=str(config_path), data=data, run_dir=run_dir, out=str(out_dir),
                   overrides=overrides)

    job_name = opts["job_name"] or default_job_name(config_path)
    config_text = config_path.read_text(encoding="utf-8")  # load_config read it: it is UTF-8
    spec = JobSpec(target=target, config_path=config_path, config_text=config_text, nodes=nodes,
                   gpus_per_node=gpus_per_node, data=data, run_dir=run_dir, overrides=overrides,
                   job_name=job_name, max_restarts=opts["max_restarts"], rdzv_port=opts["rdzv_port"],
                   env=opts["env"])
    text = module.render(spec, opts, out_dir)  # may still reject option combinations: nothing written yet
    [path] = write_artifacts(target, out_dir, {module.FILENAME: text},
                             executable=getattr(module, "EXECUTABLE", False),
                             subdirs=getattr(module, "SUBDIRS", ()))
    warning = secret_warning(target, spec.env, module.SECRETS)
    if warning:
        print(warning, file=sys.stderr)

    echo(f"wrote {path} ({target}: {nodes} node(s) x {gpus_per_node} GPU(s), job {job_name})")
    for line in module.how_to_submit(path, spec, opts):
        echo(f"  {line}")
    if submit:
        module.submit(path, spec, opts, echo=echo)
    return path


def launch_command(target: str, config: str, overrides: list[str], *, nodes: int = 1, gpus_per_node: int = 8,
                   data: str | None = None, run_dir: str | None = None, out: str | None = None,
                   options: list[str] = (), submit: bool = False) -> None:
    """``fmforge launch``: ``options`` are the scheduler settings as ``key=value`` words."""
    settings = option_words(options)
    launch(target, config, nodes=nodes, gpus_per_node=gpus_per_node, out=out, submit=submit, data=data,
           run_dir=run_dir, overrides=overrides, options=settings)
