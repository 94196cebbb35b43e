"""``fmforge deploy k8s RUN_DIR``: a Kubernetes Deployment + Service that run ``fmforge serve``.

Shape and why:
- The container runs ``python -m fmforge serve MODEL_DIR --host 0.0.0.0 --port PORT`` (``python -m``: the
  interpreter that has fmforge, as ``fmforge launch`` does). ``MODEL_DIR``'s name is the model name clients
  send, so it is RUN_DIR's name unless ``model_path`` says otherwise.
- Model files come from a PersistentVolumeClaim (``pvc``, mounted read-only at ``mount_path``: the claim
  ``fmforge launch k8s`` trains into works as is) or from an ``s3://`` URI (``model_uri``): an init
  container of the same image copies it into an ``emptyDir`` with fmforge's own S3 client (fmforge[s3] in
  the image; credentials from the pod, e.g. IRSA through ``service_account``).
- ``/health`` answers once every model is loaded: a startup probe gives loading ``startup_s`` seconds, then
  readiness (in the Service or not) and liveness (restart) probes take over.
- API keys come from a Secret mounted as files (``--api-key-file``), never from the manifest.
- On a rolling update the old pod first sleeps a few seconds (the Service stops routing to it), then gets
  SIGTERM: ``fmforge serve`` finishes its running requests within ``termination_grace_s``.
"""

from __future__ import annotations

import math
import posixpath
import re
import shlex
import sys
from pathlib import Path

from fmforge.deploy.artifacts import ServedRun, check_ranges, deploy, deploy_command, sync_hint
from fmforge.errors import FmforgeError, clip
from fmforge.launch.common import NAME, Option, dump_yaml
from fmforge.launch.kubernetes import check_quantity, kubectl_apply

TARGET = "k8s"
VERB = "deploy k8s"
FILENAME = "deployment.yaml"
SECRETS = ("put secrets in a Kubernetes Secret instead: api_key_secret mounts one for the server's API keys")
MODEL_ROOT = "/models"  # the emptyDir an s3:// model is copied into
KEY_DIR = "/etc/fmforge/api-key"
FETCH = "import sys; from fmforge.io.fs import download_dir; download_dir(sys.argv[1], sys.argv[2])"
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # DNS-1123
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
PROBE_PERIOD_S = 10

OPTIONS: dict[str, Option] = {
    "namespace": Option("default", str, "namespace of the Deployment and Service", NAME),
    "replicas": Option(1, int, "server pods"),
    "port": Option(8000, int, "container port fmforge serve listens on"),
    "service_port": Option(80, int, "port of the Service"),
    "service_type": Option("ClusterIP", str, "Service type: ClusterIP, NodePort or LoadBalancer"),
    "cpu": Option(None, str, "CPU request and limit per pod, e.g. '8'"),
    "memory": Option(None, str, "memory request and limit per pod, e.g. '32Gi'"),
    "gpus": Option(0, int, "nvidia.com/gpu limit per pod"),
    "pvc": Option(None, str, "PersistentVolumeClaim holding the run directory (mounted read-only)"),
    "mount_path": Option("/mnt/fmforge", str, "where the pvc is mounted"),
    "model_path": Option(None, str, "the run directory inside the container (default: <mount_path>/<RUN_DIR "
                                    "name>); its name is the model name clients send"),
    "model_uri": Option(None, str, "s3:// URI holding the run directory's files, copied in at pod start "
                                   "(instead of pvc)"),
    "api_key_secret": Option(None, str, "Secret whose key api_key_secret_key holds the API key(s), one per "
                                        "line; requests then need Authorization: Bearer KEY"),
    "api_key_secret_key": Option("api-key", str, "the key in api_key_secret"),
    "startup_s": Option(600, int, "seconds the server may take to load the model before liveness checks "
                                  "start"),
    "termination_grace_s": Option(60, int, "pod terminationGracePeriodSeconds: time to finish running requests"),
    "service_account": Option(None, str, "pod serviceAccountName (e.g. one allowed to read model_uri)"),
    "image_pull_policy": Option("IfNotPresent", str, "container imagePullPolicy: Always, IfNotPresent or Never"),
    "node_selector": Option({}, dict, "pod nodeSelector, e.g. {nvidia.com/gpu.product: NVIDIA-L4}"),
    "tolerations": Option([], list, "pod tolerations, e.g. [{key: nvidia.com/gpu, operator: Exists, "
                                    "effect: NoSchedule}]"),
}


def _check(opts: dict) -> None:
    """What the option types cannot say; each is a one-line error before anything is written."""
    for key in ("cpu", "memory"):
        check_quantity(VERB, key, opts[key])
    for key in ("pvc", "api_key_secret", "service_account"):
        value = opts[key]
        if value is not None and not (len(value) <= 253 and SUBDOMAIN.fullmatch(value)):
            raise FmforgeError(f"{VERB}: option {key} {clip(value)} is not a valid Kubernetes name (lowercase "
                               f"letters, digits, '-' and '.', starting and ending with a letter or digit)")
    if not re.fullmatch(r"[-._a-zA-Z0-9]{1,253}", opts["api_key_secret_key"]):
        raise FmforgeError(f"{VERB}: option api_key_secret_key {clip(opts['api_key_secret_key'])} is not a "
                           f"valid Secret key (letters, digits, '-', '_' and '.')")
    check_ranges(VERB, opts, (("replicas", 0, 10_000), ("port", 1, 65535), ("service_port", 1, 65535),
                              ("gpus", 0, 1024), ("startup_s", PROBE_PERIOD_S, 86400),
                              ("termination_grace_s", 0, 86400)))
    for key, allowed in (("service_type", SERVICE_TYPES), ("image_pull_policy", ("Always", "IfNotPresent", "Never"))):
        if opts[key] not in allowed:
            raise FmforgeError(f"{VERB}: option {key} must be one of {', '.join(allowed)}, got {clip(opts[key])}")
    if (opts["pvc"] is None) == (opts["model_uri"] is None):
        raise FmforgeError(f"{VERB}: say where the pods find the model: option pvc (a claim holding the run "
                           f"directory) or option model_uri (an s3:// URI), exactly one")
    if opts["model_uri"] is not None and not opts["model_uri"].startswith("s3://"):
        raise FmforgeError(f"{VERB}: option model_uri must be an s3:// URI, got {clip(opts['model_uri'])}")


def _model_dir(run: ServedRun, opts: dict) -> str:
    if opts["model_uri"] is not None:
        if opts["model_path"] is not None:
            raise FmforgeError(f"{VERB}: option model_path is for a pvc; with model_uri the model is copied to "
                               f"{MODEL_ROOT}/<RUN_DIR name>")
        return posixpath.join(MODEL_ROOT, run.model_name)
    mount = posixpath.normpath(opts["mount_path"])
    path = posixpath.normpath(opts["model_path"] or posixpath.join(mount, run.model_name))
    if not (posixpath.isabs(mount) and posixpath.isabs(path) and path.startswith(mount.rstrip("/") + "/")):
        raise FmforgeError(f"{VERB}: option model_path must be an absolute path inside mount_path ({mount}), "
                           f"got {clip(path)}")
    return path


def _probe(failures: int, **timing) -> dict:
    return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": PROBE_PERIOD_S,
            "timeoutSeconds": 5, "failureThreshold": failures, **timing}


def _container(model_dir: str, opts: dict) -> dict:
    command = ["python", "-m", "fmforge", "serve", model_dir, "--host", "0.0.0.0", "--port", str(opts["port"])]
    mounts = [{"name": "model", "mountPath": MODEL_ROOT if opts["model_uri"] else opts["mount_path"],
               "readOnly": True}]
    if opts["api_key_secret"]:
        command += ["--api-key-file", posixpath.join(KEY_DIR, opts["api_key_secret_key"])]
        mounts.append({"name": "api-key", "mountPath": KEY_DIR, "readOnly": True})
    resources: dict = {}
    for key in ("cpu", "memory"):
        if opts[key] is not None:
            resources.setdefault("requests", {})[key] = opts[key]
            resources.setdefault("limits", {})[key] = opts[key]
    if opts["gpus"]:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = opts["gpus"]
    container = {
        "name": "fmforge",
        "image": opts["image"],
        "imagePullPolicy": opts["image_pull_policy"],
        "command": command,
        "ports": [{"name": "http", "containerPort": opts["port"], "protocol": "TCP"}],
        "startupProbe": _probe(math.ceil(opts["startup_s"] / PROBE_PERIOD_S)),
        "readinessProbe": _probe(3),
        "livenessProbe": _probe(6),
        # let the Service stop routing here before SIGTERM: fmforge serve then finishes what it has
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "resources": resources,
        "volumeMounts": mounts,
    }
    if opts["env"]:
        container["env"] = [{"name": k, "value": v} for k, v in opts["env"].items()]
    return container


def build(run: ServedRun, name: str, opts: dict) -> list[dict]:
    """The two Kubernetes objects: [Deployment, Service]."""
    _check(opts)
    if not name[0].isalpha():
        raise FmforgeError(f"{VERB}: name {clip(name)} must start with a letter (it names the Service too)")
    ns = opts["namespace"]
    model_dir = _model_dir(run, opts)
    selector = {"app.kubernetes.io/name": "fmforge-serve", "app.kubernetes.io/instance": name}
    labels = {**selector, "app.kubernetes.io/component": "server"}
    container = _container(model_dir, opts)
    if opts["model_uri"]:
        model_volume: dict = {"emptyDir": {}}
    else:
        model_volume = {"persistentVolumeClaim": {"claimName": opts["pvc"], "readOnly": True}}
    pod: dict = {
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        "terminationGracePeriodSeconds": opts["termination_grace_s"],
        "containers": [container],
        "volumes": [{"name": "model", **model_volume}],
    }
    if opts["model_uri"]:
        fetch = {"name": "fetch-model", "image": opts["image"], "imagePullPolicy": opts["image_pull_policy"],
                 "command": ["python", "-c", FETCH, opts["model_uri"], model_dir],
                 "volumeMounts": [{"name": "model", "mountPath": MODEL_ROOT}]}
        if "env" in container:
            fetch["env"] = container["env"]
        pod["initContainers"] = [fetch]
    if opts["api_key_secret"]:
        pod["volumes"].append({"name": "api-key", "secret": {"secretName": opts["api_key_secret"]}})
    if opts["service_account"]:
        pod["serviceAccountName"] = opts["service_account"]
    if opts["node_selector"]:
        pod["nodeSelector"] = {str(k): str(v) for k, v in opts["node_selector"].items()}
    if opts["tolerations"]:
        pod["tolerations"] = list(opts["tolerations"])
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"replicas": opts["replicas"], "selector": {"matchLabels": selector},
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"type": opts["service_type"], "selector": selector,
                 "ports": [{"name": "http", "port": opts["service_port"], "targetPort": "http",
                            "protocol": "TCP"}]},
    }
    return [deployment, service]


def render(run: ServedRun, name: str, opts: dict, out_dir: Path) -> dict[str, str]:
    header = (f"# fmforge server {name}, written by `fmforge deploy k8s` for {shlex.quote(str(run.path))}\n"
              f"# Apply with: kubectl apply -f {shlex.quote(str(out_dir.resolve() / FILENAME))}\n")
    return {FILENAME: header + dump_yaml(*build(run, name, opts))}


def how_to_submit(paths: list[Path], run: ServedRun, name: str, opts: dict) -> list[str]:
    ns = shlex.quote(opts["namespace"])
    lines = []
    if opts["model_uri"]:
        lines.append(f"model:   {sync_hint(run, opts['model_uri'])}")
    else:
        lines.append(f"model:   copy {shlex.quote(str(run.path))} to {_model_dir(run, opts)} in the pods "
                     f"(claim {opts['pvc']})")
    if opts["api_key_secret"]:
        lines.append(f"keys:    kubectl -n {ns} create secret generic {opts['api_key_secret']} "
                     f"--from-file={opts['api_key_secret_key']}=KEYS_FILE")
    return [*lines,
            f"apply:   kubectl apply -f {shlex.quote(str(paths[0]))}",
            f"watch:   kubectl -n {ns} rollout status deployment/{name}",
            f"try:     kubectl -n {ns} port-forward service/{name} 8000:{opts['service_port']}, then "
            f"GET http://127.0.0.1:8000/v1/models"]


def submit(paths: list[Path], name: str, opts: dict, echo=print) -> None:
    kubectl_apply(paths[0])
    echo(f"applied Deployment and Service {opts['namespace']}/{name}")


def deploy_k8s(run_dir: str | Path, *, out: str | Path | None = None, submit: bool = False,
               options: dict | None = None, echo=print) -> list[Path]:
    """Write ``deployment.yaml`` (a Deployment and a Service running ``fmforge serve`` on ``run_dir``'s
    model) into ``out`` (default ``./deploy/k8s/``); with ``submit``, ``kubectl apply`` it. ``options``:
    ``image`` (required), ``pvc`` or ``model_uri`` (one of them), and the rest of ``OPTIONS``."""
    return deploy(sys.modules[__name__], run_dir, out=out, submit=submit, options=options, echo=echo)


def deploy_k8s_command(run_dir: str, out: str | None = None, options: list[str] = (), submit: bool = False) -> None:
    """``fmforge deploy k8s``."""
    deploy_command(sys.modules[__name__], run_dir, out=out, options=options, submit=submit)
