"""``fmforge deploy sagemaker RUN_DIR``: the CreateModel, CreateEndpointConfig and CreateEndpoint requests
of a SageMaker real-time endpoint that runs ``fmforge serve``.

SageMaker's hosting contract: it copies the model (``model_uri``: an S3 prefix holding the run directory's
files, or a ``.tar.gz`` of them) to ``/opt/ml/model``, starts the container as ``docker run IMAGE serve``
and sends ``GET /ping`` and ``POST /invocations`` to port 8080. ``fmforge serve`` answers both (chat when
the body has ``messages``, embeddings for ``input``, else a completion), so the image only needs an
entrypoint that runs ``fmforge serve /opt/ml/model --host 0.0.0.0 --port 8080`` whatever argument follows
(docs/serving.md shows one). Requests are authenticated by SageMaker (IAM), so no API key is configured.

Model and endpoint-config names carry a timestamp (each creation needs a new one); the endpoint keeps
``name``. The requests are written as JSON that ``aws sagemaker create-... --cli-input-json`` and boto3's
``create_...(**request)`` take as is.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from functools import cache
from pathlib import Path

from fmforge.deploy.artifacts import ServedRun, check_ranges, deploy, deploy_command, sync_hint
from fmforge.errors import FmforgeError, clip
from fmforge.launch import sagemaker as launch_sagemaker
from fmforge.launch.common import REQUIRED, Option

TARGET = "sagemaker"
VERB = "deploy sagemaker"
PORT = 8080  # the hosting contract's
MODEL_DIR = "/opt/ml/model"
FILES = ("create_model.json", "create_endpoint_config.json", "create_endpoint.json")
OPERATIONS = ("create_model", "create_endpoint_config", "create_endpoint")  # boto3 names, in FILES order
SECRETS = ("give the endpoint's IAM role (role_arn) the access instead, or read secrets at run time from AWS "
           "Secrets Manager: a model's Environment is shown by DescribeModel")
INSTANCE_TYPE = re.compile(r"ml\.[a-z0-9-]+\.[a-z0-9]+")  # when botocore is not there to give the list
ROLE_ARN = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")  # the service model's

OPTIONS: dict[str, Option] = {
    "role_arn": Option(REQUIRED, str, "IAM role SageMaker assumes (reads model_uri, pulls the image)"),
    "model_uri": Option(REQUIRED, str, "s3:// prefix holding the run directory's files, or an s3:// .tar.gz "
                                       "of them"),
    "instance_type": Option("ml.g5.xlarge", str, "ProductionVariant InstanceType"),
    "instance_count": Option(1, int, "InitialInstanceCount"),
    "volume_gb": Option(None, int, "ProductionVariant VolumeSizeInGB (instance types with EBS storage only)"),
    "startup_timeout_s": Option(600, int, "ContainerStartupHealthCheckTimeoutInSeconds: time to load the model"),
    "download_timeout_s": Option(600, int, "ModelDataDownloadTimeoutInSeconds"),
    "region": Option(None, str, "AWS region for --submit (default: the boto3 session's)"),
    "tags": Option({}, dict, "tags of the model, endpoint config and endpoint, e.g. {team: llm}"),
}


@cache  # loading SageMaker's service model takes a noticeable fraction of a second
def _instance_types() -> tuple[str, ...] | None:
    """The instance types the service model lists for endpoints; None without botocore."""
    try:
        import botocore.session
    except ImportError:
        return None
    model = botocore.session.get_session().get_service_model("sagemaker")
    return tuple(model.shape_for("ProductionVariantInstanceType").enum)


def _check(opts: dict) -> None:
    uri = opts["model_uri"]
    if not uri.startswith("s3://") or len(uri) > 1024 or uri.rstrip("/") == "s3:":
        raise FmforgeError(f"{VERB}: option model_uri must be an s3:// URI (at most 1024 characters), "
                           f"got {clip(uri)}")
    if not ROLE_ARN.fullmatch(opts["role_arn"]):
        raise FmforgeError(f"{VERB}: option role_arn {clip(opts['role_arn'])} is not an IAM role ARN "
                           f"(arn:aws:iam::123456789012:role/NAME)")
    known = _instance_types()
    itype = opts["instance_type"]
    if (itype not in known) if known is not None else not INSTANCE_TYPE.fullmatch(itype):
        raise FmforgeError(f"{VERB}: option instance_type {clip(itype)} is not a SageMaker hosting instance "
                           f"type (e.g. ml.g5.xlarge, ml.m5.large)")
    check_ranges(VERB, opts, (("instance_count", 1, 10_000), ("startup_timeout_s", 60, 3600),
                              ("download_timeout_s", 60, 3600), ("volume_gb", 1, 512)))


def _model_data(uri: str) -> dict:
    if uri.endswith(".tar.gz"):  # SageMaker unpacks it into /opt/ml/model
        return {"S3Uri": uri, "S3DataType": "S3Object", "CompressionType": "Gzip"}
    return {"S3Uri": uri.rstrip("/") + "/", "S3DataType": "S3Prefix", "CompressionType": "None"}


def build(name: str, opts: dict, now: float | None = None) -> list[dict]:
    """[CreateModel, CreateEndpointConfig, CreateEndpoint] requests, as boto3 takes them."""
    _check(opts)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    tags = [{"Key": str(k), "Value": str(v)} for k, v in opts["tags"].items()]
    container: dict = {"Image": opts["image"], "Mode": "SingleModel",
                       "ModelDataSource": {"S3DataSource": _model_data(opts["model_uri"])}}
    if opts["env"]:
        container["Environment"] = dict(opts["env"])
    model = {"ModelName": f"{name}-{stamp}", "ExecutionRoleArn": opts["role_arn"], "PrimaryContainer": container}
    variant = {
        "VariantName": "AllTraffic",
        "ModelName": model["ModelName"],
        "InitialInstanceCount": opts["instance_count"],
        "InstanceType": opts["instance_type"],
        "InitialVariantWeight": 1.0,
        "ModelDataDownloadTimeoutInSeconds": opts["download_timeout_s"],
        "ContainerStartupHealthCheckTimeoutInSeconds": opts["startup_timeout_s"],
    }
    if opts["volume_gb"] is not None:
        variant["VolumeSizeInGB"] = opts["volume_gb"]
    config = {"EndpointConfigName": f"{name}-{stamp}", "ProductionVariants": [variant]}
    endpoint = {"EndpointName": name, "EndpointConfigName": config["EndpointConfigName"]}
    requests = [model, config, endpoint]
    if tags:
        for request in requests:
            request["Tags"] = tags
    return requests


def render(run: ServedRun, name: str, opts: dict, out_dir: Path) -> dict[str, str]:
    return {file: json.dumps(request, indent=2) + "\n" for file, request in zip(FILES, build(name, opts), strict=True)}


def how_to_submit(paths: list[Path], run: ServedRun, name: str, opts: dict) -> list[str]:
    uri = opts["model_uri"]
    if uri.endswith(".tar.gz"):
        model = (f"model:   tar -czf model.tar.gz -C {shlex.quote(str(run.path))} --exclude checkpoints . && "
                 f"aws s3 cp model.tar.gz {shlex.quote(uri)}")
    else:
        model = f"model:   {sync_hint(run, uri)}"
    commands = [f"aws sagemaker {op.replace('_', '-')} --cli-input-json {shlex.quote(f'file://{path}')}"
                for op, path in zip(OPERATIONS, paths, strict=True)]
    return [model,
            f"image:   {opts['image']} must start `fmforge serve {MODEL_DIR} --host 0.0.0.0 --port {PORT}` "
            f"when run as `docker run IMAGE serve` (docs/serving.md)",
            f"submit:  {commands[0]}",
            *(f"         {command}" for command in commands[1:]),
            "         (or `fmforge deploy sagemaker ... --submit`, which does the three through boto3)",
            f"watch:   aws sagemaker wait endpoint-in-service --endpoint-name {shlex.quote(name)}"]


def submit(paths: list[Path], name: str, opts: dict, echo=print) -> None:
    session = launch_sagemaker.aws_session(opts["region"])
    client = session.client("sagemaker")
    requests = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    with launch_sagemaker.aws_errors("sagemaker deploy"):
        for operation, request in zip(OPERATIONS, requests, strict=True):
            response = getattr(client, operation)(**request)
    echo(f"creating SageMaker endpoint {name} ({response['EndpointArn']}); it serves once InService")


def deploy_sagemaker(run_dir: str | Path, *, out: str | Path | None = None, submit: bool = False,
                     options: dict | None = None, echo=print) -> list[Path]:
    """Write the three requests (``create_model.json``, ``create_endpoint_config.json``,
    ``create_endpoint.json``) for serving ``run_dir`` into ``out`` (default ``./deploy/sagemaker/``); with
    ``submit``, send them through boto3. ``options``: ``image``, ``role_arn``, ``model_uri`` (required) and
    the rest of ``OPTIONS``."""
    return deploy(sys.modules[__name__], run_dir, out=out, submit=submit, options=options, echo=echo)


def deploy_sagemaker_command(run_dir: str, out: str | None = None, options: list[str] = (),
                             submit: bool = False) -> None:
    """``fmforge deploy sagemaker``."""
    deploy_command(sys.modules[__name__], run_dir, out=out, options=options, submit=submit)
