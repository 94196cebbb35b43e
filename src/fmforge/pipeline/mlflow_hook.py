"""``--mlflow URI``: training and evaluation steps log to MLflow, registered versions appear in its registry.

Optional: ``pip install 'fmforge[mlflow]'``. Each train/finetune/distill step becomes an MLflow run (its
arguments as parameters, every numeric field of ``metrics.jsonl`` as a metric series, ``config.yaml`` and
``model.json`` as artifacts); an eval step logs the numbers of its JSON outputs; a ``register`` step creates
a version of the MLflow registered model of the same name, pointing at the logged run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmforge.errors import FmforgeError

TRAINING = ("train", "finetune", "distill")
MAX_METRIC_LINES = 100_000
RUN_FILES = ("config.yaml", "model.json")


class MlflowHook:
    def __init__(self, uri: str, experiment: str, artifacts: Path):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise FmforgeError("--mlflow needs MLflow: pip install 'fmforge[mlflow]'") from None
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifacts.resolve().as_uri())
        self.runs: dict[str, str] = {}  # run directory -> MLflow run id

    def log_step(self, step, args: dict, values: dict, step_dir: Path) -> None:
        if step.verb in TRAINING:
            run_dir = Path(str(args.get("out") or ""))
            run = self.client.create_run(self.experiment, run_name=step.name, tags={"fmforge.verb": step.verb})
            rid = run.info.run_id
            for key, value in args.items():
                self.client.log_param(rid, key, json.dumps(value) if isinstance(value, (list, dict)) else value)
            for step_no, key, number in _metric_lines(run_dir / "metrics.jsonl"):
                self.client.log_metric(rid, key, number, step=step_no)
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    self.client.log_artifact(rid, str(run_dir / name), "model")
            self.client.set_terminated(rid)
            self.runs[str(run_dir.resolve())] = rid
        elif step.verb == "eval":
            run = self.client.create_run(self.experiment, run_name=step.name, tags={"fmforge.verb": "eval"})
            for name, value in values.items():
                for key, number in _numbers(value, "" if len(values) == 1 else name):
                    self.client.log_metric(run.info.run_id, key, number)
            self.client.set_terminated(run.info.run_id)

    def register(self, group: str, model: Path, metrics: dict) -> None:
        rid = self.runs.get(str(model.resolve()))
        if rid is None:  # trained outside this pipeline run (or reused): log its files now
            run = self.client.create_run(self.experiment, run_name=f"register-{group}")
            rid = run.info.run_id
            for name in RUN_FILES:
                if (model / name).is_file():
                    self.client.log_artifact(rid, str(model / name), "model")
            self.client.set_terminated(rid)
        for key, number in _numbers(metrics, ""):
            self.client.log_metric(rid, key, number)
        try:
            self.client.get_registered_model(group)
        except Exception:  # noqa: BLE001 (MLflow raises its own RestException for a missing model)
            self.client.create_registered_model(group)
        source = f"{self.client.get_run(rid).info.artifact_uri}/model"
        self.client.create_model_version(group, source, run_id=rid, tags={"fmforge.path": str(model)})


def _numbers(value: Any, prefix: str):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield prefix, float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{prefix}.{key}" if prefix else str(key))


def _metric_lines(path: Path):
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if i >= MAX_METRIC_LINES:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                step = record.get("step", i)
                for key, number in _numbers({k: v for k, v in record.items() if k != "step"}, ""):
                    yield int(step) if isinstance(step, int) else i, key, number
