"""S3 fixtures: a real S3-compatible server (SeaweedFS `weed mini`) on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafleet.engine.s3 import S3Client
from lorafleet.engine.weed import WeedS3


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedS3]:
    """One server for the session. Do not stop it; use `private_weed` for outages."""
    with WeedS3(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture
def s3_bucket(weed: WeedS3) -> tuple[S3Client, str]:
    """A fresh, uniquely named bucket on the session server, and a client for it."""
    client = weed.client()
    name = f"test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def private_weed(tmp_path: Path) -> Iterator[WeedS3]:
    """A server of the test's own, started; the test may stop() and start() it (an S3 outage)."""
    with WeedS3(tmp_path / "weed") as server:
        yield server
