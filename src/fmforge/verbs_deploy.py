"""Verbs of one stage: ``deploy k8s|sagemaker``: deployment artifacts for a served run (the table ``cli.py`` parses with)."""

from __future__ import annotations

from fmforge.cli_args import Verb, arg, parent

GROUPS: dict[str, tuple[str, str | None, str]] = {
    "deploy": ("write (and apply) what hosts `fmforge serve` on a cluster: k8s, sagemaker",
               "Write the deployment artifacts that run `fmforge serve` on RUN_DIR's model: a Kubernetes "
               "Deployment + Service, or SageMaker CreateModel + CreateEndpointConfig + CreateEndpoint "
               "requests. Every value is checked before anything is written; --submit also applies them.",
               "TARGET"),
}

_COMMON = parent(
    arg("run_dir", metavar="RUN_DIR", help="the run directory to serve (checked here: a decoder, BERT or CLIP run)"),
    arg("--out", metavar="DIR", help="where to write the artifacts (default: deploy/TARGET/)"),
    arg("--option", dest="options", action="append", default=[], metavar="key=value",
        help="a deployment setting (repeatable); unknown keys are rejected and listed"),
    arg("--submit", action="store_true", help="apply the artifacts after writing them"))

VERBS: tuple[Verb, ...] = (
    Verb(
        "deploy k8s", "fmforge.deploy.artifacts_k8s:deploy_k8s_command",
        help="a Kubernetes Deployment + Service running fmforge serve (--submit: kubectl apply)",
        description="Write deploy/k8s/deployment.yaml: a Deployment whose pods run `fmforge serve` (startup, "
                    "readiness and liveness probes on /health; cpu/memory/gpus resources; replicas) and a "
                    "Service in front of it. Options: image (required); pvc (a claim holding the run directory, "
                    "mounted read-only; model_path, mount_path) or model_uri (s3://, copied in by an init "
                    "container); api_key_secret (a Secret mounted as the server's --api-key-file); namespace, "
                    "replicas, port, service_port, service_type, cpu, memory, gpus, name, env, startup_s, "
                    "termination_grace_s, service_account, node_selector, tolerations, image_pull_policy.",
        parents=(_COMMON,),
    ),
    Verb(
        "deploy sagemaker", "fmforge.deploy.artifacts_sagemaker:deploy_sagemaker_command",
        help="SageMaker CreateModel + CreateEndpointConfig + CreateEndpoint requests (--submit: boto3)",
        description="Write deploy/sagemaker/create_model.json, create_endpoint_config.json and "
                    "create_endpoint.json: a real-time endpoint whose container runs `fmforge serve` on SageMaker's "
                    "hosting contract (GET /ping, POST /invocations, port 8080, the model in /opt/ml/model). "
                    "Options: image, role_arn, model_uri (s3:// prefix or .tar.gz of the run directory) (all "
                    "required); instance_type, instance_count, volume_gb, startup_timeout_s, download_timeout_s, "
                    "name, env, tags, region.",
        parents=(_COMMON,),
    ),
)
