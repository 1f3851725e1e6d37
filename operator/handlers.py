"""kopf handlers: thin glue between watch events, the pure render/validation functions and the API.

`build_registry(config)` returns a fresh `kopf.OperatorRegistry` with every handler bound to one
`Operator` context (API client, registry writer, caches), so tests can run several operators
one after another in one process. Error policy, as kopf expresses it:
- a spec or an adapter a user must fix -> a condition with the reason, no retry (the
  revalidation timer looks again later, e.g. after a re-upload);
- an API or S3 failure nobody here can fix -> `kopf.TemporaryError(delay=...)`, retried.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from lorafleet.engine.adapter_format import AdapterError, BaseModelSpec
from lorafleet.engine.registry import Registry, RegistryEntry, parse_registry_bytes, render_shards
from lorafleet.engine.s3 import S3Client, make_s3_client

from . import conditions
from .conditions import Condition
from .config import OperatorConfig
from .kube import ApiError, KubeClient
from .registry_writer import Key, RegistryWriter
from .render import (
    API_GROUP,
    MANAGER,
    MAX_REGISTRY_SHARDS,
    registry_configmap_name,
    render_children,
    render_registry_configmaps,
    selector_string,
    service_endpoint,
)
from .spec import BaseModel, SpecError, parse_adapter, parse_basemodel
from .validation import (
    S3Unavailable,
    base_model_spec,
    check_against_basemodel,
    pinning_allowed,
    read_hf_config,
    validate_in_s3,
)

logger = logging.getLogger(__name__)
BASEMODELS = (API_GROUP, "v1alpha1", "basemodels")
ADAPTERS = (API_GROUP, "v1alpha1", "loraadapters")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Operator:
    """What the handlers share: the API client, the registry writer and small caches."""

    def __init__(self, config: OperatorConfig, kube: KubeClient) -> None:
        self.config, self.kube = config, kube
        self.writer = RegistryWriter(self._load_registry, self._publish_registry, config.writer)
        self._published: dict[tuple[str, str], bytes] = {}  # ConfigMap (ns, name) -> shard bytes last written
        self._s3_clients: dict[tuple[Any, ...], tuple[tuple[str, ...], S3Client]] = {}  # -> (creds, client)
        self._hf_configs: dict[tuple[str | None, str], dict[str, Any]] = {}  # (endpoint, uri) -> config.json
        self._secrets: dict[tuple[str, str], tuple[float, tuple[str, ...]]] = {}  # -> (expiry, key pair)
        self._secret_locks: dict[tuple[str, str], asyncio.Lock] = {}

    # -- registry ConfigMaps ---------------------------------------------------------------------

    async def _load_registry(self, key: Key) -> Registry | None:
        """The registry as the ConfigMaps hold it now. What was last written for this BaseModel is
        forgotten first: after a delete and re-create under the same name, or a ConfigMap deleted
        by hand, the same bytes must be written again."""
        names = [registry_configmap_name(key[1], shard) for shard in range(MAX_REGISTRY_SHARDS)]
        for name in names:
            self._published.pop((key[0], name), None)
        parts = []
        for name in names:
            cm = await self.kube.get("ConfigMap", key[0], name)
            if cm is None:
                break
            for name, data in sorted((cm.get("binaryData") or {}).items()):
                raw = base64.b64decode(data)
                parts.append(parse_registry_bytes(raw, name))
                self._published[(key[0], cm["metadata"]["name"])] = raw
        if not parts:
            return None
        return Registry(parts[0].base_model, {k: v for part in parts for k, v in part.adapters.items()})

    async def _publish_registry(self, key: Key, registry: Registry) -> int:
        bm = await self._basemodel(key)
        if bm is None:
            raise RuntimeError(f"BaseModel {key[0]}/{key[1]} is gone")
        configmaps = render_registry_configmaps(bm, render_shards(registry))
        writes = 0
        for cm in configmaps:
            name = cm["metadata"]["name"]
            data = base64.b64decode(next(iter(cm["binaryData"].values())))
            if self._published.get((bm.namespace, name)) != data:
                await self.kube.apply(cm)
                self._published[(bm.namespace, name)] = data
                writes += 1
        for shard in range(len(configmaps), MAX_REGISTRY_SHARDS):  # fewer shards than before
            name = registry_configmap_name(bm.name, shard)
            if self._published.pop((bm.namespace, name), None) is not None:
                await self.kube.delete("ConfigMap", bm.namespace, name)
                writes += 1
        return writes

    async def _basemodel(self, key: Key) -> BaseModel | None:
        body = await self.kube.get("BaseModel", *key)
        return parse_basemodel(body) if body else None

    # -- S3 --------------------------------------------------------------------------------------

    async def s3_client(
        self, endpoint: str | None, region: str | None, namespace: str, secret: str | None
    ) -> S3Client:
        creds = await self._credentials(namespace, secret) if secret else ()
        # One client per Secret, replaced when its credentials change (STS ones rotate hourly).
        key = (endpoint, region, namespace if secret else None, secret)
        cached = self._s3_clients.get(key)
        if cached is None or cached[0] != creds:
            import boto3

            session = boto3.Session(*creds) if creds else boto3.Session()
            client = make_s3_client(endpoint, region, max_attempts=2, read_timeout_s=10, session=session)
            self._s3_clients[key] = cached = (creds, client)
        return cached[1]

    async def _credentials(self, namespace: str, secret: str) -> tuple[str, ...]:
        """The key pair (and session token, if any) in a Secret, read at most once per
        `secret_ttl_s` (single-flight):
        publishing a thousand adapters that share one Secret must not read it a thousand times."""
        async with self._secret_locks.setdefault((namespace, secret), asyncio.Lock()):
            now = asyncio.get_running_loop().time()
            cached = self._secrets.get((namespace, secret))
            if cached is not None and now < cached[0]:
                return cached[1]
            obj = await self.kube.get("Secret", namespace, secret)
            data = (obj or {}).get("data") or {}
            if "AWS_ACCESS_KEY_ID" not in data or "AWS_SECRET_ACCESS_KEY" not in data:
                raise AdapterError(
                    "CredentialsMissing",
                    f"Secret {namespace}/{secret} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                )
            # The optional session token (temporary STS credentials) follows the key pair, in the
            # order boto3.Session takes them.
            keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
            creds = tuple(base64.b64decode(data[k]).decode() for k in keys if k in data)
            self._secrets[(namespace, secret)] = (now + self.config.secret_ttl_s, creds)
            return creds

    async def base_spec(self, bm: BaseModel) -> BaseModelSpec:
        if bm.source != "s3" or bm.architecture is not None:
            return base_model_spec(bm)
        # The model's config.json is read once per (endpoint, URI); the spec is built from the
        # BaseModel as it is now (its name and maxLoraRank may change, or differ between two
        # BaseModels of one model).
        where = (bm.s3_endpoint_url, str(bm.model_uri))
        if where not in self._hf_configs:
            client = await self.s3_client(bm.s3_endpoint_url, bm.s3_region, bm.namespace, bm.s3_secret)
            try:
                self._hf_configs[where] = await asyncio.to_thread(read_hf_config, client, str(bm.model_uri))
            except AdapterError as e:
                raise AdapterError(
                    "BaseModelUnknown", f"cannot read the base model's config.json: {e}"
                ) from e
        return base_model_spec(bm, self._hf_configs[where])

    # -- BaseModel ---------------------------------------------------------------------------------

    async def reconcile_basemodel(
        self, body: Mapping[str, Any], adapters: Mapping[str, int]
    ) -> dict[str, Any]:
        """Apply the children and return the new status."""
        try:
            bm = parse_basemodel(body)
        except SpecError as e:
            return self.basemodel_status(body, None, adapters, spec_error=e)
        for child in render_children(bm):
            try:
                await self.kube.apply(child)
            except ApiError as e:  # 409 from a concurrent create, 5xx, throttling
                raise kopf.TemporaryError(
                    f"applying {child['kind']} {bm.name}: {e}", delay=self.config.retry_delay_s
                ) from e
        try:
            await self.writer.set_base_model((bm.namespace, bm.name), bm.served_name)
        except Exception as e:
            raise kopf.TemporaryError(f"writing the registry: {e}", delay=self.config.retry_delay_s) from e
        deployment = await self.kube.get("Deployment", bm.namespace, bm.name)
        return self.basemodel_status(body, deployment, adapters)

    def basemodel_status(
        self,
        body: Mapping[str, Any],
        deployment: Mapping[str, Any] | None,
        adapters: Mapping[str, int],
        spec_error: SpecError | None = None,
    ) -> dict[str, Any]:
        meta, spec = body["metadata"], body.get("spec") or {}
        try:
            bm = parse_basemodel(body)
            selector, endpoint = selector_string(bm), service_endpoint(bm)
        except SpecError as e:
            spec_error, selector, endpoint = spec_error or e, "", ""
        return conditions.basemodel_status(
            meta["name"],
            int(meta.get("generation", 1)),
            int(spec.get("replicas", 1)),
            deployment,
            selector=selector,
            endpoint=endpoint,
            adapters=adapters,
            previous=(body.get("status") or {}).get("conditions"),
            now=_now(),
            spec_error=spec_error,
        )

    async def ensure_children(self, body: Mapping[str, Any] | None) -> None:
        """Re-create what was deleted behind the operator's back: a child, or a registry
        ConfigMap (the pods do not start without the first; later ones hold adapters too)."""
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        try:
            bm = parse_basemodel(body)
        except SpecError:
            return  # the status says why; nothing to render
        found = {  # each kind spelled out: the chart's RBAC test derives the verbs from these calls
            "Deployment": await self.kube.get("Deployment", bm.namespace, bm.name),
            "Service": await self.kube.get("Service", bm.namespace, bm.name),
            "PodDisruptionBudget": await self.kube.get("PodDisruptionBudget", bm.namespace, bm.name),
        }
        for child in render_children(bm):
            if found[child["kind"]] is None:
                logger.info("re-creating %s %s/%s", child["kind"], bm.namespace, bm.name)
                await self.kube.apply(child)
        if self.writer.snapshot((bm.namespace, bm.name)) is None:
            return  # not loaded yet: its first write creates the ConfigMaps
        missing = []
        for name in (registry_configmap_name(bm.name, i) for i in range(MAX_REGISTRY_SHARDS)):
            if (bm.namespace, name) in self._published and await self.kube.get(
                "ConfigMap", bm.namespace, name
            ) is None:
                missing.append(name)
        if missing:
            logger.info("re-creating ConfigMaps %s in %s", ", ".join(missing), bm.namespace)
            for name in missing:
                self._published.pop((bm.namespace, name), None)
            await self.writer.republish((bm.namespace, bm.name))

    async def mirror_status(self, body: Mapping[str, Any], adapters: Mapping[str, int]) -> None:
        """Refresh a BaseModel's status from its Deployment; write only if something changed."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        deployment = await self.kube.get("Deployment", meta["namespace"], meta["name"])
        status = self.basemodel_status(body, deployment, adapters)
        if _differs(body.get("status") or {}, status):
            await self.kube.patch_status("BaseModel", meta["namespace"], meta["name"], status)

    # -- LoRAAdapter -------------------------------------------------------------------------------

    async def reconcile_adapter(
        self, body: Mapping[str, Any], bm_body: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Validate, publish, and return the adapter's new status."""
        previous = body.get("status") or {}
        generation = int(body["metadata"].get("generation", 1))

        def status(phase: str, validated: Condition, ready: Condition, **details: Any) -> dict[str, Any]:
            return conditions.adapter_status(
                generation=generation,
                phase=phase,
                validated=validated,
                ready=ready,
                previous=previous.get("conditions"),
                now=_now(),
                details=details,
            )

        try:
            adapter = parse_adapter(body)
        except (SpecError, KeyError) as e:
            reason = getattr(e, "reason", "InvalidSpec")
            return status(
                "Failed", Condition("Validated", False, reason, str(e)), Condition("Ready", False, reason)
            )
        where = f"BaseModel {adapter.base_namespace}/{adapter.base_name}"
        if bm_body is None or bm_body["metadata"].get("deletionTimestamp"):
            gone = previous.get("phase") in ("Ready", "Orphaned")
            phase, reason = ("Orphaned", "BaseModelDeleted") if gone else ("Pending", "BaseModelNotFound")
            message = f"{where} {'was deleted' if gone else 'does not exist'}; the adapter is not served"
            return status(
                phase,
                Condition("Validated", None, reason, message),
                Condition("Ready", False, reason, message),
            )
        key = (adapter.base_namespace, adapter.base_name)
        try:
            bm = parse_basemodel(bm_body)
            labels = (
                None
                if adapter.namespace == bm.namespace
                else await self.kube.namespace_labels(adapter.namespace)
            )
            check_against_basemodel(adapter, bm, labels)
            base = await self.base_spec(bm)
            secret_ns, secret = (
                (adapter.namespace, adapter.secret) if adapter.secret else (bm.namespace, bm.s3_secret)
            )
            client = await self.s3_client(bm.s3_endpoint_url, bm.s3_region, secret_ns, secret)
            checked = await asyncio.to_thread(
                validate_in_s3, client, adapter.uri, base, self.config.adapter_max_bytes
            )
        except (AdapterError, SpecError) as e:
            reason = getattr(e, "reason", "InvalidSpec")
            if isinstance(e, SpecError):
                reason = "BaseModelInvalid"
            await self._unpublish(key, adapter.id)
            return status(
                "Failed",
                Condition("Validated", False, reason, str(e)),
                Condition("Ready", False, "NotValidated", str(e)),
            )
        except (S3Unavailable, ApiError) as e:
            raise kopf.TemporaryError(f"cannot validate yet: {e}", delay=self.config.retry_delay_s) from e
        m = checked.manifest
        pinned = adapter.pinned and pinning_allowed(adapter, bm, labels)
        entry = RegistryEntry(adapter.uri, checked.version, m.rank, m.bytes, pinned, m.target_modules)
        try:
            await self.writer.put(key, adapter.id, entry, base_model=bm.served_name)
        except Exception as e:
            raise kopf.TemporaryError(
                f"publishing to the registry: {e}", delay=self.config.retry_delay_s
            ) from e
        summary = f"rank {m.rank} on {', '.join(m.target_modules)}, {m.bytes} bytes"
        published = f"in the registry of {where}"
        if adapter.pinned and not pinned:
            published += f"; pinned is ignored: {where} lets only the namespaces its spec.pinningNamespaceSelector matches pin"
        return status(
            "Ready",
            Condition("Validated", True, "Valid", summary),
            Condition("Ready", True, "Published", published),
            version=checked.version,
            rank=m.rank,
            targetModules=list(m.target_modules),
            bytes=m.bytes,
        )

    async def _unpublish(self, key: Key, adapter_id: str) -> None:
        snapshot = self.writer.snapshot(key)
        if snapshot is None or adapter_id in snapshot.adapters:
            try:
                await self.writer.remove(key, adapter_id)
            except Exception as e:
                raise kopf.TemporaryError(
                    f"removing from the registry: {e}", delay=self.config.retry_delay_s
                ) from e

    async def delete_adapter(self, body: Mapping[str, Any]) -> None:
        try:
            adapter = parse_adapter(body)
        except SpecError:
            return  # never published
        if await self.kube.get("BaseModel", adapter.base_namespace, adapter.base_name) is None:
            return  # its registry went with it
        await self._unpublish((adapter.base_namespace, adapter.base_name), adapter.id)

    async def orphan_adapters(self, bm_meta: Mapping[str, Any], adapter_keys: list[tuple[str, str]]) -> None:
        message = f"BaseModel {bm_meta['namespace']}/{bm_meta['name']} was deleted; the adapter is not served"
        for namespace, name in adapter_keys:
            body = await self.kube.get("LoRAAdapter", namespace, name)
            if body is None:
                continue
            status = conditions.adapter_status(
                generation=int(body["metadata"].get("generation", 1)),
                phase="Orphaned",
                validated=Condition("Validated", None, "BaseModelDeleted", message),
                ready=Condition("Ready", False, "BaseModelDeleted", message),
                previous=(body.get("status") or {}).get("conditions"),
                now=_now(),
            )
            try:
                await self.kube.patch_status("LoRAAdapter", namespace, name, status)
            except ApiError as e:
                if e.status != 404:
                    raise


def _differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether `new` changes anything in `old` (timestamps of unchanged conditions aside)."""
    return any(old.get(k) != v for k, v in new.items())


def _adapter_counts(entries: Any) -> dict[str, int]:
    phases = [phase for _, phase in entries or ()]
    return {"total": len(phases), "ready": phases.count("Ready"), "failed": phases.count("Failed")}


def build_registry(
    config: OperatorConfig, connection: kopf.ConnectionInfo | None = None
) -> kopf.OperatorRegistry:
    """All handlers, on a new registry, sharing one `Operator` created at startup.

    `connection`: fixed API credentials (tests); by default kopf's own login (in-cluster service
    account, else kubeconfig) is used, for kopf and for the operator's client alike.
    """
    registry = kopf.OperatorRegistry()
    state: dict[str, Operator] = {}

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # kopf's own login handlers live on its default registry, not on this one: without this
        # handler `lorafleet operator` would find no credentials at all.
        return connection if connection is not None else kopf.login_via_client(**kwargs)

    def op() -> Operator:
        return state["operator"]

    @kopf.on.startup(registry=registry, id="startup")
    async def startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
        settings.persistence.finalizer = f"{API_GROUP}/finalizer"
        # kopf's bookkeeping (last handled spec, retry progress) lives in `status.kopf`, so it
        # rides on the status patch each handler run makes anyway: a new adapter costs the API
        # server two writes (finalizer, status) instead of three with annotations.
        settings.persistence.progress_storage = kopf.StatusProgressStorage()
        settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage()
        settings.posting.level = logging.WARNING  # Kubernetes Events for problems only
        # Scanning discovers namespaces matching patterns and CRDs added later; named namespaces
        # need neither (the chart installs the CRDs first), and a namespaced install lacks the RBAC.
        settings.scanning.disabled = config.exact_namespaces
        kube = KubeClient(connection) if connection is not None else KubeClient.from_login(logger)
        state["operator"] = Operator(config, kube)

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(**_: Any) -> None:
        if "operator" in state:
            operator = state.pop("operator")
            await operator.writer.close()
            await operator.kube.close()

    def shut_down() -> bool:
        # kopf can still fire a timer spawned by a late watch event after the cleanup activity
        # has closed the API client, or be amid one when cleanup closes it; such a timer has
        # nothing left to do.
        return "operator" not in state

    @kopf.index(*BASEMODELS, registry=registry, id="basemodels")
    def basemodels(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        return {(namespace, name): dict(body)}

    @kopf.index(*ADAPTERS, registry=registry, id="adapters")
    def adapters(namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any) -> dict[Key, Any]:
        base = spec.get("baseModel") or {}
        return {
            (base.get("namespace") or namespace, base.get("name", "")): (
                (namespace, name),
                status.get("phase"),
            )
        }

    def bm_body(index: kopf.Index, key: Key) -> dict[str, Any] | None:
        found = list(index.get(key, ()))
        return found[0] if found else None

    @kopf.on.resume(*BASEMODELS, registry=registry, id="reconcile_basemodel")
    @kopf.on.create(*BASEMODELS, registry=registry, id="reconcile_basemodel")
    @kopf.on.update(*BASEMODELS, registry=registry, id="reconcile_basemodel")
    async def reconcile_basemodel(body: kopf.Body, patch: kopf.Patch, adapters: kopf.Index, **_: Any) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        patch.status.update(await op().reconcile_basemodel(body, _adapter_counts(adapters.get(key))))

    @kopf.on.delete(*BASEMODELS, registry=registry, id="delete_basemodel")
    async def delete_basemodel(body: kopf.Body, adapters: kopf.Index, **_: Any) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        op().writer.forget(key)
        await op().orphan_adapters(body["metadata"], [adapter for adapter, _ in adapters.get(key, ())])

    @kopf.timer(
        *BASEMODELS,
        interval=config.status_interval_s,
        idle=config.status_interval_s,
        registry=registry,
        id="refresh_basemodel",
    )
    async def refresh_basemodel(body: kopf.Body, adapters: kopf.Index, **_: Any) -> None:
        if shut_down():
            return
        key = (body["metadata"]["namespace"], body["metadata"]["name"])

        def live() -> set[str]:
            # The index as it is now, not before an await: an adapter created (and published) while
            # mirror_status waited on the API server is not a deleted one.
            return {f"{ns}/{name}" for (ns, name), _ in adapters.get(key, ())}

        try:
            await op().ensure_children(body)
            await op().mirror_status(body, _adapter_counts(adapters.get(key)))
            if op().writer.snapshot(key) is not None:
                stale = await op().writer.retain(key, live)
                if stale:
                    logger.info("dropped registry entries of deleted adapters: %s", ", ".join(stale))
        except Exception:
            if shut_down():  # the cleanup closed the API client under this running timer
                return
            raise

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        labels={"app.kubernetes.io/managed-by": MANAGER},
        registry=registry,
        id="deployment_changed",
    )
    async def deployment_changed(
        body: kopf.Body, type: str | None, basemodels: kopf.Index, adapters: kopf.Index, **_: Any
    ) -> None:
        key = (
            body["metadata"].get("namespace", ""),
            body["metadata"].get("labels", {}).get("lorafleet.io/basemodel", ""),
        )
        owner = bm_body(basemodels, key)
        if owner is not None and type == "DELETED":  # read afresh: the index may predate its deletion
            await op().ensure_children(await op().kube.get("BaseModel", *key))
        elif owner is not None:
            await op().mirror_status(owner, _adapter_counts(adapters.get(key)))

    async def reconcile_adapter(body: kopf.Body, patch: kopf.Patch, basemodels: kopf.Index, **_: Any) -> None:
        spec = body.get("spec") or {}
        base = spec.get("baseModel") or {}
        key = (base.get("namespace") or body["metadata"]["namespace"], base.get("name", ""))
        try:
            patch.status.update(await op().reconcile_adapter(body, bm_body(basemodels, key)))
        except kopf.TemporaryError as e:
            patch.status["message"] = str(e)
            raise
        if patch.status.get("phase") == "Pending":  # the BaseModel may appear: look again soon
            raise kopf.TemporaryError(str(patch.status.get("message")), delay=config.retry_delay_s)

    for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorator(*ADAPTERS, registry=registry, id="reconcile_adapter")(reconcile_adapter)

    @kopf.timer(
        *ADAPTERS,
        interval=config.revalidate_interval_s,
        idle=config.revalidate_interval_s,
        registry=registry,
        id="revalidate_adapter",
    )
    async def revalidate_adapter(
        body: kopf.Body, patch: kopf.Patch, basemodels: kopf.Index, **_: Any
    ) -> None:
        if shut_down():
            return
        try:
            await reconcile_adapter(body=body, patch=patch, basemodels=basemodels)
        except Exception:
            if shut_down():  # as in refresh_basemodel
                return
            raise

    @kopf.on.delete(*ADAPTERS, registry=registry, id="delete_adapter")
    async def delete_adapter(body: kopf.Body, **_: Any) -> None:
        try:
            await op().delete_adapter(body)
        except ApiError as e:
            raise kopf.TemporaryError(str(e), delay=config.retry_delay_s) from e

    return registry
