"""Where adapters come from: S3 prefixes and local directories, read as files and as registries.

A registry entry's `uri` is `s3://bucket/prefix/` or `file:///abs/dir/`, and its version is
- for S3, `s3_adapter_version`: both files' ETags, weights first (what the operator records);
- for a local directory, `local_version(files)`: a sha256 over both files' names and digests.
Reading an adapter first checks that the source still holds the registry's version, then
validates the config and the safetensors header (adapter_format), and only then downloads or
reads the weights, so a refused adapter costs a listing and a few kilobytes.

Errors come in two kinds: `AdapterError` (the adapter is unusable as published: fix it) and
`SourceUnavailable` (S3 down, or the adapter changed under us: retry later).

Standalone (no operator), `AdapterDirRegistry` and `S3PrefixRegistry` act as the registry for
`DIR/<namespace>/<name>/` or `s3://bucket/prefix/<namespace>/<name>/`; their `poll()` works like
RegistryWatcher's. Knows nothing about tiers or tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from botocore.exceptions import BotoCoreError, ClientError

from .adapter_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    BaseModelSpec,
    check_files,
    check_weights,
    parse_adapter_config,
    parse_safetensors_header,
    read_safetensors_head,
    s3_adapter_version,
    validate_adapter_dir,
)
from .registry import Registry, RegistryEntry, validate_adapter_id
from .s3 import (
    S3Client,
    S3Object,
    S3SourceError,
    fetch_objects,
    is_user_error,
    list_objects,
    parse_s3_uri,
    safe_name,
)

log = logging.getLogger(__name__)

FILE_NAMES = (CONFIG_NAME, WEIGHTS_NAME)
MAX_CONFIG_BYTES = 1 << 20  # S3PrefixRegistry reads configs for rank and targets; PEFT's are ~1 KB


class SourceUnavailable(Exception):
    """The source cannot give the adapter right now; a later attempt may succeed.

    `reason`: "S3Unavailable" (network, 5xx, throttling), "VersionMismatch" (the source holds
    another version than the registry says, or changed while being read), "IOError".
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def local_version(files: Mapping[str, bytes]) -> str:
    """The version of a local adapter directory, from its files (name -> content)."""
    h = hashlib.sha256()
    for name in FILE_NAMES:
        if name in files:
            h.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return h.hexdigest()


def read_local_adapter(uri: str, version: str, base: BaseModelSpec, max_bytes: int) -> dict[str, bytes]:
    """Both files of the adapter at `file:///dir/`, validated and checked to be at `version`."""
    path = Path(unquote(urlparse(uri).path))
    try:
        validate_adapter_dir(path, base, max_bytes)
        files = {name: (path / name).read_bytes() for name in FILE_NAMES}
    except OSError as e:
        raise SourceUnavailable("IOError", f"cannot read adapter {path}: {e}") from e
    if local_version(files) != version:
        raise SourceUnavailable(
            "VersionMismatch", f"{path} changed since the registry was read; retry once it is reloaded"
        )
    return files


def fetch_s3_adapter(
    client: S3Client, uri: str, version: str, base: BaseModelSpec, max_bytes: int, dest: Path
) -> dict[str, bytes]:
    """Validate the adapter at `uri` in place, download it into `dest` (verified), return its files."""
    with _s3_errors(uri):
        bucket, prefix = parse_s3_uri(uri)
        objects = list_objects(client, bucket, prefix)
        top = {o.name: o for o in objects if "/" not in o.name}  # PEFT writes the files at the top
        check_files({name: o.size for name, o in top.items()}, max_bytes)
        config, weights = top[CONFIG_NAME], top[WEIGHTS_NAME]
        found = s3_adapter_version(weights.etag, config.etag)
        if found != version:
            raise SourceUnavailable(
                "VersionMismatch",
                f"{uri} is version {found}, the registry says {version}; retry once the registry is reloaded",
            )
        lora = parse_adapter_config(_get(client, bucket, config), base)
        head = read_safetensors_head(lambda a, b: _get(client, bucket, weights, (a, b)), weights.size)
        check_weights(lora, parse_safetensors_header(head, weights.size), base, weights.size)
        fetch_objects(client, bucket, [config, weights], dest, progress=False)
    return {name: (dest / name).read_bytes() for name in FILE_NAMES}


def put_s3_adapter(client: S3Client, bucket: str, prefix: str, directory: Path) -> str:
    """Upload a PEFT adapter directory's two files under `prefix`; return their version."""
    etags = {}
    for name in FILE_NAMES:
        put = client.put_object(Bucket=bucket, Key=prefix + name, Body=(directory / name).read_bytes())
        etags[name] = put["ETag"].strip('"')
    return s3_adapter_version(etags[WEIGHTS_NAME], etags[CONFIG_NAME])


def _get(client: S3Client, bucket: str, obj: S3Object, byte_range: tuple[int, int] | None = None) -> bytes:
    kwargs = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
    response = client.get_object(Bucket=bucket, Key=obj.key, IfMatch=f'"{obj.etag}"', **kwargs)
    return bytes(response["Body"].read())


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Sort S3 failures into retry-later (SourceUnavailable) and fix-the-adapter (AdapterError)."""
    try:
        yield
    except S3SourceError as e:
        if isinstance(e.__cause__, ClientError):
            raise _client_error(e.__cause__, uri) from e
        raise AdapterError("SourceRefused", str(e)) from e  # bad URI or object key, checksum mismatch
    except ClientError as e:
        raise _client_error(e, uri) from e
    except BotoCoreError as e:
        raise SourceUnavailable(
            "S3Unavailable", f"cannot reach S3 for {uri}: {e}; retry when S3 is back"
        ) from e
    except OSError as e:
        raise SourceUnavailable("IOError", f"cannot store {uri} locally: {e}") from e


def _client_error(e: ClientError, uri: str) -> Exception:
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    error = e.response.get("Error", {})
    what = f"{error.get('Code')}: {error.get('Message')}"
    if status in (404, 412):  # listed a moment ago: deleted or replaced since
        return SourceUnavailable("VersionMismatch", f"{uri} changed while being read ({what}); retry")
    if is_user_error(e):
        return AdapterError("SourceRefused", f"S3 refused access to {uri}: {what}")
    return SourceUnavailable("S3Unavailable", f"S3 failed reading {uri} ({what}); retry later")


class AdapterDirRegistry:
    """`DIR/<namespace>/<name>/` as a registry (standalone `--adapter-dir`).

    Entries are listed whatever their content, so a broken adapter is refused with its reason when
    requested instead of looking unknown. File digests are cached by (size, mtime, inode).
    """

    def __init__(self, root: Path, base_model: str) -> None:
        self.root, self.base_model = Path(root), base_model
        self._digests: dict[Path, tuple[tuple[int, int, int], str, Any]] = {}
        self._last: Registry | None = None

    def scan(self) -> Registry:
        adapters = {}
        for ns in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for path in sorted(p for p in ns.iterdir() if p.is_dir()):
                adapter_id = _checked_id(f"{ns.name}/{path.name}", path)
                if adapter_id is not None:
                    adapters[adapter_id] = self._entry(path.resolve())
        return Registry(self.base_model, adapters)

    def poll(self) -> Registry | None:
        """The registry if it changed since the last poll, else None."""
        registry = self.scan()
        changed, self._last = registry != self._last, registry
        return registry if changed else None

    def _entry(self, path: Path) -> RegistryEntry:
        h = hashlib.sha256()
        config: Any = None
        size = 0
        for name in FILE_NAMES:
            file = path / name
            try:
                stat = file.stat()
            except OSError:
                continue
            key = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            cached = self._digests.get(file)
            if cached is None or cached[0] != key:
                data = file.read_bytes()
                cached = (
                    key,
                    hashlib.sha256(data).hexdigest(),
                    _json_or_none(data) if name == CONFIG_NAME else None,
                )
                self._digests[file] = cached
            h.update(f"{name}\0{cached[1]}\n".encode())  # the same digest as local_version
            config = cached[2] if name == CONFIG_NAME else config
            size = stat.st_size if name == WEIGHTS_NAME else size
        return _entry(path.as_uri() + "/", h.hexdigest(), size, config)


class S3PrefixRegistry:
    """`s3://bucket/prefix/<namespace>/<name>/` as a registry (standalone `--adapter-s3-prefix`).

    One listing per poll; each config is read once per ETag. Network errors propagate: keep
    serving the previous registry and poll again later.
    """

    def __init__(self, client: S3Client, uri: str, base_model: str) -> None:
        self.client, self.base_model = client, base_model
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._configs: dict[str, Any] = {}  # config ETag -> parsed JSON (None if unreadable)
        self._last: Registry | None = None

    def scan(self) -> Registry:
        groups: dict[str, dict[str, S3Object]] = {}
        for obj in self._list():
            parts = obj.name.split("/")
            if len(parts) == 3:
                groups.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = obj
        adapters = {}
        for adapter_id, files in sorted(groups.items()):
            if _checked_id(adapter_id, f"s3://{self.bucket}/{self.prefix}{adapter_id}/") is None:
                continue
            weights, config = files.get(WEIGHTS_NAME), files.get(CONFIG_NAME)
            # Without both files there are no ETags to name the version; any listing change makes a new one.
            listing = "".join(f"{n}\0{o.etag}\n" for n, o in sorted(files.items()))
            version = (
                s3_adapter_version(weights.etag, config.etag)
                if weights and config
                else "incomplete-" + hashlib.sha256(listing.encode()).hexdigest()
            )
            uri = f"s3://{self.bucket}/{self.prefix}{adapter_id}/"
            adapters[adapter_id] = _entry(uri, version, weights.size if weights else 0, self._config(config))
        return Registry(self.base_model, adapters)

    def poll(self) -> Registry | None:
        """The registry if it changed since the last poll, else None."""
        registry = self.scan()
        changed, self._last = registry != self._last, registry
        return registry if changed else None

    def _list(self) -> list[S3Object]:
        """list_objects, except that a key that could escape a directory skips that key only."""
        objects = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):  # a "folder" placeholder, not content
                    continue
                try:
                    name = safe_name(item["Key"], self.prefix)
                except S3SourceError as e:
                    log.warning("skipping s3://%s/%s: %s", self.bucket, item["Key"], e)
                    continue
                objects.append(S3Object(item["Key"], name, item["Size"], item["ETag"].strip('"')))
        return objects

    def _config(self, obj: S3Object | None) -> Any:
        if obj is None or obj.size > MAX_CONFIG_BYTES:  # too large: listed, and refused when loaded
            return None
        if obj.etag not in self._configs:
            body = self.client.get_object(Bucket=self.bucket, Key=obj.key)["Body"].read()
            self._configs[obj.etag] = _json_or_none(body)
        return self._configs[obj.etag]


def _checked_id(adapter_id: str, where: object) -> str | None:
    try:
        return validate_adapter_id(adapter_id)
    except ValueError as e:
        log.warning("skipping adapter at %s: %s", where, e)
        return None


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _entry(uri: str, version: str, size: int, config: Any) -> RegistryEntry:
    """A registry entry; rank and targets are informational here (loading validates the files)."""
    config = config if isinstance(config, dict) else {}
    rank = config.get("r")
    targets = config.get("target_modules")
    return RegistryEntry(
        uri=uri,
        version=version,
        rank=rank if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else 1,
        bytes=size,
        target_modules=tuple(targets)
        if isinstance(targets, list) and all(isinstance(t, str) for t in targets)
        else (),
    )
