"""``fmforge deploy k8s|sagemaker``: the artifacts that host ``fmforge serve``, checked the way ``fmforge launch``
checks its own:

- Kubernetes: the Deployment and Service validate against a strict subset of the Kubernetes API schema
  (tests/data/k8s_serving_v1.schema.json, closed objects as kubectl's strict field validation); what a
  schema cannot say (selector matches the pod labels, probes and the Service name a container port, the
  command is a valid ``fmforge serve`` invocation) is checked here. The init container's copy command runs.
- SageMaker: the three requests pass botocore's validation against the real service model through a
  Stubber (nothing is sent), and the model's limits botocore leaves to the server (tests/aws_model.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from aws_model import input_shape, model_violations, stubbed_client
from conftest import free_port

from fmforge.cli import build_parser, main
from fmforge.config import ModelConfig
from fmforge.data.tokenizer import train_tokenizer
from fmforge.deploy import artifacts_sagemaker
from fmforge.deploy.artifacts import SERVABLE, servable_run
from fmforge.deploy.artifacts_k8s import deploy_k8s
from fmforge.deploy.artifacts_sagemaker import OPERATIONS, deploy_sagemaker
from fmforge.deploy.serve import ENCODER_FAMILIES
from fmforge.errors import FmforgeError
from fmforge.launch import sagemaker as launch_sagemaker
from fmforge.models.gpt import GPT
from fmforge.models.vit import ViT, ViTModelConfig
from fmforge.runs import save_pretrained

DATA = Path(__file__).parent / "data"
SERVING_DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/fmforge:0.1"
K8S = {"image": "ghcr.io/example/fmforge:0.1", "pvc": "fmforge-runs"}
SAGEMAKER = {"image": IMAGE, "role_arn": "arn:aws:iam::123456789012:role/SageMakerHosting",
             "model_uri": "s3://my-bucket/models/chat"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run of a tiny random Llama with its tokenizer: what `fmforge serve` loads."""
    cfg = ModelConfig(arch="llama", n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=32, vocab_size=300,
                      max_seq_len=16).resolved()
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "chat"
    save_pretrained(GPT(cfg).state_dict(), cfg, run)
    train_tokenizer(["deploy the model to the cluster " * 8] * 4, 280).save(run / "tokenizer.json")
    return run


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default ./deploy/<target>/ lands in the test's tmp dir


def quiet(*_):
    pass


def k8s_docs(run: Path, **options) -> tuple[dict, dict]:
    [path] = deploy_k8s(run, options={**K8S, **options}, echo=quiet)
    deployment, service = yaml.safe_load_all(path.read_text())
    return deployment, service


def sagemaker_requests(run: Path, **options) -> list[dict]:
    paths = deploy_sagemaker(run, options={**SAGEMAKER, **options}, echo=quiet)
    return [json.loads(p.read_text()) for p in paths]


def _validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DATA / "k8s_serving_v1.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ---------------------------------------------------------------------------------------------- Kubernetes


def test_k8s_deployment_and_service_validate_against_the_kubernetes_schema(run_dir):
    validator = _validator()
    deployment, service = k8s_docs(run_dir, replicas=3, cpu="8", memory="32Gi", gpus=1, namespace="llm",
                                   api_key_secret="fmforge-keys", service_type="LoadBalancer")
    assert schema_errors(validator, deployment) == [] and schema_errors(validator, service) == []
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    spec = deployment["spec"]
    assert spec["replicas"] == 3 and deployment["metadata"]["namespace"] == "llm"
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()  # the Deployment owns its pods
    assert service["spec"]["selector"].items() <= labels.items()  # the Service routes to them
    [container] = pod["containers"]
    assert container["image"] == K8S["image"]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "32Gi"},
                                      "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1}}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] in ports
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 600
    assert service["spec"]["ports"][0]["targetPort"] in ports and service["spec"]["type"] == "LoadBalancer"


def test_k8s_container_runs_a_valid_fmforge_serve_on_the_mounted_run_and_its_api_key_secret(run_dir):
    deployment, _ = k8s_docs(run_dir, port=9000, api_key_secret="fmforge-keys")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "fmforge"]
    args = vars(build_parser().parse_args(command[3:]))  # fmforge's own parser accepts it
    assert args["_run"] == "fmforge.rag.serving:serve_command"
    assert args["run_dirs"] == ["/mnt/fmforge/chat"]  # served under the run directory's own name
    assert (args["host"], args["port"]) == ("0.0.0.0", 9000)
    assert container["ports"][0]["containerPort"] == 9000
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "fmforge-runs", "readOnly": True}
    assert mounts["model"] == {"name": "model", "mountPath": "/mnt/fmforge", "readOnly": True}
    assert volumes["api-key"]["secret"] == {"secretName": "fmforge-keys"}
    assert args["api_key_file"].startswith(mounts["api-key"]["mountPath"] + "/")
    assert "env" not in container  # no key in the manifest itself


def test_k8s_schema_rejects_broken_manifests(run_dir):
    validator = _validator()
    deployment, service = k8s_docs(run_dir)
    pod_of = lambda d: d["spec"]["template"]["spec"]  # noqa: E731
    breakages = {
        "replicas as text": lambda d: d["spec"].update(replicas="three"),
        "no selector": lambda d: d["spec"].pop("selector"),
        "misspelt probe field": lambda d: pod_of(d)["containers"][0]["readinessProbe"].update(httpGett={}),
        "probe without port": lambda d: pod_of(d)["containers"][0]["livenessProbe"]["httpGet"].pop("port"),
        "bad quantity": lambda d: pod_of(d)["containers"][0]["resources"].update(limits={"memory": "32 gigs"}),
        "uppercase name": lambda d: d["metadata"].update(name="Chat"),
        "port name too long": lambda d: pod_of(d)["containers"][0]["ports"][0].update(name="the-http-port-name"),
    }
    for name, breakage in breakages.items():
        broken = json.loads(json.dumps(deployment))
        breakage(broken)
        assert schema_errors(validator, broken), f"schema accepted a Deployment with {name}"
    broken = json.loads(json.dumps(service))
    broken["spec"]["ports"][0]["port"] = 70000
    assert schema_errors(validator, broken)


@pytest.mark.slow
def test_k8s_model_from_a_uri_is_copied_by_the_init_container_into_the_served_directory(run_dir, tmp_path):
    deployment, _ = k8s_docs(run_dir, pvc=None, model_uri="s3://my-bucket/runs/chat")
    assert schema_errors(_validator(), deployment) == []
    pod = deployment["spec"]["template"]["spec"]
    [fetch], [server] = pod["initContainers"], pod["containers"]
    served = build_parser().parse_args(server["command"][3:]).run_dirs[0]
    assert fetch["command"][-2:] == ["s3://my-bucket/runs/chat", served] and served == "/models/chat"
    assert {v["name"]: v for v in pod["volumes"]}["model"] == {"name": "model", "emptyDir": {}}
    assert fetch["volumeMounts"][0]["mountPath"] == "/models"
    # run the init container's own command, with the bucket swapped for a local copy of the run
    target = tmp_path / "models" / "chat"
    command = [sys.executable, *fetch["command"][1:-2], run_dir.as_uri(), str(target)]
    subprocess.run(command, check=True, timeout=120, capture_output=True)
    assert servable_run("test", target).family == "decoder"  # what the server container then loads


def test_k8s_submit_without_kubectl_fails_in_one_line_and_keeps_the_manifest(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(FmforgeError, match=r"^cannot submit: kubectl not found on PATH") as err:
        deploy_k8s(run_dir, options=K8S, submit=True, echo=quiet)
    assert "\n" not in str(err.value)
    assert Path("deploy/k8s/deployment.yaml").is_file()  # there to apply by hand


@pytest.mark.slow
def test_k8s_submit_reports_a_kubectl_failure_in_one_line(run_dir, tmp_path, monkeypatch):
    if not any((Path(d) / "kubectl").is_file() for d in ("/usr/bin", "/usr/local/bin")):
        pytest.skip("kubectl is not installed")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-cluster"))  # kubectl then tries localhost:8080
    with pytest.raises(FmforgeError, match=r"^kubectl failed \(exit \d+\): ") as err:
        deploy_k8s(run_dir, options=K8S, submit=True, echo=quiet)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- SageMaker


def test_sagemaker_requests_pass_botocore_validation_against_the_real_service_model(run_dir):
    model, config, endpoint = sagemaker_requests(run_dir, instance_type="ml.g5.2xlarge", instance_count=2,
                                                 tags={"team": "llm"})
    client = stubbed_client("sagemaker")
    responses = {"create_model": {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/m"},
                 "create_endpoint_config": {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:"
                                                                 "endpoint-config/c"},
                 "create_endpoint": {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/e"}}
    from botocore.stub import Stubber

    with Stubber(client) as stub:
        for operation, request in zip(OPERATIONS, (model, config, endpoint), strict=True):
            stub.add_response(operation, responses[operation], expected_params=request)
            getattr(client, operation)(**request)  # validated against the service model, nothing sent
        stub.assert_no_pending_responses()
    for operation, request in zip(("CreateModel", "CreateEndpointConfig", "CreateEndpoint"),
                                  (model, config, endpoint), strict=True):
        assert model_violations(input_shape("sagemaker", operation), request) == [], operation

    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE and model["ExecutionRoleArn"] == SAGEMAKER["role_arn"]
    # uncompressed S3 prefix: SageMaker copies the run's files to /opt/ml/model, the directory fmforge serves
    assert container["ModelDataSource"]["S3DataSource"] == {"S3Uri": "s3://my-bucket/models/chat/",
                                                            "S3DataType": "S3Prefix", "CompressionType": "None"}
    [variant] = config["ProductionVariants"]
    assert variant["ModelName"] == model["ModelName"] and variant["InstanceType"] == "ml.g5.2xlarge"
    assert variant["InitialInstanceCount"] == 2
    assert endpoint == {"EndpointName": "fmforge-chat", "EndpointConfigName": config["EndpointConfigName"],
                        "Tags": [{"Key": "team", "Value": "llm"}]}


def test_sagemaker_model_limits_have_teeth_and_a_tarball_is_unpacked_by_sagemaker(run_dir):
    model, config, _ = sagemaker_requests(run_dir, model_uri="s3://my-bucket/models/chat.tar.gz")
    assert model["PrimaryContainer"]["ModelDataSource"]["S3DataSource"] == {
        "S3Uri": "s3://my-bucket/models/chat.tar.gz", "S3DataType": "S3Object", "CompressionType": "Gzip"}
    shape = input_shape("sagemaker", "CreateEndpointConfig")
    assert model_violations(shape, config) == []
    assert model_violations(shape, {**config, "EndpointConfigName": "x" * 64})
    assert model_violations(shape, {**config, "ProductionVariants": [
        {**config["ProductionVariants"][0], "InstanceType": "ml.huge.x"}]})


def test_without_botocore_an_instance_type_is_checked_by_its_shape(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "botocore.session", None)  # import botocore.session -> ImportError
    artifacts_sagemaker._instance_types.cache_clear()
    try:
        assert sagemaker_requests(run_dir, instance_type="ml.z9.2xlarge")[1]["ProductionVariants"][0][
            "InstanceType"] == "ml.z9.2xlarge"  # a type newer than this botocore passes
        with pytest.raises(FmforgeError, match="option instance_type 'g5.xlarge' is not a SageMaker"):
            sagemaker_requests(run_dir, instance_type="g5.xlarge")
    finally:
        artifacts_sagemaker._instance_types.cache_clear()


def test_sagemaker_submit_creates_the_model_the_config_and_the_endpoint_through_boto3(run_dir, monkeypatch):
    from botocore.stub import Stubber

    monkeypatch.setattr(artifacts_sagemaker.time, "strftime", lambda *a: "20260101-000000")  # fixed names
    requests = sagemaker_requests(run_dir)
    client = stubbed_client("sagemaker")

    class Session:  # what launch.sagemaker.aws_session returns once boto3, credentials and region are there
        def client(self, name):
            assert name == "sagemaker"
            return client

    monkeypatch.setattr(launch_sagemaker, "aws_session", lambda region: Session())
    arn = "arn:aws:sagemaker:us-east-1:123456789012:endpoint/fmforge-chat"
    with Stubber(client) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/m"}, requests[0])
        stub.add_response("create_endpoint_config", {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:c/c"},
                          requests[1])
        stub.add_response("create_endpoint", {"EndpointArn": arn}, requests[2])
        lines: list[str] = []
        deploy_sagemaker(run_dir, options=SAGEMAKER, submit=True, echo=lines.append)
        stub.assert_no_pending_responses()
    assert arn in lines[-1]
    with Stubber(client) as stub:  # a refusal from the service is one line
        stub.add_client_error("create_model", "ValidationException", "Could not access model data")
        with pytest.raises(FmforgeError, match=r"^sagemaker deploy failed: .*Could not access model data") as err:
            deploy_sagemaker(run_dir, options=SAGEMAKER, submit=True, echo=quiet)
    assert "\n" not in str(err.value)


def test_sagemaker_submit_without_credentials_or_boto3_fails_in_one_line(run_dir, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe
    pytest.importorskip("boto3")
    with pytest.raises(FmforgeError, match="^cannot submit: no AWS credentials found"):
        deploy_sagemaker(run_dir, options=SAGEMAKER, submit=True, echo=quiet)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FmforgeError, match="^cannot submit: no AWS region"):
        deploy_sagemaker(run_dir, options=SAGEMAKER, submit=True, echo=quiet)
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(FmforgeError, match=r"^cannot submit: boto3 is not installed"):
        deploy_sagemaker(run_dir, options=SAGEMAKER, submit=True, echo=quiet)


def _http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_the_documented_sagemaker_entrypoint_serves_ping_invocations_and_health(run_dir):
    pytest.importorskip("fastapi")
    # the Dockerfile ENTRYPOINT of docs/serving.md, started the way SageMaker starts it (`docker run IMAGE
    # serve`), with this machine's Python, the run instead of /opt/ml/model and loopback on a free port
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", SERVING_DOC.read_text(), re.M).group(1))
    port = free_port()
    script = (entrypoint[2].replace("exec python ", f"exec {sys.executable} ")
              .replace("/opt/ml/model", str(run_dir)).replace("0.0.0.0", "127.0.0.1")
              .replace("--port 8080", f"--port {port}"))
    assert script != entrypoint[2] and "--port 8080" in entrypoint[2]
    proc = subprocess.Popen([*entrypoint[:2], script, *entrypoint[3:], "serve"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                status, _ = _http(f"{base}/ping")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert status == 200
        assert _http(f"{base}/health") == (200, {"status": "ok", "models": {"chat": {"family": "decoder"}}})
        status, reply = _http(f"{base}/invocations", {"prompt": "deploy the", "max_tokens": 3, "temperature": 0})
        assert status == 200 and reply["model"] == "chat" and reply["usage"]["completion_tokens"] >= 1
        status, reply = _http(f"{base}/invocations", {"messages": [], "max_tokens": 3})
        assert status == 400 and "messages" in json.dumps(reply)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------- bad input

K8S_REFUSALS = {  # option overrides -> the words the one-line error must hold
    "cpu": ({"cpu": "4 cores"}, "option cpu must be a Kubernetes quantity"),
    "memory": ({"memory": "lots"}, "option memory must be a Kubernetes quantity"),
    "gpus": ({"gpus": -1}, "option gpus must be in 0..1024"),
    "gpus type": ({"gpus": "two"}, "option gpus must be int"),
    "replicas": ({"replicas": -2}, "option replicas must be in"),
    "port": ({"port": 70000}, "option port must be in 1..65535"),
    "name": ({"name": "Chat_Server"}, "option name 'Chat_Server' must be 1-40 lowercase"),
    "name digit": ({"name": "9lives"}, "must start with a letter"),
    "namespace": ({"namespace": "LLM"}, "option namespace 'LLM' must be 1-40 lowercase"),
    "pvc": ({"pvc": "Runs!"}, "option pvc 'Runs!' is not a valid Kubernetes name"),
    "no model source": ({"pvc": None}, "option pvc"),
    "two model sources": ({"model_uri": "s3://b/m"}, "exactly one"),
    "model_uri": ({"pvc": None, "model_uri": "/data/chat"}, "option model_uri must be an s3:// URI"),
    "model_path": ({"model_path": "/etc/passwd"}, "option model_path must be an absolute path inside"),
    "service_type": ({"service_type": "Public"}, "option service_type must be one of"),
    "unknown option": ({"replica": 2}, "unknown option 'replica'"),
    "image": ({"image": None}, "option image is required"),
}
SAGEMAKER_REFUSALS = {
    "instance type": ({"instance_type": "ml.huge.x"}, "option instance_type 'ml.huge.x' is not a SageMaker"),
    "name": ({"name": "chat.v2"}, "option name 'chat.v2' must be 1-40 lowercase"),
    "role": ({"role_arn": "admin"}, "option role_arn 'admin' is not an IAM role ARN"),
    "model_uri": ({"model_uri": "/runs/chat"}, "option model_uri must be an s3:// URI"),
    "count": ({"instance_count": 0}, "option instance_count must be in 1..10000"),
    "startup": ({"startup_timeout_s": 30}, "option startup_timeout_s must be in 60..3600"),
    "control character": ({"image": "img\nrm -rf"}, "option image contains a control character"),
}


@pytest.mark.parametrize("case", list(K8S_REFUSALS) + [f"sagemaker {c}" for c in SAGEMAKER_REFUSALS])
def test_bad_options_are_one_line_errors_before_anything_is_written(case, run_dir):
    sagemaker = case.startswith("sagemaker ")
    given, message = (SAGEMAKER_REFUSALS[case[10:]] if sagemaker else K8S_REFUSALS[case])
    base, verb = (SAGEMAKER, deploy_sagemaker) if sagemaker else (K8S, deploy_k8s)
    options = {k: v for k, v in {**base, **given}.items() if v is not None}
    with pytest.raises(FmforgeError) as err:
        verb(run_dir, options=options, out="out", echo=quiet)
    text = str(err.value)
    assert text.startswith(f"deploy {'sagemaker' if sagemaker else 'k8s'}: ") and message in text, text
    assert "\n" not in text and err.value.exit_code == 2
    assert not Path("out").exists()


def test_the_families_deploy_accepts_are_the_ones_serve_loads():
    assert SERVABLE == ("decoder", *ENCODER_FAMILIES)


def test_a_run_that_fmforge_serve_cannot_load_is_refused_in_one_line(run_dir, tmp_path):
    vit = tmp_path / "vit"
    save_pretrained(ViT(ViTModelConfig(size="vit-nano")).state_dict(), ViTModelConfig(size="vit-nano"), vit)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("model.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((run_dir / name).read_bytes())
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "model.json").write_bytes((run_dir / "model.json").read_bytes())
    cases = {tmp_path / "missing": "run directory not found", vit: "holds a vit model",
             no_tokenizer: "has no tokenizer.json", no_weights: "model.safetensors is missing",
             tmp_path: "model.json is missing"}
    for path, message in cases.items():
        with pytest.raises(FmforgeError, match=message) as err:
            deploy_k8s(path, options=K8S, out="out", echo=quiet)
        assert "\n" not in str(err.value)
    assert not Path("out").exists()


def test_cli_writes_the_artifacts_and_exits_2_on_a_user_mistake(run_dir, capsys):
    main(["deploy", "k8s", str(run_dir), "--option", "image=ghcr.io/x/fmforge:1", "--option", "pvc=runs",
          "--option", "replicas=2", "--option", "memory=16Gi"])
    out = capsys.readouterr().out
    assert "wrote deploy/k8s/deployment.yaml" in out and "kubectl apply -f deploy/k8s/deployment.yaml" in out
    deployment = next(yaml.safe_load_all(Path("deploy/k8s/deployment.yaml").read_text()))
    assert deployment["spec"]["replicas"] == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", "sagemaker", str(run_dir), "--option", f"image={IMAGE}", "--option",
              f"role_arn={SAGEMAKER['role_arn']}", "--option", "model_uri=s3://b/m", "--option",
              "instance_type=ml.nonexistent.type"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmforge: error: deploy sagemaker: option instance_type") and "\n" not in err
    assert not Path("deploy/sagemaker").exists()
