"""``fmforge plan``: from a budget (FLOPs, device-hours, money, a model size, a target loss or a dataset) to
the compute-optimal model and data size under each published law, the FLOPs, time and cost on named
hardware, the penalty for repeating data, the inference-aware alternative, batch/lr guidance, and a config
``fmforge train`` accepts unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from fmforge.config import Config, build_config, load_config, save_config
from fmforge.data.manifest import load_manifest
from fmforge.errors import FmforgeError
from fmforge.plan import hparams
from fmforge.plan.fit import load_law
from fmforge.plan.hardware import (
    DEFAULT_MFU,
    Hardware,
    flops_from_budget,
    get_hardware,
    mfu_from_run,
    parse_prices,
    time_and_cost,
)
from fmforge.plan.laws import (
    LAWS,
    ChinchillaLaw,
    Law,
    data_constrained_optimum,
    effective_data,
    flops_for,
    inference_aware_optimum,
    repeated_loss,
)
from fmforge.plan.shapes import count_params, flops_per_token, propose_model, resolve_proposal
from fmforge.train.memory import estimate_memory

DEFAULT_LAW = "besiroglu"


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise FmforgeError(f"{name} must be a positive number, got {value}")


def load_fitted_law(path: str | Path, allow_bounded_fit: bool = False) -> ChinchillaLaw:
    """A law.json written by ``fmforge ladder`` as a law of the Chinchilla form (N = non-embedding params).
    A fit with a constant at a bound of its range is refused unless ``allow_bounded_fit``: its points did not
    determine the law, so a plan extrapolated from it means nothing."""

    fitted = load_law(path)
    if fitted.at_bound and not allow_bounded_fit:
        raise FmforgeError(f"--law {path}: {'; '.join(fitted.bound_notes())} - that ladder did not determine the "
                           "law; widen it, or pass --allow-bounded-fit to plan with it anyway")
    law = ChinchillaLaw("fitted", fitted.E, fitted.A, fitted.B, fitted.alpha, fitted.beta,
                        n_definition="non_embedding", source=f"fmforge ladder fit ({path})")
    _FITTED[law] = fitted
    return law


_FITTED: dict = {}  # the fitted law behind a "fitted" ChinchillaLaw: bootstrap intervals, fit diagnostics


def _select_laws(law: str | None, allow_bounded_fit: bool = False) -> tuple[dict[str, Law], str]:
    laws: dict[str, Law] = dict(LAWS)
    if law is None:
        return laws, DEFAULT_LAW
    if law in LAWS:
        return laws, law
    if Path(law).is_file() or law.endswith(".json"):
        laws["fitted"] = load_fitted_law(law, allow_bounded_fit)
        return laws, "fitted"
    raise FmforgeError(f"--law: {law!r} is neither a known law ({', '.join(LAWS)}) nor a law.json file")


def _fit_micro_batch(model_cfg, n_params: int, seq_len: int, seqs_per_rank: int, hw: Hardware | None,
                     devices: int) -> tuple[int, str, float | None]:
    """Largest power-of-two micro-batch (<= 32, dividing the rank's sequences) that the memory estimate fits
    in 85% of the device, without activation checkpointing if possible."""
    candidates = [m for m in (32, 16, 8, 4, 2, 1) if m <= seqs_per_rank and seqs_per_rank % m == 0] or [1]
    if hw is None or not hw.memory_gb:
        return min(8, candidates[0]), "none", None
    dp = "fsdp" if devices > 1 else "ddp"
    for ac in ("none", "full"):
        for micro in candidates:
            est = estimate_memory(model_cfg, n_params, seq_len, micro, devices, dp, ac, bf16=hw.name != "cpu")
            if est["total"] <= 0.85 * hw.memory_gb:
                return micro, ac, est["total"]
    est = estimate_memory(model_cfg, n_params, seq_len, 1, devices, dp, "full", bf16=hw.name != "cpu")
    return 1, "full", est["total"]


def propose_config(row: dict, flops: float, seq_len: int, data: str | None, hw: Hardware | None,
                   devices: int) -> tuple[dict, list[str]]:
    """The chosen law's run as a train config (a plain dict, validated through the real schema)."""
    warnings = []
    batch_tokens, lr = hparams.deepseek(flops)
    batch = hparams.round_batch(batch_tokens, seq_len)
    batch = max(batch, seq_len * devices)  # at least one sequence per rank
    steps = max(1, math.ceil(row["tokens"] / batch))
    model = dict(row["model"])
    if data is None:
        model["vocab_size"] = row["model_resolved"]["vocab_size"]
    resolved = resolve_proposal(row["model"], row["vocab_size"])
    micro, ac, mem = _fit_micro_batch(resolved, row["params_total"], seq_len, batch // seq_len // devices, hw, devices)
    if hw is not None and mem is not None and mem > 0.85 * hw.memory_gb:
        warnings.append(f"even micro-batch 1 with activation checkpointing needs ~{mem:.0f} GB per device "
                        f"(> {hw.memory_gb:.0f} GB): use more devices (FSDP shards weights and optimizer) or "
                        "tensor parallelism (parallel.tp)")
    interval = max(1, min(1000, steps // 10))
    raw = {
        "model": model,
        "data": {"path": data, "seq_len": seq_len},
        "optim": {"lr": float(f"{lr:.3g}"), "warmup_steps": hparams.warmup_steps(steps)},
        "train": {"max_steps": steps, "global_batch": batch, "micro_batch_size": micro,
                  "eval_interval": interval, "log_interval": max(1, min(10, steps // 10))},
        "parallel": {"dp": "fsdp" if devices > 1 else "ddp", "ac": ac},
        "checkpoint": {"interval": interval},
    }
    return raw, warnings


def _law_row(name: str, law: Law, n: float, d: float, arch: str, seq_len: int, vocab: int,
             hw: Hardware | None, devices: int, mfu: float, unique: float | None, budget: float,
             inference_tokens: float | None) -> dict:
    fields = propose_model(n, arch, vocab, seq_len, count=law.n_definition)
    resolved = resolve_proposal(fields, vocab)
    total, non_embedding = count_params(resolved)
    loss = law.loss(n, d)
    row = {
        "law": name, "source": law.source, "n_definition": law.n_definition,
        "params": n, "tokens": d, "tokens_per_param": d / n, "loss": loss,
        "flops_6nd": 6.0 * n * d,
        "model": fields, "model_resolved": {k: getattr(resolved, k) for k in
                                            ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size")},
        "params_total": total, "params_non_embedding": non_embedding, "vocab_size": vocab,
    }
    # Training FLOPs of the proposed shape: 6 x (weights that multiply activations) + attention, per token.
    row["flops"] = flops_per_token(resolved, seq_len) * d
    if hw is not None:
        row["hours"], row["cost_usd"] = time_and_cost(row["flops"], hw, devices, mfu)
    if unique is not None and d > unique:
        dc_n, dc_d = data_constrained_optimum(law, budget, unique)
        row["repetition"] = {
            "unique_tokens": unique, "epochs": d / unique, "effective_tokens": effective_data(d, unique),
            "loss_if_unique": loss, "loss_repeated": repeated_loss(law, n, d, unique),
            "data_constrained_params": dc_n, "data_constrained_tokens": dc_d,
            "data_constrained_loss": repeated_loss(law, dc_n, dc_d, unique),
        }
        row["repetition"]["penalty"] = row["repetition"]["loss_repeated"] - loss
    if inference_tokens:
        best = inference_aware_optimum(law, loss, inference_tokens)
        if best is not None:
            ia_n, ia_d = best
            base = 6 * n * d + 2 * n * inference_tokens
            total_ia = 6 * ia_n * ia_d + 2 * ia_n * inference_tokens
            row["inference_aware"] = {"inference_tokens": inference_tokens, "params": ia_n, "tokens": ia_d,
                                      "train_flops": 6 * ia_n * ia_d, "total_flops": total_ia,
                                      "compute_optimal_total_flops": base, "saving": 1 - total_ia / base}
    return row


def plan(*, flops: float | None = None, gpu: str | None = None, gpus: int = 1, hours: float | None = None,
         usd: float | None = None, prices: dict[str, float] | None = None, mfu: float | None = None,
         mfu_from: str | None = None, tokens: float | None = None, data: str | None = None,
         params: float | None = None, target_loss: float | None = None, inference_tokens: float | None = None,
         law: str | None = None, arch: str = "llama", seq_len: int = 2048, vocab_size: int | None = None,
         allow_bounded_fit: bool = False) -> dict:
    """The whole plan as a JSON-ready dict; see ``fmforge plan --help`` for the inputs.

    Budget precedence: FLOPs (``flops``, or ``gpu`` x ``gpus`` x ``hours``, or ``usd``) > ``params`` >
    ``target_loss`` > the dataset (``tokens`` / ``data``: use every unique token once). With a budget and
    ``params`` together the model size is fixed and the budget buys D = C / 6N."""
    for name, value in (("--flops", flops), ("--hours", hours), ("--usd", usd), ("--tokens", tokens),
                        ("--params", params), ("--target-loss", target_loss), ("--inference-tokens", inference_tokens)):
        _positive(name, value)
    if gpus < 1:
        raise FmforgeError(f"--gpus must be at least 1, got {gpus}")
    if mfu is not None and not 0 < mfu <= 1:
        raise FmforgeError(f"--mfu must be in (0, 1], got {mfu}")
    if (hours or usd) and not gpu:
        raise FmforgeError("--hours and --usd need --gpu (which hardware the time or money buys)")
    if hours and usd:
        raise FmforgeError("give --hours or --usd, not both")
    laws, chosen = _select_laws(law, allow_bounded_fit)
    hw = get_hardware(gpu, prices) if gpu else None
    if mfu_from:
        mfu = mfu_from_run(mfu_from)
    mfu = mfu or DEFAULT_MFU
    unique = tokens
    if data is not None:

        if not Path(data).is_dir():
            raise FmforgeError(f"--data: not a directory: {data}")
        manifest = load_manifest(data)
        unique = unique or float(manifest["tokens"]["train"])
        vocab_size = vocab_size or int(manifest["tokenizer"]["vocab_size"])
        data = str(Path(data).resolve())
    vocab = vocab_size or 50257
    budget = flops
    source = "--flops"
    if budget is None and hw is not None and (hours or usd):
        budget = flops_from_budget(hw, gpus, mfu, hours=hours, usd=usd)
        source = f"{gpus} x {hw.name} x {hours:g} h at MFU {mfu:.0%}" if hours else \
            f"${usd:,.0f} of {hw.name} at ${hw.usd_per_hour}/h, MFU {mfu:.0%}"
    if budget is None and not (params or target_loss or unique):
        raise FmforgeError("nothing to plan from: give --flops, --gpu with --hours or --usd, --params, "
                           "--target-loss, or --tokens/--data")

    rows = []
    for name, lw in laws.items():
        try:
            if budget is not None and params:
                n, d, c = params, budget / (6.0 * params), budget
            elif budget is not None:
                c = budget
                n, d = lw.optimum(c)
            else:
                c = (flops_for(lw, n=params) if params else flops_for(lw, loss=target_loss) if target_loss
                     else flops_for(lw, d=unique))
                n, d = lw.optimum(c)
            row = _law_row(name, lw, n, d, arch, seq_len, vocab, hw, gpus, mfu, unique, c, inference_tokens)
        except (ValueError, FmforgeError) as err:  # a target loss below this law's floor; no shape that small
            rows.append({"law": name, "source": lw.source, "error": str(err)})
            continue
        row["budget_flops"] = c
        rows.append(row)
    pick = next(r for r in rows if r["law"] == chosen)
    if "error" in pick:
        raise FmforgeError(f"law {chosen}: {pick['error']}")
    config, warnings = propose_config(pick, pick["budget_flops"], seq_len, data, hw, gpus)
    cfg = build_config(config)  # the proposal must pass the same validation `fmforge train` applies
    if budget is not None and pick["flops"] > 1.25 * pick["budget_flops"]:
        # Non-embedding laws leave the output head's matmul out of 6ND; at small widths it dominates.
        warnings.append(f"the proposed shape needs {pick['flops']:.3g} FLOPs, {pick['flops'] / pick['budget_flops']:.1f}x "
                        "the budget: 6ND leaves out the output head and attention, which dominate at this size")
    fitted = _FITTED.get(laws.get("fitted"))
    if fitted is not None:
        row = next(r for r in rows if r["law"] == "fitted")
        if "error" not in row:
            ci = fitted.loss_ci(row["params"], row["tokens"])
            row["loss_ci"] = list(ci) if ci else None
        if fitted.at_bound:
            warnings.append(f"the fitted law's constant(s) {', '.join(fitted.at_bound)} ended at the edge of the fit's "
                            "range: the ladder does not pin the law down (add sizes or token budgets)")
        for key, what in (("N", "params"), ("D", "tokens")):
            seen = [p[key] for p in fitted.points if key in p]
            if seen and row.get(what) and not min(seen) / 10 <= row[what] <= max(seen) * 10:
                warnings.append(f"the fitted law is extrapolated from {key} in [{min(seen):.3g}, {max(seen):.3g}] "
                                f"to {row[what]:.3g}")
    guidance = hparams.guidance(pick["params_total"], pick["params_non_embedding"], pick["budget_flops"],
                                pick["loss"], seq_len)
    return {
        "budget": {"flops": budget, "source": source if budget is not None else None},
        "hardware": None if hw is None else {"name": hw.name, "devices": gpus, "peak_tflops": hw.peak_tflops,
                                             "memory_gb": hw.memory_gb, "usd_per_hour": hw.usd_per_hour, "mfu": mfu},
        "unique_tokens": unique, "inference_tokens": inference_tokens, "arch": arch, "seq_len": seq_len,
        "laws": rows, "chosen": chosen, "hparams": guidance, "config": cfg.model_dump(mode="json"),
        "warnings": warnings,
    }


def rescale(config: str, overrides: list[str], global_batch_tokens: int | None, world_size: int | None,
            rule: str) -> tuple[dict, list[str]]:

    cfg = load_config(config, overrides)
    changes, why = hparams.rescale_plan(cfg, global_batch_tokens, world_size, rule)
    return changes, why


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:.2f}"


def render(report: dict, console=None) -> None:
    """Terminal tables: one row per law, then repetition, inference-aware and hyperparameter guidance."""
    from rich.console import Console
    from rich.table import Table

    if console is None:  # piped output: keep the tables whole rather than wrap them to 80 columns
        console = Console()
        if not console.is_terminal:
            console = Console(width=150)
    b = report["budget"]
    if b["flops"] is not None:
        console.print(f"budget: {b['flops']:.3g} FLOPs ({b['source']})")
    hw = report["hardware"]
    if hw:
        console.print(f"hardware: {hw['devices']} x {hw['name']} ({hw['peak_tflops']:.3g} TFLOP/s bf16 peak, "
                      f"{hw['memory_gb']:.0f} GB, ${hw['usd_per_hour']}/h each), MFU {hw['mfu']:.0%}")
    t = Table(title="compute-optimal run per law (losses are on each paper's data: compare choices, not numbers)")
    for col in ("law", "N", "D", "D/N", "loss", "FLOPs", "shape (L x d, heads/kv)", "time", "cost"):
        t.add_column(col, justify="left" if col in ("law", "shape (L x d, heads/kv)") else "right")
    for r in report["laws"]:
        if "error" in r:
            t.add_row(r["law"], "-", "-", "-", "-", "-", r["error"], "-", "-")
            continue
        m = r["model_resolved"]
        mark = " *" if r["law"] == report["chosen"] else ""
        nkind = "" if r["n_definition"] == "total" else " ne"
        loss = f"{r['loss']:.3f}"
        if r.get("loss_ci"):
            loss += f" [{r['loss_ci'][0]:.3f}, {r['loss_ci'][1]:.3f}]"
        t.add_row(r["law"] + mark, _si(r["params"]) + nkind, _si(r["tokens"]), f"{r['tokens_per_param']:.1f}",
                  loss, f"{r['flops']:.3g}",
                  f"{m['n_layer']} x {m['d_model']}, {m['n_head']}/{m['n_kv_head']}",
                  f"{r['hours']:,.1f} h" if "hours" in r else "-", _usd(r["cost_usd"]) if "cost_usd" in r else "-")
    console.print(t)
    console.print("N: parameters as each law counts them (ne: non-embedding); FLOPs: the proposed shape's "
                  "6 x weights + attention per token x D; * = the law the config is built from")
    reps = [r for r in report["laws"] if "repetition" in r]
    if reps:
        t = Table(title=f"data-constrained (Muennighoff et al. 2023): {_si(report['unique_tokens'])} unique tokens")
        for col in ("law", "epochs", "effective D", "loss (fresh)", "loss (repeated)", "better split N / D / loss"):
            t.add_column(col, justify="right")
        for r in reps:
            p = r["repetition"]
            t.add_row(r["law"], f"{p['epochs']:.2f}", _si(p["effective_tokens"]), f"{p['loss_if_unique']:.3f}",
                      f"{p['loss_repeated']:.3f}", f"{_si(p['data_constrained_params'])} / "
                      f"{_si(p['data_constrained_tokens'])} / {p['data_constrained_loss']:.3f}")
        console.print(t)
    infs = [r for r in report["laws"] if "inference_aware" in r]
    if infs:
        t = Table(title=f"inference-aware (Sardana & Frankle 2023): same loss, {_si(report['inference_tokens'])} "
                        "inference tokens")
        for col in ("law", "N", "D", "train FLOPs", "train+inference FLOPs", "saving vs compute-optimal"):
            t.add_column(col, justify="right")
        for r in infs:
            p = r["inference_aware"]
            t.add_row(r["law"], _si(p["params"]), _si(p["tokens"]), f"{p['train_flops']:.3g}",
                      f"{p['total_flops']:.3g}", f"{p['saving']:.1%}")
        console.print(t)
    t = Table(title=f"batch size and learning rate for the {report['chosen']} run")
    for col in ("heuristic", "global batch (tokens)", "peak lr", "source"):
        t.add_column(col)
    for h in report["hparams"]:
        t.add_row(h["heuristic"], _si(h["batch_tokens"]), "-" if h["lr"] is None else f"{h['lr']:.3g}", h["source"])
    console.print(t)
    c = report["config"]
    console.print(f"proposed config ({report['chosen']}): {c['model']['n_layer']} layers x {c['model']['d_model']}, "
                  f"{c['model']['n_head']} heads ({c['model']['n_kv_head']} kv), context {c['data']['seq_len']}; "
                  f"{c['train']['max_steps']} steps x {c['train']['global_batch']} tokens, lr {c['optim']['lr']}, "
                  f"warmup {c['optim']['warmup_steps']}, micro-batch {c['train']['micro_batch_size']}, "
                  f"activation checkpointing {c['parallel']['ac']}")
    for w in report["warnings"]:
        console.print(f"warning: {w}")


def plot(report: dict, path: str | Path, laws: dict[str, Law] | None = None) -> None:
    """Left: the chosen law's loss vs N on iso-FLOP curves (budget / 100 ... x 100), its optimum locus and the
    chosen point. Right: compute-optimal N vs C under every law, where they disagree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    laws = laws or dict(LAWS)
    pick = next(r for r in report["laws"] if r["law"] == report["chosen"])
    law = laws[report["chosen"]]
    c0 = pick["budget_flops"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("viridis")
    budgets = [c0 * 10.0 ** k for k in (-2, -1, 0, 1, 2)]
    for i, c in enumerate(budgets):
        n_opt = law.optimum(c)[0]
        ns = np.logspace(np.log10(n_opt) - 1.5, np.log10(n_opt) + 1.5, 200)
        ax1.plot(ns, [law.loss(n, c / (6 * n)) for n in ns], color=cmap(i / 4), label=f"C = {c:.2g}")
        ax1.plot([n_opt], [law.loss(n_opt, c / (6 * n_opt))], "o", color=cmap(i / 4), ms=4)
    ax1.plot([pick["params"]], [pick["loss"]], "r*", ms=14, label="chosen")
    ax1.set(xscale="log", xlabel="parameters N", ylabel="predicted loss", title=f"iso-FLOP curves ({law.name})")
    ax1.legend(fontsize=8)
    cs = np.logspace(np.log10(c0) - 4, np.log10(c0) + 4, 50)
    for name, lw in laws.items():
        ax2.plot(cs, [lw.optimum(c)[0] for c in cs], label=name)
    ax2.axvline(c0, color="grey", ls=":")
    ax2.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal N",
            title="the laws disagree")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan_command(*, flops: float | None = None, gpu: str | None = None, gpus: int = 1, hours: float | None = None,
                 usd: float | None = None, prices: Sequence[str] = (), mfu: float | None = None,
                 mfu_from: str | None = None, tokens: float | None = None, data: str | None = None,
                 params: float | None = None, target_loss: float | None = None,
                 inference_tokens: float | None = None, law: str | None = None, arch: str = "llama",
                 seq_len: int = 2048, vocab_size: int | None = None, json_out: bool = False,
                 plot_path: str | None = None, write_config: str | None = None, rescale_config: str | None = None,
                 global_batch_tokens: int | None = None, world_size: int | None = None,
                 lr_rule: str = "sqrt", allow_bounded_fit: bool = False) -> None:
    """``fmforge plan``: print the plan's tables (or, ``json_out``, its JSON), and optionally write the plot
    (``plot_path``) and the proposed config (``write_config``). The budget arguments are ``plan``'s;
    ``prices`` are ``NAME=USD`` hourly-price overrides. With ``rescale_config`` it instead carries that
    config to ``global_batch_tokens`` / ``world_size`` (lr by ``lr_rule``) and prints the overrides."""
    if rescale_config:
        _rescale_command(rescale_config, global_batch_tokens, world_size, lr_rule, json_out, write_config)
        return
    report = plan(flops=flops, gpu=gpu, gpus=gpus, hours=hours, usd=usd, prices=parse_prices(list(prices)),
                  mfu=mfu, mfu_from=mfu_from, tokens=tokens, data=data, params=params, target_loss=target_loss,
                  inference_tokens=inference_tokens, law=law, arch=arch, seq_len=seq_len, vocab_size=vocab_size,
                  allow_bounded_fit=allow_bounded_fit)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    if write_config:
        save_config(Config.model_validate(report["config"]), write_config)
        if not json_out:
            print(f"wrote {write_config}: fmforge train {write_config}"
                  + ("" if report["config"]["data"]["path"] else " --data DATA_DIR"))
    if plot_path:
        laws, _ = _select_laws(law, allow_bounded_fit)
        plot(report, plot_path, laws)
        if not json_out:
            print(f"wrote {plot_path}")


def _rescale_command(config: str, global_batch_tokens: int | None, world_size: int | None, lr_rule: str,
                     json_out: bool, write_config: str | None) -> None:
    """``fmforge plan --rescale CONFIG``: print the overrides (and why), optionally write the new config."""
    changes, why = rescale(config, [], global_batch_tokens, world_size, lr_rule)
    if json_out:
        print(json.dumps({"overrides": changes, "why": why}, indent=2))
    else:
        for line in why:
            print(line)
        print("overrides: " + (" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in changes.items()) or "(none)"))
    if write_config:
        cfg = load_config(config, [f"{k}={v}" for k, v in changes.items()])
        save_config(cfg, write_config)
        print(f"wrote {write_config}")
