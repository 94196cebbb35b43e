"""The work directory of a sharded preparation (``--engine``): the plan, and what each unit has done.

``OUT/.fmforge-work/`` holds

- ``plan.json``: the settings, the input files, and the work units (consecutive runs of the input files, in
  input order, about ``unit_bytes`` of stored input each; a larger file is a unit of its own). The units are a
  function of the inputs and ``unit_bytes`` only, never of the number of workers or the engine, so any
  division of the work produces the same units and the same output;
- ``tokenizer.json``: the tokenizer every unit encodes with (given, or trained on a sample first);
- ``units/UNIT/``: a finished unit, made under a temporary name and renamed in one step, so a unit directory
  is complete or absent; ``units/UNIT.failed.json`` records a unit's last failure;
- ``logs/UNIT.log``: each unit's log (every attempt appends); ``jobs.json``: scheduler job ids.

A rerun with the same inputs and settings resumes: finished units are never redone. Everything here is
fmforge's own; ``--overwrite`` removes the directory only when its plan says so.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from fmforge.data.limits import MAX_DESCRIPTION_BYTES
from fmforge.data.manifest import write_json_atomic
from fmforge.errors import FmforgeError, clip
from fmforge.io import fs as remote
from fmforge.io.bounded import read_json_object

WORK = ".fmforge-work"
PLAN = "plan.json"
PLAN_FORMAT = "fmforge-prepare-plan"
PLAN_VERSION = 1
DONE = "unit.json"
UNIT_PREFIX = "u"
RESULTS = ("manifest.json", "index.json")


@dataclass(frozen=True)
class Unit:
    id: str
    files: list[str]
    bytes: int


def unit_name(i: int) -> str:
    return f"{UNIT_PREFIX}{i:05d}"


def plan_units(files: list[Path | str], unit_bytes: int) -> list[Unit]:
    """Consecutive runs of ``files`` of about ``unit_bytes`` stored bytes each (at least one file per unit)."""
    if isinstance(unit_bytes, bool) or not isinstance(unit_bytes, int) or unit_bytes < 1:
        raise FmforgeError(f"unit_bytes must be a positive integer, got {unit_bytes!r}")
    units: list[Unit] = []
    group: list[str] = []
    size = 0
    for f in files:
        n = _size(f)
        if group and size + n > unit_bytes:
            units.append(Unit(unit_name(len(units)), group, size))
            group, size = [], 0
        group.append(str(f))
        size += n
    if group:
        units.append(Unit(unit_name(len(units)), group, size))
    return units


def _size(f: Path | str) -> int:
    if isinstance(f, str) and remote.is_remote(f):
        with remote.errors(f, "read the size of"):
            return int(remote.filesystem(f).size(f) or 0)
    try:
        return os.path.getsize(f)
    except OSError as err:
        raise FmforgeError(f"cannot read {f}: {err.strerror or err}") from None


class WorkDir:
    """``OUT/.fmforge-work``: paths, the plan, and the state of each unit."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / WORK
        self.units_dir = self.path / "units"
        self.logs_dir = self.path / "logs"
        self._plan: dict | None = None

    # ---- the plan ------------------------------------------------------------------------------------
    @property
    def plan_path(self) -> Path:
        return self.path / PLAN

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def exists(self) -> bool:
        return self.plan_path.is_file()

    def plan(self) -> dict:
        if self._plan is None:
            self._plan = read_plan(self.plan_path)
        return self._plan

    def units(self) -> list[Unit]:
        return [Unit(u["id"], list(u["files"]), int(u["bytes"])) for u in self.plan()["units"]]

    def unit(self, unit_id: str) -> Unit:
        for u in self.units():
            if u.id == unit_id:
                return u
        raise FmforgeError(f"{self.plan_path} has no unit {clip(unit_id)}")

    def merged(self) -> dict | None:
        """What the merge wrote (the plan's ``result``: manifest.json or index.json), or None before it."""
        name = self.plan().get("result")
        if name not in RESULTS:
            raise FmforgeError(f"{self.plan_path} is damaged: result {clip(repr(name))} is not one of {RESULTS}")
        path = self.out / name
        return read_small_json(path) if path.is_file() else None

    def create(self, plan: dict) -> None:
        """Write a new plan (the directory must not hold one)."""
        for d in (self.path, self.units_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.plan_path, plan, indent=1)
        self._plan = plan

    def remove(self) -> None:
        """Delete the work directory: only when its plan shows it is ours."""
        if self.path.is_dir():
            if not self.exists():
                raise FmforgeError(f"{self.path} exists but holds no fmforge plan: remove it yourself")
            read_plan(self.plan_path)  # raises unless it is ours
            shutil.rmtree(self.path)
        self._plan = None

    # ---- units ---------------------------------------------------------------------------------------
    def unit_dir(self, unit_id: str) -> Path:
        return self.units_dir / unit_id

    def failed_path(self, unit_id: str) -> Path:
        return self.units_dir / f"{unit_id}.failed.json"

    def log_path(self, unit_id: str) -> Path:
        return self.logs_dir / f"{unit_id}.log"

    def is_done(self, unit_id: str) -> bool:
        return (self.unit_dir(unit_id) / DONE).is_file()

    def done_stats(self, unit_id: str) -> dict:
        return read_small_json(self.unit_dir(unit_id) / DONE)

    def pending(self) -> list[str]:
        return [u.id for u in self.units() if not self.is_done(u.id)]

    def failures(self) -> dict[str, str]:
        """Units whose last attempt failed and that have not finished since: {unit: error}."""
        out = {}
        for u in self.units():
            path = self.failed_path(u.id)
            if path.is_file() and not self.is_done(u.id):
                try:
                    out[u.id] = str(read_small_json(path).get("error", "failed"))
                except FmforgeError:
                    out[u.id] = "failed (its failure record is unreadable)"
        return out

    def require_done(self, verb: str) -> None:
        """Before a merge: every unit finished, else one error naming the first missing ones and their errors."""
        missing = self.pending()
        if missing:
            failures = self.failures()
            named = ", ".join(f"{u} ({failures[u]})" if u in failures else u for u in missing[:5])
            raise FmforgeError(f"{len(missing)} of {len(self.units())} units are not done: {named}"
                               f"{' ...' if len(missing) > 5 else ''}; run the same `fmforge {verb}` again to "
                               f"retry them (logs: {self.logs_dir})")

    def staging_dir(self, unit_id: str) -> Path:
        """A fresh private directory to build ``unit_id`` in before ``commit``."""
        d = self.units_dir / f".{unit_id}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        d.mkdir(parents=True)
        return d

    def commit(self, unit_id: str, staged: Path) -> bool:
        """Rename the staged directory into place; False when another attempt finished the unit first
        (a requeued or duplicated task), in which case the staged copy is dropped."""
        try:
            os.rename(staged, self.unit_dir(unit_id))
        except OSError:
            if self.is_done(unit_id):
                shutil.rmtree(staged, ignore_errors=True)
                return False
            raise
        self.failed_path(unit_id).unlink(missing_ok=True)
        return True

    def clear_staging(self) -> None:
        """Leftovers of killed attempts (``.UNIT.tmp-*``)."""
        if self.units_dir.is_dir():
            for p in self.units_dir.iterdir():
                if p.name.startswith(".") and ".tmp-" in p.name and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)


def run_logged(work: WorkDir, unit_id: str, attempt: int, fn) -> dict:
    """Run ``fn()`` for one unit with its start, result or traceback appended to the unit's log; a failure
    writes the unit's failure record and raises a one-line ``UnitFailed``."""
    log = work.log_path(unit_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"[{stamp}] {unit_id} attempt {attempt} on {os.uname().nodename} pid {os.getpid()}\n")
    start = time.perf_counter()
    try:
        stats = fn()
    except Exception as err:  # noqa: BLE001 - recorded with its traceback, then reported by unit name
        error = clip(f"{type(err).__name__}: {err}" if not isinstance(err, FmforgeError) else str(err), 300)
        with open(log, "a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        write_json_atomic(work.failed_path(unit_id), {"unit": unit_id, "attempt": attempt, "error": error,
                                                      "log": str(log)}, indent=1)
        raise UnitFailed(f"{unit_id}: {error}") from None
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {unit_id} done in {time.perf_counter() - start:.1f}s: "
                f"{json.dumps({k: v for k, v in stats.items() if isinstance(v, (int, float, str))})}\n")
    return stats


class UnitFailed(FmforgeError):
    """One unit's attempt failed (its log holds the traceback)."""


def read_small_json(path: Path) -> dict:
    return read_json_object(path, MAX_DESCRIPTION_BYTES)


def read_plan(path: Path) -> dict:
    plan = read_small_json(path)
    if plan.get("format") != PLAN_FORMAT:
        raise FmforgeError(f"{path} is not an fmforge preparation plan")
    if not isinstance(plan.get("format_version"), int) or plan["format_version"] > PLAN_VERSION:
        raise FmforgeError(f"{path} has plan version {plan.get('format_version')!r}; this fmforge reads up to "
                           f"{PLAN_VERSION}")
    units = plan.get("units")
    if not isinstance(units, list) or not all(isinstance(u, dict) and isinstance(u.get("id"), str)
                                              and u["id"].startswith(UNIT_PREFIX) and u["id"][1:].isdigit()
                                              and isinstance(u.get("files"), list) for u in units):
        raise FmforgeError(f"{path} is damaged: its units are not a list of {{id, files, bytes}}")
    return plan
