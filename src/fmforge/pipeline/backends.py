"""Where a verb step runs: a local process (default) or a Slurm job (``--backend slurm``).

Both run ``python -m fmforge.pipeline.job STEP_DIR CWD -- VERB ARGS`` (see ``job.py``): stdout, log and exit status
land in the step directory. A Slurm step is submitted with ``--dependency=afterok:`` on the jobs of the steps
it waits for that are still queued or running, so Slurm itself chains the pipeline, and a failed step's
dependants are cancelled by Slurm (``--kill-on-invalid-dep=yes``); the scripts are written by ``fmforge
launch``'s Slurm code, with its options and value checks (``--slurm-option KEY=VALUE``).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fmforge.launch import data_slurm
from fmforge.launch.common import require_tool, run_tool
from fmforge.pipeline.job import die_with_parent

JOB = "fmforge.pipeline.job"


def _rc(step_dir: Path) -> int | None:
    try:
        return int((step_dir / "rc").read_text().strip())
    except (OSError, ValueError):
        return None


class LocalBackend:
    name = "local"
    chains = False  # a step starts only when the steps it waits for have finished

    def __init__(self, options: dict | None = None):
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, step: str, step_dir: Path, cwd: Path, argv: list[str], after: list[str]) -> str:
        self.procs[step] = subprocess.Popen([sys.executable, "-m", JOB, str(step_dir), str(cwd), "--", *argv],
                                            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        return step

    def poll(self, handle: str, step_dir: Path) -> int | None | str:
        code = self.procs[handle].poll()
        if code is None:
            return None
        rc = _rc(step_dir)
        return rc if rc is not None else f"the step process ended with status {code} before its verb finished"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@dataclass
class _Work:
    path: Path  # data_slurm writes scripts' logs to path/slurm


class SlurmBackend:
    name = "slurm"
    chains = True  # a step whose inputs are only paths is submitted at once, after its upstream jobs

    def __init__(self, options: dict | None = None):
        self.sbatch = require_tool("sbatch", "--backend slurm runs on a Slurm login node")
        self.opts = data_slurm.slurm_options(options or {})
        self.jobs: dict[str, str] = {}
        self.gone: set[str] = set()

    def start(self, step: str, step_dir: Path, cwd: Path, argv: list[str], after: list[str]) -> str:
        python = self.opts["python"] or sys.executable
        name = f"{self.opts['job_name'] or 'fmforge-pipeline'}-{step}"
        (step_dir / "slurm").mkdir(exist_ok=True)  # Slurm's own log of the job (--output)
        script = data_slurm._script(_Work(step_dir), self.opts, name, [],
                                    [python, "-m", JOB, str(step_dir.resolve()), str(cwd), "--", *argv])
        path = step_dir / "step.sbatch"
        path.write_text(script, encoding="utf-8")
        deps = [self.jobs[s] for s in after if s in self.jobs]
        dependency = [f"--dependency=afterok:{':'.join(deps)}"] if deps else []
        self.jobs[step] = run_tool([self.sbatch, "--parsable", *dependency, str(path)]).strip().split(";")[0]
        (step_dir / "slurm_job").write_text(" ".join([self.jobs[step], *(d.split("=", 1)[1] for d in dependency)]))
        return self.jobs[step]

    def poll(self, handle: str, step_dir: Path) -> int | None | str:
        rc = _rc(step_dir)
        if rc is not None:
            return rc
        if handle in data_slurm.active_jobs([handle]):
            return None
        # the job left the queue without an exit status: cancelled (a dependency failed) or killed
        if _rc(step_dir) is not None:
            return _rc(step_dir)
        logs = sorted((step_dir / "slurm").glob("*.out"))
        last = logs[-1].read_text(errors="replace").strip().splitlines()[-1:] if logs else []
        return f"Slurm job {handle} ended without finishing the step ({last[0][:200] if last else 'no Slurm log'})"

    def stop(self) -> None:
        live = [j for j in self.jobs.values() if j in data_slurm.active_jobs([j])]
        if live:
            subprocess.run(["scancel", *live], capture_output=True, timeout=30)


BACKENDS = {"local": LocalBackend, "slurm": SlurmBackend}
