"""BaseModel and LoRAAdapter specs as typed values, with the CRDs' defaults applied.

Pure. The API server applies the CRD defaults and schema; this module applies the same defaults
again (an emulator or an old stored object may lack them) and the cross-field rules the schema
states as CEL, so an invalid spec becomes a `SpecError` with a reason, never a crash loop.
`tests/test_operator_render.py` checks that these defaults equal the CRD's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorafleet.engine.adapter_format import SMOLLM2_135M
from lorafleet.engine.config import DTYPES, QUANTIZATIONS

_QUANTITY_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMGTPE]i|[kMGTPE])?")
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_UNITS |= {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}


SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


class SpecError(ValueError):
    """A spec the operator cannot act on; `reason` becomes the condition reason.

    Reasons name what to fix: InvalidName, ModelURIMissing, PVCSourceIncomplete, UnknownModelSource,
    UnsupportedDtype, UnsupportedQuantization, InvalidQuantity, and InvalidSpec for a spec that
    is not even shaped as the CRD says (an API server that skipped the schema).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_quantity(value: str | int, what: str) -> int:
    """Kubernetes quantity -> bytes: "2Gi" -> 2147483648, "500M" -> 500000000."""
    m = _QUANTITY_RE.fullmatch(str(value))
    if m is None:
        raise SpecError("InvalidQuantity", f"{what}: {value!r} is not a quantity like 2Gi or 500M")
    return int(float(m["num"]) * _UNITS[m["unit"] or ""])


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int


@dataclass(frozen=True)
class BaseModel:
    """A BaseModel resource, defaults applied. Byte budgets are in bytes."""

    namespace: str
    name: str
    uid: str
    generation: int
    served_name: str
    source: str  # builtin | s3 | pvc
    model_uri: str | None  # s3://... when source is s3
    pvc_claim: str | None
    pvc_path: str
    model_name: str  # identity adapters must match (their base_model_name_or_path)
    architecture: Architecture | None
    s3_endpoint_url: str | None
    s3_region: str | None
    s3_secret: str | None  # Secret in this namespace with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    dtype: str
    quantization: str  # none | int8 | int4: weight-only, LoRA deltas stay in `dtype`
    image: str
    image_pull_policy: str
    extra_args: tuple[str, ...]
    replicas: int
    gpus: int
    memory: str  # a quantity, passed through to the pod
    cpu: str
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    gpu_slots: int = 8
    cpu_cache_bytes: int = 2 << 30
    disk_cache_bytes: int = 10 << 30
    disk_cache_claim: str | None = None
    disk_cache_medium: str = ""
    max_lora_rank: int = 64
    # None: only the BaseModel's own namespace; {} allows every namespace (label selector rules).
    adapter_namespace_selector: dict[str, Any] | None = None
    adapter_uri_prefix: str | None = None  # "{namespace}" stands for the adapter's namespace
    pinning_namespace_selector: dict[str, Any] | None = None  # None: only the BaseModel's namespace
    service_type: str = "ClusterIP"
    service_port: int = 80
    drain_seconds: int = 30
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str | None = None
    api_keys_secret: tuple[str, str] | None = None  # (Secret name, key): the engine's --api-keys-file


def parse_basemodel(body: Mapping[str, Any]) -> BaseModel:
    meta, spec = body.get("metadata", {}), body.get("spec") or {}
    model, s3 = spec.get("model") or {}, spec.get("s3") or {}
    resources, cache, service = (
        spec.get("resources") or {},
        spec.get("adapterCache") or {},
        spec.get("service") or {},
    )
    name = str(meta.get("name", ""))
    if not SERVICE_NAME.fullmatch(name):  # the CRD's CEL rule too; API servers before 1.25 skip it
        raise SpecError(
            "InvalidName",
            f"the BaseModel name {name!r} becomes the engine Service's name, so it must be a DNS-1035 label: "
            "at most 63 lower-case letters, digits and '-', starting with a letter and not ending with '-'",
        )
    source = model.get("source", "builtin")
    pvc = model.get("pvc") or {}
    if source == "s3" and not model.get("uri"):
        raise SpecError("ModelURIMissing", "spec.model.uri is required when spec.model.source is s3")
    if source == "pvc" and not (pvc.get("claimName") and model.get("architecture")):
        raise SpecError(
            "PVCSourceIncomplete",
            "spec.model.pvc.claimName and spec.model.architecture are required for pvc",
        )
    if source not in ("builtin", "s3", "pvc"):
        raise SpecError("UnknownModelSource", f"spec.model.source must be builtin, s3 or pvc, got {source!r}")
    dtype, quantization = spec.get("dtype", "bfloat16"), spec.get("quantization", "none")
    if dtype not in DTYPES:
        raise SpecError("UnsupportedDtype", f"spec.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantization != "none" and quantization not in QUANTIZATIONS:
        raise SpecError(
            "UnsupportedQuantization",
            f"spec.quantization must be none, {' or '.join(QUANTIZATIONS)}, got {quantization!r}",
        )
    arch = model.get("architecture")
    default_name = {
        "builtin": SMOLLM2_135M.name,
        "s3": (model.get("uri") or "").rstrip("/").rsplit("/", 1)[-1],
    }
    try:
        return BaseModel(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation", 1)),
            served_name=spec.get("servedName") or meta["name"],
            source=source,
            model_uri=model.get("uri"),
            pvc_claim=pvc.get("claimName"),
            pvc_path=pvc.get("path", "/"),
            model_name=model.get("name") or default_name.get(source) or meta["name"],
            architecture=Architecture(
                arch["hiddenSize"],
                arch["intermediateSize"],
                arch["numHeads"],
                arch["numKvHeads"],
                arch["headDim"],
                arch["numLayers"],
            )
            if arch
            else None,
            s3_endpoint_url=s3.get("endpointUrl"),
            s3_region=s3.get("region"),
            s3_secret=(s3.get("credentialsSecret") or {}).get("name"),
            dtype=dtype,
            quantization=quantization,
            image=spec.get("image", "lorafleet:0.1.0"),
            image_pull_policy=spec.get("imagePullPolicy", "IfNotPresent"),
            extra_args=tuple(spec.get("extraArgs") or ()),
            replicas=int(spec.get("replicas", 1)),
            gpus=int(resources.get("gpus", 0)),
            memory=str(resources.get("memory", "5Gi")),
            cpu=str(resources.get("cpu", "1")),
            node_selector=dict(spec.get("nodeSelector") or {}),
            tolerations=list(spec.get("tolerations") or []),
            affinity=dict(spec.get("affinity") or {}),
            gpu_slots=int(cache.get("gpuSlots", 8)),
            cpu_cache_bytes=parse_quantity(cache.get("cpuBytes", "2Gi"), "spec.adapterCache.cpuBytes"),
            disk_cache_bytes=parse_quantity(cache.get("diskBytes", "10Gi"), "spec.adapterCache.diskBytes"),
            disk_cache_claim=(cache.get("volume") or {}).get("claimName"),
            disk_cache_medium=(cache.get("volume") or {}).get("medium", ""),
            max_lora_rank=int(spec.get("maxLoraRank", 64)),
            adapter_namespace_selector=spec.get("adapterNamespaceSelector"),
            adapter_uri_prefix=spec.get("adapterURIPrefix"),
            pinning_namespace_selector=spec.get("pinningNamespaceSelector"),
            service_type=service.get("type", "ClusterIP"),
            service_port=int(service.get("port", 80)),
            drain_seconds=int(spec.get("drainSeconds", 30)),
            image_pull_secrets=tuple(str(ref["name"]) for ref in spec.get("imagePullSecrets") or ()),
            service_account=spec.get("serviceAccountName"),
            api_keys_secret=(str(keys["name"]), str(keys.get("key", "api-keys")))
            if (keys := spec.get("apiKeysSecret"))
            else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError("InvalidSpec", f"cannot read the BaseModel spec: {e!r}") from e


@dataclass(frozen=True)
class LoRAAdapter:
    namespace: str
    name: str
    base_namespace: str  # the BaseModel's namespace (default: the adapter's own)
    base_name: str
    uri: str
    secret: str | None  # Secret in the adapter's namespace, used for the operator's checks
    pinned: bool

    @property
    def id(self) -> str:
        """The registry id, `<namespace>/<name>`."""
        return f"{self.namespace}/{self.name}"


def parse_adapter(body: Mapping[str, Any]) -> LoRAAdapter:
    meta, spec = body.get("metadata", {}), body.get("spec") or {}
    base, source = spec.get("baseModel") or {}, spec.get("source") or {}
    if not base.get("name") or not str(source.get("uri", "")).startswith("s3://"):
        raise SpecError("InvalidSpec", "spec.baseModel.name and an s3:// spec.source.uri are required")
    return LoRAAdapter(
        namespace=meta["namespace"],
        name=meta["name"],
        base_namespace=base.get("namespace") or meta["namespace"],
        base_name=base["name"],
        uri=source["uri"] if source["uri"].endswith("/") else source["uri"] + "/",
        secret=(source.get("credentialsSecret") or {}).get("name"),
        pinned=bool(spec.get("pinned", False)),
    )


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels AND matchExpressions; {} matches all)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op, False)
        if not ok:
            return False
    return True
