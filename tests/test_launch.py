"""fmforge launch: each target's artifact is checked against the thing that would consume it.

- sbatch script: ``bash -n``, then run for real on a single-node Slurm (Debian's slurm-wlm) started on
  loopback by a fixture: the job trains, is told its time limit is near, checkpoints, requeues and resumes.
- PyTorchJob manifest: JSON Schema transcribed from the Kubeflow training-operator CRD (tests/data).
- SageMaker CreateTrainingJob request: botocore's real service model, through a stubbed client (nothing is
  sent) plus the length/pattern/enum limits botocore's validator leaves to the server.
- SkyPilot task: SkyPilot's own task schema (tests/data, generated from skypilot), and sky.Task.from_yaml
  itself when skypilot is importable (or FMFORGE_TEST_SKY_PYTHON names a Python that has it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from aws_model import input_shape, model_violations, stubbed_client
from conftest import slurm_cmd

from fmforge.errors import FmforgeError
from fmforge.launch import sagemaker as sagemaker_target
from fmforge.launch.cli import launch
from fmforge.launch.common import torchrun_argv, train_args

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
DATA = Path(__file__).parent / "data"
OVERRIDES = ["optim.lr=1e-3", "train.max_steps=123"]

# Options each target needs to produce an artifact (placeholders: nothing is ever sent anywhere).
TARGET_OPTIONS = {
    "slurm": {"partition": "gpu", "account": "proj42"},
    "k8s": {"image": "ghcr.io/example/fmforge:0.1", "pvc": "fmforge-runs", "env": {"NCCL_DEBUG": "WARN"}},
    "sagemaker": {"image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/fmforge:0.1",
                  "role_arn": "arn:aws:iam::123456789012:role/SageMakerTraining",
                  "s3_uri": "s3://my-bucket/fmforge",
                  "spot": True, "keep_alive_s": 600, "retries": 2, "tags": {"team": "llm"}},
    "skypilot": {"checkpoint_bucket": "s3://my-bucket/ckpt", "use_spot": True,
                 "setup": "pip install fmforge"},
}
TARGET_DATA = {"slurm": None, "k8s": "/mnt/fmforge/data", "sagemaker": "s3://my-bucket/data/corpus",
               "skypilot": None}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default artifact dir ./launch/<target> lands in the test's tmp dir


def make(target: str, *, nodes: int = 2, gpus_per_node: int = 8, **kw) -> Path:
    kw.setdefault("options", TARGET_OPTIONS[target])
    kw.setdefault("overrides", OVERRIDES)
    kw.setdefault("data", TARGET_DATA[target])
    return launch(target, str(CONFIG), nodes=nodes, gpus_per_node=gpus_per_node, echo=lambda *a: None, **kw)


def job_command(target: str, path: Path) -> list[str]:
    """The words each artifact runs on every node."""
    text = path.read_text()
    if target == "slurm":
        block = text[text.index("\nsrun ") + 1:text.index(" &\nSTEP=")]
        return shlex.split(block.replace("\\\n", " "))
    if target == "k8s":
        job = list(yaml.safe_load_all(text))[1]
        return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    if target == "sagemaker":
        algo = json.loads(text)["AlgorithmSpecification"]
        return algo["ContainerEntrypoint"] + algo["ContainerArguments"]
    run = yaml.safe_load(text)["run"]
    return shlex.split(run[run.index("exec "):].replace("\\\n", " "))


def contains(words: list[str], seq: list[str]) -> bool:
    return any(words[i:i + len(seq)] == seq for i in range(len(words) - len(seq) + 1))


# ---------------------------------------------------------------------------------------------- command


@pytest.mark.slow
def test_torchrun_command_uses_c10d_rendezvous_restarts_and_resumes_automatically():
    argv = torchrun_argv(python="python", nnodes=4, nproc_per_node=8, endpoint="head:29500", rdzv_id="job1",
                         max_restarts=2, train=train_args("cfg.yaml", "data/x", "runs/x", ["a.b=1"]))
    assert argv == ["python", "-m", "torch.distributed.run", "--nnodes", "4", "--nproc-per-node", "8",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29500", "--rdzv-id", "job1",
                    "--max-restarts", "2", "-m", "fmforge", "train", "cfg.yaml", "--data", "data/x",
                    "--out", "runs/x", "--resume", "auto", "a.b=1"]
    # the flags are the launcher's real ones
    help_text = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for flag in ("--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
                 "--rdzv-conf", "--max-restarts"):
        assert flag in help_text


@pytest.mark.parametrize("target", ["slurm", "k8s", "sagemaker", "skypilot"])
def test_every_artifact_runs_fmforge_train_under_torchrun_with_resume_auto_and_the_overrides(target):
    path = make(target)
    assert path == Path("launch") / target / path.name and path.is_file()
    words = job_command(target, path)
    assert contains(words, ["-m", "torch.distributed.run"])
    assert contains(words, ["--rdzv-backend", "c10d"])
    assert contains(words, ["-m", "fmforge", "train"])
    assert contains(words, ["--resume", "auto"])
    assert words[-len(OVERRIDES):] == OVERRIDES
    if target in ("k8s", "sagemaker"):  # static command: the node count is spelled out
        assert contains(words, ["--nnodes", "2", "--nproc-per-node", "8"])


def test_launch_prints_where_the_artifact_is_and_how_to_submit_it():
    lines: list[str] = []
    path = launch("k8s", str(CONFIG), options=TARGET_OPTIONS["k8s"], echo=lines.append)
    assert str(path) in lines[0]
    assert any(f"kubectl apply -f {path}" in line for line in lines)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("target", ["slurm", "k8s", "sagemaker", "skypilot"])
def test_bad_config_fails_before_any_artifact_is_written(target, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FmforgeError, match="optim.lrr"):
        make(target, out=str(out), overrides=["optim.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: many\n")
    with pytest.raises(FmforgeError, match="model.n_layer"):
        launch(target, str(bad), out=str(out), options=TARGET_OPTIONS[target], echo=lambda *a: None)
    assert not out.exists()


def test_unknown_option_key_fails_naming_the_key(tmp_path):
    with pytest.raises(FmforgeError, match="unknown option 'partiton'.*partition"):
        make("slurm", out=str(tmp_path / "o"), options={"partiton": "gpu"})
    assert not (tmp_path / "o").exists()


def test_missing_required_option_and_unknown_target_fail_with_one_line():
    with pytest.raises(FmforgeError, match="option image is required"):
        make("k8s", options={})
    with pytest.raises(FmforgeError, match="unknown target 'lsf'"):
        launch("lsf", str(CONFIG))


def test_options_given_as_command_line_strings_are_parsed_and_type_checked():
    path = make("sagemaker", options={**TARGET_OPTIONS["sagemaker"], "spot": "true", "max_run_s": "7200",
                                      "keep_alive_s": "0"})
    request = json.loads(path.read_text())
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 14400}
    with pytest.raises(FmforgeError, match="option max_run_s must be int"):
        make("sagemaker", options={**TARGET_OPTIONS["sagemaker"], "max_run_s": "a day"})


@pytest.mark.parametrize(("target", "tool"), [("slurm", "sbatch"), ("k8s", "kubectl"), ("skypilot", "sky")])
def test_submit_without_the_tool_on_path_fails_naming_it(target, tool, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(FmforgeError, match=rf"^cannot submit: {tool} not found on PATH"):
        make(target, submit=True)
    assert (Path("launch") / target).is_dir()  # the artifact is still there to submit by hand


def test_sagemaker_submit_without_boto3_or_credentials_fails_naming_what_is_missing(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe
    pytest.importorskip("boto3")
    with pytest.raises(FmforgeError, match="^cannot submit: no AWS credentials found"):
        make("sagemaker", submit=True)
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(FmforgeError, match=r"^cannot submit: boto3 is not installed"):
        make("sagemaker", submit=True)


# ---------------------------------------------------------------------------------------------- Slurm


def test_sbatch_script_is_valid_bash_with_requeue_and_checkpoint_before_time_limit():
    path = make("slurm", options={**TARGET_OPTIONS["slurm"], "time": "04:00:00", "signal_lead_s": 300})
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    for expected in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
                     "--time=04:00:00", "--partition=gpu", "--account=proj42", "--requeue",
                     "--signal=B:USR1@300", "--open-mode=append"):
        assert expected in directives
    assert any(d.startswith("--output=") and d.endswith("/logs/%x-%j.out") for d in directives)
    assert (path.parent / "logs").is_dir()  # sbatch does not create it
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert "trap checkpoint_and_requeue USR1" in text
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    words = job_command("slurm", path)
    assert words[0] == "srun" and contains(words, ["--rdzv-endpoint", "$HEAD_NODE:$RDZV_PORT"])
    assert contains(words, [str(CONFIG)])  # absolute paths: the job runs on other nodes


def _job_field(job_id: str, env: dict, name: str) -> str:
    out = slurm_cmd("scontrol", "show", "job", job_id, env=env)
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def _wait(what: str, predicate, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.3)


@pytest.mark.slow
def test_sbatch_script_trains_on_real_slurm_then_checkpoints_requeues_and_resumes_before_time_limit(
        slurm_cluster, prepared, tmp_path, monkeypatch):
    env = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    run_dir = tmp_path / "run"
    max_steps = 400
    overrides = [f"{k}={v}" for k, v in {
        "model.size": "nano", "model.n_kv_head": 2, "data.seq_len": 64, "train.global_batch": 512,
        "train.micro_batch_size": 4, "train.max_steps": max_steps, "train.log_interval": 1,
        "train.eval_interval": 10_000, "train.eval_batches": 1, "train.threads": 1, "optim.warmup_steps": 5,
        "checkpoint.interval": 10_000,  # so a mid-run checkpoint can only come from the time-limit signal
        "log.tensorboard": False, "log.progress": "plain"}.items()]
    lines: list[str] = []
    path = launch("slurm", str(CONFIG), nodes=1, gpus_per_node=1, data=str(prepared), run_dir=str(run_dir),
                  overrides=overrides, options={"cpus_per_task": 1, "time": "00:10:00"}, submit=True,
                  echo=lines.append)
    job_id = re.search(r"submitted Slurm job (\d+)", "\n".join(lines)).group(1)
    log = path.parent / "logs" / f"fmforge-tiny-{job_id}.out"
    metrics = run_dir / "metrics.jsonl"

    def steps() -> list[int]:
        if not metrics.exists():
            return []
        return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]

    _wait("training to start", lambda: len(steps()) >= 20, 90, log)
    # What Slurm does --signal_lead_s before the time limit (--signal=B:USR1@120): signal the batch shell.
    slurm_cmd("scancel", "--batch", "--signal=USR1", job_id, env=env)
    _wait("the job to be requeued", lambda: _job_field(job_id, env, "Restarts") == "1", 60, log)
    _wait("the requeued job to finish",
          lambda: _job_field(job_id, env, "JobState") in ("COMPLETED", "FAILED"), 120, log)

    text = log.read_text()
    assert _job_field(job_id, env, "JobState") == "COMPLETED", text[-3000:]
    assert "time limit near: checkpointing" in text
    assert "resumed from" in text
    done = steps()
    assert done[-1] == max_steps and all(b > a for a, b in zip(done, done[1:])), "resumed, not restarted"
    mid_run = [p for p in (run_dir / "checkpoints").glob("step_*") if 0 < int(p.name[5:]) < max_steps]
    assert mid_run, "the SIGTERM checkpoint written before the requeue"
    assert (run_dir / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- Kubernetes


def _pytorchjob_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DATA / "pytorchjob_v1.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_pytorchjob_manifest_validates_against_the_training_operator_crd_schema():
    validator = _pytorchjob_validator()
    options = {**TARGET_OPTIONS["k8s"], "min_nodes": 1, "cpu": "64", "memory": "480Gi"}
    config_map, job = yaml.safe_load_all(make("k8s", options=options).read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]
    assert not errors, errors

    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "rdzvPort": 29400, "minReplicas": 1,
                                            "maxReplicas": 2, "maxRestarts": 3}
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 2 and worker["restartPolicy"] == "OnFailure"
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["image"] == "ghcr.io/example/fmforge:0.1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8, "cpu": "64", "memory": "480Gi"}
    assert contains(container["command"], ["--nnodes", "1:2"])  # elastic: keeps training on 1 of 2 nodes
    assert contains(container["command"], ["--rdzv-endpoint", "fmforge-tiny-worker-0:29400"])
    assert contains(container["command"], ["--out", "/mnt/fmforge/fmforge-tiny"])
    volumes = {v["name"]: v for v in worker["template"]["spec"]["volumes"]}
    assert volumes["run"]["persistentVolumeClaim"] == {"claimName": "fmforge-runs"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    # the config travels in the ConfigMap the container mounts
    assert config_map["kind"] == "ConfigMap" and config_map["data"]["config.yaml"] == CONFIG.read_text()
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert contains(container["command"], ["train", "/etc/fmforge/config.yaml"])


def test_crd_schema_rejects_broken_pytorchjobs():
    validator = _pytorchjob_validator()
    job = list(yaml.safe_load_all(make("k8s").read_text()))[1]
    breakages = {  # each takes (job, its pod spec) and breaks one thing
        "replicas as text": lambda j, pod: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"),
        "no containers": lambda j, pod: pod.pop("containers"),
        "misspelt field": lambda j, pod: pod["containers"][0].update(comand=["python"]),
        "bad quantity": lambda j, pod: pod["volumes"][2]["emptyDir"].update(sizeLimit="16 gigs"),
        "unknown replica type": lambda j, pod: j["spec"]["pytorchReplicaSpecs"].update(Chief={}),
    }
    for name, breakage in breakages.items():
        broken = json.loads(json.dumps(job))
        breakage(broken, broken["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"])
        assert list(validator.iter_errors(broken)), f"schema accepted a job with {name}"


def test_k8s_resource_sizes_must_be_kubernetes_quantities(tmp_path):
    for key, value in (("memory", "480 GB"), ("cpu", "64 cores"), ("shm_size", "lots")):
        with pytest.raises(FmforgeError, match=rf"^launch k8s: option {key} must be a Kubernetes quantity"):
            make("k8s", options={**TARGET_OPTIONS["k8s"], key: value}, out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_k8s_paths_must_be_visible_inside_the_container():
    with pytest.raises(FmforgeError, match="--data must be a path inside the container"):
        make("k8s", data="data/corpus")


# ---------------------------------------------------------------------------------------------- SageMaker


def test_sagemaker_request_passes_botocore_validation_against_the_real_service_model():
    from botocore.stub import Stubber

    request = json.loads(make("sagemaker").read_text())
    client = stubbed_client("sagemaker")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:training-job/" + request["TrainingJobName"]
    with Stubber(client) as stub:
        stub.add_response("create_training_job", {"TrainingJobArn": arn}, expected_params=request)
        assert client.create_training_job(**request)["TrainingJobArn"] == arn  # validated, nothing sent
        stub.assert_no_pending_responses()

    assert request["ResourceConfig"] == {"InstanceType": "ml.p5.48xlarge", "InstanceCount": 2,
                                         "VolumeSizeInGB": 500, "KeepAlivePeriodInSeconds": 600}
    assert request["EnableManagedSpotTraining"] is True
    stopping = request["StoppingCondition"]
    assert stopping["MaxWaitTimeInSeconds"] >= stopping["MaxRuntimeInSeconds"]
    assert request["CheckpointConfig"] == {"S3Uri": "s3://my-bucket/fmforge/fmforge-tiny/checkpoints",
                                           "LocalPath": "/opt/ml/checkpoints"}
    assert request["RetryStrategy"] == {"MaximumRetryAttempts": 2}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in request["InputDataConfig"]}
    assert channels == {"config": "s3://my-bucket/fmforge/fmforge-tiny/config/",
                        "data": "s3://my-bucket/data/corpus/"}
    words = job_command("sagemaker", Path("launch/sagemaker/create_training_job.json"))
    assert contains(words, ["--rdzv-endpoint", "algo-1:29500"])
    assert contains(words, ["train", "/opt/ml/input/data/config/config.yaml",
                            "--data", "/opt/ml/input/data/data", "--out", "/opt/ml/checkpoints"])


def test_sagemaker_request_meets_the_service_model_limits_botocore_leaves_to_the_server():
    model = input_shape("sagemaker", "CreateTrainingJob")
    request = json.loads(make("sagemaker").read_text())
    assert model_violations(model, request) == []
    assert model_violations(model, {**request, "TrainingJobName": "x" * 64})  # the check has teeth


def test_botocore_rejects_a_request_without_role_arn():
    from botocore.exceptions import ParamValidationError
    from botocore.validate import ParamValidator

    model = input_shape("sagemaker", "CreateTrainingJob")
    request = json.loads(make("sagemaker").read_text())
    assert not ParamValidator().validate(request, model).has_errors()
    report = ParamValidator().validate({k: v for k, v in request.items() if k != "RoleArn"}, model)
    assert report.has_errors() and "RoleArn" in report.generate_report()
    client = stubbed_client("sagemaker")
    with pytest.raises(ParamValidationError, match="RoleArn"):
        client.create_training_job(**{k: v for k, v in request.items() if k != "RoleArn"})


def test_sagemaker_submit_uploads_the_config_and_creates_the_job_through_boto3(monkeypatch):
    from botocore.stub import ANY, Stubber

    monkeypatch.setattr(sagemaker_target.time, "strftime", lambda *a: "20250101-000000")  # fixed job name
    request = json.loads(make("sagemaker", out="preview").read_text())
    s3, sm = stubbed_client("s3"), stubbed_client("sagemaker")

    class Session:  # what sagemaker.aws_session returns once boto3, credentials and region are present
        def client(self, name):
            return {"s3": s3, "sagemaker": sm}[name]

    monkeypatch.setattr(sagemaker_target, "aws_session", lambda region: Session())
    arn = "arn:aws:sagemaker:us-east-1:123456789012:training-job/fmforge-tiny-20250101-000000"
    with Stubber(s3) as s3_stub, Stubber(sm) as sm_stub:
        key = "fmforge/fmforge-tiny/config/config.yaml"
        s3_stub.add_response("put_object", {}, {"Bucket": "my-bucket", "Key": key, "Body": ANY})
        sm_stub.add_response("create_training_job", {"TrainingJobArn": arn}, expected_params=request)
        lines: list[str] = []
        launch("sagemaker", str(CONFIG), nodes=2, data=TARGET_DATA["sagemaker"], overrides=OVERRIDES,
               options=TARGET_OPTIONS["sagemaker"], submit=True, echo=lines.append)
        s3_stub.assert_no_pending_responses()
        sm_stub.assert_no_pending_responses()
    assert arn in lines[-1]


@pytest.mark.parametrize("data", ["data/corpus", "/mnt/shared/corpus", "gs://bucket/corpus"])
def test_sagemaker_refuses_a_data_path_its_instances_cannot_see(data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FmforgeError, match=r"^launch sagemaker: --data must be an s3:// URI") as err:
        make("sagemaker", data=data, out=str(out))
    assert "\n" not in str(err.value) and data in str(err.value)
    assert not out.exists()  # refused before anything was written


def test_sagemaker_rejects_gpu_count_that_does_not_match_the_instance_type():
    with pytest.raises(FmforgeError, match="ml.g5.12xlarge has 4 GPU"):
        make("sagemaker", options={**TARGET_OPTIONS["sagemaker"], "instance_type": "ml.g5.12xlarge"})


# ---------------------------------------------------------------------------------------------- SkyPilot


def test_skypilot_task_validates_against_skypilot_task_schema(prepared):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DATA / "skypilot_task.schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    task = yaml.safe_load(make("skypilot", data=str(prepared)).read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(task)]
    assert not errors, errors
    assert list(validator.iter_errors({**task, "num_nodes": "two"}))  # the schema has teeth
    assert list(validator.iter_errors({**task, "resources": {"acelerators": "H100:8"}}))

    assert task["num_nodes"] == 2 and task["resources"] == {"accelerators": "H100:8", "use_spot": True}
    assert task["file_mounts"]["~/fmforge-job/config.yaml"] == str(CONFIG)
    assert task["file_mounts"]["~/fmforge-job/data"] == str(prepared.resolve())
    assert task["file_mounts"]["/fmforge-ckpt"] == {"source": "s3://my-bucket/ckpt", "mode": "MOUNT_CACHED"}
    for var in ("NODE_RANK", "NODE_IPS", "NUM_GPUS_PER_NODE", "NUM_NODES"):
        assert f"$SKYPILOT_{var}" in task["run"]
    words = job_command("skypilot", Path("launch/skypilot/task.yaml"))
    assert contains(words, ["--out", "/fmforge-ckpt/fmforge-tiny"])
    subprocess.run(["bash", "-n"], input=task["run"], text=True, check=True)


@pytest.mark.slow
def test_skypilot_task_loads_in_skypilot_itself(prepared, tmp_path):
    path = make("skypilot", data=str(prepared))
    check = f"import sky; t = sky.Task.from_yaml({str(path.resolve())!r}); print(t.num_nodes, t.resources)"
    other_python = os.environ.get("FMFORGE_TEST_SKY_PYTHON")
    try:
        import sky  # noqa: F401
        python = sys.executable
    except ImportError:
        if not other_python:
            pytest.skip("skypilot is not installed here (its ~50 dependencies would pin this venv's click, "
                        "bcrypt, ...); set FMFORGE_TEST_SKY_PYTHON to a Python that has it")
        python = other_python
    # HOME in tmp: SkyPilot writes its state under ~/.sky
    proc = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("2 ") and "H100" in proc.stdout
