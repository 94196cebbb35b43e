"""``fmforge eval human report``: unblind the ratings with the key and summarise them.

Per model: mean Likert score, thumbs-up rate and pairwise win rate (a tie is half a win; a ranking of k
outputs counts as its k(k-1)/2 pairwise outcomes), each with a percentile-bootstrap 95% interval over
items (items are resampled, raters kept); Bradley–Terry strengths from all pairwise outcomes. Agreement
between raters on the same judgements: Fleiss' κ and Krippendorff's α always, Cohen's κ when there are
exactly two raters. Each rater's last answer to an item is the one that counts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from fmforge.errors import FmforgeError
from fmforge.eval.human.agreement import (
    bradley_terry,
    bt_mle_exists,
    category_counts,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
)
from fmforge.eval.human.server import BadRequest, check_answer, read_ratings
from fmforge.eval.human.tasks import read_key
from fmforge.eval.results import save_result

BT_PSEUDO_WINS = 0.5  # per direction and compared pair, only when the plain MLE does not exist


def _answers(ratings: Path, key: dict, key_path: Path) -> tuple[list[dict], Counter]:
    """Each rater's latest valid answer per item, and the count of lines skipped by reason."""
    records, unreadable = read_ratings(ratings)
    if not records and not unreadable and not ratings.is_file():
        raise FmforgeError(f"ratings file not found: {ratings}")
    foreign = [r for r in records if r["task_set"] != key["task_set"]]
    if foreign:
        raise FmforgeError(f"{ratings} holds ratings of another task set ({foreign[0]['task_set'][:12]}) than "
                           f"{key_path} describes ({key['task_set'][:12]}): wrong ratings file or key")
    skipped = Counter({"unreadable line": unreadable} if unreadable else {})
    items = {i: {"id": i, "outputs": [{"label": lab} for lab in sorted(m)]} for i, m in key["items"].items()}
    latest = {}
    for r in records:
        try:
            clean = check_answer({k: v for k, v in r.items() if k != "time"}, items, key["task_set"])
        except BadRequest:
            skipped["invalid answer"] += 1
            continue
        latest[(clean["rater"], clean["item"])] = clean
    if not latest:
        raise FmforgeError(f"{ratings} holds no answers to score")
    return list(latest.values()), skipped


def _outcomes(answer: dict, mapping: dict[str, str]) -> list[tuple[str, str, float]]:
    """(model, other model, points for the first: 1 win, 0.5 tie) for each pairwise outcome of an answer."""
    if "choice" in answer:
        a, b = mapping["A"], mapping["B"]
        return [(a, b, {"A": 1.0, "B": 0.0, "tie": 0.5}[answer["choice"]])]
    ranking = answer.get("ranking") or []
    return [(mapping[x], mapping[y], 1.0) for x, y in combinations(ranking, 2)]


def _item_tables(answers: list[dict], key: dict, names: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
    """Per item × model sums and counts of every per-model statistic (for the item bootstrap), the wins
    matrix (ties half) and the ties matrix."""
    item_ids = sorted({a["item"] for a in answers})
    row, col = {i: n for n, i in enumerate(item_ids)}, {m: n for n, m in enumerate(names)}
    shape = (len(item_ids), len(names))
    t = {k: np.zeros(shape) for k in ("likert_sum", "likert_n", "up", "thumbs_n", "points", "games")}
    wins, ties = np.zeros((len(names),) * 2), np.zeros((len(names),) * 2)
    for a in answers:
        mapping, r = key["items"][a["item"]], row[a["item"]]
        for label, score in a["likert"].items():
            t["likert_sum"][r, col[mapping[label]]] += score
            t["likert_n"][r, col[mapping[label]]] += 1
        for label, verdict in a["thumbs"].items():
            t["up"][r, col[mapping[label]]] += verdict == "up"
            t["thumbs_n"][r, col[mapping[label]]] += 1
        for x, y, pts in _outcomes(a, mapping):
            i, j = col[x], col[y]
            for m, p in ((i, pts), (j, 1.0 - pts)):
                t["points"][r, m] += p
                t["games"][r, m] += 1
            wins[i, j] += pts
            wins[j, i] += 1.0 - pts
            if pts == 0.5:
                ties[i, j] += 1
                ties[j, i] += 1
    return t, wins, ties


def _num(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _bootstrap(num: np.ndarray, den: np.ndarray, weights: np.ndarray) -> list[tuple]:
    """Per model: (point estimate, 2.5th and 97.5th percentile over the item-resampled estimates)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        point = num.sum(axis=0) / den.sum(axis=0)
        boot = (weights @ num) / (weights @ den)
    out = []
    for m in range(num.shape[1]):
        finite = boot[:, m][np.isfinite(boot[:, m])]
        lo, hi = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (math.nan, math.nan))
        out.append((_num(point[m]), _num(lo), _num(hi)))
    return out


def _agreement_units(answers: list[dict]) -> dict[str, dict[tuple, dict[str, object]]]:
    """Per kind of judgement: unit -> {rater: value}."""
    units = {"likert": {}, "thumbs": {}, "choice": {}, "ranking": {}}
    for a in answers:
        rater, item = a["rater"], a["item"]
        for label, v in a["likert"].items():
            units["likert"].setdefault((item, label), {})[rater] = v
        for label, v in a["thumbs"].items():
            units["thumbs"].setdefault((item, label), {})[rater] = v
        if "choice" in a:
            units["choice"].setdefault((item,), {})[rater] = a["choice"]
        for pos, label in enumerate(a.get("ranking") or [], 1):
            units["ranking"].setdefault((item, label), {})[rater] = pos
    return units


def agreement(answers: list[dict]) -> dict:
    """Inter-rater agreement per kind of judgement over the units (item, or item × output) that at least
    two raters judged: Fleiss' κ (nominal), Krippendorff's α (nominal, or ordinal and interval for scores
    and rank positions) and, with exactly two raters, Cohen's κ (quadratic-weighted for Likert scores)."""
    raters = sorted({a["rater"] for a in answers})
    levels = {"likert": ("ordinal", "interval"), "thumbs": ("nominal",), "choice": ("nominal",),
              "ranking": ("ordinal",)}
    out = {}
    for kind, units in _agreement_units(answers).items():
        shared = {u: by for u, by in units.items() if len(by) >= 2}
        if not shared:
            continue
        data = [[by.get(r) for by in shared.values()] for r in raters]
        res = {"units": len(shared), "fleiss_kappa": _num(fleiss_kappa(category_counts(
            [list(by.values()) for by in shared.values()], [1, 2, 3, 4, 5] if kind == "likert" else None)))}
        for level in levels[kind]:
            res[f"alpha_{level}"] = _num(krippendorff_alpha(data, level))
        if len(raters) == 2:
            weights = "quadratic" if kind in ("likert", "ranking") else None
            cats = [1, 2, 3, 4, 5] if kind == "likert" else None
            name = "cohen_kappa_quadratic" if weights else "cohen_kappa"
            res[name] = _num(cohen_kappa(data[0], data[1], weights, cats))
        out[kind] = res
    return out


def _bt(wins: np.ndarray, names: list[str]) -> dict | None:
    if wins.sum() == 0 or len(names) < 2:
        return None
    exists = bt_mle_exists(wins)
    compared = (wins + wins.T) > 0
    strengths = bradley_terry(wins if exists else wins + BT_PSEUDO_WINS * compared)
    return {"strengths": dict(zip(names, map(float, strengths))), "regularized": not exists}


def summarize(answers: list[dict], key: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """The report's numbers (see the module docstring) from validated answers and their key."""
    names = [m["name"] for m in key["models"]]
    t, wins, ties = _item_tables(answers, key, names)
    rng = np.random.default_rng(seed)
    n_items = t["likert_n"].shape[0]
    weights = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_boot).astype(float)
    likert = _bootstrap(t["likert_sum"], t["likert_n"], weights)
    thumbs = _bootstrap(t["up"], t["thumbs_n"], weights)
    win = _bootstrap(t["points"], t["games"], weights)
    bt = _bt(wins, names)
    models = []
    for m, model in enumerate(key["models"]):
        models.append({
            "name": model["name"], "run_dir": model.get("run_dir"),
            "likert_mean": likert[m][0], "likert_ci": list(likert[m][1:]), "likert_n": int(t["likert_n"][:, m].sum()),
            "thumbs_up_rate": thumbs[m][0], "thumbs_up_ci": list(thumbs[m][1:]),
            "thumbs_n": int(t["thumbs_n"][:, m].sum()),
            "win_rate": win[m][0], "win_rate_ci": list(win[m][1:]), "comparisons": int(t["games"][:, m].sum()),
            "bt_strength": bt["strengths"][model["name"]] if bt else None})
    pairwise = [{"a": names[i], "b": names[j], "a_wins": float(wins[i, j] - 0.5 * ties[i, j]),
                 "b_wins": float(wins[j, i] - 0.5 * ties[i, j]), "ties": int(ties[i, j])}
                for i, j in combinations(range(len(names)), 2) if wins[i, j] + wins[j, i] > 0]
    raters = sorted({a["rater"] for a in answers})
    return {"task_set": key["task_set"], "raters": raters, "items_rated": n_items, "answers": len(answers),
            "models": models, "pairwise": pairwise, "bradley_terry": bt, "agreement": agreement(answers),
            "bootstrap": {"samples": n_boot, "seed": seed, "resampled": "items", "interval": 0.95}}


_AGREEMENT_COLUMNS = {"fleiss_kappa": "Fleiss κ", "alpha_nominal": "α nom", "alpha_ordinal": "α ord",
                      "alpha_interval": "α int", "cohen_kappa": "Cohen κ", "cohen_kappa_quadratic": "Cohen κw"}


def _fmt(x, fmt: str) -> str:
    return "–" if x is None else f"{x:{fmt}}"


def _with_ci(point, ci, percent: bool) -> str:
    """``3.79 (3.50–4.08)`` or ``83% (69–94)``."""
    if point is None:
        return "–"
    if percent:
        return f"{point:.0%}" + ("" if ci[0] is None else f" ({ci[0] * 100:.0f}–{ci[1] * 100:.0f})")
    return f"{point:.2f}" + ("" if ci[0] is None else f" ({ci[0]:.2f}–{ci[1]:.2f})")


def print_report(report: dict, console: Console) -> None:
    """The report as rich tables: per model, pairwise outcomes, inter-rater agreement."""
    table = Table(title=f"Human evaluation: {len(report['raters'])} rater(s), {report['items_rated']} items, "
                        f"task set {report['task_set'][:12]}", box=box.SIMPLE_HEAD,
                  caption="(95% interval, items bootstrapped)  B–T: Bradley–Terry strength")
    for col in ("model", "Likert 1–5", "thumbs up", "win rate", "B–T", "n"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col != "model")
    for m in report["models"]:
        table.add_row(m["name"], _with_ci(m["likert_mean"], m["likert_ci"], False),
                      _with_ci(m["thumbs_up_rate"], m["thumbs_up_ci"], True),
                      _with_ci(m["win_rate"], m["win_rate_ci"], True), _fmt(m["bt_strength"], ".3f"),
                      str(m["likert_n"]))
    console.print(table)
    if report["pairwise"]:
        pairs = Table(title="Pairwise outcomes", caption="a ranking counts pair by pair", box=box.SIMPLE_HEAD)
        for col in ("model A", "model B", "A wins", "B wins", "ties"):
            pairs.add_column(col, justify="left" if col.startswith("model") else "right")
        for p in report["pairwise"]:
            pairs.add_row(p["a"], p["b"], f"{p['a_wins']:g}", f"{p['b_wins']:g}", str(p["ties"]))
        console.print(pairs)
    if report["bradley_terry"] and report["bradley_terry"]["regularized"]:
        console.print(f"note: a model never won (or never lost), so Bradley–Terry adds {BT_PSEUDO_WINS} "
                      "pseudo-wins each way per pair")
    if not report["agreement"]:
        console.print("agreement: needs at least two raters on the same items")
        return
    agree = Table(title="Inter-rater agreement", box=box.SIMPLE_HEAD,
                  caption="α nom/ord/int: Krippendorff's α, nominal/ordinal/interval; κw: quadratic weights")
    shown = [s for s in _AGREEMENT_COLUMNS if any(s in a for a in report["agreement"].values())]
    for col in ("judged", "units", *(_AGREEMENT_COLUMNS[s] for s in shown)):
        agree.add_column(col, justify="left" if col == "judged" else "right", no_wrap=True)
    for kind, res in report["agreement"].items():
        agree.add_row(kind, str(res["units"]), *(_fmt(res.get(s), ".3f") for s in shown))
    console.print(agree)


def _flat_metrics(report: dict, model: dict) -> dict:
    metrics = {"likert_mean": model["likert_mean"], "likert_ci_low": model["likert_ci"][0],
               "likert_ci_high": model["likert_ci"][1], "thumbs_up_rate": model["thumbs_up_rate"],
               "thumbs_up_ci_low": model["thumbs_up_ci"][0], "thumbs_up_ci_high": model["thumbs_up_ci"][1],
               "win_rate": model["win_rate"], "win_rate_ci_low": model["win_rate_ci"][0],
               "win_rate_ci_high": model["win_rate_ci"][1], "bt_strength": model["bt_strength"],
               "answers": model["likert_n"], "comparisons": model["comparisons"], "raters": len(report["raters"]),
               "items": report["items_rated"]}
    for kind, res in report["agreement"].items():
        metrics.update({f"{kind}_{stat}": v for stat, v in res.items() if stat != "units"})
    return {k: v for k, v in metrics.items() if v is not None}


def human_report(ratings: str | Path, key: str | Path, *, json_out: bool = False, n_boot: int = 2000, seed: int = 0,
                 save: bool = True, echo=print) -> dict:
    """``fmforge eval human report``: score the ratings file ``ratings`` with the task set's ``key``, print
    the tables (or one JSON object with ``json_out``) and, with ``save``, write each model's numbers to
    ``RUN_DIR/eval/human.json`` of every run directory the key names that exists. Returns the report."""
    if n_boot < 100:
        raise FmforgeError(f"--bootstrap must be at least 100 resamples (got {n_boot})")
    ratings, key_path = Path(ratings), Path(key)
    key_doc = read_key(key_path)
    answers, skipped = _answers(ratings, key_doc, key_path)
    report = {"ratings": str(ratings), "key": str(key_path), **summarize(answers, key_doc, n_boot, seed),
              "skipped": dict(skipped)}
    saved = []
    if save:
        for model in report["models"]:
            run_dir = model.get("run_dir")
            if run_dir and Path(run_dir).is_dir():
                others = [m["name"] for m in report["models"] if m is not model]
                saved.append(str(save_result(run_dir, "human", "human", _flat_metrics(report, model),
                                             model=model["name"], compared_with=others, report=report)))
    report["saved"] = saved
    if json_out:
        echo(json.dumps(report, ensure_ascii=False))
    else:
        print_report(report, Console(highlight=False))
        for reason, n in sorted(skipped.items()):
            echo(f"skipped {n} rating line(s): {reason}")
        for path in saved:
            echo(f"saved {path}")
    return report
