"""SkyPilot: a task YAML (``sky launch -c NAME task.yaml``, or ``sky jobs launch`` for managed recovery).

SkyPilot runs ``run`` on every node with ``SKYPILOT_NODE_RANK``, ``SKYPILOT_NODE_IPS`` (one per line, head
first), ``SKYPILOT_NUM_NODES`` and ``SKYPILOT_NUM_GPUS_PER_NODE`` set; the script turns those into the
torchrun rendezvous. Rank 0 is told it hosts the c10d store (``--rdzv-conf is_host=1``) rather than leaving
torch to guess it from hostnames, which cloud VMs with several NICs can get wrong.

The config (and a local ``--data`` directory) reach the nodes as ``file_mounts`` under ``~/fmforge-job``,
where the job runs. The run directory is ``~/fmforge-job/runs/<job_name>`` on the head node's disk unless
``checkpoint_bucket`` is given: then it lives on that bucket, mounted with ``MOUNT_CACHED`` (local write-back
cache, so checkpoint writes run at disk speed), and a managed job that loses its spot nodes resumes from it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.launch.common import (
    NAME,
    SCRIPT,
    JobSpec,
    Option,
    Shell,
    dump_yaml,
    is_uri,
    local_path,
    require_tool,
    run_tool,
    shell_join,
    torchrun_argv,
    train_args,
)

FILENAME = "task.yaml"
SUBMIT_TOOL = "sky"
JOB_DIR = "~/fmforge-job"
BUCKET_MOUNT = "/fmforge-ckpt"
SECRETS = ("pass secrets at submit time instead: `sky launch --env NAME` takes NAME's value from your "
           "environment")

OPTIONS: dict[str, Option] = {
    "accelerators": Option("H100", str, "GPU type, e.g. H100, A100-80GB, L4 (the count is gpus_per_node)"),
    "cloud": Option(None, str, "resources.cloud, e.g. aws, gcp, kubernetes (default: cheapest enabled)"),
    "region": Option(None, str, "resources.region"),
    "use_spot": Option(False, bool, "resources.use_spot (pair with checkpoint_bucket and managed)"),
    "disk_size": Option(None, int, "resources.disk_size in GB"),
    "image_id": Option(None, str, "resources.image_id, e.g. docker:<image with fmforge>"),
    "setup": Option("", str, "setup commands run once per node, e.g. 'pip install -e .' with workdir (run as "
                             "written: never pass values through from others)", SCRIPT),
    "workdir": Option(None, str, "local directory synced to the nodes' ~/sky_workdir before setup"),
    "checkpoint_bucket": Option(None, str, "s3:// / gs:// / r2:// ... URI holding the run directory"),
    "cluster_name": Option(None, str, "cluster name for sky launch -c (default: job_name); same rules as "
                                      "job_name", NAME),
    "managed": Option(False, bool, "--submit with `sky jobs launch` (managed job: recovers from spot "
                                   "preemption and resumes from checkpoint_bucket)"),
}


def build(spec: JobSpec, opts: dict) -> dict:
    accelerator = opts["accelerators"]
    if ":" in accelerator:
        raise FmforgeError(f"launch skypilot: give the GPU type only (accelerators="
                           f"{accelerator.split(':')[0]}); the count comes from gpus_per_node")
    file_mounts: dict = {f"{JOB_DIR}/config.yaml": str(spec.config_path)}
    data = spec.data
    if data is not None and not is_uri(data):
        local = local_path(data)
        if not local.is_dir():
            raise FmforgeError(f"launch skypilot: data directory not found: {local}")
        file_mounts[f"{JOB_DIR}/data"] = str(local)
        data = "data"
    if opts["checkpoint_bucket"]:
        file_mounts[BUCKET_MOUNT] = {"source": opts["checkpoint_bucket"], "mode": "MOUNT_CACHED"}
    run_dir = spec.run_dir or (f"{BUCKET_MOUNT}/{spec.job_name}" if opts["checkpoint_bucket"]
                               else f"runs/{spec.job_name}")

    command = torchrun_argv(
        python="python",
        nnodes=Shell('"$SKYPILOT_NUM_NODES"'),
        nproc_per_node=Shell('"$SKYPILOT_NUM_GPUS_PER_NODE"'),
        endpoint=Shell(f'"$HEAD_IP:{spec.rdzv_port or 29500}"'),
        rdzv_id=Shell('"$SKYPILOT_TASK_ID"'),
        rdzv_conf=Shell('"is_host=$IS_HOST"'),
        max_restarts=spec.max_restarts,
        train=train_args("config.yaml", data, run_dir, spec.overrides),
    )
    run = f"""set -uo pipefail
cd {JOB_DIR}
python -c 'import fmforge' || {{
    echo "fmforge is not installed on this node: install it in setup, or use an image_id that has it" >&2
    exit 1
}}
HEAD_IP=$(echo "$SKYPILOT_NODE_IPS" | head -n1)
if [ "$SKYPILOT_NODE_RANK" = 0 ]; then IS_HOST=1; else IS_HOST=0; fi
echo "fmforge: node $SKYPILOT_NODE_RANK of $SKYPILOT_NUM_NODES, rendezvous $HEAD_IP"
exec {shell_join(command)}
"""
    resources: dict = {"accelerators": f"{accelerator}:{spec.gpus_per_node}", "use_spot": opts["use_spot"]}
    for key in ("cloud", "region", "disk_size", "image_id"):
        if opts[key] is not None:
            resources[key] = opts[key]
    task: dict = {"name": spec.job_name, "num_nodes": spec.nodes, "resources": resources}
    if spec.env:
        task["envs"] = dict(spec.env)
    if opts["workdir"]:
        task["workdir"] = str(local_path(opts["workdir"]))
    task["file_mounts"] = file_mounts
    if opts["setup"].strip():
        task["setup"] = opts["setup"].strip() + "\n"
    task["run"] = run
    return task


def render(spec: JobSpec, opts: dict, out_dir: Path) -> str:
    header = (f"# fmforge training job {spec.job_name}, written by `fmforge launch skypilot` from "
              f"{shlex.quote(str(spec.config_path))}\n"
              f"# Submit with: sky launch -c {shlex.quote(_cluster(spec, opts))} "
              f"{shlex.quote(str(out_dir.resolve() / FILENAME))}\n")
    return header + dump_yaml(build(spec, opts))


def _cluster(spec: JobSpec, opts: dict) -> str:
    return opts["cluster_name"] or spec.job_name


def how_to_submit(path: Path, spec: JobSpec, opts: dict) -> list[str]:
    task = shlex.quote(str(path))
    if opts["managed"]:
        return [f"submit:  sky jobs launch -n {shlex.quote(spec.job_name)} {task}", "watch:   sky jobs queue"]
    cluster = shlex.quote(_cluster(spec, opts))
    return [f"submit:  sky launch -c {cluster} {task}   (or `sky jobs launch {task}` for managed recovery)",
            f"logs:    sky logs {cluster}", f"stop:    sky down {cluster}"]


def submit(path: Path, spec: JobSpec, opts: dict, echo=print) -> str:
    sky = require_tool("sky", "pip install skypilot, then `sky check` to enable a cloud")
    if opts["managed"]:
        run_tool([sky, "jobs", "launch", "--yes", "--detach-run", "--name", spec.job_name, str(path)],
                 stream=True)
        echo(f"submitted SkyPilot managed job {spec.job_name}")
        return spec.job_name
    cluster = _cluster(spec, opts)
    run_tool([sky, "launch", "--yes", "--detach-run", "--cluster", cluster, str(path)], stream=True)
    echo(f"submitted SkyPilot task on cluster {cluster}")
    return cluster
