"""WeedS3: the loopback S3 server that tests, `lorafleet dev` and benchmarks rely on."""

from __future__ import annotations

import socket
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from lorafleet.engine.s3 import S3Client, make_s3_client
from lorafleet.engine.weed import PROBE_BUCKET, REGION, WeedS3


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on and every UDP socket it bound."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue  # closed in the meantime
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (state == "0A" or table.startswith("udp")):  # 0A: LISTEN
                address, port = local.rsplit(":", 1)
                found.append((_decode_address(address), int(port, 16)))
    return found


def _decode_address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # /proc stores 4 host-order words
    return socket.inet_ntop(socket.AF_INET6, words)


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_every_port_is_ours_and_on_loopback(weed: WeedS3) -> None:
    assert weed.pid is not None
    sockets = listening_sockets(weed.pid)
    ours = {p + offset for p in weed.ports.values() for offset in (0, 10000)}
    assert sockets, "weed listens on nothing?"
    assert {address for address, _ in sockets} == {"127.0.0.1"}
    assert {port for _, port in sockets} <= ours
    assert weed.ports["s3"] in {port for _, port in sockets}


def test_objects_round_trip(s3_bucket: tuple[S3Client, str]) -> None:
    client, bucket = s3_bucket
    etag = client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")["ETag"]
    assert etag == '"5d41402abc4b2a76b9719d911017c592"'  # the MD5 of the content, as S3 does
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"


def test_wrong_credentials_are_refused(weed: WeedS3, s3_bucket: tuple[S3Client, str]) -> None:
    _, bucket = s3_bucket
    session = boto3.Session(aws_access_key_id=weed.access_key, aws_secret_access_key="not-the-secret")
    intruder = make_s3_client(weed.endpoint_url, REGION, max_attempts=1, session=session)
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        intruder.list_objects_v2(Bucket=bucket)


def test_restart_keeps_data_and_endpoint(private_weed: WeedS3) -> None:
    client = private_weed.client(max_attempts=1, connect_timeout_s=1)
    client.create_bucket(Bucket="kept")
    client.put_object(Bucket="kept", Key="k", Body=b"v1")
    endpoint = private_weed.endpoint_url

    private_weed.stop()
    assert not private_weed.running
    with pytest.raises(EndpointConnectionError):
        client.get_object(Bucket="kept", Key="k")

    private_weed.start()
    assert private_weed.endpoint_url == endpoint
    assert client.get_object(Bucket="kept", Key="k")["Body"].read() == b"v1"  # the same client works again


def test_a_taken_port_is_replaced_before_the_first_start(tmp_path: Path) -> None:
    server = WeedS3(tmp_path / "weed")
    taken_port = server.ports["s3"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken_port))
        squatter.listen()
        with server:
            assert server.ports["s3"] != taken_port
            # Only the readiness probe's bucket: the server is ours, not whatever held the port.
            assert [b["Name"] for b in server.client().list_buckets()["Buckets"]] == [PROBE_BUCKET]


def test_a_taken_port_after_an_outage_is_an_error_with_the_log(private_weed: WeedS3) -> None:
    private_weed.stop()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", private_weed.ports["s3"]))
        squatter.listen()
        with pytest.raises(
            RuntimeError, match=rf"weed exited with code \d+ while starting:\n.*{private_weed.ports['s3']}"
        ):
            private_weed.start()
    assert not private_weed.running
