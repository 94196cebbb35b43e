"""``fmforge ladder``: fit your own scaling law from a grid of small real training runs.

Each rung is one model shape x one token budget, trained by the real trainer on the base config, ending with
a learning-rate decay fitted to its own length (a rung cut from a longer schedule overstates its loss,
Hoffmann et al. 2022). By default (``branch=True``) the rungs use the warmup-stable-decay schedule and the
rungs of one size share one trunk: each budget's cooldown branches off the trunk's stable phase at its decay
start (``rungs.py``; Hägele et al. 2024), so a size costs one run plus short cooldowns. With
``branch=False`` every rung is a run of its own with the base config's schedule stretched to its length.
The final validation loss of every finished rung is fitted with ``fit.fit_law`` (non-monotone rungs are
flagged); the law predicts a larger target run, which can be trained to check the prediction, unless a
constant sits at a bound of the fit. The law holds for the base config's hyperparameters and data only.

Layout of OUT: ``ladder.json`` (base config, mode + every rung named so far), ``ladder.jsonl`` (one record per
finished run), ``trunks/TAG/``, ``rungs/NAME/`` and ``target/NAME/`` (run directories), ``law.json`` (for
``fmforge plan --law``) and ``ladder.png``. A later command may add sizes or token budgets (with the same
base config and mode): it trains the rungs it names and fits every finished rung. Every run resumes from its
newest checkpoint after a kill; a finished rung is never trained again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fmforge.config import ModelConfig
from fmforge.data.manifest import load_manifest
from fmforge.data.staging import stage_prepared_data
from fmforge.errors import FmforgeError
from fmforge.io.fs import is_remote
from fmforge.models.sizes import DECODER_SIZES as SIZES
from fmforge.plan.common import base_config, exclusive, flatten
from fmforge.plan.fit import MIN_POINTS, FittedLaw, fit_law, save_law
from fmforge.plan.rungs import SHAPE_KEYS, ladder_cost, run_config, rung_warmup, train_branch, train_piece
from fmforge.plan.shapes import count_params, flops_per_token, propose_model

# Keys each rung sets itself, or that change how a run executes and not what it computes (micro-batches
# split the same global batch): a ladder may continue with other values.
RUN_ONLY_KEYS = ("log.", "checkpoint.", "train.threads", "train.device", "train.log_interval", "data.prefetch",
                 "train.eval_interval", "train.out_dir", "train.micro_batch_size", "train.max_steps")


@dataclass
class LadderResult:
    out: Path
    law: FittedLaw
    rungs: list[dict]  # one record per finished rung: name, N, D, steps, val_loss, train_loss, seconds, model
    target: dict | None  # prediction (and, once trained, actual loss and error) for the target run


def run_ladder(config, overrides=(), *, data=None, out=None, sizes=None, params=None, tokens=None,
               target_params=None, target_tokens=None, run_target=False, bootstrap=200, seed=0,
               fit_only=False, branch=True, allow_bounded_fit=False) -> LadderResult:
    """Train every (``sizes`` or ``params``) x ``tokens`` rung not yet finished in ``out``, fit L(N, D) to
    their final validation losses with ``bootstrap`` resamples (seeded by ``seed``), predict the run of
    ``target_params`` non-embedding parameters on ``target_tokens`` tokens and, with ``run_target``, train
    it and record the prediction error. ``fit_only`` refits the finished rungs and trains nothing.
    ``branch``: WSD rungs whose cooldowns branch off one trunk per size (else one run per rung, with the base
    schedule). A fit with a constant at a bound predicts nothing unless ``allow_bounded_fit``."""
    if out is None:
        raise FmforgeError("--out LADDER_DIR is required")
    if bootstrap < 0:
        raise FmforgeError(f"--bootstrap must be 0 or more, got {bootstrap}")
    if (target_params is None) != (target_tokens is None):
        raise FmforgeError("give --target-params and --target-tokens together")
    if run_target and target_params is None:
        raise FmforgeError("--run-target needs --target-params and --target-tokens")
    base = base_config(config, overrides, data)
    if fit_only and (Path(out) / "ladder.json").is_file():
        branch = _stored_mode(Path(out))  # refitting trains nothing: the ladder's own mode applies
    if branch and base["optim"]["schedule"] != "wsd":
        print(f"rungs branch their cooldowns off one warmup-stable-decay run per size: optim.schedule=wsd "
              f"(was {base['optim']['schedule']}), decay over the last {base['optim']['decay_fraction']:.0%} of each")
        base["optim"]["schedule"] = "wsd"
    vocab = _vocab_size(base["data"]["path"])
    out = Path(out)
    if fit_only:
        if not (out / "ladder.json").is_file():
            raise FmforgeError(f"no ladder in {out}: run it without --fit-only first")
        if sizes or params or tokens:
            print("--fit-only: nothing is trained; fitting the finished rungs of the ladder (grid arguments ignored)")
        grid = []
    else:
        grid = _grid(base, sizes, params, tokens, vocab, branch)
    target = _target_spec(base, target_params, target_tokens, vocab) if target_params is not None else None
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "ladder"):
        rungs = _merge_ladder(out, base, grid, branch)
        records = _read_records(out)
        if not fit_only:
            # This command trains the rungs it names; the fit takes every finished rung of the ladder.
            names = {r["name"] for r in grid}
            mine = [r for r in rungs if r["name"] in names]
            todo = [r for r in mine if not _finished(out / "rungs" / r["name"], records.get(("rung", r["name"])))]
            extra = f" (the ladder has {len(rungs)})" if len(rungs) > len(mine) else ""
            print(f"ladder {out}: {len(mine)} rungs{extra}, {len(mine) - len(todo)} finished, {len(todo)} to train")
            _print_cost(base, mine, todo, vocab, branch)
            for i, rung in enumerate(todo, 1):
                if branch:
                    result, seconds, trunk_seconds = train_branch(base, rung, out)
                    extra = {"trunk": rung["trunk"], "trunk_seconds": round(trunk_seconds, 3)}
                    records[("rung", rung["name"])] = _record(out, base, rung, result, seconds, f"{i}/{len(todo)}",
                                                              extra=extra)
                else:
                    records[("rung", rung["name"])] = _train_rung(base, rung, out / "rungs", out, f"{i}/{len(todo)}")
        return _fit_and_report(out, base, rungs, records, target, run_target and not fit_only, bootstrap, seed,
                               allow_bounded_fit)


def _vocab_size(path: str) -> int:

    if is_remote(path):

        path = stage_prepared_data(path)  # cached: the trainer reuses this copy
    return int(load_manifest(path)["tokenizer"]["vocab_size"])


def _model(base: dict, fields: dict, vocab: int):

    model = {k: v for k, v in base["model"].items() if k not in SHAPE_KEYS}
    return ModelConfig(**{**model, **fields}).resolved(vocab_size=vocab, seq_len=base["data"]["seq_len"])


def _shape(base: dict, fields: dict, label: str, vocab: int) -> dict:

    try:
        resolved = _model(base, fields, vocab)
    except (FmforgeError, ValueError) as err:
        raise FmforgeError(f"{label}: {str(err).splitlines()[0]}") from None
    tag = fields["size"] or f"l{resolved.n_layer}-d{resolved.d_model}-h{resolved.n_head}-kv{resolved.n_kv_head}"
    return {"tag": tag, "model": fields, "N": count_params(resolved)[1]}


def _steps(base: dict, tokens: float, flag: str) -> int:
    gbt = base["train"]["global_batch"]
    if not (tokens > 0 and math.isfinite(tokens)):
        raise FmforgeError(f"{flag} must be a positive number of tokens, got {tokens:g}")
    steps = round(tokens / gbt)
    if steps < 1:
        raise FmforgeError(f"{flag} {tokens:g} is less than one global batch (train.global_batch = {gbt})")
    return steps


def _grid(base: dict, sizes, params, tokens, vocab: int, branch: bool) -> list[dict]:

    if not sizes and not params:
        raise FmforgeError("empty ladder: give the model sizes (--sizes NAME,... or --params N,...) and --tokens D,...")
    if sizes and params:
        raise FmforgeError("give --sizes or --params, not both")
    if not tokens:
        raise FmforgeError("empty ladder: give the training tokens of each rung with --tokens D,...")
    shapes = {}
    for name in sizes or []:
        if name not in SIZES:
            raise FmforgeError(f"--sizes: unknown size {name!r}; known: {', '.join(SIZES)}")
        shape = _shape(base, {"size": name}, f"--sizes {name}", vocab)
        shapes.setdefault(shape["tag"], shape)
    for n in params or []:
        fields = propose_model(n, base["model"]["arch"], vocab, base["data"]["seq_len"])
        shape = _shape(base, fields, f"--params {n:g}", vocab)
        if shape["tag"] in shapes:
            print(f"--params {n:g}: same shape as another size ({shape['tag']}); trained once")
        shapes.setdefault(shape["tag"], shape)
    steps = sorted({_steps(base, d, "--tokens") for d in tokens})
    gbt = base["train"]["global_batch"]
    # The rungs of one trunk share its warmup, so every branch sees the trunk's own schedule.
    shared = {"warmup": rung_warmup(base, steps[0])} if branch else {}
    return [{"name": f"{s['tag']}_t{k * gbt}", "model": s["model"], "N": s["N"], "steps": k, "D": k * gbt,
             "trunk": s["tag"], **shared} for s in shapes.values() for k in steps]


def _target_spec(base: dict, n: float, d: float, vocab: int) -> dict:

    shape = _shape(base, propose_model(n, base["model"]["arch"], vocab, base["data"]["seq_len"]),
                   f"--target-params {n:g}", vocab)
    steps = _steps(base, d, "--target-tokens")
    gbt = base["train"]["global_batch"]
    return {"name": f"{shape['tag']}_t{steps * gbt}", "model": shape["model"], "N": shape["N"], "steps": steps,
            "D": steps * gbt, "requested_N": n, "requested_D": d}


def _comparable(base: dict) -> dict:
    return {k: v for k, v in flatten(base).items()
            if not k.startswith(RUN_ONLY_KEYS) and k.removeprefix("model.") not in SHAPE_KEYS}


def _merge_ladder(out: Path, base: dict, grid: list[dict], branch: bool = False) -> list[dict]:
    """Rungs of the ladder in OUT plus ``grid``, cheapest first. Rungs fitted together must share every
    setting but shape and tokens, so a ladder continues only with the base config and mode it started with."""
    path = out / "ladder.json"
    stored, by_name = {"base": base, "branch": branch, "rungs": []}, {}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            old, by_name = _comparable(stored["base"]), {r["name"]: r for r in stored["rungs"]}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FmforgeError(f"{path} is corrupt; use another --out or remove it") from None
        if bool(stored.get("branch", False)) != branch:
            was = "branched WSD cooldowns" if stored.get("branch") else "one run per rung"
            raise FmforgeError(f"{out} holds a ladder trained as {was}: continue it in that mode "
                               f"(branch={not branch}) or use another --out")
        new = _comparable(base)
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if keys:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])
            raise FmforgeError(f"{out} holds a ladder with a different base config ({diff}); rerun with the "
                               "original config or use another --out")
        stored["base"] = base  # run-only settings (threads, logging) follow the latest command
    added = [r for r in grid if r["name"] not in by_name]
    for r in by_name.values():  # ladders from before branching named no trunk: a size is its tag
        r.setdefault("trunk", r["name"].rsplit("_t", 1)[0])
    warmups = {r.get("trunk"): r["warmup"] for r in by_name.values() if "warmup" in r}
    for r in added:  # a budget added to a size that has a trunk takes that trunk's warmup
        if r.get("trunk") in warmups:
            r["warmup"] = warmups[r["trunk"]]
    by_name.update({r["name"]: r for r in added})
    stored["rungs"] = sorted(by_name.values(), key=lambda r: (r["N"] * r["D"], r["name"]))
    _check_fittable(stored["rungs"])
    if added or not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=1) + "\n")
        os.replace(tmp, path)
    return stored["rungs"]


def _stored_mode(out: Path) -> bool:
    try:
        return bool(json.loads((out / "ladder.json").read_text()).get("branch", False))
    except (ValueError, AttributeError):
        raise FmforgeError(f"{out / 'ladder.json'} is corrupt; use another --out or remove it") from None


def _check_fittable(rungs: list[dict]) -> None:
    """Hours of training must not end in a fit that cannot run: check the grid's shape first."""
    n_sizes, n_tokens = len({r["N"] for r in rungs}), len({r["D"] for r in rungs})
    if len(rungs) < MIN_POINTS or n_sizes < 2 or n_tokens < 2:
        raise FmforgeError(f"a ladder of {len(rungs)} rung(s) ({n_sizes} model size(s) x {n_tokens} token "
                           f"budget(s)) cannot be fitted: it needs at least {MIN_POINTS} rungs, 2 sizes and "
                           "2 token budgets")


def _read_records(out: Path) -> dict[tuple[str, str], dict]:
    """Finished runs by (kind, name): a target may have a rung's shape and tokens."""
    records = {}
    path = out / "ladder.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
                record = json.loads(line)
                records[(record["kind"], record["name"])] = record
    return records


def _append_record(out: Path, record: dict) -> None:
    with open(out / "ladder.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finished(run_dir: Path, record: dict | None) -> bool:
    return record is not None and (run_dir / "model.safetensors").is_file()


def _train_rung(base: dict, run: dict, root: Path, out: Path, label: str, kind: str = "rung") -> dict:
    """Train one rung (or the target) as a run of its own and record it."""
    result, seconds = train_piece(run_config(base, run, root / run["name"]), run["name"], kind)
    return _record(out, base, run, result, seconds, label, kind)


def _record(out: Path, base: dict, run: dict, result, seconds: float, label: str, kind: str = "rung",
            extra: dict | None = None) -> dict:
    if result.val_loss is None:
        raise FmforgeError(f"{base['data']['path']} has no validation split: the ladder fits final validation losses")
    val = result.val_loss if math.isfinite(result.val_loss) else None
    record = {"name": run["name"], "kind": kind, "N": run["N"], "D": run["D"], "steps": result.step,
              "val_loss": val, "train_loss": result.loss, "seconds": round(seconds, 3), "model": run["model"],
              **(extra or {})}
    _append_record(out, record)
    shown = f"{val:.4f}" if val is not None else "diverged (not fitted)"
    print(f"{kind} {label} {run['name']}: N {run['N']:,} D {run['D']:,}  val loss {shown}  ({seconds:.1f} s)")
    return record


def _print_cost(base: dict, rungs: list[dict], todo: list[dict], vocab: int, branch: bool) -> None:
    """The ladder's training cost up front: tokens and FLOPs, branched and as separate runs."""
    if not rungs:
        return
    seq = base["data"]["seq_len"]
    fpt = {r["trunk"]: flops_per_token(_model(base, r["model"], vocab), seq) for r in rungs}
    cost = ladder_cost(rungs, base["optim"]["decay_fraction"], base["train"]["global_batch"], fpt)
    sep, br = cost["separate"], cost["branched"]
    n_sizes = len({r["trunk"] for r in rungs})
    as_runs = f"{sep['tokens']:,} tokens, {sep['flops']:.3g} FLOPs as {len(rungs)} separate runs"
    if branch:
        print(f"cost: {br['tokens']:,} tokens, {br['flops']:.3g} FLOPs as {n_sizes} WSD trunk(s) + {len(rungs)} "
              f"cooldowns ({as_runs}: branching saves {1 - br['flops'] / sep['flops']:.0%})")
    else:
        print(f"cost: {as_runs} ({br['tokens']:,} tokens, {br['flops']:.3g} FLOPs with branched WSD cooldowns)")
    if len(todo) < len(rungs):
        left = ladder_cost(todo, base["optim"]["decay_fraction"], base["train"]["global_batch"], fpt)
        print(f"  still to train: at most {left['branched' if branch else 'separate']['flops']:.3g} FLOPs")


def _fit_and_report(out: Path, base: dict, rungs: list[dict], records: dict, target: dict | None,
                    run_target: bool, bootstrap: int, seed: int, allow_bounded_fit: bool = False) -> LadderResult:
    done = [records[("rung", r["name"])] for r in rungs
            if _finished(out / "rungs" / r["name"], records.get(("rung", r["name"])))]
    fitted = [r for r in done if r["val_loss"] is not None]
    if len(done) < len(rungs):
        print(f"{len(rungs) - len(done)} rung(s) not trained yet: fitting the {len(fitted)} finished")
    points = [{"name": r["name"], "N": r["N"], "D": r["D"], "loss": r["val_loss"]} for r in fitted]
    if bootstrap:
        print(f"fitting {len(points)} runs, {bootstrap} bootstrap resamples ...")
    law = fit_law([p["N"] for p in points], [p["D"] for p in points], [p["loss"] for p in points],
                  bootstrap=bootstrap, seed=seed, points=points,
                  source=f"fmforge ladder {out.resolve()}: {len(points)} runs on {base['data']['path']}")
    report = None
    if target is not None and law.at_bound and not allow_bounded_fit:
        save_law(law, out / "law.json")
        _print(out, law, fitted, None)
        _plot(law, fitted, None, out / "ladder.png")
        law.predict(target["N"], target["D"])  # raises: one line naming the constants and their bounds
    if target is not None:
        ci = law.loss_ci(target["N"], target["D"])
        predicted = law.predict(target["N"], target["D"], allow_bounded=True)
        report = {**target, "predicted": predicted, "ci": list(ci) if ci else None}
        print(f"target {target['name']}: N {target['N']:,} (asked {target['requested_N']:g}) D {target['D']:,}: "
              f"predicted val loss {report['predicted']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
        run_dir = out / "target" / target["name"]
        record = records.get(("target", target["name"]))
        if run_target and not _finished(run_dir, record):
            save_law(law, out / "law.json", target=report)  # the prediction is on disk before the run starts
            record = _train_rung(base, target, out / "target", out, "run", kind="target")
        if _finished(run_dir, record) and record["val_loss"] is not None:
            actual = record["val_loss"]
            report.update(actual=actual, error=report["predicted"] - actual,
                          relative_error=(report["predicted"] - actual) / actual, seconds=record["seconds"])
    save_law(law, out / "law.json", **({"target": report} if report else {}))
    _print(out, law, fitted, report)
    _plot(law, fitted, report, out / "ladder.png")
    return LadderResult(out, law, done, report)


def _ci(law: FittedLaw, key: str) -> str:
    lo_hi = law.ci.get(key)
    return f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "-"


def _print(out: Path, law: FittedLaw, rungs: list[dict], target: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file has no width to fit: keep every value whole
        console.width = 200
    table = Table(title=f"fmforge ladder: {out}")
    for col in ("rung", "N (non-emb.)", "D (tokens)", "steps", "val loss", "fit", "residual", "train loss", "s"):
        table.add_column(col, justify="left" if col == "rung" else "right", no_wrap=True)
    for r in rungs:
        fit = float(law.loss(r["N"], r["D"]))
        train_loss = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        table.add_row(r["name"], f"{r['N']:,}", f"{r['D']:,}", str(r["steps"]), f"{r['val_loss']:.4f}", f"{fit:.4f}",
                      f"{(fit - r['val_loss']) / r['val_loss']:+.2%}", train_loss, f"{r['seconds']:.1f}")
    console.print(table)
    consts = Table(title=f"L = E + A/N^alpha + B/D^beta ({law.n_points} runs)")
    boot = len(law.samples) if law.samples is not None else 0
    for col in ("constant", "value", f"95% CI ({boot} bootstrap fits)" if boot else "95% CI"):
        consts.add_column(col, justify="left" if col == "constant" else "right", no_wrap=True)
    for key in ("E", "A", "B", "alpha", "beta"):
        consts.add_row(key, f"{getattr(law, key):.4g}", _ci(law, key))
    consts.add_row("a (N_opt ~ C^a)", f"{law.a:.3f}", _ci(law, "a"))
    console.print(consts)
    if law.at_bound:
        print(f"warning: the fit put {', '.join(law.at_bound)} at the edge of its range ({'; '.join(law.bound_notes())}): "
              "these rungs do not pin the law down; widen the ladder (more sizes and token budgets, further apart) "
              "before trusting it")
    for flag in law.non_monotone:
        more = "parameters at the same D" if flag["axis"] == "N" else "tokens at the same N"
        print(f"warning: rung {flag['name']} has a higher val loss ({flag['loss']:.4f}) than {flag['than']} with "
              f"fewer {more} ({flag['than_loss']:.4f}): not monotone in {flag['axis']}")
    if target is not None and "actual" in target:
        print(f"target {target['name']}: predicted {target['predicted']:.4f}, actual {target['actual']:.4f}, "
              f"error {target['error']:+.4f} ({target['relative_error']:+.2%})")
    print(f"law written to {out / 'law.json'} (use it with `fmforge plan --law`); plot in {out / 'ladder.png'}")


def _plot(law: FittedLaw, rungs: list[dict], target: dict | None, path: Path) -> None:
    # A bare Figure renders through Agg without touching pyplot's global backend or needing a display.
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    d_all = [r["D"] for r in rungs] + ([target["D"]] if target else [])
    d_grid = np.geomspace(min(d_all) / 1.5, max(d_all) * 1.5, 100)
    for i, n in enumerate(sorted({r["N"] for r in rungs})):
        pts = [r for r in rungs if r["N"] == n]
        ax.scatter([r["D"] for r in pts], [r["val_loss"] for r in pts], color=f"C{i % 10}", label=f"N = {n:,}")
        ax.plot(d_grid, law.loss(n, d_grid), color=f"C{i % 10}", alpha=0.7)
    if target is not None:
        ax.plot(d_grid, law.loss(target["N"], d_grid), color="k", ls="--", alpha=0.6,
                label=f"target N = {target['N']:,} (fit)")
        yerr = None
        if target.get("ci"):
            yerr = [[target["predicted"] - target["ci"][0]], [target["ci"][1] - target["predicted"]]]
        ax.errorbar([target["D"]], [target["predicted"]], yerr=yerr, fmt="D", color="k", capsize=4,
                    label="target predicted (95% CI)")
        if "actual" in target:
            ax.scatter([target["D"]], [target["actual"]], marker="*", s=160, color="C3", zorder=3,
                       label="target actual")
    ax.set(xscale="log", xlabel="D (training tokens)", ylabel="final validation loss",
           title=f"E={law.E:.3g}  A={law.A:.3g}  B={law.B:.3g}  alpha={law.alpha:.3f}  beta={law.beta:.3f}")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
