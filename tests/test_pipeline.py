"""Pipeline files are validated whole before anything runs; state, lineage and the DAG picture (in-process)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fmforge.cli import main
from fmforge.errors import FmforgeError
from fmforge.pipeline.dag import draw
from fmforge.pipeline.lineage import lineage
from fmforge.pipeline.resolve import compare
from fmforge.pipeline.spec import load_pipeline
from fmforge.pipeline.state import State, file_manifest, manifest_hash, still_matches

GOOD = """
name: t
params:
  lr: 0.003
  steps: {type: int, default: 20}
steps:
  data:
    verb: data prepare
    args: {inputs: [corpus], out: "${out}/data", vocab_size: 300}
    outputs: {dir: {path: "${out}/data"}}
  train:
    verb: train
    args: {config: tiny.yaml, data: "${steps.data.dir}", out: "${out}/run", overrides: ["optim.lr=${params.lr}"]}
    outputs: {run_dir: {path: "${out}/run"}}
  eval:
    verb: eval
    args: {run_dir: "${steps.train.run_dir}", json: true}
    outputs: {metrics: stdout}
  gate:
    condition: [{left: "${steps.eval.metrics.val_loss}", op: "<", right: 9.0}]
    if: [register]
    else: [stop]
  register: {register: {model: "${steps.train.run_dir}", group: g}}
  stop: {fail: "too high"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_valid_pipeline_gets_its_dependencies_from_references_and_branches(tmp_path):
    pipe = load_pipeline(write(tmp_path, GOOD), {"steps": "5"})
    assert pipe.params == {"lr": 0.003, "steps": 5}
    assert pipe.order.index("data") < pipe.order.index("train") < pipe.order.index("eval") < pipe.order.index("gate")
    assert pipe.steps["train"].upstream == {"data"}
    assert pipe.steps["eval"].value_refs == set()  # a path reference is not a value: Slurm can chain it
    assert pipe.steps["gate"].value_refs == {"eval"}
    assert pipe.gated_by == {"register": ("gate", True), "stop": ("gate", False)}
    assert pipe.steps["register"].upstream == {"train", "gate"}


@pytest.mark.parametrize("edit, message", [
    (("verb: eval", "verb: evaluate"), "steps.eval.verb: unknown fmforge verb 'evaluate'"),
    (("json: true}", "json: true, batchsize: 4}"), "steps.eval.args.batchsize: `fmforge eval` has no such argument"),
    (("vocab_size: 300", "vocab_size: many"), "steps.data.args.vocab_size: 'many' is not a valid value"),
    (("${steps.data.dir}", "${steps.dta.dir}"), "steps.train.args: ${steps.dta.dir} names no step 'dta'"),
    (("${steps.data.dir}", "${steps.data.path}"), "step 'data' declares no output 'path'"),
    (("${params.lr}", "${params.rate}"), "steps.train.args: ${params.rate} names no parameter"),
    (('op: "<"', 'op: "=<"'), "steps.gate.condition[0].op: one of"),
    (("else: [stop]", "else: [nowhere]"), "steps.gate.else: no step 'nowhere'"),
    (("steps: {type: int, default: 20}", "steps: {type: integer}"), "params.steps.type: one of int"),
])
def test_one_mistake_is_one_error_naming_the_step_and_field(tmp_path, edit, message):
    with pytest.raises(FmforgeError) as err:
        load_pipeline(write(tmp_path, GOOD.replace(*edit)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_cycle_is_named_step_by_step(tmp_path):
    text = GOOD.replace('config: tiny.yaml,', 'config: tiny.yaml, resume: "${steps.eval.metrics.x}",')
    with pytest.raises(FmforgeError, match=r"dependency cycle .*train -> eval -> train|dependency cycle .*eval -> train -> eval"):
        load_pipeline(write(tmp_path, text))


def test_missing_required_argument_and_bad_param_override_are_refused(tmp_path):
    with pytest.raises(FmforgeError, match="steps.eval.args: `fmforge eval` needs run_dir"):
        load_pipeline(write(tmp_path, GOOD.replace('run_dir: "${steps.train.run_dir}", json: true',
                                                   'json: true, data: "${steps.train.run_dir}"')))
    with pytest.raises(FmforgeError, match="params.steps: expected int, got 'lots'"):
        load_pipeline(write(tmp_path, GOOD), {"steps": "lots"})
    with pytest.raises(FmforgeError, match="--param nope: the pipeline has no such parameter"):
        load_pipeline(write(tmp_path, GOOD), {"nope": "1"})


def test_malformed_yaml_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path, "steps:\n  a: [unclosed\n")
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "run", str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmforge: error:") and "malformed YAML at line" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_conditions_compare_numbers_and_strings_and_refuse_mixed_types():
    assert compare(1.5, "<", 2, "c") and not compare(3, "<=", 2, "c") and compare("a", "==", "a", "c")
    with pytest.raises(FmforgeError, match="c: cannot compare 'x' < 2"):
        compare("x", "<", 2, "c")


def test_a_changed_file_of_an_artifact_is_detected_and_added_files_are_not(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"weights")
    manifest = file_manifest(tmp_path / "a")
    (tmp_path / "a" / "eval.json").write_text("{}")  # a later step adds files to a run directory
    assert still_matches(tmp_path / "a", manifest)
    (tmp_path / "a" / "w.bin").write_bytes(b"weightz")
    assert not still_matches(tmp_path / "a", manifest)


def test_lineage_walks_up_to_the_inputs_and_down_to_what_was_derived(tmp_path):
    state = State(tmp_path)
    state.record_lineage(1, "data", [("/c", "h0", "input")], [(str(tmp_path / "data"), "h1", "path")])
    state.record_lineage(1, "train", [(str(tmp_path / "data"), "h1", "artifact"), ("/cfg", "h2", "input")],
                         [(str(tmp_path / "run"), "h3", "path")])
    state.record_lineage(1, "quantize", [(str(tmp_path / "run"), "h3", "artifact")],
                         [(str(tmp_path / "int8"), "h4", "path")])
    state.close()
    up = lineage(str(tmp_path / "run"), run=str(tmp_path))
    assert [(n["path"], n["depth"]) for n in up] == [(str(tmp_path / "run"), 0), ("/cfg", 1),
                                                     (str(tmp_path / "data"), 1), ("/c", 2)]
    assert up[0]["step"] == "train"
    down = lineage(str(tmp_path / "data"), up=False, run=str(tmp_path))
    assert [n["path"] for n in down] == [str(tmp_path / p) for p in ("data", "run", "int8")]


def test_the_dag_picture_is_a_png_or_an_svg(tmp_path):
    steps = [{"name": "a", "state": "reused", "started": 1.0, "finished": 1.0, "upstream": "[]"},
             {"name": "b", "state": "succeeded", "started": 1.0, "finished": 3.5, "upstream": '["a"]'},
             {"name": "c", "state": "failed", "started": 1.0, "finished": 2.0, "upstream": '["a"]'},
             {"name": "d", "state": "stopped", "started": None, "finished": 2.0, "upstream": '["b", "c"]'}]
    draw(steps, tmp_path / "dag.png", "t")
    draw(steps, tmp_path / "dag.svg", "t")
    assert (tmp_path / "dag.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "dag.svg").read_bytes()[:1000]


def test_manifest_hash_depends_on_content_not_on_order():
    assert manifest_hash({"a": "1", "b": "2"}) == manifest_hash({"b": "2", "a": "1"}) != manifest_hash({"a": "1"})


def test_the_lifecycle_example_is_a_valid_pipeline():
    example = Path(__file__).resolve().parents[1] / "examples" / "lifecycle.yaml"
    pipe = load_pipeline(example, {"corpus": "corpus"})
    assert {"data", "profile", "plan", "tune", "train", "eval", "bias", "gate", "register", "quantize",
            "smoke"} <= set(pipe.steps)
    assert pipe.gated_by["register"] == ("gate", True)


def test_a_cache_entry_older_than_its_expiry_is_not_reused(tmp_path):
    state = State(tmp_path)
    state.remember("k", "train", {"run_dir": "/r"}, {})
    assert state.cached("k", None) == {"outputs": {"run_dir": "/r"}, "files": {}}
    assert state.cached("k", 3600) is not None
    state.db.execute("UPDATE cache SET created = created - 7200")
    assert state.cached("k", 3600) is None and state.cached("other", None) is None
