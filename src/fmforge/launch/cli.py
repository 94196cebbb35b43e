"""``fmforge launch``: write (and optionally submit) the job artifact that trains CONFIG on a cluster."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from fmforge.config import load_config
from fmforge.errors import FmforgeError
from fmforge.launch import kubernetes, sagemaker, skypilot, slurm
from fmforge.launch.common import COMMON_OPTIONS, JOB_NAME, JobSpec, default_job_name, resolve_options

TARGETS: dict[str, ModuleType] = {
    "slurm": slurm, "k8s": kubernetes, "sagemaker": sagemaker, "skypilot": skypilot,
}


def target_options(target: str) -> dict:
    """The documented options of ``target`` (common + target-specific): {key: Option(default, type, help)}."""

    return {**COMMON_OPTIONS, **_module(target).OPTIONS}


def _module(target: str) -> ModuleType:
    if target not in TARGETS:
        raise FmforgeError(f"launch: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
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
    ``out``: directory for the artifact (default ``./launch/<target>/``). Returns the artifact's path.
    """
    module = _module(target)
    if nodes < 1:
        raise FmforgeError(f"launch: nodes must be at least 1, got {nodes}")
    if gpus_per_node < 1:
        raise FmforgeError(f"launch: gpus_per_node must be at least 1, got {gpus_per_node}")
    overrides = list(overrides)
    load_config(config, overrides)  # the job would fail at its first step: fail here, before any artifact
    opts = resolve_options(target, module.OPTIONS, options)

    config_path = Path(config).expanduser().resolve()
    job_name = opts["job_name"] or default_job_name(config_path)
    if not JOB_NAME.match(job_name):
        raise FmforgeError(f"launch: job_name {job_name!r} must be 1-40 lowercase letters, digits or '-', "
                           f"starting and ending with a letter or digit (it names pods, clusters and jobs)")
    spec = JobSpec(target=target, config_path=config_path, config_text=config_path.read_text(), nodes=nodes,
                   gpus_per_node=gpus_per_node, data=data, run_dir=run_dir, overrides=overrides,
                   job_name=job_name, max_restarts=opts["max_restarts"], rdzv_port=opts["rdzv_port"],
                   env=opts["env"])

    out_dir = Path(out) if out is not None else Path("launch") / target
    text = module.render(spec, opts, out_dir)  # may still reject option combinations: nothing written yet
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / module.FILENAME
    path.write_text(text)
    if module is slurm:
        path.chmod(0o755)

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
    settings = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FmforgeError(f"bad --option {item!r}: expected key=value")
        settings[key] = value
    launch(target, config, nodes=nodes, gpus_per_node=gpus_per_node, out=out, submit=submit, data=data,
           run_dir=run_dir, overrides=overrides, options=settings)
