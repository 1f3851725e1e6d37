"""Desired children of a BaseModel: Deployment, Service, PodDisruptionBudget, registry ConfigMaps.

Pure: a `BaseModel` (and the registry shards) in, plain manifests out. Everything is owned by the
BaseModel (so deleting it garbage-collects them) and carries the standard labels. The pod
template never depends on the registry's content: publishing adapters must not roll the pods,
the engines reload the mounted registry instead.
"""

from __future__ import annotations

import base64
from typing import Any

from lorafleet.engine.adapter_format import DEFAULT_MAX_BYTES

from .spec import BaseModel

API_GROUP = "lorafleet.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
MANAGER = "lorafleet-operator"  # the field manager of server-side apply, and managed-by label
HTTP_PORT = 8000  # engine HTTP: OpenAI API, /generate, /health, /ready and /metrics
REGISTRY_DIR = "/etc/lorafleet/registry"
API_KEYS_DIR = "/etc/lorafleet/api-keys"
ADAPTER_CACHE_DIR = "/var/cache/lorafleet/adapters"
MODEL_DIR = "/models"
MODEL_CACHE_DIR = "/var/cache/lorafleet/models"  # the image's LORAFLEET_CACHE_DIR
ENGINE_GID = 10001  # the image's user and group
# The pod mounts this many registry shards, all but the first optional, so that adding a shard
# (past ~15,000 adapters per shard) never changes the pod template.
MAX_REGISTRY_SHARDS = 8
PRESTOP_SLEEP_S = 5  # endpoints drop the pod from the Service before the engine gets SIGTERM


def labels(bm: BaseModel) -> dict[str, str]:
    return selector(bm) | {"app.kubernetes.io/component": "engine", "app.kubernetes.io/managed-by": MANAGER}


def selector(bm: BaseModel) -> dict[str, str]:
    return {"app.kubernetes.io/name": "lorafleet-engine", "lorafleet.io/basemodel": bm.name}


def selector_string(bm: BaseModel) -> str:
    """The label selector as text, for the scale subresource (status.selector)."""
    return ",".join(f"{k}={v}" for k, v in selector(bm).items())


def owner_reference(bm: BaseModel) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "BaseModel",
        "name": bm.name,
        "uid": bm.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(bm: BaseModel, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": bm.namespace,
        "labels": labels(bm),
        "ownerReferences": [owner_reference(bm)],
    }


def registry_configmap_name(basemodel_name: str, shard: int) -> str:
    return f"{basemodel_name}-registry" if shard == 0 else f"{basemodel_name}-registry-{shard:03d}"


def service_endpoint(bm: BaseModel) -> str:
    return f"http://{bm.name}.{bm.namespace}.svc:{bm.service_port}"


def engine_args(bm: BaseModel) -> list[str]:
    """The engine's command line. Flag names must match `lorafleet engine --help` (a test parses
    them with the engine's own parser)."""
    args = ["engine", "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--served-model-name", bm.served_name]
    # The name the operator validated adapters against; the engine's default (its model directory's
    # name) is an S3 model's cache directory or the PVC path's last component.
    args += ["--base-model-name", bm.model_name]
    if bm.source == "s3":
        args += ["--model", str(bm.model_uri)]
    elif bm.source == "pvc":
        args += ["--model", f"{MODEL_DIR}/{bm.pvc_path.strip('/')}".rstrip("/")]
    if bm.quantization != "none":
        args += ["--quantization", bm.quantization]
    args += [
        "--dtype",
        bm.dtype,
        "--registry",
        REGISTRY_DIR,
        "--max-lora-rank",
        str(bm.max_lora_rank),
        "--max-loras",
        str(bm.gpu_slots),
        "--adapter-cpu-mib",
        str(max(1, bm.cpu_cache_bytes >> 20)),
        "--adapter-disk-mib",
        str(max(1, bm.disk_cache_bytes >> 20)),
        "--adapter-cache-dir",
        ADAPTER_CACHE_DIR,
        "--drain-grace-s",
        str(bm.drain_seconds),
    ]
    if bm.api_keys_secret is not None:
        args += ["--api-keys-file", f"{API_KEYS_DIR}/keys"]
    return args + list(bm.extra_args)


def _env(bm: BaseModel) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if bm.s3_secret:
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        ):
            ref = {"name": bm.s3_secret, "key": key, "optional": optional}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if bm.s3_endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": bm.s3_endpoint_url})
    if bm.s3_region:
        # botocore reads AWS_DEFAULT_REGION; AWS_REGION is what other AWS SDKs read.
        env += [{"name": name, "value": bm.s3_region} for name in ("AWS_DEFAULT_REGION", "AWS_REGION")]
    return env


def _volumes(bm: BaseModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    shards = [
        {"configMap": {"name": registry_configmap_name(bm.name, i), "optional": i > 0}}
        for i in range(MAX_REGISTRY_SHARDS)
    ]
    if bm.disk_cache_claim:
        cache: dict[str, Any] = {"persistentVolumeClaim": {"claimName": bm.disk_cache_claim}}
    else:
        # The engine downloads into the same volume (up to two loads at once, each at most
        # DEFAULT_MAX_BYTES) before it evicts to its budget: a limit of exactly the budget would
        # get the pod evicted by the kubelet on the first cold load after the tier fills up.
        size_limit = bm.disk_cache_bytes + 2 * DEFAULT_MAX_BYTES
        cache = {
            "emptyDir": {"sizeLimit": str(size_limit)}
            | ({"medium": "Memory"} if bm.disk_cache_medium else {})
        }
    volumes: list[dict[str, Any]] = [
        {"name": "registry", "projected": {"sources": shards}},
        {"name": "adapter-cache", **cache},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "registry", "mountPath": REGISTRY_DIR, "readOnly": True},
        {"name": "adapter-cache", "mountPath": ADAPTER_CACHE_DIR},
    ]
    if bm.source == "pvc":
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": bm.pvc_claim, "readOnly": True}}
        )
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
    elif bm.source == "s3":  # downloaded once per pod, not again after every container restart
        volumes.append({"name": "model-cache", "emptyDir": {}})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_DIR})
    if bm.api_keys_secret is not None:
        name, key = bm.api_keys_secret
        volumes.append(
            {"name": "api-keys", "secret": {"secretName": name, "items": [{"key": key, "path": "keys"}]}}
        )
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    return volumes, mounts


def render_deployment(bm: BaseModel) -> dict[str, Any]:
    volumes, mounts = _volumes(bm)
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    resources: dict[str, Any] = {
        "requests": {"cpu": bm.cpu, "memory": bm.memory},
        "limits": {"memory": bm.memory} | ({"nvidia.com/gpu": str(bm.gpus)} if bm.gpus else {}),
    }
    container = {
        "name": "engine",
        "image": bm.image,
        "imagePullPolicy": bm.image_pull_policy,
        "command": ["lorafleet"],
        "args": engine_args(bm),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "env": _env(bm),
        "resources": resources,
        "volumeMounts": mounts,
        # Loading the weights (and dequantizing or downloading them) can take minutes.
        "startupProbe": probe | {"failureThreshold": 60},
        "livenessProbe": probe | {"failureThreshold": 3},
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        # After the sleep the engine gets SIGTERM: it fails /ready and finishes running requests.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        # Volumes (a disk-cache PVC above all) writable by the engine, whatever user the image runs as.
        "securityContext": {"fsGroup": ENGINE_GID, "fsGroupChangePolicy": "OnRootMismatch"},
        "terminationGracePeriodSeconds": bm.drain_seconds + PRESTOP_SLEEP_S,
    }
    for key, value in (
        ("nodeSelector", bm.node_selector),
        ("tolerations", bm.tolerations),
        ("affinity", bm.affinity),
        ("imagePullSecrets", [{"name": n} for n in bm.image_pull_secrets]),
        ("serviceAccountName", bm.service_account),
    ):
        if value:
            pod_spec[key] = value
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(bm, bm.name),
        "spec": {
            "replicas": bm.replicas,
            "selector": {"matchLabels": selector(bm)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(bm),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(HTTP_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def render_service(bm: BaseModel) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(bm, bm.name),
        "spec": {
            "type": bm.service_type,
            "selector": selector(bm),
            "ports": [{"name": "http", "port": bm.service_port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_pdb(bm: BaseModel) -> dict[str, Any]:
    # maxUnavailable rather than minAvailable: with one replica, minAvailable 1 would block drains forever.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(bm, bm.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(bm)}},
    }


def render_children(bm: BaseModel) -> list[dict[str, Any]]:
    """Everything but the registry, which the registry writer owns."""
    return [render_deployment(bm), render_service(bm), render_pdb(bm)]


def render_registry_configmaps(bm: BaseModel, shards: dict[str, bytes]) -> list[dict[str, Any]]:
    """One ConfigMap per shard (from `registry.render_shards`), each under the 1 MiB object limit."""
    if len(shards) > MAX_REGISTRY_SHARDS:
        raise ValueError(f"registry needs {len(shards)} shards; pods mount at most {MAX_REGISTRY_SHARDS}")
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(bm, registry_configmap_name(bm.name, i)),
            "binaryData": {key: base64.b64encode(data).decode()},
        }
        for i, (key, data) in enumerate(sorted(shards.items()))
    ]
