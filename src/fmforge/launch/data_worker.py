"""The command a Slurm job of a sharded preparation runs (``python -m fmforge.launch.data_worker``):

    tokenizer OUT                                  train the tokenizer on the sample (once)
    units OUT --group I --groups G --retries R     the pending units I, I+G, ... (each tried 1 + R times)
    merge OUT                                      global dedup, final shards, manifest

Errors end in one ``error: ...`` line on stderr (Slurm's log) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys

from fmforge.data.engines import execute
from fmforge.data.workplan import UnitFailed, WorkDir
from fmforge.errors import FmforgeError
from fmforge.launch.data_slurm import pending_of_group
from fmforge.lazy import resolve


def run_group(out: str, group: int, groups: int, retries: int) -> int:
    work = WorkDir(out)
    task = work.plan()["task"]
    failed = 0
    for unit in pending_of_group(work, group, groups):
        for attempt in range(1 + retries):
            if work.is_done(unit):
                break
            try:
                execute(out, unit, task)
                print(f"{unit}: done", flush=True)
                break
            except UnitFailed as err:
                last = attempt == retries
                print(f"{'error: ' if last else ''}{err}{'' if last else ' (retrying)'}", flush=True)
                failed += last
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmforge.launch.data_worker")
    parser.add_argument("step", choices=("tokenizer", "units", "merge"))
    parser.add_argument("out")
    parser.add_argument("--group", type=int, default=0)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--retries", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        plan = WorkDir(args.out).plan()
        if args.step == "tokenizer":
            resolve(plan["tokenizer_task"])(args.out)
            return 0
        if args.step == "units":
            return run_group(args.out, args.group, args.groups, args.retries)
        resolve(plan["merge"])(args.out, log=print)
        print("merged", flush=True)
        return 0
    except FmforgeError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
