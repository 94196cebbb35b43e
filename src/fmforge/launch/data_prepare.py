"""``fmforge data prepare --engine local|ray|slurm``: the same preparation split into work units that run in
parallel on an engine, then merged into one prepared directory that ``fmforge train`` reads as any other.
Without ``--engine`` the verb runs the single-process path of ``prepare.py``; ``data status`` shows where a
sharded preparation stands.

Steps: plan (input files → units, ``workplan.py``) → tokenizer (given, or trained on a deterministic sample,
one job) → units (``text_units.run_unit`` on the engine, each retried, a failing one reported by name) → merge
(global dedup, split, shards, manifest). Rerunning the same command resumes: finished units are not redone.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fmforge.data import text_units
from fmforge.data.augment import augment_settings
from fmforge.data.engines import ENGINES, cpu_count, import_ray, run_local, run_ray
from fmforge.data.limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_LINE_BYTES
from fmforge.data.manifest import MANIFEST, check_output_dir, load_manifest
from fmforge.data.prepare import OUR_OUTPUTS, prepare_data, remove_our_files, summarize, validate_request
from fmforge.data.sources import DocumentReader, format_counts, resolve_inputs
from fmforge.data.textcut import DEFAULT_DOCUMENT_BYTES
from fmforge.data.tokenizer import load_tokenizer
from fmforge.data.workplan import PLAN_FORMAT, PLAN_VERSION, WorkDir, plan_units
from fmforge.errors import FmforgeError, clip
from fmforge.launch import data_slurm
from fmforge.launch.common import option_words
from fmforge.lazy import resolve

DEFAULT_UNIT_BYTES = 256 << 20
DEFAULT_SAMPLE_BYTES = 1 << 30
# Settings the merge alone uses: a rerun may change them without redoing any unit.
MERGE_SETTINGS = ("allow_uneven_split", "shard_tokens", "drop_near_duplicates")


def prepare_command(inputs: list[str], out: str, *, engine: str | None = None, workers: int | None = None,
                    unit_bytes: int = DEFAULT_UNIT_BYTES, retries: int = 2,
                    tokenizer_sample_bytes: int = DEFAULT_SAMPLE_BYTES, ray_address: str | None = None,
                    slurm_option: list[str] = (), detach: bool = False, **settings) -> dict:
    """``fmforge data prepare``: one process without ``engine``, else the sharded path."""
    if engine is None:
        if workers is not None or slurm_option or ray_address or detach:
            raise FmforgeError("--workers, --ray-address, --slurm-option and --detach need --engine local|ray|slurm")
        return prepare_data(inputs, out, **settings)
    options = parse_slurm_options(slurm_option)
    return prepare_sharded(inputs, out, engine=engine, workers=workers, unit_bytes=unit_bytes, retries=retries,
                           tokenizer_sample_bytes=tokenizer_sample_bytes, ray_address=ray_address,
                           slurm_options=options, detach=detach, **settings)


def prepare_sharded(inputs: list[str], out: str | Path, *, engine: str = "local", workers: int | None = None,
                    unit_bytes: int = DEFAULT_UNIT_BYTES, retries: int = 2,
                    tokenizer_sample_bytes: int = DEFAULT_SAMPLE_BYTES, ray_address: str | None = None,
                    slurm_options: dict | None = None, detach: bool = False, tokenizer: str | None = None,
                    vocab_size: int = 8192, val_fraction: float = 0.01, text_field: str = "text",
                    shard_tokens: int = 50_000_000, overwrite: bool = False, drop_near_duplicates: bool = False,
                    max_document_bytes: int = MAX_DOCUMENT_BYTES, max_line_bytes: int = MAX_DOCUMENT_LINE_BYTES,
                    document_bytes: int = DEFAULT_DOCUMENT_BYTES, encoding_errors: str = "drop-line",
                    allow_uneven_split: bool = False, redact_pii: bool = False, augment: str | None = None,
                    augment_mode: str = "two-sided", augment_p: float | None = None, augment_seed: int = 0,
                    augment_names: bool = False, log: Callable[[str], None] | None = print) -> dict | None:
    """Prepare ``inputs`` into ``out`` as work units on ``engine`` (``local``: ``workers`` processes on this
    machine, default all cores; ``ray``: Ray tasks on the cluster at ``ray_address``, or a local Ray with
    ``workers`` CPUs; ``slurm``: an array job of at most ``workers`` concurrent tasks, with ``slurm_options``
    as ``fmforge launch slurm`` takes them). Units hold about ``unit_bytes`` of input; each failed unit is
    retried ``retries`` times. The other arguments are ``prepare_data``'s. Returns the manifest (None with
    ``detach``: the Slurm jobs were submitted and run on)."""
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    check_engine_args(engine, workers, retries, detach, slurm_options)
    if tokenizer_sample_bytes < 1:
        raise FmforgeError(f"--tokenizer-sample-bytes must be positive, got {tokenizer_sample_bytes}")
    workers = workers or default_workers(engine)
    out = Path(out)
    work = WorkDir(out)
    if overwrite:
        work.remove()
    if work.exists() and not overwrite:
        if (out / MANIFEST).exists():
            raise FmforgeError(f"{out} already holds prepared data; pass --overwrite to replace it")
    else:
        validate_request(out, tokenizer, vocab_size, val_fraction, shard_tokens, overwrite)
        if overwrite and out.is_dir():
            remove_our_files(out)
    settings = {"text_field": text_field, "val_fraction": val_fraction, "max_document_bytes": max_document_bytes,
                "max_line_bytes": max_line_bytes, "document_bytes": document_bytes,
                "encoding_errors": encoding_errors, "allow_uneven_split": allow_uneven_split,
                "drop_near_duplicates": drop_near_duplicates, "shard_tokens": shard_tokens,
                "vocab_size": vocab_size, "tokenizer": None if tokenizer is None else str(tokenizer),
                "tokenizer_sample_bytes": tokenizer_sample_bytes, "unit_bytes": unit_bytes, "redact_pii": redact_pii}
    if augment is not None:  # only when asked, so plans written before --augment existed still resume
        settings["augment"] = augment_settings(augment, augment_mode, augment_p, augment_seed, augment_names)
    DocumentReader([], text_field, max_document_bytes=max_document_bytes, max_line_bytes=max_line_bytes,
                   document_bytes=document_bytes, encoding_errors=encoding_errors)  # checks the settings
    skipped: Counter = Counter()
    files = resolve_inputs(inputs, skipped)
    units = plan_units(files, unit_bytes)
    plan = {"format": PLAN_FORMAT, "format_version": PLAN_VERSION, "kind": "text", "engine": engine,
            "inputs": [str(i) for i in inputs], "settings": settings, "skipped": dict(skipped),
            "units": [{"id": u.id, "files": u.files, "bytes": u.bytes} for u in units],
            "task": text_units.TASK, "merge": text_units.MERGE, "result": MANIFEST, "tokenizer_task": text_units.TOKENIZER_TASK}
    _start_or_resume(work, plan, say)
    total_bytes = sum(u.bytes for u in units)
    say(f"{len(files)} files ({total_bytes / 1e6:,.1f} MB) in {len(units)} units of ~{unit_bytes / 1e6:,.0f} MB"
        + (f" (skipped {format_counts(skipped)})" if skipped else "") + f"; engine {engine}, {workers} workers")
    need_tokenizer = not work.tokenizer_path.is_file()
    if need_tokenizer and tokenizer is not None:
        load_tokenizer(tokenizer).save(work.tokenizer_path)
        need_tokenizer = False
    train_tok = functools.partial(text_units.train_sample_tokenizer, str(out))
    if need_tokenizer and engine == "local":
        say(f"training a {vocab_size}-token byte-level BPE on a sample of at most "
            f"{tokenizer_sample_bytes / 1e6:,.0f} MB")
        train_tok()
        need_tokenizer = False
    manifest = run_plan(work, engine=engine, workers=workers, retries=retries, ray_address=ray_address,
                        slurm_options=slurm_options, detach=detach, first=train_tok if need_tokenizer else None,
                        say=say)
    if manifest is None:
        return None
    summarize(say, out, manifest, time.perf_counter() - start, manifest["engine"]["units_wall_seconds"],
              drop_near_duplicates)
    say(f"  {manifest['engine']['units']} units ({manifest['engine']['unit_seconds']:.1f} unit-seconds), merge "
        f"{manifest['engine']['merge_seconds']:.1f}s; removed documents listed in {out / text_units.REMOVED}")
    return manifest


def run_plan(work: WorkDir, *, engine: str, workers: int, retries: int, ray_address: str | None = None,
             slurm_options: dict | None = None, detach: bool = False, first: Callable[[], object] | None = None,
             say: Callable[[str], None] = print) -> dict | None:
    """Run a created plan's pending units on ``engine``, then its merge; any kind of data (the plan names its
    ``task`` and ``merge`` functions). ``first``: a job to run before the units (the tokenizer); on Slurm, the
    plan's ``tokenizer_task`` runs as its own job when ``first`` is given. Returns what the merge returns
    (None when detached); units that failed every retry end in one error naming them."""
    plan = work.plan()
    out = str(work.out)
    progress = Progress(work, say)
    if engine == "slurm":
        jobs = data_slurm.submit(out, work, workers=workers, retries=retries, options=slurm_options,
                                    need_tokenizer=first is not None, echo=say)
        if detach:
            say(f"detached: follow it with `fmforge data status {out}`")
            return None
        data_slurm.wait(work, jobs, progress.tick)
        result = work.merged()
        if result is None:
            if first is not None and not work.tokenizer_path.is_file():
                raise FmforgeError(f"the tokenizer job failed: {data_slurm.last_error(work, 'tok')}")
            _raise_failures(work)
            raise FmforgeError(f"the merge job failed: {data_slurm.last_error(work, 'merge')}")
        return result
    pending = work.pending()
    work.clear_staging()
    kwargs = {"workers": workers, "retries": retries, "on_done": progress.done, "on_failed": progress.failed}
    if engine == "local":
        if first is not None:
            first()
        failures = run_local(out, pending, plan["task"], **kwargs)
    else:
        failures = run_ray(out, pending, plan["task"], address=ray_address, first=first, **kwargs)
    if failures:
        _raise_failures(work)
    say(f"merging {len(plan['units'])} units")
    return resolve(plan["merge"])(out, log=say)


def parse_slurm_options(items: list[str]) -> dict[str, str]:
    """``--slurm-option KEY=VALUE`` words as a dict (checked later against launch slurm's table)."""
    return option_words(items, "--slurm-option")


def check_engine_args(engine: str, workers: int | None, retries: int, detach: bool, slurm_options: dict | None) -> None:
    """The engine settings every sharded preparation takes, checked before any work."""
    if engine not in ENGINES:
        raise FmforgeError(f"unknown engine {clip(engine)}; choose one of {', '.join(ENGINES)}")
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise FmforgeError(f"--workers must be at least 1, got {workers}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise FmforgeError(f"--retries must be 0 or more, got {retries!r}")
    if detach and engine != "slurm":
        raise FmforgeError("--detach applies to --engine slurm only (the other engines run in this process)")
    if engine == "ray":
        import_ray()
    if engine == "slurm":
        data_slurm.slurm_options(slurm_options)


def default_workers(engine: str) -> int:
    return cpu_count() if engine != "slurm" else 16


def _start_or_resume(work: WorkDir, plan: dict, say: Callable[[str], None]) -> None:
    if not work.exists():
        check_output_dir(work.out, MANIFEST, OUR_OUTPUTS, "prepared data", False)
        work.create(plan)
        return
    old = work.plan()
    same = {k: v for k, v in plan["settings"].items() if k not in MERGE_SETTINGS}
    before = {k: v for k, v in old["settings"].items() if k not in MERGE_SETTINGS}
    if (old["kind"], old["units"], before) != (plan["kind"], plan["units"], same):
        changed = sorted(k for k in set(same) | set(before) if same.get(k) != before.get(k))
        what = f"settings {', '.join(changed)}" if changed else "input files"
        raise FmforgeError(f"{work.out} holds an unfinished preparation of other {what}; run the same command to "
                           "resume it, or pass --overwrite to start over")
    done = len(old["units"]) - len(work.pending())
    say(f"resuming {work.out}: {done} of {len(old['units'])} units already done (not redone)")
    work.create({**old, "settings": {**old["settings"], **{k: plan["settings"][k] for k in MERGE_SETTINGS}},
                 "engine": plan["engine"]})


def _raise_failures(work: WorkDir) -> None:
    failures = work.failures()
    pending = work.pending()
    if not pending:
        return
    named = "; ".join(f"{u}: {failures[u].removeprefix(u + ': ')}" if u in failures else f"{u}: did not run"
                      for u in pending[:5])
    raise FmforgeError(f"{len(pending)} of {len(work.units())} units failed after their retries ({named}"
                       f"{'; ...' if len(pending) > 5 else ''}); the others are kept: run the same command again "
                       f"to retry only these (logs in {work.logs_dir})")


class Progress:
    """Units done / total, tokens/s and an ETA (by input bytes), one line per finished unit (at most one
    every 2 s when units are many)."""

    def __init__(self, work: WorkDir, say: Callable[[str], None]):
        self.work, self.say = work, say
        self.units = {u.id: u.bytes for u in work.units()}
        self.start = time.perf_counter()
        self.done_here: dict[str, dict] = {}
        self.already = {u for u in self.units if work.is_done(u)}
        self.last = 0.0
        self.failed_units: set[str] = set()

    def line(self) -> str:
        done = self.already | set(self.done_here)
        elapsed = time.perf_counter() - self.start
        amount, what = produced(self.done_here.values(), self.work.plan()["kind"])
        done_bytes = sum(self.units[u] for u in self.done_here)
        left = sum(b for u, b in self.units.items() if u not in done)
        eta = left * elapsed / done_bytes if done_bytes else None
        eta_text = f"ETA {_clock(eta)}" if eta is not None else "ETA -"
        failed = f", {len(self.failed_units)} failed" if self.failed_units else ""
        return (f"units {len(done)}/{len(self.units)}{failed} · {amount / max(elapsed, 1e-9):,.0f} {what}/s · "
                f"{_clock(elapsed)} elapsed · {eta_text}")

    def done(self, unit: str, stats: dict) -> None:
        self.done_here[unit] = stats
        self.failed_units.discard(unit)
        now = time.perf_counter()
        if len(self.units) <= 50 or now - self.last >= 2 or len(self.done_here) + len(self.already) == len(self.units):
            self.last = now
            self.say(self.line())

    def failed(self, unit: str, error: str, final: bool) -> None:
        if final:
            self.failed_units.add(unit)
        self.say(f"{'FAILED' if final else 'retrying'} {error}")

    def tick(self) -> None:
        """Scheduler engines: read progress from the units' directories."""
        for u in self.units:
            if u not in self.done_here and u not in self.already and self.work.is_done(u):
                self.done(u, self.work.done_stats(u))


def produced(stats, kind: str) -> tuple[int, str]:
    """What finished units produced: tokens (text) or written samples (images)."""
    if kind == "text":
        return sum(st.get("tokens", 0) for st in stats), "tokens"
    return sum(sum(st.get("written", {}).values()) for st in stats), "samples"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def status(data_dir: str, log: Callable[[str], None] | None = print) -> dict:
    """``fmforge data status``: a prepared directory's state, and for a sharded preparation each unit's."""
    say = log or (lambda _msg: None)
    out = Path(data_dir)
    work = WorkDir(out)
    if not work.exists():
        complete = (out / MANIFEST).is_file()
        if not complete:
            raise FmforgeError(f"{out} holds neither prepared data nor a sharded preparation")
        m = load_manifest(out)
        say(f"{out}: complete ({m.get('created', '?')}), {m['tokens']['train']:,} train + {m['tokens']['val']:,} val "
            f"tokens in {len(m['shards'])} shards")
        return {"complete": True, "units": None}
    plan = work.plan()
    complete = work.merged() is not None
    units = work.units()
    done = [u.id for u in units if work.is_done(u.id)]
    failures = work.failures()
    tokens, what = produced([work.done_stats(u) for u in done], plan["kind"])
    state = "complete" if complete else ("units done, merge pending" if len(done) == len(units) else "in progress")
    say(f"{out}: {state} · engine {plan['engine']} · units {len(done)}/{len(units)} done, {len(failures)} failed, "
        f"{len(units) - len(done) - len(failures)} to run · {tokens:,} {what} so far")
    for unit, error in failures.items():
        say(f"  FAILED {error if error.startswith(unit) else f'{unit}: {error}'} (log {work.log_path(unit)})")
    jobs = data_slurm.recorded_jobs(work)
    if jobs:
        say(f"  slurm jobs: {', '.join(f'{k} {v}' for k, v in jobs.items() if k in ('tokenizer', 'units', 'merge'))}")
    return {"complete": complete, "units": len(units), "done": done, "failed": failures, "tokens": tokens,
            "engine": plan["engine"]}
