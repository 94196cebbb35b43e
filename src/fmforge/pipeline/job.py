"""One step's process: ``python -m fmforge.pipeline.job STEP_DIR CWD -- fmforge-argv...``.

Runs ``python -m fmforge ARGV`` in CWD (the pipeline file's directory) with its stdout in ``STEP_DIR/stdout.txt`` and its stderr in
``STEP_DIR/log.txt``, then writes the exit status to ``STEP_DIR/rc`` (atomically: a step without ``rc`` did
not finish). The same wrapper runs under the local backend and inside a Slurm job. The verb process dies with
this one (Linux parent-death signal), so a runner killed with ``kill -9`` leaves no orphan writing into a
step directory the next run is about to reuse.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when its parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    step_dir, cwd, sep, *command = argv
    if sep != "--" or not command:
        print("usage: python -m fmforge.pipeline.job STEP_DIR CWD -- VERB ARGS...", file=sys.stderr)
        return 2
    step_dir = Path(step_dir)
    with open(step_dir / "stdout.txt", "wb") as out, open(step_dir / "log.txt", "ab") as log:
        rc = subprocess.call([sys.executable, "-m", "fmforge", *command], stdout=out, stderr=log, cwd=cwd,
                             preexec_fn=die_with_parent if os.name == "posix" else None)
    tmp = step_dir / "rc.tmp"
    tmp.write_text(str(rc))
    os.replace(tmp, step_dir / "rc")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
