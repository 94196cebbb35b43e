"""``fmforge bias data TABLE ...``: Clarify's pre- and post-training bias metrics on a labelled table."""

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

from fmforge.bias import clarify, gates
from fmforge.bias.tables import (
    Columns,
    Selector,
    Table,
    distinct_values,
    numeric_features,
    parse_values,
    read_table,
    select,
)
from fmforge.config import build_config
from fmforge.data.labelled import read_labelled
from fmforge.errors import FmforgeError, clip
from fmforge.io.fs import sha256_file
from fmforge.runs import load_pretrained

RUN_PREDICTION = "predicted (run)"

DESCRIPTIONS = {
    "CI": "class imbalance", "DPL": "difference in positive proportions of labels", "KL": "KL divergence",
    "JS": "Jensen-Shannon divergence", "LP": "L2 norm of label distribution difference",
    "TVD": "total variation distance", "KS": "Kolmogorov-Smirnov distance (max over labels)",
    "CDDL": "conditional demographic disparity in labels", "DPPL": "difference in positive proportions in "
    "predictions", "DI": "disparate impact", "DCAcc": "difference in conditional acceptance",
    "DCR": "difference in conditional rejection", "RD": "recall difference", "SD": "specificity difference",
    "DAR": "difference in acceptance rates (precision)", "DRR": "difference in rejection rates",
    "AD": "accuracy difference", "TE": "treatment equality", "FT": "flip test (k-NN counterfactual)",
    "GE": "generalized entropy index (alpha 2)",
}


def bias_data(table: str, *, facet: str, label: str, positive: list[str] | str | None = None,
              positive_threshold: float | None = None, facet_value: list[str] | str | None = None,
              facet_threshold: float | None = None, facet_terms: str | None = None, predicted: str | None = None,
              group: str | None = None, run: str | None = None, text: str = "text", out: str | None = None,
              json_out: bool = False, fail_if: list[str] | None = None) -> dict:
    """Clarify bias metrics of ``table`` (CSV/TSV/JSONL/Parquet, or ``__label__`` text lines: columns
    ``label``, ``text``).

    The facet's sensitive group d is the rows whose ``facet`` column equals ``facet_value`` (comma list), is
    above ``facet_threshold``, or mentions any word of ``facet_terms`` (comma list; whole words, any case);
    ``--facet COL=VALUE`` is short for ``--facet COL --facet-value VALUE``. A label is positive when it is one of
    ``positive`` or above ``positive_threshold``; ``predicted`` (a column read with the same rule) adds the
    post-training metrics; so does ``run``, a fine-tuned fmforge text classifier (``finetune.task=classify``)
    whose predictions on the ``text`` column are used instead; ``group`` enables CDDL. Results (with the input's sha256 and a timestamp) go to
    ``out`` and/or stdout; each ``fail_if`` condition that holds fails the run (exit 1) naming the metric.
    """
    for condition in fail_if or []:
        gates.parse_condition(condition)  # a typo in a gate fails before any work
    data = read_table(table)
    if run:
        if predicted:
            raise FmforgeError("give --predicted COL or --run RUN_DIR, not both")
        predicted = _add_run_predictions(data, run, text)
    facet_sel, label_sel = _selectors(data, facet, facet_value, facet_threshold, facet_terms, label, positive,
                                      positive_threshold)
    cols = select(data, facet_sel, label_sel, predicted=predicted, group=group)
    result = _report(data, cols, facet_sel, label_sel, predicted, group)
    text = gates.dumps(result)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    print(text if json_out else format_report(result, out))
    gates.enforce(fail_if, result)
    return result


def bias_compare(old: str, new: str, *, json_out: bool = False, fail_if: list[str] | None = None) -> list[dict]:
    """``fmforge bias compare OLD.json NEW.json``: metric-by-metric drift (new - old); ``--fail-if`` applies to
    the deltas."""
    return gates.compare(old, new, json_out=json_out, fail_if=fail_if)


def _add_run_predictions(data: Table, run: str, text: str) -> str:
    """Predict every row's ``text`` with the classifier in ``run``; store the class name in a new column."""
    if text not in data.columns:
        raise FmforgeError(f"text column {clip(text)} is not in {data.path}; columns: {', '.join(data.columns[:40])}")
    texts = [row.get(text) for row in data.rows]
    present = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    labels = predict_classes(run, [texts[i] for i in present])
    for row in data.rows:
        row[RUN_PREDICTION] = None  # rows without text are counted as missing a prediction and skipped
    for i, label in zip(present, labels):
        data.rows[i][RUN_PREDICTION] = label
    data.columns.append(RUN_PREDICTION)
    return RUN_PREDICTION


def predict_classes(run_dir: str, texts: list[str], batch_size: int = 32) -> list[str]:
    """Class names a fine-tuned fmforge text classifier predicts for ``texts``, encoded as its training encoded
    them (``data/labelled.py``: [CLS] + tokens + [SEP], padded to ``data.seq_len``). The class names are the
    sorted labels of the run's training data (``data.path`` in its ``config.yaml``), as training indexed them."""
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise FmforgeError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = build_config(yaml.safe_load(config.read_text()))
    data_path = Path(str(cfg.data.path))
    if not data_path.is_file():
        raise FmforgeError(f"the run's labelled data {data_path} (which names its classes) is not there any more")
    names = sorted({label for _, label in read_labelled(data_path)[0]})
    classes = sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else names
    model, tokenizer = load_pretrained(run_dir, "cpu", family="bert")
    if getattr(model.cfg, "num_labels", 0) != len(classes):
        raise FmforgeError(f"{run_dir} is not a text classifier over the {len(classes)} classes of {data_path}")
    vocab, seq_len = tokenizer.tokenizer, cfg.data.seq_len
    start = vocab.token_to_id("[CLS]") if vocab.token_to_id("[CLS]") is not None else tokenizer.bos_id
    end = vocab.token_to_id("[SEP]") if vocab.token_to_id("[SEP]") is not None else tokenizer.eos_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    out: list[str] = []
    for begin in range(0, len(texts), batch_size):
        ids, masks = [], []
        for sentence in texts[begin:begin + batch_size]:
            toks = (([start] if start is not None else []) + tokenizer.encode(sentence.strip())[: seq_len - 2]
                    + [end])[:seq_len]
            ids.append(toks + [pad] * (seq_len - len(toks)))
            masks.append([1] * len(toks) + [0] * (seq_len - len(toks)))
        with torch.no_grad():
            logits = model(torch.tensor(ids), torch.tensor(masks), classify=True)
        out.extend(classes[i] for i in logits.argmax(-1).tolist())
    return out


def _selectors(data: Table, facet: str, facet_value, facet_threshold, facet_terms, label: str, positive,
               positive_threshold) -> tuple[Selector, Selector]:
    if facet_value is None and facet_threshold is None and not facet_terms and "=" in facet \
            and facet not in data.columns:
        facet, facet_value = facet.split("=", 1)
    chosen = sum(x is not None and x != "" for x in (facet_value, facet_threshold, facet_terms))
    if chosen != 1:
        hint = f"; values of {facet}: {distinct_values(data.rows, facet)}" if facet in data.columns else ""
        raise FmforgeError("give exactly one of --facet-value, --facet-threshold, --facet-terms (or --facet "
                           f"COL=VALUE) to say which rows are the sensitive group{hint}")
    terms = tuple(t.strip() for t in (facet_terms or "").split(",") if t.strip())
    if facet_terms is not None and not terms:
        raise FmforgeError("--facet-terms needs at least one word")
    facet_sel = Selector(facet, values=parse_values(facet_value), threshold=_number(facet_threshold, "facet"),
                         terms=terms)
    if facet_value is not None and not facet_sel.values:
        raise FmforgeError("--facet-value is empty")
    if (positive is None or positive == []) == (positive_threshold is None):
        hint = f"; values of {label}: {distinct_values(data.rows, label)}" if label in data.columns else ""
        raise FmforgeError(f"give exactly one of --positive VALUE or --positive-threshold X for the label{hint}")
    label_sel = Selector(label, values=parse_values(positive), threshold=_number(positive_threshold, "positive"))
    return facet_sel, label_sel


def _number(value, what: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise FmforgeError(f"--{what}-threshold must be a number, got {clip(value)}") from err


def _report(data: Table, cols: Columns, facet_sel: Selector, label_sel: Selector, predicted: str | None,
            group: str | None) -> dict:
    pre, errors = clarify.pretraining_metrics(cols.facet, cols.label, cols.group)
    metrics = {"pretraining": pre}
    d = cols.facet
    counts = {"n_a": int((~d).sum()), "n_d": int(d.sum()), "positive_a": int(cols.label[~d].sum()),
              "positive_d": int(cols.label[d].sum())}
    if cols.pred is not None:
        exclude = {facet_sel.column, label_sel.column, predicted, group}  # features: what is left
        features = numeric_features(cols, exclude)
        post, post_errors = clarify.posttraining_metrics(d, cols.label, cols.pred, features)
        metrics["posttraining"] = post
        errors.update(post_errors)
        counts.update(predicted_positive_a=int(cols.pred[~d].sum()), predicted_positive_d=int(cols.pred[d].sum()),
                      flip_test_features=0 if features is None else int(features.shape[1]))
    return {
        "kind": "bias-data",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {"path": str(Path(data.path).resolve()), "sha256": sha256_file(data.path),
                  "rows_read": len(data.rows), "rows_used": len(cols.rows), "skipped": dict(cols.skipped)},
        "setup": {"facet": facet_sel.describe(), "label": label_sel.describe(), "predicted": predicted,
                  "group": group},
        "counts": counts, "metrics": metrics, "not_computed": errors,
    }


def _show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4f}" if np.isfinite(value) else ("inf" if value > 0 else "-inf")


def format_report(result: dict, out: str | None = None) -> str:
    """The human-readable report: what was compared, group sizes, one line per metric."""
    c = result["counts"]
    lines = [f"bias data: {result['input']['path']} ({result['input']['rows_used']} rows used)",
             f"  facet d: {result['setup']['facet']} (n_d={c['n_d']}, positives {c['positive_d']}); "
             f"facet a: the rest (n_a={c['n_a']}, positives {c['positive_a']})",
             f"  positive label: {result['setup']['label']}"]
    for reason, n in result["input"]["skipped"].items():
        lines.append(f"  skipped {n} {reason}")
    for stage, values in result["metrics"].items():
        lines.append(f"{stage}:")
        for name, value in values.items():
            why = result["not_computed"].get(name)
            tail = f"  (not computed: {why})" if why else ""
            lines.append(f"  {name:<6} {_show(value):>9}  {DESCRIPTIONS[name]}{tail}")
    if out:
        lines.append(f"saved {out}")
    return "\n".join(lines)

