"""Hyperparameter search: each Optuna trial is a short real training run of the base config.

The study lives in ``OUT/study.db`` (SQLite), each trial's run in ``OUT/trials/trial_NNNN/``. Rerunning the same
command continues the study until ``trials`` trials have finished (complete or pruned); a trial a killed
process left running is marked failed and its parameters are tried again. Writes ``OUT/trials.csv``,
``OUT/best.yaml`` (the base config with the best parameters: ``fmforge train`` takes it as it is) and
``OUT/tune.png``.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fmforge.config import build_config, config_to_dict
from fmforge.errors import FmforgeError
from fmforge.plan.common import base_config, exclusive, flatten
from fmforge.train.loop import train

STUDY_NAME = "fmforge-tune"
# What tune writes into OUT besides study.db: without study.db, these belong to a study it cannot see.
TUNE_OUTPUTS = ("trials", "trials.csv", "best.yaml", "tune.png")
_TRIAL_DIR = re.compile(r"trial_(\d+)")
PRUNERS = ("median", "sha", "none")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class TuneResult:
    out: Path
    best_params: dict | None
    best_value: float | None
    best_config: Path | None
    trials: list[dict] = field(default_factory=list)  # one row per trial: number, state, params, val_loss, steps


def tune(config, overrides=(), data=None, out=None, trials: int = 20, space=None, pruner: str = "median",
         seed: int = 0) -> TuneResult:
    """Search the space (default: lr, warmup, global batch tokens, weight decay) with a seeded TPE sampler,
    pruning trials on the validation losses they report every ``train.eval_interval`` steps. Outputs in
    ``out`` that its study.db does not account for (trial runs left after study.db was removed) are never
    deleted or reused: that is a one-line error."""
    if out is None:
        raise FmforgeError("--out STUDY_DIR is required")
    if trials < 1:
        raise FmforgeError(f"--trials must be at least 1, got {trials}")
    if pruner not in PRUNERS:
        raise FmforgeError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    base = base_config(config, overrides, data)
    search = load_space(space, base)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "tune"):  # with one process per study, any RUNNING trial is one a killed process left
        return _search(base, search, out, trials, pruner, seed)


def _search(base: dict, search: dict, out: Path, trials: int, pruner: str, seed: int) -> TuneResult:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours to print
    if not (out / "study.db").exists():
        _refuse_foreign_outputs(out)
    study = optuna.create_study(storage=f"sqlite:///{(out / 'study.db').resolve()}", study_name=STUDY_NAME,
                                direction="minimize", load_if_exists=True, pruner=_pruner(pruner))
    _refuse_foreign_trials(out, len(study.trials))
    _check_same_study(study, base, search, out)
    # A fixed seed on a resumed study would replay the first trials' draws: move it on by the trials so far.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        params = {**stale.system_attrs.get("fixed_params", {}), **stale.params}  # a retry may die before suggesting
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(params, user_attrs={"retry_of": stale.number})
        print(f"trial {stale.number} was left running by a killed tune: marked failed, its parameters will be retried")

    run_cfg = copy.deepcopy(base)
    t = run_cfg["train"]
    if not t["eval_interval"] or t["eval_interval"] >= t["max_steps"]:
        # Pruning needs validation losses before the end of a trial.
        t["eval_interval"] = max(1, t["max_steps"] // 4)
        print(f"trials validate every {t['eval_interval']} steps (train.eval_interval) so that pruning has losses to judge")
    # Trials are never resumed, so mid-run checkpoints would only cost time; progress is one line per trial.
    run_cfg["checkpoint"]["interval"] = 0
    run_cfg["log"]["progress"] = "none"

    finished = _finished(study)
    if finished:
        print(f"study {out}: {finished} finished trial(s) so far, {max(0, trials - finished)} to go")
    while finished < trials:
        _run_trial(study, search, run_cfg, out / "trials")
        finished = _finished(study)
    return _report(study, search, base, out)


def default_space(base: dict) -> dict:
    """lr (log), warmup steps, global batch tokens around the base value, weight decay."""
    t, seq = base["train"], base["data"]["seq_len"]
    unit = seq * t["micro_batch_size"]  # a global batch must be whole micro-batches of whole sequences
    gbt = t["global_batch"]
    choices = sorted({max(unit, n // unit * unit) for n in (gbt // 2, gbt, 2 * gbt)})
    space = {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True, "int": False}}
    if t["max_steps"] >= 2:
        space["optim.warmup_steps"] = {"low": 0, "high": max(1, t["max_steps"] // 4), "log": False, "int": True}
    space["train.global_batch"] = {"choices": choices}
    space["optim.weight_decay"] = {"low": 0.0, "high": 0.2, "log": False, "int": False}
    return space


def load_space(path, base: dict) -> dict:
    """The search space from a YAML file (or the default), each key checked against the config schema."""
    if path is None:
        where, raw = "search space", default_space(base)
    else:
        where, p = f"space {path}", Path(path)
        if not p.is_file():
            raise FmforgeError(f"space file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            raise FmforgeError(f"{where}: not valid YAML") from None
        if not isinstance(raw, dict) or not raw:
            raise FmforgeError(f"{where}: expected a mapping of config keys, e.g. optim.lr: {{low: 1e-4, high: 1e-2, log: true}}")
    space = {}
    for key, entry in raw.items():
        if not isinstance(key, str) or not all(part.isidentifier() for part in key.split(".")):
            raise FmforgeError(f"{where}: {key!r} is not a config key like optim.lr")
        if key in ("train.out_dir", "data.path"):
            raise FmforgeError(f"{where}: {key} is set by tune, not searched")
        space[key] = _entry(where, key, entry)
        values = space[key].get("choices") or [space[key]["low"], space[key]["high"]]
        for value in values:  # both ends of a range, or every choice, must make a valid config
            try:
                cfg = build_config(_with_params(base, {key: value}))
            except FmforgeError as err:
                raise FmforgeError(f"{where}: {str(err).removeprefix('config error: ')}") from None
            unit = cfg.data.seq_len * cfg.train.micro_batch_size
            if cfg.train.global_batch % unit:
                raise FmforgeError(f"{where}: {key} = {value!r} gives train.global_batch "
                                   f"{cfg.train.global_batch}, not a multiple of data.seq_len x "
                                   f"train.micro_batch_size ({unit})")
    _fit_warmup(where, space, base["train"]["max_steps"])
    return space


def _entry(where: str, key: str, entry) -> dict:
    shape = "expected {low, high[, log, int]} or {choices: [...]}"
    if not isinstance(entry, dict):
        raise FmforgeError(f"{where}: {key}: {shape}")
    unknown = sorted(set(map(str, entry)) - {"low", "high", "log", "int", "choices"})
    if unknown:
        raise FmforgeError(f"{where}: {key}: unknown field(s) {', '.join(unknown)}; {shape}")
    if "choices" in entry:
        choices = entry["choices"]
        if len(entry) > 1 or not isinstance(choices, list) or not choices:
            raise FmforgeError(f"{where}: {key}: choices must be a non-empty list, alone")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise FmforgeError(f"{where}: {key}: choices must be plain values (numbers, strings, booleans)")
        return {"choices": [_number(c) for c in choices]}
    if "low" not in entry or "high" not in entry:
        raise FmforgeError(f"{where}: {key}: {shape}")
    low, high = (_number(entry[k]) for k in ("low", "high"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise FmforgeError(f"{where}: {key}: low and high must be numbers")
    log, is_int = entry.get("log", False), entry.get("int", False)
    if not isinstance(log, bool) or not isinstance(is_int, bool):
        raise FmforgeError(f"{where}: {key}: log and int must be true or false")
    if low >= high:
        raise FmforgeError(f"{where}: {key}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise FmforgeError(f"{where}: {key}: a log scale needs low > 0")
    if is_int:
        if low != int(low) or high != int(high):
            raise FmforgeError(f"{where}: {key}: int ranges need whole-number low and high")
        low, high = int(low), int(high)
    return {"low": low, "high": high, "log": log, "int": is_int}


def _number(value):
    # YAML 1.1 reads 1e-4 (no dot) as a string; nobody means a string there.
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value) else value


def _fit_warmup(where: str, space: dict, max_steps: int) -> None:
    spec = space.get("optim.warmup_steps")
    if spec is None:
        return
    if "choices" in spec:
        if any(isinstance(c, (int, float)) and c >= max_steps for c in spec["choices"]):
            raise FmforgeError(f"{where}: optim.warmup_steps: every choice must be below train.max_steps ({max_steps})")
    elif spec["high"] >= max_steps:
        if spec["low"] >= max_steps - 1:
            raise FmforgeError(f"{where}: optim.warmup_steps: low ({spec['low']}) leaves no warmup below "
                               f"train.max_steps ({max_steps})")
        print(f"optim.warmup_steps: high {spec['high']} clipped to {max_steps - 1}, below train.max_steps")
        spec["high"] = max_steps - 1 if spec["int"] else float(max_steps - 1)


def _with_params(raw: dict, params: dict) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in params.items():
        *sections, name = key.split(".")
        node = raw
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FmforgeError(f"{key}: {part} is not a config section")
        node[name] = value
    return raw


def _pruner(name: str):
    import optuna

    if name == "median":  # two finished trials before judging: one is no median
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _check_same_study(study, base: dict, space: dict, out: Path) -> None:
    """Trials of one study must be comparable: same base config, same space. Stored with the study itself."""
    if not study.user_attrs:
        study.set_user_attr("base config", base)
        study.set_user_attr("search space", space)
    for name, now in (("base config", base), ("search space", space)):
        old, new = flatten(study.user_attrs.get(name, {})), flatten(json.loads(json.dumps(now)))  # as SQLite returns it
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if keys:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])
            raise FmforgeError(f"{out / 'study.db'} holds a study with another {name} ({diff}); "
                               "rerun with the original config and space, or use another --out")


def _refuse_foreign_outputs(out: Path) -> None:
    """Without study.db (removed, or never there), tune's outputs in OUT are from a study it cannot see:
    refuse rather than write over or delete runs it cannot prove it made."""
    found = [name for name in TUNE_OUTPUTS if os.path.lexists(out / name)]
    if found:
        raise FmforgeError(f"{out} holds {', '.join(found)} but no study.db (removed?): tune will not replace "
                           "runs it did not make; move them away or choose another --out")


def _refuse_foreign_trials(out: Path, known: int) -> None:
    """A trial directory numbered at or past the study's trial count was not made by this study (its next
    trial would take that name): refuse rather than delete it."""
    root = out / "trials"
    names = sorted(os.listdir(root)) if root.is_dir() else []
    foreign = [name for name in names if (m := _TRIAL_DIR.fullmatch(name)) and int(m.group(1)) >= known]
    if foreign:
        raise FmforgeError(f"{root / foreign[0]} is not a run of the study in {out / 'study.db'} (which has "
                           f"{known} trial(s)): tune will not replace it; move it away or choose another --out")


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _suggest(trial, key: str, spec: dict):
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    if spec["int"]:
        return trial.suggest_int(key, spec["low"], spec["high"], log=spec["log"])
    return trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])


def _run_trial(study, space: dict, run_cfg: dict, root: Path) -> None:
    from optuna.trial import TrialState

    trial = study.ask()  # an enqueued retry comes first
    params = {key: _suggest(trial, key, spec) for key, spec in space.items()}
    run_dir = root / f"trial_{trial.number:04d}"
    if os.path.lexists(run_dir):  # not this study's (checked at start): never resume or delete another's run
        study.tell(trial, state=TrialState.FAIL)
        raise FmforgeError(f"{run_dir} exists but was not made by this study; move it away and rerun")
    cfg = build_config(_with_params(run_cfg, params))
    cfg.train.out_dir = str(run_dir)
    trial.set_user_attr("run_dir", str(run_dir))

    def on_validation(step: int, val_loss: float) -> bool:
        if not math.isfinite(val_loss):
            return True  # diverged: nothing to learn from the rest of the run
        trial.report(val_loss, step)
        return trial.should_prune()

    def echo(message: str) -> None:
        if message.startswith("warning"):
            print(f"trial {trial.number}: {message}")

    try:
        result = train(cfg, echo=echo, on_validation=on_validation)
    except BaseException as err:
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(err, KeyboardInterrupt):
            study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
        raise
    trial.set_user_attr("steps", result.step)
    if result.preempted:  # SIGTERM/SIGINT: the same parameters get a clean run when the study resumes
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
        print(f"trial {trial.number} stopped; rerun the same command to continue the study")
        raise KeyboardInterrupt
    if result.val_loss is None:
        study.tell(trial, state=TrialState.FAIL)
        raise FmforgeError(f"{cfg.data.path} has no validation split: tune ranks trials by validation loss")
    if result.pruned or not math.isfinite(result.val_loss):
        study.tell(trial, state=TrialState.PRUNED)
        state = "pruned"
    else:
        study.tell(trial, result.val_loss)
        state = "complete"
    shown = "  ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
    print(f"trial {trial.number:>3}  {state:<8}  val loss {val} at step {result.step:<6}  {shown}")


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _value(trial):
    """A complete trial's final val loss; a pruned one's last reported loss (optuna stores it as its value)."""
    return trial.value if trial.state.name in ("COMPLETE", "PRUNED") else None


def _report(study, space: dict, base: dict, out: Path) -> TuneResult:
    from optuna.trial import TrialState
    from rich.console import Console
    from rich.table import Table

    keys = list(space)
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, **{k: t.params.get(k) for k in keys},
                     "val_loss": _value(t), "steps": t.user_attrs.get("steps"),
                     "retry_of": t.user_attrs.get("retry_of"), "run_dir": t.user_attrs.get("run_dir")})
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = min(complete, key=lambda t: t.value) if complete else None
    table = Table(title=f"fmforge tune: {out}")
    for name in ("trial", "state", *keys, "val loss", "steps"):
        table.add_column(name, justify="left" if name == "state" else "right", no_wrap=True)
    for r in rows:
        mark = " *" if best is not None and r["number"] == best.number else ""
        table.add_row(f"{r['number']}{mark}", r["state"].lower(), *(_fmt(r[k]) if r[k] is not None else "-" for k in keys),
                      f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-", "-" if r["steps"] is None else str(r["steps"]))
    console = Console()
    if not console.is_terminal:  # a log file has no width to fit: keep every value whole
        console.width = 200
    console.print(table)

    best_config = None
    if best is None:
        print("no trial completed: no best.yaml")
    else:
        cfg = build_config(_with_params(base, best.params))
        cfg.train.out_dir = None
        best_config = out / "best.yaml"
        best_config.write_text(f"# fmforge tune: trial {best.number} of {out}, val loss {best.value:.4f}\n"
                               + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        print(f"best: trial {best.number}, val loss {best.value:.4f}; config in {best_config}")
    _plot(rows, space, out / "tune.png")
    return TuneResult(out, dict(best.params) if best else None, best.value if best else None, best_config, rows)


def _plot(rows: list[dict], space: dict, path: Path) -> None:
    # A bare Figure renders through Agg without touching pyplot's global backend or needing a display.
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(4 * (1 + len(space)), 3.5), layout="constrained")
    axes = fig.subplots(1, 1 + len(space), squeeze=False)[0]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["val_loss"] is not None]
    ax = axes[0]
    ax.scatter([r["number"] for r in done], [r["val_loss"] for r in done], label="complete")
    ax.scatter([r["number"] for r in pruned], [r["val_loss"] for r in pruned], marker="x", color="grey",
               label="pruned (last reported)")
    if done:
        best = list(itertools.accumulate((r["val_loss"] for r in done), min))
        ax.step([r["number"] for r in done] + [rows[-1]["number"]], best + best[-1:], where="post", color="C3",
                label="best so far")
    ax.set(title="optimization history", xlabel="trial", ylabel="val loss")
    ax.legend(fontsize="small")
    for ax, (key, spec) in zip(axes[1:], space.items()):
        for group, style in ((done, {}), (pruned, {"marker": "x", "color": "grey"})):
            points = [(r[key], r["val_loss"]) for r in group if r[key] is not None]
            if points:  # choices sit at their index, in the space's order
                values = [spec["choices"].index(v) if "choices" in spec else v for v, _ in points]
                ax.scatter(values, [loss for _, loss in points], **style)
        if "choices" in spec:
            ax.set_xticks(range(len(spec["choices"])), labels=[str(c) for c in spec["choices"]])
        if spec.get("log"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=key, xlabel=key, ylabel="val loss")
    fig.savefig(path, dpi=100)
