"""Slurm: an sbatch script that runs ``srun`` + torchrun (c10d rendezvous on the first node of the job).

Surviving the scheduler:
- ``--requeue``: after a node failure or preemption Slurm puts the job back in the queue; the rerun
  resumes from the newest checkpoint (``--resume auto``) under the same job id.
- Time limit: ``--signal=B:USR1@LEAD`` makes Slurm signal the batch shell LEAD seconds before the limit. The
  script then sends SIGTERM to the job's steps (``scancel --signal=TERM``: a signal, not a cancel), so the
  trainer writes a checkpoint and exits cleanly, and requeues the job — a long run becomes a chain of
  time-limited jobs with no lost work beyond the signal lead. Note torchrun gives its workers 30 s after
  SIGTERM before SIGKILL; the trainer checkpoints at once on SIGTERM.
- Paths are made absolute (the job runs on other nodes, assumed to share this filesystem) and the job runs
  in the directory ``launch`` was called from.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from fmforge.launch.common import (
    ARGS,
    SCRIPT,
    WORD,
    JobSpec,
    Option,
    Shell,
    check_text,
    is_uri,
    local_path,
    require_tool,
    run_tool,
    shell_join,
    torchrun_argv,
    train_args,
)

FILENAME = "job.sbatch"
SUBMIT_TOOL = "sbatch"
EXECUTABLE = True  # the artifact gains the owner's execute bit
SUBDIRS = ("logs",)  # made next to the artifact: sbatch does not create the --output directory
SECRETS = ("export secrets in the shell you run sbatch from instead: the job inherits that environment "
           "(sbatch's default --export=ALL)")

OPTIONS: dict[str, Option] = {
    "partition": Option(None, str, "#SBATCH --partition", WORD),
    "account": Option(None, str, "#SBATCH --account", WORD),
    "qos": Option(None, str, "#SBATCH --qos", WORD),
    "constraint": Option(None, str, "#SBATCH --constraint (node features)", WORD),
    "time": Option("24:00:00", str, "#SBATCH --time, Slurm format [D-]HH:MM:SS; the job checkpoints and "
                                    "requeues itself before it", WORD),
    "cpus_per_task": Option(None, int, "#SBATCH --cpus-per-task: CPUs for each node's torchrun and its "
                                       "workers (default: 8 per GPU)"),
    "mem": Option(None, str, "#SBATCH --mem per node, e.g. 0 (all) or 480G", WORD),
    "exclusive": Option(False, bool, "#SBATCH --exclusive: do not share nodes with other jobs"),
    "signal_lead_s": Option(120, int, "seconds before the time limit at which to checkpoint and requeue"),
    "python": Option(None, str, "interpreter with fmforge installed, as seen on the compute nodes "
                                "(default: the one running launch)"),
    "setup": Option("", str, "shell lines run before training, e.g. 'module load cuda/12.4' (run as "
                             "written: never pass values through from others)", SCRIPT),
    "sbatch_args": Option([], list, "extra raw #SBATCH arguments, e.g. ['--mail-type=END'] (each item is "
                                    "split at whitespace into one #SBATCH line per word)", ARGS),
}


def _absolute(what: str, path: str) -> str:
    # the working directory joins the path here: check the result, not only what the user typed
    return path if is_uri(path) else check_text("slurm", what, str(local_path(path)))


def render(spec: JobSpec, opts: dict, out_dir: Path) -> str:
    run_dir = _absolute("the run directory", spec.run_dir or f"runs/{spec.job_name}")
    data = _absolute("--data", spec.data) if spec.data is not None else None
    log_dir = check_text("slurm", "the log directory (--out/logs, an #SBATCH --output value)",
                         str(out_dir.resolve() / "logs"), WORD)
    workdir = check_text("slurm", "the working directory (an #SBATCH --chdir value)", str(Path.cwd()), WORD)
    cpus = opts["cpus_per_task"] or 8 * spec.gpus_per_node

    directives = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the per-GPU workers itself
        f"--gpus-per-node={spec.gpus_per_node}",
        f"--cpus-per-task={cpus}",
        f"--time={opts['time']}",
    ]
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if opts[key] is not None:
            directives.append(f"--{key}={opts[key]}")
    if opts["exclusive"]:
        directives.append("--exclusive")
    directives += [
        "--requeue",
        f"--signal=B:USR1@{opts['signal_lead_s']}",
        f"--output={log_dir}/%x-%j.out",
        "--open-mode=append",  # a requeued run appends to the same log
        f"--chdir={workdir}",
        *opts["sbatch_args"],
    ]

    command = torchrun_argv(
        python=opts["python"] or sys.executable,
        nnodes=Shell('"$SLURM_JOB_NUM_NODES"'),
        nproc_per_node=spec.gpus_per_node,
        endpoint=Shell('"$HEAD_NODE:$RDZV_PORT"'),
        rdzv_id=Shell('"$SLURM_JOB_ID"'),
        max_restarts=spec.max_restarts,
        train=train_args(str(spec.config_path), data, run_dir, spec.overrides),
    )
    # srun does not pass --cpus-per-task on to the step since Slurm 22.05: repeat it
    srun = 'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \\\n    '

    env_lines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in spec.env.items())
    port = spec.rdzv_port or "$((29500 + SLURM_JOB_ID % 1000))"
    setup = opts["setup"].strip()
    source, script = shlex.quote(str(spec.config_path)), shlex.quote(str(out_dir.resolve() / FILENAME))
    return f"""#!/bin/bash
# fmforge training job {spec.job_name}, written by `fmforge launch slurm` from {source}
# Submit with: sbatch {script}
{"".join(f"#SBATCH {d}{chr(10)}" for d in directives)}
{setup + chr(10) if setup else ""}{env_lines}set -uo pipefail  # after the setup lines: `module` scripts are not -u safe

# c10d rendezvous on the first node of the allocation. The default port is derived from the job id, so two
# jobs sharing a node do not collide and a requeued job keeps its port.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
RDZV_PORT={port}
echo "fmforge: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NUM_NODES node(s)," \\
     "rendezvous $HEAD_NODE:$RDZV_PORT, run dir" {shlex.quote(run_dir)}

# Slurm sends USR1 to this shell {opts["signal_lead_s"]}s before the time limit: SIGTERM the training steps
# (a signal, not a cancel) so the trainer checkpoints and exits, then requeue; the rerun resumes.
REQUEUE=0
checkpoint_and_requeue() {{
    echo "fmforge: time limit near: checkpointing, then requeueing job $SLURM_JOB_ID"
    REQUEUE=1
    scancel --signal=TERM "$SLURM_JOB_ID"
}}
trap checkpoint_and_requeue USR1

{srun}{shell_join(command)} &
STEP=$!
# `wait` returns early when a trapped signal arrives: keep waiting until the step has really exited.
while true; do
    wait "$STEP"
    STATUS=$?
    kill -0 "$STEP" 2>/dev/null || break
done
if [ "$REQUEUE" = 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
"""


def how_to_submit(path: Path, spec: JobSpec, opts: dict) -> list[str]:
    return [f"submit:  sbatch {shlex.quote(str(path))}",
            f"logs:    {path.parent.resolve() / 'logs'}/{spec.job_name}-<jobid>.out",
            "watch:   squeue --me"]


def submit(path: Path, spec: JobSpec, opts: dict, echo=print) -> str:
    sbatch = require_tool("sbatch", "run this on a Slurm login node, or copy the script there")
    # submit from the directory launch was called in; the script's --chdir already pins the job's cwd
    out = run_tool([sbatch, "--parsable", str(path)])
    job_id = out.strip().split(";")[0]
    echo(f"submitted Slurm job {job_id}")
    return job_id

