"""``fmforge pipeline run``: schedule the steps, reuse cached ones, run the rest, record state and lineage.

Steps wait for the steps they reference or ``depends_on``; ready steps start at once, at most ``workers`` at a
time. A verb step's directory is ``OUT/steps/NAME/`` (``out/`` is its ``${out}``, with ``stdout.txt``,
``log.txt``, ``rc``); its key (``resolve.step_key``) is recorded with the content of its outputs, and a later
run whose key matches and whose recorded outputs are intact reuses it. A step interrupted with the same key
keeps its directory and, when its verb takes ``--resume``, continues from its own checkpoints
(``--resume auto``); otherwise the directory is cleared first. A failed step stops its dependants; branches
that do not depend on it finish.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fmforge.errors import FmforgeError
from fmforge.pipeline import verbs as verb_table
from fmforge.pipeline.backends import BACKENDS
from fmforge.pipeline.progress import StepView, live_table, transition_line
from fmforge.pipeline.registry import APPROVED, Registry, beats
from fmforge.pipeline.resolve import MissingValue, Scope, compare, external_inputs, step_key
from fmforge.pipeline.spec import Pipeline, Step
from fmforge.pipeline.state import STATE_FILE, State, file_manifest, manifest_hash, still_matches
from fmforge.runs import read_small_json

MARKER = ".fmforge-step"
MAX_OUTPUT_JSON = 16 << 20
DONE_OK = ("succeeded", "reused")
FINAL = ("succeeded", "reused", "failed", "skipped", "stopped")


class StepFailed(Exception):
    pass


def claim_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FmforgeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE_FILE).is_file():
        raise FmforgeError(f"--out {out} is not empty and holds no pipeline state; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


class Runner:
    def __init__(self, pipe: Pipeline, out: Path, *, workers: int = 2, backend: str = "local",
                 use_cache: bool = True, registry: str | None = None, slurm_options: dict | None = None,
                 mlflow=None, echo=print, console=None):
        self.pipe, self.out, self.workers, self.use_cache, self.echo = pipe, out, max(1, workers), use_cache, echo
        self.console = console  # a terminal's rich Console: a live table instead of one line per state change
        self.live = False
        self.backend = BACKENDS[backend](slurm_options)
        self.registry_path = registry
        self.mlflow = mlflow
        self.scope = Scope(pipe, out)
        self.cwd = pipe.path.resolve().parent  # relative paths in a pipeline are relative to its file
        self.status: dict[str, str] = {name: "pending" for name in pipe.order}
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.notes: dict[str, str] = {}  # why a step failed or was stopped
        self.handles: dict[str, Any] = {}
        self.prepared: dict[str, tuple] = {}  # ready step -> (key, inputs, args, argv), waiting for a worker
        self.pending_keys: dict[str, tuple] = {}  # running step -> (key, inputs, resolved args)
        self.errors: dict[str, str] = {}
        self.branch: dict[str, bool] = {}
        self.t0 = time.time()

    # ------------------------------------------------------------------------------------------ the loop

    def run(self) -> dict:
        claim_out(self.out)
        lock = open(self.out / ".pipeline.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FmforgeError(f"another `fmforge pipeline run` is using {self.out}") from None
        self.state = State(self.out)
        self.run_id = self.state.new_run(self.pipe.name, self.pipe.params)
        self.echo(f"pipeline {self.pipe.name}: {len(self.pipe.order)} steps, run {self.run_id}, "
                  f"backend {self.backend.name}, state {self.state.path}")
        try:
            with live_table(self.console, self.snapshot, f"pipeline {self.pipe.name}, run {self.run_id}") as live:
                self.live = live
                self._loop()
        except MissingValue:
            # a mistake in the file, like those validation finds: stop as for them, the step left unrecorded
            self.backend.stop()
            self.state.finish_run(self.run_id, "invalid")
            self.state.close()
            raise
        except BaseException:
            self.backend.stop()
            self.state.finish_run(self.run_id, "interrupted")
            raise
        finally:
            lock.close()
        failed = [n for n, s in self.status.items() if s == "failed"]
        status = "failed" if failed else "succeeded"
        self.state.finish_run(self.run_id, status)
        self.state.close()
        return {"run": self.run_id, "status": status, "steps": dict(self.status), "errors": dict(self.errors),
                "seconds": time.time() - self.t0, "out": str(self.out)}

    def _loop(self) -> None:
        while any(s not in FINAL for s in self.status.values()):
            progressed = self._poll_running()
            for name in self.pipe.order:
                if self.status[name] == "pending":
                    progressed |= self._advance(self.pipe.steps[name])
            if not progressed:
                time.sleep(0.1)

    def snapshot(self) -> list[StepView]:
        """Every step's state and timing now, in the pipeline's order (read by the live table's thread)."""
        return [StepView(name, self.status[name], self.started.get(name), self.finished.get(name),
                         self.notes.get(name, "")) for name in self.pipe.order]

    def _set(self, name: str, status: str, **kw) -> None:
        self.state.set_step(self.run_id, name, status, upstream=sorted(self.pipe.steps[name].upstream), **kw)
        now = time.time()
        if status == "running" or (status in ("succeeded", "failed") and name not in self.started):
            self.started[name] = now  # a condition, register or fail step takes no time to speak of
        if status in FINAL:
            self.finished[name] = now
        if kw.get("error"):
            self.notes[name] = kw["error"]
        self.status[name] = status
        if not self.live:
            counts: dict[str, int] = {}
            for state in self.status.values():
                counts[state] = counts.get(state, 0) + 1
            self.echo(transition_line(name, status, now - self.t0, counts, kw.get("error") or ""))

    def _advance(self, step: Step) -> bool:
        deps = {d: self.status[d] for d in step.upstream}
        bad = [d for d, s in deps.items() if s in ("failed", "stopped")]
        if bad:
            self._set(step.name, "stopped", error=f"upstream step {bad[0]} did not succeed")
            return True
        gate = self.pipe.gated_by.get(step.name)
        if (gate and gate[0] in self.branch and self.branch[gate[0]] != gate[1]) \
                or any(s == "skipped" for s in deps.values()):
            self._set(step.name, "skipped")
            return True
        running = sum(1 for s in self.status.values() if s == "running")
        if all(s in DONE_OK for s in deps.values()):
            if step.kind == "verb" and running >= self.workers and not self._try_reuse(step):
                return False
            if self.status[step.name] == "pending":
                self._start(step)
            return True
        early = (self.backend.chains and step.kind == "verb" and not gate
                 and all(s in DONE_OK or (s == "running" and d not in step.value_refs) for d, s in deps.items()))
        if early:
            self._start(step, after=[d for d, s in deps.items() if s == "running"])
            return True
        return False

    def _start(self, step: Step, after: list[str] | None = None) -> None:
        try:
            if step.kind == "verb":
                self._start_verb(step, after or [])
            elif step.kind == "condition":
                self._condition(step)
            elif step.kind == "register":
                self._register(step)
            else:
                used: dict = {}
                message = self.scope.resolve(step.message, step, f"steps.{step.name}.fail", used)
                self._set(step.name, "failed", error=str(message))
                self.errors[step.name] = str(message)
        except MissingValue:
            raise
        except (FmforgeError, StepFailed) as err:
            self.errors[step.name] = str(err)
            self._set(step.name, "failed", error=str(err))

    # ------------------------------------------------------------------------------------------ verb steps

    def _args(self, step: Step) -> tuple[dict, dict]:
        used: dict = {}
        args = self.scope.resolve(step.args, step, f"steps.{step.name}.args", used)
        schema = verb_table.schema(step.verb, f"steps.{step.name}")
        for key, value in args.items():
            verb_table.check_value(schema.action(str(key)), value, f"steps.{step.name}.args.{key}")
        if verb_table.accepts(schema, "resume") and not any(schema.action(str(k)).dest == "resume" for k in args):
            args["resume"] = "auto"  # an interrupted attempt continues from its own checkpoints
        return args, used

    def _prepare(self, step: Step) -> tuple[str, dict, dict, list[str]]:
        args, used = self._args(step)
        inputs = dict(used)
        inputs.update(external_inputs(args, used, self.cwd, self.out))
        argv = verb_table.to_argv(verb_table.schema(step.verb, step.name), args)
        return step_key("verb", argv, inputs), inputs, args, argv

    def _start_verb(self, step: Step, after: list[str]) -> None:
        if after:  # upstream not finished: the key and the cache wait until the step is done
            self._preview_paths(step)
            key, inputs, argv = None, {}, None
            args, _ = self._args(step)
        else:
            key, inputs, args, argv = self.prepared.pop(step.name, None) or self._prepare(step)
            if self._reuse(step, key):
                return
        step_dir = self.out / "steps" / step.name
        self._fresh_dir(step, step_dir, key)
        if argv is None:
            argv = verb_table.to_argv(verb_table.schema(step.verb, step.name), args)
        self.pending_keys[step.name] = (key, inputs, args)
        self.handles[step.name] = self.backend.start(step.name, step_dir, self.cwd, argv, after)
        self._set(step.name, "running", key=key)

    def _try_reuse(self, step: Step) -> bool:
        """While every worker is busy, a step whose inputs are ready may still be reused from the cache."""
        if step.name in self.prepared:
            return False
        try:
            self.prepared[step.name] = self._prepare(step)
        except MissingValue:
            raise
        except FmforgeError:
            return False  # reported when the step starts
        if self._reuse(step, self.prepared[step.name][0]):
            del self.prepared[step.name]
            return True
        return False

    def _fresh_dir(self, step: Step, step_dir: Path, key: str | None) -> None:
        attempt = step_dir / "attempt.json"
        earlier = read_small_json(attempt) if attempt.is_file() and not attempt.is_symlink() else {}
        # only an interrupted attempt of a verb that resumes keeps its directory; anything else starts clean
        same = (key is not None and earlier.get("key") == key and not earlier.get("finished")
                and verb_table.accepts(verb_table.schema(step.verb, step.name), "resume"))
        if step_dir.exists() and not same:
            if not (step_dir / MARKER).is_file():
                raise FmforgeError(f"{step_dir} exists and was not made by fmforge pipeline; move it away")
            shutil.rmtree(step_dir)
        (step_dir / "out").mkdir(parents=True, exist_ok=True)
        (step_dir / MARKER).write_text("made by fmforge pipeline run; the next run may replace it\n")
        attempt.write_text(json.dumps({"key": key, "started": time.time()}))
        for name in ("rc", "stdout.txt"):
            (step_dir / name).unlink(missing_ok=True)
        if same:
            self.echo(f"            {step.name:<16} resuming an interrupted attempt in {step_dir}")

    def _reuse(self, step: Step, key: str) -> bool:
        if not (self.use_cache and step.cache):
            return False
        hit = self.state.cached(key, step.cache_expire_s)
        if hit is None:
            return False
        for name, (path, manifest) in hit["files"].items():
            if not still_matches(Path(path), manifest):
                self.echo(f"            {step.name:<16} cached output {name} changed since it was made: re-running")
                return False
        self.scope.values[step.name] = hit["outputs"]
        self.scope.hashes[step.name] = {n: manifest_hash(m) for n, (_, m) in hit["files"].items()}
        self._set(step.name, "reused", key=key, reused=True, outputs=hit["outputs"])
        return True

    def _poll_running(self) -> bool:
        progressed = False
        for name, handle in list(self.handles.items()):
            step_dir = self.out / "steps" / name
            rc = self.backend.poll(handle, step_dir)
            if rc is None:
                continue
            del self.handles[name]
            progressed = True
            try:
                if rc != 0:
                    raise StepFailed(rc if isinstance(rc, str) else _last_error(step_dir, rc))
                self._finish(self.pipe.steps[name], step_dir)
            except (StepFailed, FmforgeError) as err:
                self.errors[name] = str(err)
                self._set(name, "failed", error=str(err))
        return progressed

    def _finish(self, step: Step, step_dir: Path) -> None:
        key, inputs, args = self.pending_keys.pop(step.name)
        if key is None:  # a chained (Slurm) step: its inputs are final now
            key, inputs, args, _ = self._prepare(step)
        values, files = {}, {}
        for name, output in step.outputs.items():
            if output.kind in ("stdout", "text"):
                path = step_dir / "stdout.txt"
                values[name] = (_read_json(path, f"steps.{step.name}.outputs.{name} (the verb's stdout)")
                                if output.kind == "stdout" else _read_text(path))
            else:
                used: dict = {}
                path = (self.cwd / self.scope.resolve(output.path, step, f"steps.{step.name}.outputs.{name}", used)).resolve()
                if not path.exists():
                    raise StepFailed(f"declared output {name} ({path}) was not written")
                values[name] = str(path) if output.kind == "path" else _read_json(path, f"output {name}")
            files[name] = (str(path), file_manifest(path))
        self.scope.values[step.name] = values
        self.scope.hashes[step.name] = {n: manifest_hash(m) for n, (_, m) in files.items()}
        (step_dir / "attempt.json").write_text(json.dumps({"key": key, "finished": time.time()}))
        if step.cache:
            self.state.remember(key, step.name, values, files)
        self.state.record_lineage(self.run_id, step.name, [(p, h, k) for p, (h, k) in inputs.items()],
                                  [(p, manifest_hash(m), step.outputs[n].kind) for n, (p, m) in files.items()])
        if self.mlflow is not None:
            self.mlflow.log_step(step, args, values, step_dir)
        self._set(step.name, "succeeded", key=key, outputs=values)

    def _preview_paths(self, step: Step) -> None:
        """Chained submission: path outputs of upstream steps still running are known before they finish."""
        for dep in step.upstream:
            if self.status[dep] == "running" and dep not in self.scope.values:
                upstream = self.pipe.steps[dep]
                self.scope.values[dep] = {
                    name: str((self.cwd / self.scope.resolve(out.path, upstream, "", {})).resolve())
                    for name, out in upstream.outputs.items() if out.kind == "path"}
                self.scope.hashes[dep] = {name: "pending" for name in self.scope.values[dep]}

    # ------------------------------------------------------------------------------------------ other steps

    def _condition(self, step: Step) -> None:
        where = f"steps.{step.name}.condition"
        holds = True
        for i, cond in enumerate(step.conditions):
            used: dict = {}
            left = self.scope.resolve(cond["left"], step, f"{where}[{i}].left", used)
            right = self.scope.resolve(cond["right"], step, f"{where}[{i}].right", used)
            ok = compare(left, cond["op"], right, f"{where}[{i}]")
            self.echo(f"            {step.name:<16} {left!r} {cond['op']} {right!r}: {ok}")
            holds = holds and ok
        self.branch[step.name] = holds
        self.scope.values[step.name] = {"result": holds}
        self._set(step.name, "succeeded", outputs={"result": holds})

    def _register(self, step: Step) -> None:
        used: dict = {}
        spec = self.scope.resolve(step.register, step, f"steps.{step.name}.register", used)
        metrics = spec.get("metrics") or {}
        if isinstance(metrics, str):
            metrics = read_small_json(self.cwd / metrics)
        if not isinstance(metrics, dict):
            raise StepFailed(f"steps.{step.name}.register.metrics: a JSON object or a JSON file")
        model = (self.cwd / str(spec["model"])).resolve()
        inputs = dict(used)
        if str(model) not in inputs:
            inputs[str(model)] = (manifest_hash(file_manifest(model)), "artifact")
        key = step_key("register", {**spec, "metrics": metrics, "registry": str(self.registry_path)}, inputs)
        hit = self.state.cached(key, step.cache_expire_s) if self.use_cache and step.cache else None
        if hit is not None:
            self.scope.values[step.name] = hit["outputs"]
            self._set(step.name, "reused", key=key, reused=True, outputs=hit["outputs"])
            return
        registry = Registry(self.registry_path)
        try:
            rule = spec.get("beats_champion")
            if rule and not beats(metrics, registry.champion(spec["group"]), rule["metric"],
                                  rule.get("lower_is_better", True)):
                outputs = {"registered": False, "reason": f"the champion's {rule['metric']} is better"}
            else:
                lineage = {"state": str(self.state.path), "artifact": str(model), "hash": inputs[str(model)][0],
                           "pipeline": self.pipe.name, "run": self.run_id, "step": step.name}
                version = registry.register(model, spec["group"], metrics, lineage, spec.get("description", ""),
                                            copy=spec.get("copy", True))
                ref = f"{spec['group']}@{version['version']}"
                if spec.get("approve"):
                    registry.set_status(ref, APPROVED)
                if spec.get("alias"):
                    registry.alias(ref, spec["alias"])
                outputs = {"registered": True, "version": version["version"], "ref": ref}
                if self.mlflow is not None:
                    self.mlflow.register(spec["group"], model, metrics)
        finally:
            registry.close()
        self.state.remember(key, step.name, outputs, {})
        self.scope.values[step.name] = outputs
        self._set(step.name, "succeeded", key=key, outputs=outputs)


def _read_json(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_OUTPUT_JSON:
            raise StepFailed(f"{what}: {path} is over {MAX_OUTPUT_JSON:,} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StepFailed(f"{what}: {path} is not JSON ({err})") from None


def _read_text(path: Path, limit: int = 64 << 10) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


def _last_error(step_dir: Path, rc: int) -> str:
    try:
        with open(step_dir / "log.txt", "rb") as f:
            f.seek(max(0, os.path.getsize(step_dir / "log.txt") - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("fmforge: error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no log")
    return f"exit status {rc}: {last[:300]} (log: {step_dir / 'log.txt'})"
