"""Where the units of a sharded preparation run: processes on this machine, or Ray tasks on a cluster.
(Slurm array jobs: ``data_slurm.py``.) Never a scheduler of our own: ``concurrent.futures`` and Ray do
the scheduling; fmforge only says which units are left and records what happened.

Every engine runs ``execute(out, unit, task)``: the unit's task function, its log, its failure record.
A failed unit is retried up to ``retries`` times, then reported by name; the other units go on.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from fmforge.data.manifest import write_json_atomic
from fmforge.data.workplan import UnitFailed, WorkDir, read_small_json, run_logged
from fmforge.errors import FmforgeError, clip
from fmforge.lazy import resolve

ENGINES = ("local", "ray", "slurm")
RAY_HINT = "the ray engine needs Ray: pip install 'fmforge[ray]'"

OnDone = Callable[[str, dict], None]
OnFailed = Callable[[str, str, bool], None]  # unit, error, final (no retry left)


def next_attempt(work: WorkDir, unit_id: str) -> int:
    """1 + the attempt number of the unit's last recorded failure (attempts count across reruns)."""
    path = work.failed_path(unit_id)
    if path.is_file():
        try:
            return int(read_small_json(path).get("attempt", 0)) + 1
        except (FmforgeError, TypeError, ValueError):
            return 2
    return 1


def execute(out: str, unit_id: str, task: str) -> dict:
    """Run one unit's ``task`` ("module:function" taking (out, unit_id)) with its log and failure record."""
    work = WorkDir(out)
    return run_logged(work, unit_id, next_attempt(work, unit_id), lambda: resolve(task)(out, unit_id))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init_worker(threads: int) -> None:
    # Each worker's Rust tokenizer and BLAS use its share of the cores, not all of them (oversubscription).
    # With one core each, the tokenizer encodes on the calling thread: its thread pool, even of size 1, costs
    # 9% of the throughput of two workers on two cores (benchmarks/prepare_scaling.py).
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def run_local(out: str, units: list[str], task: str, *, workers: int, retries: int, on_done: OnDone,
              on_failed: OnFailed) -> dict[str, str]:
    """``workers`` processes (spawned: no state inherited from this one). Returns {unit: error} of the units
    that failed every attempt. A worker that dies (killed, out of memory) costs its unit one attempt."""
    work = WorkDir(out)
    if workers == 1:
        return _run_here(out, units, task, retries, on_done, on_failed)
    threads = max(1, cpu_count() // workers)
    ctx = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,))

    pool = new_pool()
    queue, running, tries, failures = list(units), {}, {u: 0 for u in units}, {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                unit = queue.pop(0)
                tries[unit] += 1
                running[pool.submit(execute, out, unit, task)] = unit
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in finished:
                unit = running.pop(future)
                try:
                    on_done(unit, future.result())
                    continue
                except BrokenProcessPool:
                    broken = True
                    error = f"{unit}: its worker process died (killed, or out of memory)"
                    write_json_atomic(work.failed_path(unit), {"unit": unit, "attempt": next_attempt(work, unit),
                                                               "error": error, "log": str(work.log_path(unit))},
                                      indent=1)
                except UnitFailed as err:
                    error = str(err)
                final = tries[unit] > retries
                on_failed(unit, error, final)
                if final:
                    failures[unit] = error
                else:
                    queue.append(unit)
            if broken:  # every other running unit's future fails too: they come back here as failures
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failures


def _run_here(out: str, units: list[str], task: str, retries: int, on_done: OnDone,
              on_failed: OnFailed) -> dict[str, str]:
    """One worker: the units one after another in this process (no pool to start)."""
    failures = {}
    for unit in units:
        for attempt in range(1 + retries):
            try:
                on_done(unit, execute(out, unit, task))
                break
            except UnitFailed as err:
                final = attempt == retries
                on_failed(unit, str(err), final)
                if final:
                    failures[unit] = str(err)
    return failures


def import_ray():
    try:
        import ray
    except ImportError:
        raise FmforgeError(RAY_HINT) from None
    return ray


def run_ray(out: str, units: list[str], task: str, *, workers: int, retries: int, address: str | None,
            on_done: OnDone, on_failed: OnFailed, first: Callable[[], None] | None = None) -> dict[str, str]:
    """Ray tasks (one CPU each) on the cluster at ``address`` (``auto``: the one this machine belongs to), or
    on a local Ray started for this run with ``workers`` CPUs and stopped after it. Ray retries a failed
    task ``retries`` times. The output directory must be on a filesystem every Ray node sees. ``first``
    runs as one Ray task before the units (the tokenizer job)."""
    ray = import_ray()
    started = False
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if not ray.is_initialized():
        kwargs = {"num_cpus": workers} if address is None else {"address": address}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise FmforgeError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                               f"{clip(str(err).splitlines()[0] if str(err) else type(err).__name__)}") from None
        started = True
    try:
        if first is not None:
            ray.get(ray.remote(num_cpus=1)(first).remote())
        remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=True)(execute)
        pending = {remote.remote(out, unit, task): unit for unit in units}
        failures = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ready[0])
            try:
                on_done(unit, ray.get(ready[0]))
            except ray.exceptions.RayError as err:
                cause = getattr(err, "cause", None)
                error = str(cause) if isinstance(cause, FmforgeError) else f"{unit}: {clip(str(err), 300)}"
                failures[unit] = error
                on_failed(unit, error, True)
        return failures
    finally:
        if started:
            ray.shutdown()
            # ray.init leaves a SIGTERM handler that calls sys.exit: the caller gets its own back (a process
            # forked later, such as data profile's workers, would otherwise inherit it)
            with contextlib.suppress(ValueError):  # not the main thread: Ray set none
                for sig, handler in handlers.items():
                    if handler is not None:  # None: set outside Python, not ours to put back
                        signal.signal(sig, handler)
