"""S3 access: URI parsing, a configured boto3 client, and verified downloads of a prefix.

Knows nothing about models or adapters: callers list a prefix, decide whether the objects suit
them, and fetch them into a local directory. Credentials come from boto3's standard chain
(environment, shared files, instance or pod identity) and are never logged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

S3Client = Any  # botocore builds its client classes at runtime; there is nothing static to name

MANIFEST_NAME = ".s3-manifest.json"  # written into every fetched directory, so it is a reserved name
# S3's rules plus the underscore that some S3-compatible stores allow; never '/' or a leading '.'.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_PLAIN_MD5_RE = re.compile(r"^[0-9a-f]{32}$")  # multipart ETags look like "<md5 of md5s>-<parts>"
_CHUNK_BYTES = 1 << 20


class S3SourceError(ValueError):
    """An S3 location cannot be used as given: bad URI, missing bucket, unsafe key, failed check."""


@dataclass(frozen=True)
class S3Object:
    key: str  # full object key
    name: str  # path below the listed prefix, '/'-separated; checked to stay inside a directory
    size: int  # bytes
    etag: str  # without quotes; the MD5 of the content unless the object was uploaded in parts


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> `("bucket", "some/prefix")`. The prefix may be empty."""
    if not uri.startswith("s3://"):
        raise S3SourceError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise S3SourceError(
            f"invalid bucket name {bucket!r} in {uri!r}: expected 3-63 lowercase letters, digits, '.', '-'"
        )
    return bucket, prefix


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    connect_timeout_s: float = 5,
    read_timeout_s: float = 30,
    max_attempts: int = 5,
    *,
    session: boto3.Session | None = None,
) -> S3Client:
    """A boto3 S3 client with bounded timeouts and standard (exponential backoff) retries.

    `endpoint_url` selects an S3-compatible server (SeaweedFS, MinIO) and turns on path-style
    addressing, which those servers expect. `session` overrides the standard credential chain,
    e.g. with the fixed keys of a test server.
    """
    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"mode": "standard", "max_attempts": max_attempts},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return (session or boto3.Session()).client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )


def safe_name(key: str, prefix: str) -> str:
    """The part of `key` below the directory `prefix`, refused if it could escape a local directory."""
    name = key[len(prefix) :]
    parts = name.split("/")
    if (
        not key.startswith(prefix)
        or any(part in ("", ".", "..") for part in parts)
        or "\\" in name
        or "\0" in name
        or name == MANIFEST_NAME
    ):
        raise S3SourceError(f"refusing object key {key!r}: it would not stay inside the download directory")
    return name


def list_objects(client: S3Client, bucket: str, prefix: str) -> list[S3Object]:
    """The objects below `prefix`, taken as a directory (`a/b` lists `a/b/...`, not `a/bc`)."""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):  # a "folder" placeholder, not content
                    continue
                name = safe_name(item["Key"], prefix)
                objects.append(S3Object(item["Key"], name, item["Size"], item["ETag"].strip('"')))
    except ClientError as e:
        _raise_if_user_error(e, f"cannot list s3://{bucket}/{prefix}")
        raise
    return sorted(objects, key=lambda o: o.name)


def fetch_objects(
    client: S3Client, bucket: str, objects: Sequence[S3Object], dest: Path, *, progress: bool = True
) -> int:
    """Make `dest` a verified copy of `objects`; return how many were downloaded (0: cache reused).

    `dest` keeps a manifest (name -> key, etag, size). Files whose entry still matches are reused;
    the others are downloaded and checked against the listing (size, and MD5 where the ETag is
    one). The new directory is built next to `dest` and swapped in only once complete, so `dest` is
    never partial or unverified. Concurrent callers (threads or processes) serialize on a lock file.
    """
    wanted = {o.name: asdict(o) for o in objects}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock")):
        old = _read_manifest(dest)
        reusable = {
            o.name for o in objects if old.get(o.name) == wanted[o.name] and _has_size(dest / o.name, o.size)
        }
        if old == wanted and len(reusable) == len(objects):
            return 0
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            meter = _Meter(sum(o.size for o in objects if o.name not in reusable), enabled=progress)
            for o in objects:
                target = tmp / o.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if o.name in reusable:
                    os.link(dest / o.name, target)
                else:
                    _download(client, bucket, o, target, meter)
            (tmp / MANIFEST_NAME).write_text(json.dumps(wanted, indent=1, sort_keys=True))
            tmp.chmod(0o755)  # mkdtemp makes it private
            _swap_in(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the swap succeeded
    return len(objects) - len(reusable)


def _download(client: S3Client, bucket: str, obj: S3Object, target: Path, meter: _Meter) -> None:
    where = f"s3://{bucket}/{obj.key}"
    try:
        # IfMatch: fail rather than mix files of two versions when the object changes under us.
        response = client.get_object(Bucket=bucket, Key=obj.key, IfMatch=f'"{obj.etag}"')
    except ClientError as e:
        _raise_if_user_error(e, f"cannot download {where}")
        raise
    if response.get("ETag", "").strip('"') != obj.etag:
        raise S3SourceError(f"{where} changed while downloading (ETag {response.get('ETag')}); retry")
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(target, "wb") as f:
        for chunk in response["Body"].iter_chunks(_CHUNK_BYTES):
            f.write(chunk)
            md5.update(chunk)
            size += len(chunk)
            meter.advance(obj.name, len(chunk))
    if size != obj.size:
        raise S3SourceError(f"{where}: got {size} bytes, the listing says {obj.size}; not cached")
    if _PLAIN_MD5_RE.match(obj.etag) and md5.hexdigest() != obj.etag:
        raise S3SourceError(
            f"{where}: content MD5 {md5.hexdigest()} does not match ETag {obj.etag}; not cached"
        )


# 4xx answers that mean "not now" rather than "never": retried like a 5xx, not reported as the
# user's mistake (an expired session token is refreshed, a skewed clock is corrected, throttling ends).
TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeTooSkewed", "ExpiredToken", "TokenRefreshRequired", "SlowDown",
    "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
})  # fmt: skip


def is_user_error(e: ClientError) -> bool:
    """A 4xx answer the user must fix (no such bucket, access denied, precondition failed)."""
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = e.response.get("Error", {}).get("Code")
    return 400 <= status < 500 and status != 429 and code not in TRANSIENT_CODES


def _raise_if_user_error(e: ClientError, what: str) -> None:
    if is_user_error(e):
        error = e.response.get("Error", {})
        raise S3SourceError(f"{what}: {error.get('Code')}: {error.get('Message')}") from e


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((directory / MANIFEST_NAME).read_text())
        return manifest
    except (OSError, ValueError):
        return {}


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _swap_in(new: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
    os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Meter:
    """Download progress on stderr: a line per second at most, plus one when everything is in."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.last = 0.0

    def advance(self, name: str, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= 1.0 or self.done == self.total):
            self.last = now
            print(f"downloading {name}: {self.done / 1e6:.1f} / {self.total / 1e6:.1f} MB", file=sys.stderr)
