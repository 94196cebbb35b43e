"""Kubernetes: a Kubeflow PyTorchJob (training-operator, ``kubeflow.org/v1``) and a ConfigMap holding the
config.

Shape and why:
- ``elasticPolicy`` (rdzvBackend c10d, min/maxReplicas, maxRestarts) with Worker replicas only: the
  operator's elastic mode. Every worker runs the same torchrun command; rendezvous is on
  ``<job>-worker-0:<port>``, the pod the operator names first and gives a headless service. Ranks come
  from the c10d store, so a restarted pod simply rejoins.
- ``restartPolicy: OnFailure``: a crashed container is restarted in the same pod; together with torchrun's
  ``--max-restarts`` and ``--resume auto`` a failure costs at most one checkpoint interval.
- The run directory must outlive the container: by default an ``emptyDir`` at ``mount_path`` (survives
  container restarts, not pod deletion); give ``pvc`` (a ReadWriteMany claim when nodes > 1) to survive
  pod rescheduling. ``/dev/shm`` is a memory ``emptyDir`` because the default 64 MiB breaks DataLoader
  workers and NCCL.
- On pod deletion Kubernetes sends SIGTERM: torchrun passes it to the workers and the trainer checkpoints
  (``termination_grace_s`` must cover that; torchrun itself waits 30 s before SIGKILL).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path

from fmforge.errors import FmforgeError, clip
from fmforge.launch.common import (
    REQUIRED,
    JobSpec,
    Option,
    dump_yaml,
    is_uri,
    require_tool,
    run_tool,
    torchrun_argv,
    train_args,
    who,
)

FILENAME = "pytorchjob.yaml"
SUBMIT_TOOL = "kubectl"
CONFIG_DIR = "/etc/fmforge"
DEFAULT_RDZV_PORT = 29400  # torchrun's own default c10d port
SECRETS = ("put secrets in a Kubernetes Secret instead and reference it from the container "
           "(env valueFrom.secretKeyRef)")

# resource.Quantity as the API server parses it (the pattern in every CRD's openAPIV3Schema): '64', '500m',
# '480Gi', '1e3'. A value outside it is rejected by kubectl apply, after the artifact was written.
QUANTITY = re.compile(r"[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                      r"([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?")

OPTIONS: dict[str, Option] = {
    "image": Option(REQUIRED, str, "container image with fmforge installed"),
    "namespace": Option("default", str, "namespace of the PyTorchJob and its ConfigMap"),
    "pvc": Option(None, str, "PersistentVolumeClaim mounted at mount_path for the run directory "
                             "(ReadWriteMany when nodes > 1); default: an emptyDir"),
    "mount_path": Option("/mnt/fmforge", str, "where the run volume is mounted; the default run directory "
                                              "is <mount_path>/<job_name>"),
    "min_nodes": Option(None, int, "elastic lower bound: keep training with this many nodes (default: "
                                   "nodes, i.e. fixed size)"),
    "shm_size": Option("16Gi", str, "size limit of the /dev/shm memory volume"),
    "cpu": Option(None, str, "CPU request and limit per pod, e.g. '64'"),
    "memory": Option(None, str, "memory request and limit per pod, e.g. '480Gi'"),
    "termination_grace_s": Option(120, int, "pod terminationGracePeriodSeconds (time to checkpoint on "
                                            "SIGTERM)"),
    "node_selector": Option({}, dict, "pod nodeSelector, e.g. "
                                      "{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}"),
    "tolerations": Option([], list, "pod tolerations, e.g. [{key: nvidia.com/gpu, operator: Exists, "
                                    "effect: NoSchedule}]"),
    "service_account": Option(None, str, "pod serviceAccountName (e.g. one allowed to read your bucket)"),
    "image_pull_policy": Option("IfNotPresent", str, "container imagePullPolicy"),
    "backoff_limit": Option(None, int, "runPolicy.backoffLimit: job-level retries before it is failed"),
}


def check_quantity(target: str, key: str, value: str | None) -> str | None:
    """``value`` if it is a Kubernetes resource quantity ('64', '500m', '480Gi'), else a one-line error."""
    if value is not None and not QUANTITY.fullmatch(value):
        raise FmforgeError(f"{who(target)}: option {key} must be a Kubernetes quantity such as '8', '500m' or "
                           f"'32Gi', got {clip(value)}")
    return value


def kubectl_apply(path: Path) -> None:
    """``kubectl apply -f path``; a missing kubectl or a refused manifest is one line."""
    kubectl = require_tool("kubectl", "install kubectl and point it at your cluster")
    run_tool([kubectl, "apply", "-f", str(path)])


def _container_path(kind: str, path: str) -> str:
    if not (is_uri(path) or posixpath.isabs(path)):
        raise FmforgeError(f"launch k8s: {kind} must be a path inside the container (absolute, e.g. on the "
                           f"pvc) or a URI, got {path!r}")
    return path


def build(spec: JobSpec, opts: dict) -> list[dict]:
    """The two Kubernetes objects: [ConfigMap, PyTorchJob]."""
    name, ns = spec.job_name, opts["namespace"]
    port = spec.rdzv_port or DEFAULT_RDZV_PORT
    min_nodes = opts["min_nodes"] or spec.nodes
    if not 1 <= min_nodes <= spec.nodes:
        raise FmforgeError(f"launch k8s: min_nodes must be between 1 and nodes ({spec.nodes}), "
                           f"got {min_nodes}")
    for key in ("cpu", "memory", "shm_size"):
        check_quantity("k8s", key, opts[key])
    run_dir = _container_path("the run directory", spec.run_dir or posixpath.join(opts["mount_path"], name))
    data = _container_path("--data", spec.data) if spec.data is not None else None
    labels = {"app.kubernetes.io/name": "fmforge", "app.kubernetes.io/instance": name}

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": ns, "labels": labels},
        "data": {"config.yaml": spec.config_text},
    }

    command = torchrun_argv(
        python="python",
        nnodes=spec.nodes if min_nodes == spec.nodes else f"{min_nodes}:{spec.nodes}",
        nproc_per_node=spec.gpus_per_node,
        endpoint=f"{name}-worker-0:{port}",
        rdzv_id=name,
        max_restarts=spec.max_restarts,
        train=train_args(f"{CONFIG_DIR}/config.yaml", data, run_dir, spec.overrides),
    )
    resources: dict = {"limits": {"nvidia.com/gpu": spec.gpus_per_node}}
    for key in ("cpu", "memory"):
        if opts[key] is not None:
            resources["limits"][key] = opts[key]
            resources.setdefault("requests", {})[key] = opts[key]
    run_volume = ({"persistentVolumeClaim": {"claimName": opts["pvc"]}} if opts["pvc"] else {"emptyDir": {}})
    container = {
        "name": "pytorch",  # the operator looks for this container name
        "image": opts["image"],
        "imagePullPolicy": opts["image_pull_policy"],
        "command": [str(w) for w in command],
        "env": [{"name": k, "value": v} for k, v in spec.env.items()],
        # the operator builds the headless service from the port named pytorchjob-port
        "ports": [{"name": "pytorchjob-port", "containerPort": port, "protocol": "TCP"}],
        "resources": resources,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "run", "mountPath": opts["mount_path"]},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if not container["env"]:
        del container["env"]
    pod_spec: dict = {
        "terminationGracePeriodSeconds": opts["termination_grace_s"],
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{name}-config"}},
            {"name": "run", **run_volume},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts["shm_size"]}},
        ],
    }
    if opts["node_selector"]:
        pod_spec["nodeSelector"] = {str(k): str(v) for k, v in opts["node_selector"].items()}
    if opts["tolerations"]:
        pod_spec["tolerations"] = list(opts["tolerations"])
    if opts["service_account"]:
        pod_spec["serviceAccountName"] = opts["service_account"]

    run_policy: dict = {"cleanPodPolicy": "None"}  # keep finished pods so their logs can be read
    if opts["backoff_limit"] is not None:
        run_policy["backoffLimit"] = opts["backoff_limit"]
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvPort": port,
                "minReplicas": min_nodes,
                "maxReplicas": spec.nodes,
                "maxRestarts": spec.max_restarts,
            },
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": spec.nodes,
                    "restartPolicy": "OnFailure",
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec},
                },
            },
        },
    }
    return [config_map, job]


def render(spec: JobSpec, opts: dict, out_dir: Path) -> str:
    header = (f"# fmforge training job {spec.job_name}, written by `fmforge launch k8s` from "
              f"{shlex.quote(str(spec.config_path))}\n"
              f"# Needs the Kubeflow training operator (PyTorchJob CRD). Submit with: kubectl apply -f "
              f"{shlex.quote(str(out_dir.resolve() / FILENAME))}\n")
    return header + dump_yaml(*build(spec, opts))


def how_to_submit(path: Path, spec: JobSpec, opts: dict) -> list[str]:
    ns, name = shlex.quote(opts["namespace"]), spec.job_name
    return [f"submit:  kubectl apply -f {shlex.quote(str(path))}",
            f"watch:   kubectl -n {ns} get pytorchjob {name}",
            f"logs:    kubectl -n {ns} logs -f {name}-worker-0"]


def submit(path: Path, spec: JobSpec, opts: dict, echo=print) -> str:
    kubectl_apply(path)
    echo(f"submitted PyTorchJob {opts['namespace']}/{spec.job_name}")
    return spec.job_name
