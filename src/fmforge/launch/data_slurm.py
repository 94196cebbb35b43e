"""``data prepare --engine slurm``: the units as a Slurm array job, with ``fmforge launch``'s Slurm options
and value checks.

Up to three jobs, chained by dependencies: the tokenizer job (when no tokenizer is given; the array waits
for it to succeed, ``afterok``), the array (task i runs the pending units i, i+G, i+2G, ..., each retried
``retries`` times; ``%workers`` caps how many tasks run at once), and the merge (``afterany``: it runs even
when some units failed, and then reports them by name). Scripts, job ids and Slurm's own logs live in
``OUT/.fmforge-work/slurm``; the output directory must be on a filesystem the compute nodes share.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fmforge.data.manifest import write_json_atomic
from fmforge.data.workplan import WorkDir, read_small_json
from fmforge.errors import FmforgeError
from fmforge.launch import slurm
from fmforge.launch.common import WORD, check_text, require_tool, resolve_options, run_tool

MAX_ARRAY_TASKS = 1000  # Slurm's default MaxArraySize is 1001
OPTION_KEYS = ("partition", "account", "qos", "constraint", "time", "cpus_per_task", "mem", "python", "setup",
               "sbatch_args")
TABLE = {key: slurm.OPTIONS[key] for key in OPTION_KEYS}
WORKER = "fmforge.launch.data_worker"


def slurm_options(given: dict | None) -> dict:
    """``launch slurm``'s options that apply here (plus job_name, env), checked the same way."""
    return resolve_options("slurm", TABLE, given)


def _script(work: WorkDir, opts: dict, name: str, directives: list[str], argv: list[str]) -> str:
    log_dir = check_text("slurm", "the log directory", str((work.path / "slurm").resolve()), WORD)
    workdir = check_text("slurm", "the working directory (an #SBATCH --chdir value)", str(Path.cwd()), WORD)
    lines = [f"--job-name={name}", "--ntasks=1", f"--cpus-per-task={opts['cpus_per_task'] or 1}",
             f"--time={opts['time']}",
             f"--output={log_dir}/%x-" + ("%A_%a.out" if any(d.startswith("--array") for d in directives) else "%j.out"),
             "--open-mode=append",
             f"--chdir={workdir}", "--kill-on-invalid-dep=yes", *directives]
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if opts[key] is not None:
            lines.append(f"--{key}={opts[key]}")
    lines += opts["sbatch_args"]
    env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in opts["env"].items())
    setup = opts["setup"].strip()
    command = " ".join(shlex.quote(a) if not a.startswith('"$') else a for a in argv)
    return ("#!/bin/bash\n# fmforge data preparation job, written by `fmforge data prepare --engine slurm`\n"
            + "".join(f"#SBATCH {d}\n" for d in lines)
            + (setup + "\n" if setup else "") + env + "set -uo pipefail\n" + f"exec {command}\n")


def submit(out: str, work: WorkDir, *, workers: int, retries: int, options: dict, need_tokenizer: bool,
           echo: Callable[[str], None]) -> dict:
    """Write the scripts, submit the chain, record the job ids in ``slurm/jobs.json``; returns them."""
    sbatch = require_tool("sbatch", "run this on a Slurm login node")
    opts = slurm_options(options)
    python = opts["python"] or sys.executable
    out_abs = check_text("slurm", "the output directory", str(Path(out).resolve()))
    name = opts["job_name"] or "fmforge-prepare"
    pending = work.pending()
    groups = max(1, min(len(pending), MAX_ARRAY_TASKS))
    d = work.path / "slurm"
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(d / "pending.json", {"units": pending}, indent=1)
    base = [python, "-m", WORKER]
    scripts = {
        "tokenizer": _script(work, opts, name + "-tok", [], [*base, "tokenizer", out_abs]),
        "units": _script(work, opts, name, [f"--array=0-{groups - 1}%{max(1, workers)}"],
                         [*base, "units", out_abs, "--group", '"$SLURM_ARRAY_TASK_ID"', "--groups", str(groups),
                          "--retries", str(retries)]),
        "merge": _script(work, opts, name + "-merge", [], [*base, "merge", out_abs]),
    }
    jobs: dict[str, str] = {}

    def sb(kind: str, after: str | None) -> str:
        path = d / f"{kind}.sbatch"
        path.write_text(scripts[kind], encoding="utf-8")
        argv = [sbatch, "--parsable"] + ([f"--dependency={after}"] if after else []) + [str(path)]
        jobs[kind] = run_tool(argv).strip().split(";")[0]
        return jobs[kind]

    tok_job = sb("tokenizer", None) if need_tokenizer else None
    units_job = sb("units", f"afterok:{tok_job}" if tok_job else None)
    sb("merge", f"afterany:{units_job}")
    write_json_atomic(d / "jobs.json", {**jobs, "groups": groups, "submitted": time.time()}, indent=1)
    echo(f"submitted Slurm jobs: {', '.join(f'{k} {v}' for k, v in jobs.items())} ({len(pending)} units in "
         f"{groups} array tasks, at most {workers} at once)")
    return jobs


def active_jobs(job_ids: list[str]) -> set[str]:
    """The ids among ``job_ids`` that Slurm still lists as pending or running."""
    proc = subprocess.run(["squeue", "-h", "-o", "%F %T", "-j", ",".join(job_ids)], capture_output=True,
                          text=True)
    if proc.returncode != 0:  # every id already gone from the controller's memory
        return set()
    done_states = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
    return {line.split()[0] for line in proc.stdout.splitlines() if line.split()[1:2] and
            line.split()[1] not in done_states}


def last_error(work: WorkDir, kind: str) -> str:
    """The last line a job of ``kind`` wrote to its Slurm log that looks like our error."""
    lines = []
    for log in sorted((work.path / "slurm").glob(f"*-{kind}-*.out" if kind != "units" else "*.out")):
        lines += log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else "no log")


def wait(work: WorkDir, jobs: dict, tick: Callable[[], None], poll_s: float = 1.0) -> None:
    """Block until every job of the chain has left the queue, calling ``tick`` each poll."""
    ids = [jobs[k] for k in ("tokenizer", "units", "merge") if k in jobs]
    while active_jobs(ids):
        tick()
        time.sleep(poll_s)
    tick()


def recorded_jobs(work: WorkDir) -> dict | None:
    path = work.path / "slurm" / "jobs.json"
    return read_small_json(path) if path.is_file() else None


def pending_of_group(work: WorkDir, group: int, groups: int) -> list[str]:
    listed = json.loads((work.path / "slurm" / "pending.json").read_text(encoding="utf-8"))["units"]
    if not 0 <= group < groups:
        raise FmforgeError(f"array task {group} is outside 0..{groups - 1}")
    return listed[group::groups]
