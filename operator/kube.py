"""A small async Kubernetes API client for the operator's own reads and writes.

kopf watches and patches the resources it handles; the children (Deployment, Service, PDB,
registry ConfigMaps), other objects' statuses and Secrets go through this client. It signs in
with the same credentials kopf uses (`kopf.login_via_client`: in-cluster service account or
kubeconfig) and speaks plain JSON over aiohttp. Children are written with server-side apply, so
a field the operator stops rendering is removed and a user's unrelated fields are kept.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf

from .render import MANAGER


def _text(data: str | bytes) -> str:
    return data.decode() if isinstance(data, bytes) else data


# kind -> (API path prefix, plural)
KINDS = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "BaseModel": ("/apis/lorafleet.io/v1alpha1", "basemodels"),
    "LoRAAdapter": ("/apis/lorafleet.io/v1alpha1", "loraadapters"),
}


class ApiError(Exception):
    """A non-2xx answer. 404, 409 and 422 are the ones callers act on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _token_header(info: kopf.ConnectionInfo) -> dict[str, str]:
    return {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"} if info.token else {}


def object_path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")


class KubeClient:
    def __init__(
        self,
        info: kopf.ConnectionInfo,
        *,
        timeout_s: float = 30.0,
        relogin: Callable[[], kopf.ConnectionInfo | None] | None = None,
    ) -> None:
        self.server = info.server.rstrip("/")
        self._relogin = relogin  # on a 401: credentials again (tokens expire: exec plugins, rotation)
        self._token_header = _token_header(info)
        self._relogin_lock = asyncio.Lock()
        headers = {"Accept": "application/json"}
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        ssl_ctx: ssl.SSLContext | bool = True
        if self.server.startswith("https"):
            ssl_ctx = ssl.create_default_context(
                cafile=info.ca_path, cadata=_text(info.ca_data) if info.ca_data else None
            )
            if info.insecure:
                ssl_ctx.check_hostname, ssl_ctx.verify_mode = False, ssl.CERT_NONE
            if info.certificate_path:
                ssl_ctx.load_cert_chain(info.certificate_path, info.private_key_path)
        self.session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=20),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    @classmethod
    def from_login(cls, logger: logging.Logger | None = None) -> KubeClient:
        def login() -> kopf.ConnectionInfo | None:
            return kopf.login_via_client(
                logger=logger or logging.getLogger(__name__), settings=kopf.OperatorSettings()
            )

        info = login()
        if info is None:
            raise kopf.PermanentError("no Kubernetes credentials: neither in-cluster nor a kubeconfig")
        return cls(info, relogin=login)

    async def close(self) -> None:
        await self.session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        **params: str,
    ) -> dict[str, Any]:
        for attempt in range(2):
            headers = {"Content-Type": content_type} if body is not None else {}
            headers |= self._token_header
            async with self.session.request(
                method, self.server + path, json=body, headers=headers, params=params
            ) as r:
                if r.status == 401 and attempt == 0 and self._relogin is not None:
                    await self._sign_in_again(headers)
                    continue
                if r.status >= 400:
                    raise ApiError(r.status, (await r.text())[:500])
                if r.content_type != "application/json":
                    return {}
                data = await r.json()
                return data if isinstance(data, dict) else {}
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def _sign_in_again(self, rejected: Mapping[str, str]) -> None:
        """New credentials after a 401, once for all the requests that met it at the same time."""
        async with self._relogin_lock:
            if self._token_header.get("Authorization") != rejected.get("Authorization"):
                return  # another request signed in again meanwhile
            assert self._relogin is not None
            info = await asyncio.to_thread(self._relogin)
            if info is not None:
                self._token_header = _token_header(info)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            return await self.request("GET", object_path(kind, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply `obj` (create or update); the emulator, lacking apply, gets a create."""
        meta = obj["metadata"]
        path = object_path(obj["kind"], meta["namespace"], meta["name"])

        async def server_side_apply() -> dict[str, Any]:
            return await self.request(
                "PATCH",
                path,
                obj,
                content_type="application/apply-patch+yaml",
                fieldManager=MANAGER,
                force="true",
            )

        try:
            return await server_side_apply()
        except ApiError as e:
            if e.status != 404:
                raise
        try:
            return await self.request("POST", object_path(obj["kind"], meta["namespace"]), obj)
        except ApiError as e:
            if e.status != 409:  # created meanwhile (another writer, a previous operator): update it
                raise
        return await server_side_apply()

    async def patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        await self.request(
            "PATCH",
            object_path(kind, namespace, name, "status"),
            {"status": status},
            content_type="application/merge-patch+json",
        )

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete; False if it was already gone."""
        try:
            await self.request("DELETE", object_path(kind, namespace, name))
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    async def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        try:
            ns = await self.request("GET", f"/api/v1/namespaces/{namespace}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return dict((ns.get("metadata") or {}).get("labels") or {})
