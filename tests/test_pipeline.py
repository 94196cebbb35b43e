"""Pipeline files are validated whole before anything runs; state, content hashes, lineage, the progress display
and the DAG picture (in-process)."""

from __future__ import annotations

import io
import json
import struct
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

import fmforge
from fmforge.cli import main
from fmforge.errors import FmforgeError
from fmforge.io.fs import sha256_file
from fmforge.pipeline.command import run_pipeline
from fmforge.pipeline.dag import draw
from fmforge.pipeline.lifecycle import EXAMPLE
from fmforge.pipeline.lineage import lineage
from fmforge.pipeline.progress import StepView, progress_table
from fmforge.pipeline.resolve import MissingValue, Scope, compare
from fmforge.pipeline.spec import load_pipeline
from fmforge.pipeline.state import State, content_hash, file_manifest, manifest_hash, still_matches

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
    (("${steps.eval.metrics.val_loss}", "${steps.evl.metrics.val_loss}"),
     "steps.gate.condition: ${steps.evl.metrics.val_loss} names no step 'evl'"),
    (("${steps.eval.metrics.val_loss}", "${steps.eval.scores.val_loss}"),
     "steps.gate.condition: ${steps.eval.scores.val_loss}: step 'eval' declares no output 'scores'"),
    (("${steps.eval.metrics.val_loss}", "${steps.train.run_dir.val_loss}"),
     "steps.gate.condition: ${steps.train.run_dir.val_loss}: train.run_dir is a path, not JSON"),
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


def test_the_lifecycle_example_ships_in_the_package_and_the_checkout_links_to_it():
    assert EXAMPLE.is_file() and EXAMPLE.is_relative_to(Path(fmforge.__file__).parent)
    assert not list(EXAMPLE.parent.glob("*.py"))  # steps run in this folder: nothing there may shadow a module
    link = Path(__file__).resolve().parents[1] / "examples" / "lifecycle.yaml"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute() and link.resolve() == EXAMPLE.resolve()


def test_the_lifecycle_example_is_a_valid_pipeline():
    pipe = load_pipeline(EXAMPLE, {"corpus": "corpus"})
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


def _safetensors(path: Path, tensors: dict, metadata: dict) -> Path:
    save_file(tensors, path, metadata=metadata)
    return path


def _reordered_header(source: Path, target: Path) -> Path:
    """``source`` with its ``__metadata__`` keys written in reverse order (same tensors, same metadata)."""
    raw = source.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return target


def test_safetensors_files_with_the_same_tensors_and_metadata_in_another_order_hash_the_same(tmp_path):
    tensors = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4, dtype=torch.bfloat16)}
    meta = {"format": "pt", "arch": "llama", "step": "40", "vocab": "512"}
    a = _safetensors(tmp_path / "a.safetensors", tensors, meta)
    b = _safetensors(tmp_path / "b.safetensors", tensors, dict(reversed(list(meta.items()))))
    c = _reordered_header(a, tmp_path / "c.safetensors")
    assert a.read_bytes() != c.read_bytes()  # byte-different files ...
    assert content_hash(a) == content_hash(b) == content_hash(c)  # ... holding the same content
    assert sha256_file(a) != sha256_file(c)
    (tmp_path / "run").mkdir()
    c.replace(tmp_path / "run" / "model.safetensors")
    manifest = file_manifest(tmp_path / "run")
    a.replace(tmp_path / "run" / "model.safetensors")
    assert still_matches(tmp_path / "run", manifest)


def test_safetensors_files_with_other_tensors_or_metadata_hash_differently(tmp_path):
    tensors = {"w": torch.arange(12.0).reshape(3, 4)}
    base = content_hash(_safetensors(tmp_path / "a.safetensors", tensors, {"step": "40"}))
    changed = {"w": torch.arange(12.0).reshape(3, 4).clone()}
    changed["w"][2, 3] = 11.5
    assert content_hash(_safetensors(tmp_path / "b.safetensors", changed, {"step": "40"})) != base
    assert content_hash(_safetensors(tmp_path / "c.safetensors", {"w": tensors["w"].reshape(4, 3)},
                                     {"step": "40"})) != base
    assert content_hash(_safetensors(tmp_path / "d.safetensors", tensors, {"step": "41"})) != base


def test_a_file_named_safetensors_that_is_not_one_is_hashed_as_plain_bytes(tmp_path):
    for i, blob in enumerate((b"weights", b"", (10).to_bytes(8, "little") + b"{not json}", (1 << 40).to_bytes(8, "little"))):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(blob)
        assert content_hash(path) == sha256_file(path)


GATE_ONLY = """
params:
  score: 0.3
steps:
  gate:
    condition: [{left: "${params.score}", op: "<", right: 0.5}]
    if: [ship]
    else: [stop]
  ship: {fail: "shipping is not a verb: this step stands for one"}
  stop: {fail: "score ${params.score} too high"}
"""


def test_progress_table_shows_each_step_state_and_elapsed_time():
    now = 1000.0
    steps = [StepView("data", "reused", 990.0, 990.0), StepView("train", "running", 987.96),
             StepView("eval", "pending"), StepView("quantize", "succeeded", 900.0, 912.5),
             StepView("gate", "failed", 999.0, 999.0, "exit status 2: fmforge: error: bad"),
             StepView("stop", "skipped", None, 999.0), StepView("ship", "stopped", None, 999.0)]
    console = Console(file=io.StringIO(), width=120, record=True)
    console.print(progress_table(steps, now, "pipeline t, run 3"))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if line.startswith("│")}
    assert rows == {"data": ["cached", "-", ""], "train": ["running", "12.0s", ""], "eval": ["pending", "", ""],
                    "quantize": ["done", "12.5s", ""], "gate": ["failed", "0.0s", "exit status 2: fmforge: error: bad"],
                    "stop": ["skipped", "", ""], "ship": ["stopped", "", ""]}
    assert "1 cached, 1 done, 1 failed, 1 pending, 1 running, 1 skipped, 1 stopped" in " ".join(text.split())


def test_progress_off_a_terminal_is_one_plain_line_per_state_change(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "run", str(write(tmp_path, GATE_ONLY)), "--out", str(tmp_path / "out"), "--param", "score=0.7"])
    assert exit_.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    changes = [line.split("]", 1)[1].split()[:2] for line in lines if line.startswith("[")]
    assert changes == [["gate", "succeeded"], ["ship", "skipped"], ["stop", "failed"]]
    assert not any(ch in "".join(lines) for ch in "┏│└")


def test_progress_on_a_terminal_is_a_live_table_instead_of_lines(tmp_path, capsys):
    screen = io.StringIO()
    result = run_pipeline(write(tmp_path, GATE_ONLY), {}, tmp_path / "out",
                          console=Console(file=screen, force_terminal=True, width=100, color_system=None))
    assert result["steps"] == {"gate": "succeeded", "ship": "failed", "stop": "skipped"}
    drawn = screen.getvalue()
    assert "│ gate" in drawn and "│ done" in drawn and "│ skipped" in drawn and "shipping is not a verb" in drawn
    assert "0.3 < 0.5: True" in drawn  # messages print above the table
    assert "succeeded  |" not in drawn + capsys.readouterr().out


def test_a_reference_to_a_value_the_output_lacks_names_step_field_and_the_keys_there(tmp_path):
    pipe = load_pipeline(write(tmp_path, GOOD))
    scope = Scope(pipe, tmp_path / "out")
    scope.values["eval"] = {"metrics": {"val_loss": 2.5, "per_task": [1, 2], "evil\nkey": 1}}
    gate = pipe.steps["gate"]
    assert scope.lookup("steps.eval.metrics.val_loss", gate, "steps.gate.condition[0].left", {}) == 2.5
    cases = {"steps.eval.metrics.val_los": "(output 'metrics'; keys: val_loss, per_task, 'evil\\nkey')",
             "steps.eval.metrics.per_task.5": "(output 'metrics'; a list of 2 items there)",
             "steps.eval.metrics.val_loss.mean": "(output 'metrics'; 2.5 there, not a mapping)"}
    for expr, tail in cases.items():
        with pytest.raises(MissingValue) as err:
            scope.lookup(expr, gate, "steps.gate.condition[0].left", {})
        assert str(err.value) == (f"pipeline: step 'gate' field 'condition[0].left': ${{{expr}}} not found in "
                                  f"eval's stdout {tail}")
