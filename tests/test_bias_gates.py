"""Gates and drift: --fail-if parsing and evaluation, JSON infinities, bias compare."""

import json
import math

import pytest

from fmforge.bias import gates
from fmforge.bias.data_command import bias_compare
from fmforge.errors import FmforgeError


@pytest.mark.parametrize("text, expected", [
    ("DPL > 0.2", gates.Condition("DPL", ">", 0.2)),
    ("abs(DPL)>=0.1", gates.Condition("DPL", ">=", 0.1, absolute=True)),
    (" crows-pairs.gender <= 6e-1 ", gates.Condition("crows-pairs.gender", "<=", 0.6)),
    ("DI < -inf", gates.Condition("DI", "<", -math.inf)),
])
def test_conditions_parse(text, expected):
    assert gates.parse_condition(text) == expected


@pytest.mark.parametrize("text", ["DPL", "DPL => 1", "DPL > x", "abs(DPL > 1", "> 1", ""])
def test_malformed_conditions_are_usage_errors(text):
    with pytest.raises(FmforgeError, match="bad --fail-if") as err:
        gates.parse_condition(text)
    assert err.value.exit_code == 2


RESULTS = {"metrics": {"pretraining": {"DPL": -0.3, "KL": 0.1, "CDDL": None},
                       "posttraining": {"DI": "Infinity"}},
           "crows-pairs": {"gender": 0.61}}


def test_check_reports_each_failing_gate_by_its_dotted_path():
    failures = gates.check(["abs(DPL) > 0.2", "DPL > 0", "DI >= 1e9", "crows-pairs.gender > 0.6"], RESULTS)
    assert failures == ["abs(DPL) > 0.2: metrics.pretraining.DPL = -0.3", "DI >= 1e+09: metrics.posttraining.DI = inf",
                        "crows-pairs.gender > 0.6: crows-pairs.gender = 0.61"]


def test_a_gate_on_a_metric_that_was_not_computed_fails():
    assert gates.check(["CDDL > 0.5"], RESULTS) == ["CDDL > 0.5: metrics.pretraining.CDDL was not computed"]


def test_unknown_and_ambiguous_metrics_are_named():
    with pytest.raises(FmforgeError, match="unknown metric 'XYZ'; metrics: CDDL, DI, DPL"):
        gates.check(["XYZ > 1"], RESULTS)
    with pytest.raises(FmforgeError, match="ambiguous"):
        gates.check(["DPL > 1"], {"a": {"DPL": 1}, "b": {"DPL": 2}})


def test_enforce_raises_gate_failed_with_exit_1():
    with pytest.raises(gates.GateFailed, match="bias gate failed: KL < 1") as err:
        gates.enforce(["KL < 1"], RESULTS)
    assert err.value.exit_code == 1
    gates.enforce(["KL > 1"], RESULTS)
    gates.enforce(None, RESULTS)


def test_infinities_round_trip_as_standard_json():
    text = gates.dumps({"a": math.inf, "b": -math.inf, "c": math.nan, "d": [1.5]})
    assert json.loads(text) == {"a": "Infinity", "b": "-Infinity", "c": None, "d": [1.5]}
    assert gates.flatten(json.loads(text)) == {"a": math.inf, "b": -math.inf, "c": None}


def test_drift_is_metric_by_metric_and_equal_infinities_do_not_drift():
    old = {"metrics": {"DPL": 0.1, "DI": "Infinity", "KL": 0.2}, "counts": {"n_a": 5}}
    new = {"metrics": {"DPL": 0.25, "DI": "Infinity", "JS": 0.01}, "counts": {"n_a": 6}}
    rows = {r["metric"]: r for r in gates.drift(old, new)}
    assert set(rows) == {"metrics.DPL", "metrics.DI", "metrics.KL", "metrics.JS"}
    assert rows["metrics.DPL"]["delta"] == pytest.approx(0.15)
    assert rows["metrics.DI"]["delta"] == 0.0
    assert rows["metrics.KL"]["new"] is None and rows["metrics.KL"]["delta"] is None


def test_bias_compare_prints_drift_and_gates_on_deltas(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"metrics": {"DPL": 0.1, "CI": 0.3}}))
    new.write_text(json.dumps({"metrics": {"DPL": 0.3, "CI": 0.3}}))
    bias_compare(str(old), str(new))
    table = capsys.readouterr().out
    assert "metrics.DPL" in table and "0.2" in table
    with pytest.raises(gates.GateFailed, match="DPL > 0.1"):
        bias_compare(str(old), str(new), json_out=True, fail_if=["DPL > 0.1"])
    assert json.loads(capsys.readouterr().out)["drift"][1]["metric"] == "metrics.DPL"


def test_compare_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FmforgeError, match="no such results file"):
        bias_compare(str(tmp_path / "missing.json"), str(bad))
    with pytest.raises(FmforgeError, match="not a JSON results file"):
        bias_compare(str(bad), str(bad))
    (tmp_path / "a.json").write_text('{"x": "text"}')
    with pytest.raises(FmforgeError, match="share no numeric metrics"):
        bias_compare(str(tmp_path / "a.json"), str(tmp_path / "a.json"))
