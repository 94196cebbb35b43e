"""Amazon SageMaker: a CreateTrainingJob request (JSON), submitted through boto3.

How the job runs torchrun: the request overrides the image's entrypoint with
``AlgorithmSpecification.ContainerEntrypoint`` / ``ContainerArguments`` and runs the same torchrun command as
every other target. We do not use the SageMaker PyTorch convention (``sagemaker_program`` +
``sagemaker_distribution``/``torch_distributed`` hyperparameters): that is interpreted by the
sagemaker-training-toolkit inside AWS's framework images only and wants the code uploaded as a tarball.
The entrypoint form works with any image that has fmforge installed. SageMaker names the instances
``algo-1`` … ``algo-N`` (resolvable inside the job), so the c10d rendezvous is on ``algo-1``.

Surviving interruptions: the run directory is ``/opt/ml/checkpoints``, which SageMaker syncs to
``CheckpointConfig.S3Uri`` while the job runs and restores when a spot-interrupted or retried job
restarts; ``--resume auto`` continues from the newest checkpoint there. The checkpoint prefix depends only on
``job_name``, so launching again with the same job name also continues the run. The config travels as an
S3 input channel (``--submit`` uploads it); an ``s3://`` ``--data`` becomes a second channel.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.launch.common import REQUIRED, JobSpec, Option, torchrun_argv, train_args

FILENAME = "create_training_job.json"
SUBMIT_TOOL = "boto3"
CHANNELS = "/opt/ml/input/data"  # SageMaker downloads channel NAME to CHANNELS/NAME
CHECKPOINTS = "/opt/ml/checkpoints"
MAX_ARG_CHARS = 256  # per ContainerEntrypoint/ContainerArguments item (service model)
SECRETS = ("give the job's IAM role (role_arn) the access instead, or read secrets at run time from AWS "
           "Secrets Manager: the request's Environment is shown by DescribeTrainingJob")

OPTIONS: dict[str, Option] = {
    "image": Option(REQUIRED, str, "ECR image URI with fmforge installed "
                                   "(AlgorithmSpecification.TrainingImage)"),
    "role_arn": Option(REQUIRED, str, "IAM role SageMaker assumes (needs S3 access to s3_uri)"),
    "s3_uri": Option(REQUIRED, str, "s3://bucket/prefix holding <job_name>/config, /checkpoints and /output"),
    "instance_type": Option("ml.p5.48xlarge", str, "ResourceConfig.InstanceType (one per node)"),
    "volume_gb": Option(500, int, "ResourceConfig.VolumeSizeInGB per instance"),
    "keep_alive_s": Option(0, int, "warm pool: ResourceConfig.KeepAlivePeriodInSeconds (0: off)"),
    "spot": Option(False, bool, "EnableManagedSpotTraining"),
    "max_run_s": Option(86400, int, "StoppingCondition.MaxRuntimeInSeconds"),
    "max_wait_s": Option(None, int, "StoppingCondition.MaxWaitTimeInSeconds with spot: run time plus time "
                                    "spent waiting for capacity (default: 2 x max_run_s)"),
    "retries": Option(0, int, "RetryStrategy.MaximumRetryAttempts on internal/capacity errors (0: off)"),
    "input_mode": Option("File", str, "TrainingInputMode for the channels: File or FastFile"),
    "region": Option(None, str, "AWS region for --submit (default: the boto3 session's)"),
    "tags": Option({}, dict, "job tags, e.g. {team: llm}"),
}

# GPUs per instance for common types, to catch --gpus-per-node mistakes before they cost an instance-hour.
INSTANCE_GPUS = {
    "ml.p3.16xlarge": 8, "ml.p3dn.24xlarge": 8, "ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8,
    "ml.p5.48xlarge": 8, "ml.g5.xlarge": 1, "ml.g5.2xlarge": 1, "ml.g5.4xlarge": 1, "ml.g5.8xlarge": 1,
    "ml.g5.16xlarge": 1, "ml.g5.12xlarge": 4, "ml.g5.24xlarge": 4, "ml.g5.48xlarge": 8,
    "ml.g6.12xlarge": 4, "ml.g6.48xlarge": 8,
}


def _s3_join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _channel(name: str, s3_uri: str, input_mode: str) -> dict:
    return {
        "ChannelName": name,
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": s3_uri,
                                        "S3DataDistributionType": "FullyReplicated"}},
        "InputMode": input_mode,
    }


def build(spec: JobSpec, opts: dict, now: float | None = None) -> dict:
    """The CreateTrainingJob request, as boto3's ``create_training_job(**request)`` takes it."""
    s3 = opts["s3_uri"]
    if not s3.startswith("s3://"):
        raise FmforgeError(f"launch sagemaker: option s3_uri must start with s3://, got {s3!r}")
    if spec.run_dir is not None:
        raise FmforgeError(f"launch sagemaker: run_dir cannot be chosen: the job always runs in "
                           f"{CHECKPOINTS}, synced to <s3_uri>/<job_name>/checkpoints")
    if opts["input_mode"] not in ("File", "FastFile"):
        raise FmforgeError(f"launch sagemaker: option input_mode must be File or FastFile, "
                           f"got {opts['input_mode']!r}")
    gpus = INSTANCE_GPUS.get(opts["instance_type"])
    if gpus is not None and gpus != spec.gpus_per_node:
        raise FmforgeError(f"launch sagemaker: {opts['instance_type']} has {gpus} GPU(s), but gpus_per_node "
                           f"is {spec.gpus_per_node}")

    data = spec.data
    if data is not None and not data.startswith("s3://"):
        raise FmforgeError(f"launch sagemaker: --data must be an s3:// URI: SageMaker instances see their "
                           f"data only through S3 input channels, not a path on this machine, got {data!r}")
    job_prefix = _s3_join(s3, spec.job_name)
    channels = [_channel("config", _s3_join(job_prefix, "config") + "/", opts["input_mode"])]
    if data is not None:
        channels.append(_channel("data", data.rstrip("/") + "/", opts["input_mode"]))
        data = f"{CHANNELS}/data"

    argv = torchrun_argv(
        python="python",
        nnodes=spec.nodes,
        nproc_per_node=spec.gpus_per_node,
        endpoint=f"algo-1:{spec.rdzv_port or 29500}",
        rdzv_id=spec.job_name,
        max_restarts=spec.max_restarts,
        train=train_args(f"{CHANNELS}/config/config.yaml", data, CHECKPOINTS, spec.overrides),
    )
    entrypoint, arguments = argv[:3], argv[3:]
    too_long = [a for a in arguments if len(a) > MAX_ARG_CHARS]
    if too_long:
        raise FmforgeError(f"launch sagemaker: each container argument is limited to {MAX_ARG_CHARS} "
                           f"characters; too long: {too_long[0][:60]}...")

    stopping = {"MaxRuntimeInSeconds": opts["max_run_s"]}
    if opts["spot"]:
        max_wait = opts["max_wait_s"] or 2 * opts["max_run_s"]
        if max_wait < opts["max_run_s"]:
            raise FmforgeError(f"launch sagemaker: max_wait_s ({max_wait}) must be at least max_run_s "
                               f"({opts['max_run_s']})")
        stopping["MaxWaitTimeInSeconds"] = max_wait
    elif opts["max_wait_s"] is not None:
        raise FmforgeError("launch sagemaker: max_wait_s only applies with spot=true")

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    request = {
        # unique per submission (SageMaker job names cannot be reused); the S3 layout uses job_name only
        "TrainingJobName": f"{spec.job_name}-{stamp}",
        "RoleArn": opts["role_arn"],
        "AlgorithmSpecification": {
            "TrainingImage": opts["image"],
            "TrainingInputMode": opts["input_mode"],
            "ContainerEntrypoint": entrypoint,
            "ContainerArguments": arguments,
        },
        "InputDataConfig": channels,
        "OutputDataConfig": {"S3OutputPath": _s3_join(job_prefix, "output")},
        "ResourceConfig": {
            "InstanceType": opts["instance_type"],
            "InstanceCount": spec.nodes,
            "VolumeSizeInGB": opts["volume_gb"],
            "KeepAlivePeriodInSeconds": opts["keep_alive_s"],
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": opts["spot"],
        "CheckpointConfig": {"S3Uri": _s3_join(job_prefix, "checkpoints"), "LocalPath": CHECKPOINTS},
        "Environment": {"PYTHONUNBUFFERED": "1", **spec.env},
    }
    if opts["retries"]:
        request["RetryStrategy"] = {"MaximumRetryAttempts": opts["retries"]}
    if opts["tags"]:
        request["Tags"] = [{"Key": str(k), "Value": str(v)} for k, v in opts["tags"].items()]
    return request


def render(spec: JobSpec, opts: dict, out_dir: Path) -> str:
    return json.dumps(build(spec, opts), indent=2) + "\n"


def config_s3_uri(request: dict) -> str:
    channel = next(c for c in request["InputDataConfig"] if c["ChannelName"] == "config")
    return channel["DataSource"]["S3DataSource"]["S3Uri"] + "config.yaml"


def how_to_submit(path: Path, spec: JobSpec, opts: dict) -> list[str]:
    request = json.loads(path.read_text(encoding="utf-8"))
    name = shlex.quote(request["TrainingJobName"])
    return [f"submit:  aws s3 cp {shlex.quote(str(spec.config_path))} {shlex.quote(config_s3_uri(request))}",
            f"         aws sagemaker create-training-job --cli-input-json {shlex.quote(f'file://{path}')}",
            "         (or `fmforge launch sagemaker ... --submit`, which does both through boto3)",
            f"watch:   aws sagemaker describe-training-job --training-job-name {name}"]


def aws_session(region: str | None):
    """A boto3 session that can submit, or a one-line error naming what is missing."""
    try:
        import boto3
    except ImportError:
        raise FmforgeError("cannot submit: boto3 is not installed (pip install 'fmforge[launch]')") from None
    session = boto3.Session(region_name=region)
    if session.get_credentials() is None:
        raise FmforgeError("cannot submit: no AWS credentials found (set AWS_PROFILE or "
                           "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run `aws configure`)")
    if session.region_name is None:
        raise FmforgeError("cannot submit: no AWS region (option region, or AWS_REGION/AWS_DEFAULT_REGION)")
    return session


@contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """A botocore error (refused request, unreachable endpoint, expired credentials) as one line."""
    from botocore.exceptions import BotoCoreError, ClientError  # aws_session has checked boto3 is there

    try:
        yield
    except (BotoCoreError, ClientError) as err:
        lines = str(err).splitlines() or [type(err).__name__]
        raise FmforgeError(f"{what} failed: {lines[0]}") from None


def submit(path: Path, spec: JobSpec, opts: dict, echo=print) -> str:
    session = aws_session(opts["region"])
    request = json.loads(path.read_text(encoding="utf-8"))
    bucket, _, key = config_s3_uri(request).removeprefix("s3://").partition("/")
    with aws_errors("sagemaker submit"):
        session.client("s3").put_object(Bucket=bucket, Key=key, Body=spec.config_text.encode())
        response = session.client("sagemaker").create_training_job(**request)
    echo(f"submitted SageMaker training job {request['TrainingJobName']} ({response['TrainingJobArn']})")
    return request["TrainingJobName"]
