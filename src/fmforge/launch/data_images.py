"""``fmforge data prepare-images [--engine local|ray|slurm]``: one process without ``--engine``
(``image_prepare.prepare_images``), else the same preparation as work units run in parallel on an engine and
merged into one prepared directory (the plan, the unit task and the merge: ``image_units.py``; the engines:
``data_prepare.run_plan``). ``image_units`` stays free of the engine and Slurm modules (and of what they import,
torch among them), so each worker process that imports it to run a unit starts in a fraction of a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fmforge.data.image_prepare import prepare_images, summarize
from fmforge.data.image_units import DEFAULT_UNIT_RECORDS, plan_images
from fmforge.errors import FmforgeError
from fmforge.launch.data_prepare import check_engine_args, default_workers, parse_slurm_options, run_plan


def prepare_images_command(inputs: list[str], out: str, *, engine: str | None = None, workers: int | None = None,
                           unit_records: int = DEFAULT_UNIT_RECORDS, retries: int = 2,
                           ray_address: str | None = None, slurm_option: list[str] = (), detach: bool = False,
                           **settings) -> dict | None:
    """``fmforge data prepare-images``: one process without ``engine`` (``workers``: its decoding threads),
    else the sharded path (``workers``: units at once)."""
    if engine is None:
        if slurm_option or ray_address or detach:
            raise FmforgeError("--ray-address, --slurm-option and --detach need --engine local|ray|slurm")
        return prepare_images(inputs, out, workers=workers, **settings)
    options = parse_slurm_options(slurm_option)
    return prepare_images_sharded(inputs, out, engine=engine, workers=workers, unit_records=unit_records,
                                  retries=retries, ray_address=ray_address, slurm_options=options, detach=detach,
                                  **settings)


def prepare_images_sharded(inputs: list[str], out: str | Path, *, engine: str = "local", workers: int | None = None,
                           unit_records: int = DEFAULT_UNIT_RECORDS, retries: int = 2,
                           ray_address: str | None = None, slurm_options: dict | None = None, detach: bool = False,
                           log: Callable[[str], None] | None = print, **settings) -> dict | None:
    """Prepare images into ``out`` as work units of ``unit_records`` records on ``engine`` (``local``:
    ``workers`` processes on this machine, default all cores; ``ray``: Ray tasks on the cluster at
    ``ray_address``, or a local Ray of ``workers`` CPUs; ``slurm``: an array job of at most ``workers``
    concurrent tasks, with ``slurm_options`` as ``fmforge launch slurm`` takes them); each failed unit is
    retried ``retries`` times. ``settings`` are ``prepare_images``' (``plan_images``), except its ``workers``:
    a unit decodes on its engine's share of the cores. Rerunning the same call resumes: finished units are not
    redone. Returns the index (None with ``detach``: the Slurm jobs were submitted and run on)."""
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    check_engine_args(engine, workers, retries, detach, slurm_options)
    workers = workers or default_workers(engine)
    work = plan_images(inputs, out, engine=engine, unit_records=unit_records, log=say, **settings)
    say(f"engine {engine}, {workers} workers")
    index = run_plan(work, engine=engine, workers=workers, retries=retries, ray_address=ray_address,
                     slurm_options=slurm_options, detach=detach, say=say)
    if index is None:
        return None
    e = index["engine"]
    summarize(say, Path(out), index, time.perf_counter() - start)
    say(f"  {e['units']} units ({e['unit_seconds']:.1f} unit-seconds, {e['units_wall_seconds']:.1f}s wall), merge "
        f"{e['merge_seconds']:.1f}s")
    return index
