"""LoRAAdapter admission: against its BaseModel, then against the files in S3.

Failures a tenant can fix raise `AdapterError` (engine/adapter_format.py) whose `reason` becomes
the `Validated` condition's reason. Failures nobody here can fix right now (S3 unreachable, 5xx)
raise `S3Unavailable`, which handlers turn into a retry. S3 reads are small: a listing, the
config (a few hundred bytes) and one or two ranged GETs of the safetensors header; weights are
never downloaded by the operator.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from lorafleet.engine.adapter_format import (
    CONFIG_NAME,
    SMOLLM2_135M,
    WEIGHTS_NAME,
    AdapterError,
    AdapterManifest,
    BaseModelSpec,
    check_files,
    check_weights,
    parse_adapter_config,
    parse_safetensors_header,
    read_safetensors_head,
    s3_adapter_version,
)
from lorafleet.engine.s3 import S3Client, S3SourceError, is_user_error, list_objects, parse_s3_uri

from .spec import BaseModel, LoRAAdapter, selector_matches


class S3Unavailable(Exception):
    """S3 did not answer usefully (network, 5xx, throttling): retry later."""


@dataclass(frozen=True)
class ValidatedAdapter:
    manifest: AdapterManifest
    version: str  # s3_adapter_version: both files' ETags, so re-uploading either changes it


def check_against_basemodel(
    adapter: LoRAAdapter, bm: BaseModel, namespace_labels: Mapping[str, str] | None
) -> None:
    """Namespace admission and the BaseModel's adapter location policy. `namespace_labels`: the
    adapter namespace's labels (None if unknown)."""
    if bm.adapter_uri_prefix:
        allowed = bm.adapter_uri_prefix.replace("{namespace}", adapter.namespace).rstrip("/") + "/"
        rest = adapter.uri[len(allowed) :].rstrip("/")
        # No "."/".."/empty segments either: some S3-compatible stores normalize them away.
        if not adapter.uri.startswith(allowed) or (rest and {"", ".", ".."} & set(rest.split("/"))):
            raise AdapterError(
                "SourceNotAllowed",
                f"BaseModel {bm.namespace}/{bm.name} serves adapters of namespace {adapter.namespace!r} "
                f"only from under {allowed}; {adapter.uri} is not",
            )
    if not _selects(bm.adapter_namespace_selector, adapter, bm, namespace_labels):
        raise AdapterError(
            "NamespaceNotAllowed",
            f"BaseModel {bm.namespace}/{bm.name} does not accept adapters from namespace {adapter.namespace!r}; "
            "its spec.adapterNamespaceSelector must match this namespace's labels",
        )


def pinning_allowed(adapter: LoRAAdapter, bm: BaseModel, namespace_labels: Mapping[str, str] | None) -> bool:
    """Whether the adapter's `pinned` is honoured: always in the BaseModel's namespace, elsewhere
    only where spec.pinningNamespaceSelector matches (pins never leave the CPU tier)."""
    return _selects(bm.pinning_namespace_selector, adapter, bm, namespace_labels)


def _selects(
    selector: Mapping[str, Any] | None, adapter: LoRAAdapter, bm: BaseModel, labels: Mapping[str, str] | None
) -> bool:
    """The BaseModel's own namespace always; another only when `selector` (absent: none) matches
    its labels (None: unknown)."""
    if adapter.namespace == bm.namespace:
        return True
    return selector is not None and labels is not None and selector_matches(selector, labels)


def base_model_spec(bm: BaseModel, hf_config: Mapping[str, Any] | None = None) -> BaseModelSpec:
    """What adapters are checked against: the spec's architecture, the model's config.json, or
    the built-in model's known shapes."""
    if bm.architecture is not None:
        a = bm.architecture
        return BaseModelSpec(
            bm.model_name,
            a.hidden_size,
            a.intermediate_size,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
            a.num_layers,
            bm.max_lora_rank,
        )
    if hf_config is not None:
        return BaseModelSpec.from_hf_config(hf_config, name=bm.model_name, max_rank=bm.max_lora_rank)
    if bm.source == "builtin":
        return BaseModelSpec(**{**SMOLLM2_135M.__dict__, "name": bm.model_name, "max_rank": bm.max_lora_rank})
    raise AdapterError(
        "BaseModelUnknown", f"cannot tell the architecture of {bm.name}: set spec.model.architecture"
    )


def read_hf_config(client: S3Client, uri: str) -> dict[str, Any]:
    """A BaseModel's config.json from S3 (its shapes check adapters)."""
    bucket, prefix = parse_s3_uri(uri)
    key = prefix.rstrip("/") + "/config.json" if prefix else "config.json"
    return json.loads(_get(client, bucket, key, f"{uri} config.json"))


def validate_in_s3(client: S3Client, uri: str, base: BaseModelSpec, max_bytes: int) -> ValidatedAdapter:
    """List the adapter's prefix and check config and safetensors header, without the weights."""
    try:
        bucket, prefix = parse_s3_uri(uri)
    except S3SourceError as e:
        raise AdapterError("InvalidSpec", str(e)) from e
    try:
        objects = list_objects(client, bucket, prefix)
    except S3SourceError as e:  # 4xx: no such bucket, access denied
        raise AdapterError("MissingFile", f"cannot list {uri}: {e}") from e
    except (BotoCoreError, ClientError) as e:
        raise S3Unavailable(f"cannot list {uri}: {e}") from e
    if not objects:
        raise AdapterError(
            "MissingFile", f"nothing found at {uri}: upload adapter_config.json and adapter_model.safetensors"
        )
    top = {o.name: o for o in objects if "/" not in o.name}  # PEFT writes the files at the top level
    check_files({name: o.size for name, o in top.items()}, max_bytes)
    config_obj = top[CONFIG_NAME]
    config = parse_adapter_config(_get(client, bucket, config_obj.key, f"{uri}{CONFIG_NAME}"), base)
    weights = top[WEIGHTS_NAME]
    where = f"{uri}{WEIGHTS_NAME}"
    if weights.size < 8:
        raise AdapterError(
            "CorruptSafetensors", f"{where} is {weights.size} bytes: too short to be safetensors"
        )
    head = read_safetensors_head(lambda a, b: _get(client, bucket, weights.key, where, (a, b)), weights.size)
    header = parse_safetensors_header(head, weights.size)
    version = s3_adapter_version(weights.etag, config_obj.etag)
    return ValidatedAdapter(check_weights(config, header, base, weights.size), version)


def _get(
    client: S3Client, bucket: str, key: str, where: str, byte_range: tuple[int, int] | None = None
) -> bytes:
    kwargs = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
    try:
        return bytes(client.get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read())
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status in (403, 404) and is_user_error(e):
            raise AdapterError(
                "MissingFile", f"cannot read {where}: {e.response.get('Error', {}).get('Code')}"
            ) from e
        raise S3Unavailable(f"cannot read {where}: {e}") from e
    except BotoCoreError as e:
        raise S3Unavailable(f"cannot read {where}: {e}") from e
