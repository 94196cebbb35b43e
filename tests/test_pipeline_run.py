"""Running pipelines for real (steps are `python -m fmforge` processes): the cache, resume after kill -9,
parallel branches and failure isolation, conditions both ways, lineage, MLflow, Slurm, the lifecycle example."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import STDLIB
from safetensors.torch import load_file

from fmforge.cli import main
from fmforge.pipeline.command import run_pipeline
from fmforge.pipeline.lifecycle import quickstart_lifecycle
from fmforge.pipeline.lineage import lineage
from fmforge.pipeline.registry import Registry

pytestmark = pytest.mark.slow

TINY = """
model: {arch: llama, size: nano, n_kv_head: 2}
data: {seq_len: 64}
optim: {lr: 3.0e-3, warmup_steps: 5}
train: {global_batch: 256, micro_batch_size: 4, log_interval: 5, eval_interval: 1000, eval_batches: 2, threads: 1}
checkpoint: {interval: 10, keep_last: 2}
log: {tensorboard: false}
"""
PIPELINE = """
name: tiny
params:
  lr: 0.003
  steps: 60
  max_val_loss: 100.0
steps:
  plan:
    verb: plan
    args: {params: 2e6, tokens: 1e7, vocab_size: 512, json: true}
    outputs: {sizing: stdout}
  data:
    verb: data prepare
    args: {inputs: [corpus], out: "${out}/data", vocab_size: 300, val_fraction: 0.1, document_bytes: 8192}
    outputs: {dir: {path: "${out}/data"}}
  train:
    verb: train
    args: {config: tiny.yaml, data: "${steps.data.dir}", out: "${out}/run",
           overrides: ["optim.lr=${params.lr}", "train.max_steps=${params.steps}"]}
    outputs: {run_dir: {path: "${out}/run"}}
  eval:
    verb: eval
    args: {run_dir: "${steps.train.run_dir}", max_batches: 4, json: true}
    outputs: {metrics: stdout}
  gate:
    condition:
      - {left: "${steps.eval.metrics.val_loss}", op: "<", right: "${steps.eval.metrics.unigram_loss}"}
      - {left: "${steps.eval.metrics.val_loss}", op: "<", right: "${params.max_val_loss}"}
    if: [register]
    else: [stop]
  register:
    register: {model: "${steps.train.run_dir}", group: tiny-lm, metrics: "${steps.eval.metrics}"}
  stop: {fail: "val_loss ${steps.eval.metrics.val_loss} is not good enough"}
"""
STEPS = ("plan", "data", "train", "eval", "gate", "register", "stop")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("project")
    (d / "corpus").mkdir()
    for name in ("argparse.py", "textwrap.py", "string.py", "heapq.py", "shlex.py"):
        (d / "corpus" / name).write_bytes((STDLIB / name).read_bytes())
    (d / "tiny.yaml").write_text(TINY)
    (d / "p.yaml").write_text(textwrap.dedent(PIPELINE))
    return d


def run(project: Path, out: str, **kw) -> dict:
    return run_pipeline(project / "p.yaml", kw.pop("params", {}), project / out,
                        registry=str(project / "registry.sqlite"), echo=lambda _m: None, **kw)


@pytest.fixture(scope="module")
def first(project) -> dict:
    result = run(project, "out")
    result["weights"] = load_file(project / "out/steps/train/out/run/model.safetensors")
    return result


def test_first_run_runs_every_step_and_takes_the_if_branch(first):
    assert first["status"] == "succeeded", first["errors"]
    assert first["steps"] == {**dict.fromkeys(STEPS, "succeeded"), "stop": "skipped"}


def test_second_run_reuses_every_step(project, first):
    again = run(project, "out")
    assert again["steps"] == {**dict.fromkeys(("plan", "data", "train", "eval", "register"), "reused"),
                              "gate": "succeeded", "stop": "skipped"}
    assert again["seconds"] < 15


def test_condition_takes_the_else_branch_and_the_fail_step_fails_the_run(project, first):
    result = run(project, "out", params={"max_val_loss": 0.5})
    assert result["status"] == "failed"
    assert result["steps"]["register"] == "skipped" and result["steps"]["stop"] == "failed"
    assert "is not good enough" in result["errors"]["stop"]
    assert result["steps"]["train"] == "reused"  # a gate parameter re-evaluates the gate only


def test_a_condition_on_a_missing_value_exits_2_naming_step_and_field_and_records_nothing(project, first, capsys):
    (project / "typo.yaml").write_text(textwrap.dedent(PIPELINE).replace(
        '- {left: "${steps.eval.metrics.val_loss}", op: "<", right: "${steps.eval.metrics.unigram_loss}"}',
        '- {left: "${steps.eval.metrics.val_los}", op: "<", right: "${steps.eval.metrics.unigram_loss}"}'))
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "run", str(project / "typo.yaml"), "--out", str(project / "out"),
              "--registry", str(project / "registry.sqlite")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmforge: error: pipeline: step 'gate' field 'condition[0].left': "
                          "${steps.eval.metrics.val_los} not found in eval's stdout (output 'metrics'; keys: ")
    assert "val_loss" in err and "\n" not in err
    db = sqlite3.connect(project / "out/pipeline.sqlite")
    run, status = db.execute("SELECT id, status FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    steps = dict(db.execute("SELECT name, state FROM steps WHERE run=?", (run,)))
    db.close()
    assert status == "invalid"
    assert steps == dict.fromkeys(("plan", "data", "train", "eval"), "reused")  # no row for gate or after it


# after the missing-value test: its run evaluates the gate afresh from reused steps
def test_a_corrupted_cached_output_is_detected_by_its_hash_and_rerun(project, first):
    printed = project / "out/steps/plan/stdout.txt"
    original = printed.read_text()
    printed.write_text(original.replace('"arch"', '"arhc"', 1))
    result = run(project, "out")
    assert result["steps"]["plan"] == "succeeded" and printed.read_text() == original
    assert all(result["steps"][s] == "reused" for s in ("data", "train", "eval", "register"))
    assert result["steps"]["gate"] == "succeeded" and result["status"] == "succeeded"


def test_lineage_of_the_model_reaches_the_corpus_and_the_registered_version(project, first):
    run_dir = str((project / "out/steps/train/out/run").resolve())
    up = {n["path"]: n for n in lineage(run_dir)}
    assert str((project / "corpus").resolve()) in up and str((project / "tiny.yaml").resolve()) in up
    assert up[str((project / "out/steps/data/out/data").resolve())]["step"] == "data"
    down = [n["path"] for n in lineage(str(project / "out/steps/data/out/data"), up=False)]
    assert run_dir in down and str((project / "out/steps/eval/stdout.txt").resolve()) in down
    version = Registry(project / "registry.sqlite").get("tiny-lm@1")
    assert lineage("tiny-lm@1", registry=str(project / "registry.sqlite"))[0]["path"] == run_dir
    # the registered version is a copy of the model files: later runs that rewrite run_dir do not change it
    assert Path(version["path"]).parent.name == "tiny-lm" and (Path(version["path"]) / "model.safetensors").is_file()
    assert not (Path(version["path"]) / "checkpoints").exists()


def test_kill_9_of_the_runner_then_resume_matches_an_uninterrupted_run(project, first):
    out = project / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fmforge", "pipeline", "run", str(project / "p.yaml"),
                             "--out", str(out), "--registry", str(project / "registry-killed.sqlite")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "steps/train/out/run/checkpoints"
    deadline = time.monotonic() + 240
    while not any(checkpoints.glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "steps/train/out/run/model.safetensors").exists(), "training finished before the kill"
    db = sqlite3.connect(out / "pipeline.sqlite")
    assert dict(db.execute("SELECT name, state FROM steps"))["train"] == "running"
    db.close()
    time.sleep(1)  # the step's processes die with the runner (parent-death signal)
    result = run_pipeline(project / "p.yaml", {}, out, registry=str(project / "registry-killed.sqlite"),
                          echo=lambda _m: None)
    assert result["status"] == "succeeded"
    assert result["steps"]["data"] == "reused" and result["steps"]["train"] == "succeeded"
    assert "resumed from" in (out / "steps/train/stdout.txt").read_text()
    resumed = load_file(out / "steps/train/out/run/model.safetensors")
    # tensors, not file bytes: safetensors writes its metadata header in no fixed order
    assert resumed.keys() == first["weights"].keys()
    assert all(torch.equal(resumed[k], first["weights"][k]) for k in resumed)


# last of the tests on project/out: it leaves the run directory trained with another lr
def test_changed_parameter_reruns_exactly_the_downstream_steps_and_logs_to_mlflow(project, first, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run(project, "out", params={"lr": 0.002}, mlflow=uri)
    assert result["steps"]["plan"] == "reused" and result["steps"]["data"] == "reused"
    assert all(result["steps"][s] == "succeeded" for s in ("train", "eval", "gate", "register"))
    client = mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("fmforge-tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs["train"].data.params["overrides"] == '["optim.lr=0.002", "train.max_steps=60"]'
    assert "loss" in runs["train"].data.metrics and "val_loss" in runs["eval"].data.metrics
    assert [str(v.version) for v in client.search_model_versions("name='tiny-lm'")] == ["1"]


def test_independent_branches_run_in_parallel_and_finish_when_one_fails(tmp_path):
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""
        steps:
          broken: {verb: data status, args: {data_dir: does-not-exist}}
          after_broken: {verb: plan, args: {params: 2e6, vocab_size: 512, json: true}, depends_on: [broken]}
          fine: {verb: plan, args: {params: 2e6, vocab_size: 512, json: true}, outputs: {sizing: stdout}}
    """))
    result = run_pipeline(tmp_path / "p.yaml", {}, tmp_path / "out", workers=2, echo=lambda _m: None)
    assert result["steps"] == {"broken": "failed", "fine": "succeeded", "after_broken": "stopped"}
    assert "does-not-exist" in result["errors"]["broken"]
    db = sqlite3.connect(tmp_path / "out/pipeline.sqlite")
    times = {n: (s, f) for n, s, f in db.execute("SELECT name, started, finished FROM steps")}
    assert max(times["broken"][0], times["fine"][0]) < min(times["broken"][1], times["fine"][1])


def test_slurm_backend_chains_steps_with_afterok(tmp_path, project, slurm_cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""
        steps:
          data:
            verb: data prepare
            args: {{inputs: ["{project / 'corpus'}"], out: "${{out}}/data", vocab_size: 300, val_fraction: 0.1,
                   document_bytes: 8192}}
            outputs: {{dir: {{path: "${{out}}/data"}}}}
          status: {{verb: data status, args: {{data_dir: "${{steps.data.dir}}"}}, outputs: {{text: text}}}}
    """))
    result = run_pipeline(tmp_path / "p.yaml", {}, tmp_path / "out", backend="slurm", echo=lambda _m: None)
    assert result["status"] == "succeeded", result["errors"]
    assert "fmforge.pipeline.job" in (tmp_path / "out/steps/status/step.sbatch").read_text()
    data_job = (tmp_path / "out/steps/data/slurm_job").read_text().split()[0]
    # submitted before data finished, chained by Slurm (its input is a path, known in advance)
    assert (tmp_path / "out/steps/status/slurm_job").read_text().split()[1:] == [f"afterok:{data_job}"]
    assert "complete" in (tmp_path / "out/steps/status/stdout.txt").read_text()


def test_slurm_cancels_the_dependants_of_a_failed_step(tmp_path, project, slurm_cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""
        steps:
          data:
            verb: data prepare
            args: {{inputs: ["{tmp_path / 'missing'}"], out: "${{out}}/data", vocab_size: 300}}
            outputs: {{dir: {{path: "${{out}}/data"}}}}
          status: {{verb: data status, args: {{data_dir: "${{steps.data.dir}}"}}}}
    """))
    result = run_pipeline(tmp_path / "p.yaml", {}, tmp_path / "out", backend="slurm", echo=lambda _m: None)
    assert result["steps"] == {"data": "failed", "status": "failed"}
    assert "exit status 2: fmforge: error:" in result["errors"]["data"] and "missing" in result["errors"]["data"]
    assert "ended without finishing the step" in result["errors"]["status"]  # cancelled: afterok never held
    assert not (tmp_path / "out/steps/status/rc").exists()


def test_lifecycle_example_end_to_end_then_reused(tmp_path):
    cold = quickstart_lifecycle(tmp_path / "lc", minutes=3, echo=lambda _m: None, tune_steps=5, train_steps=40)
    assert cold["status"] == "succeeded", cold["errors"]
    assert cold["steps"]["register"] == "succeeded" and cold["steps"]["smoke"] == "succeeded"
    warm = quickstart_lifecycle(tmp_path / "lc", minutes=3, echo=lambda _m: None, tune_steps=5, train_steps=40)
    assert {s for n, s in warm["steps"].items() if n not in ("gate", "rejected")} == {"reused"}
    assert Registry(tmp_path / "lc/registry.sqlite").get("lifecycle-lm@champion")["status"] == "Approved"
