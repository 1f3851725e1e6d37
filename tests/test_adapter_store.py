"""The adapter store: CPU LRU, in-use and pinned adapters, the disk tier, single-flight loads,
versions, refusals, S3 outages (real S3 on loopback), and the standalone registries."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_numpy

from lorafleet.engine.adapter_disk import INDEX_NAME, DiskTier
from lorafleet.engine.adapter_format import CONFIG_NAME, WEIGHTS_NAME, BaseModelSpec
from lorafleet.engine.adapter_sources import FILE_NAMES, AdapterDirRegistry, S3PrefixRegistry, local_version
from lorafleet.engine.adapter_store import (
    AdapterStore,
    AdapterStoreConfig,
    InvalidAdapterName,
    UnknownAdapter,
)
from lorafleet.engine.adapter_weights import LoadedAdapter, load_adapter_weights
from lorafleet.engine.registry import Registry
from lorafleet.engine.s3 import MANIFEST_NAME, S3Client
from lorafleet.engine.weed import WeedS3
from tests.plugins.tiny_models import make_peft_adapter
from tests.test_adapter_format import TINY, make_adapter_files, write_dir

WAIT_S = 20.0  # generous bounds on event waits; a passing test never comes near them
Files = dict[str, bytes]
NBYTES = load_adapter_weights("x/y", "v", *make_adapter_files().values(), TINY).nbytes  # rank 4, q+v


class NoS3:
    """The S3 client of a store that must not touch S3: any use fails the load loudly."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"S3 used ({name}) by a store that should not need it")


class CountingS3:
    """A real S3 client that records object GETs and listings, and can hold full downloads of
    objects whose key ends with `hold` until `gate` is set."""

    def __init__(self, client: S3Client, hold: str | None = None) -> None:
        self._client = client
        self.hold = hold
        self.gate = threading.Event()
        self.held = threading.Event()  # a held download is waiting at the gate
        self.gets: list[tuple[str, str | None]] = []  # (key, Range or None for a full GET)
        self.listings = 0
        self._lock = threading.Lock()

    def get_object(self, **kwargs: Any) -> Any:
        with self._lock:
            self.gets.append((kwargs["Key"], kwargs.get("Range")))
        if self.hold and kwargs["Key"].endswith(self.hold) and "Range" not in kwargs:
            self.held.set()
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return self._client.get_object(**kwargs)

    def get_paginator(self, name: str) -> Any:
        with self._lock:
            self.listings += 1
        return self._client.get_paginator(name)

    def downloads(self, name: str = WEIGHTS_NAME) -> int:
        """Full GETs of objects called `name`: downloads of weights, not header probes."""
        with self._lock:
            return sum(1 for key, byte_range in self.gets if key.endswith("/" + name) and byte_range is None)


def config(**kw: Any) -> AdapterStoreConfig:
    return AdapterStoreConfig(**({"max_rank": 8, "s3_max_attempts": 1} | kw))


@pytest.fixture
def open_store() -> Iterator[Callable[..., AdapterStore]]:
    """open_store(config, registry, s3_client=..., base=TINY): a store closed after the test."""
    stores: list[AdapterStore] = []

    def make(cfg: AdapterStoreConfig, registry: Registry, s3_client: Any = None, base: BaseModelSpec = TINY):
        store = AdapterStore(cfg, base, registry, s3_client=s3_client or NoS3())
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def load(store: AdapterStore, adapter_id: str) -> LoadedAdapter:
    """request() and wait for the adapter to be ready; fail with the load error otherwise."""
    store.request(adapter_id)
    status = store.wait(adapter_id, WAIT_S)
    assert status.state == "ready", status.error
    adapter = store.get(adapter_id)
    assert adapter is not None
    return adapter


def assert_weights(adapter: LoadedAdapter, files: Files) -> None:
    """The loaded tensors are exactly the safetensors ones, under (layer, projection) keys."""
    tensors = load_numpy(files[WEIGHTS_NAME])
    cfg = json.loads(files[CONFIG_NAME])
    assert adapter.rank == cfg["r"] and adapter.scale == cfg["lora_alpha"] / cfg["r"]
    expected = {}
    for name, array in tensors.items():
        module, ab = name.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        layer, proj = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        expected[(layer, proj, ab)] = torch.from_numpy(array).float()
    got = {}
    for (layer, proj), (a, b) in adapter.weights.items():
        got[(layer, proj, "lora_A")], got[(layer, proj, "lora_B")] = a, b
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def local_adapters(root: Path, specs: dict[str, Files]) -> Registry:
    """Write `specs` (id -> files) under `root` as --adapter-dir does, and scan it."""
    for adapter_id, files in specs.items():
        write_dir(root / adapter_id, files)
    return AdapterDirRegistry(root, "tiny").scan()


def pinned(registry: Registry, *ids: str) -> Registry:
    adapters = {k: dataclasses.replace(e, pinned=k in ids) for k, e in registry.adapters.items()}
    return Registry(registry.base_model, adapters)


def upload(client: S3Client, bucket: str, prefix: str, files: Files) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=prefix + name, Body=data)


def s3_registry(client: S3Client, bucket: str) -> Registry:
    return S3PrefixRegistry(client, f"s3://{bucket}/ads/", "tiny").scan()


# -- CPU tier ---------------------------------------------------------------------------------


def test_cold_load_then_cpu_hit(tmp_path, open_store):
    files = make_adapter_files(rank=4, seed=1)
    store = open_store(config(), local_adapters(tmp_path, {"team/bot": files}))
    assert store.status("team/bot").state == "absent"
    adapter = load(store, "team/bot")
    assert_weights(adapter, files)
    assert adapter.key == ("team/bot", local_version(files))
    assert store.request("team/bot").state == "ready"  # a CPU hit: no second load
    stats = store.stats()
    assert (stats.hits["cpu"], stats.misses["cpu"], stats.loads) == (1, 1, {"disk": 1, "s3": 0})
    assert stats.resident["cpu"] == 1 and stats.resident_bytes["cpu"] == adapter.nbytes == NBYTES
    assert len(stats.load_seconds["disk"]) == 1 and stats.loading == 0


def test_peft_saved_adapter_loads_as_peft_wrote_it(tiny_llama_dir, tmp_path, open_store):
    out = make_peft_adapter(tiny_llama_dir, tmp_path / "team" / "peft", 4, 8, rslora=True, seed=3)
    base = BaseModelSpec.from_hf_config(
        json.loads((tiny_llama_dir / "config.json").read_text()), name=tiny_llama_dir.name, max_rank=8
    )
    store = open_store(config(), AdapterDirRegistry(tmp_path, "tiny").scan(), base=base)
    adapter = load(store, "team/peft")
    assert adapter.rank == 4 and adapter.scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    saved = load_numpy((out / WEIGHTS_NAME).read_bytes())
    assert len(adapter.weights) == 2 * 7 and len(saved) == 2 * len(adapter.weights)
    a, b = adapter.weights[(1, "down_proj")]
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    assert torch.equal(a, torch.from_numpy(saved[f"{prefix}.lora_A.weight"]))
    assert torch.equal(b, torch.from_numpy(saved[f"{prefix}.lora_B.weight"]))


def test_cpu_tier_evicts_least_recently_used_within_its_budget(tmp_path, open_store):
    specs = {f"team/a{i}": make_adapter_files(seed=i) for i in range(3)}
    store = open_store(config(cpu_bytes=2 * NBYTES + NBYTES // 2), local_adapters(tmp_path, specs))
    load(store, "team/a0")
    load(store, "team/a1")
    assert store.get("team/a0") is not None  # a0 is now the most recently used
    load(store, "team/a2")
    assert store.get("team/a1") is None and store.status("team/a1").state == "absent"
    assert store.get("team/a0") is not None and store.get("team/a2") is not None
    stats = store.stats()
    assert stats.evictions["cpu"] == 1 and stats.resident_bytes["cpu"] == 2 * NBYTES
    assert_weights(load(store, "team/a1"), specs["team/a1"])  # loads again after eviction


def test_acquired_adapters_are_never_evicted(tmp_path, open_store):
    specs = {f"team/a{i}": make_adapter_files(seed=i) for i in range(3)}
    store = open_store(config(cpu_bytes=2 * NBYTES), local_adapters(tmp_path, specs))
    load(store, "team/a0")
    assert store.acquire("team/a0") is not None  # the running batch uses a0 ...
    load(store, "team/a1")  # ... and a1 is more recently used
    load(store, "team/a2")
    assert store.get("team/a0") is not None and store.get("team/a1") is None  # a1 went, not a0
    assert store.acquire("team/a2") is not None
    assert store.stats().active == 2

    store.request("team/a1")  # both residents are in use: nothing can make room
    status = store.wait("team/a1", WAIT_S)
    assert status.state == "failed" and status.retryable and status.error is not None
    assert status.error.reason == "CpuTierFull" and "cpu_bytes" in str(status.error)

    store.release("team/a0")
    load(store, "team/a1")  # retried: a0 is free now and makes room
    assert store.get("team/a0") is None and store.get("team/a2") is not None
    store.release("team/a2")
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        store.release("team/a2")


def test_pinned_adapters_are_preloaded_and_never_evicted(tmp_path, open_store):
    specs = {f"team/a{i}": make_adapter_files(seed=i) for i in range(3)} | {
        "team/p": make_adapter_files(seed=9)
    }
    registry = pinned(local_adapters(tmp_path, specs), "team/p")
    store = open_store(config(cpu_bytes=2 * NBYTES), registry)
    assert store.wait("team/p", WAIT_S).state == "ready"  # nobody asked for it
    assert_weights(store.get("team/p"), specs["team/p"])
    for i in range(3):
        load(store, f"team/a{i}")  # each evicts the previous one, never the (least recent) pinned one
        assert store.status("team/p").state == "ready"  # status() does not count as a use
    assert store.stats().evictions["cpu"] == 2

    # Unpinned by a registry update, it is an ordinary adapter again.
    store.update_registry(registry)  # pinned again: already in memory, so not requested again
    assert store.stats().hits["cpu"] == 0
    store.update_registry(pinned(registry))  # unpinned: an ordinary adapter, and the least recent
    load(store, "team/a0")
    assert store.status("team/p").state == "absent"


def test_an_adapter_that_cannot_fit_beside_the_pinned_ones_evicts_nobody(tmp_path, open_store):
    """Refused before evicting: other tenants keep their warm adapters. And since pinned adapters
    never leave, the refusal is final (not retried every step)."""
    specs = {"team/p": make_adapter_files(seed=9), "team/warm": make_adapter_files(seed=1),
             "team/big": make_adapter_files(rank=8, seed=2)}  # fmt: skip
    store = open_store(
        config(cpu_bytes=2 * NBYTES + NBYTES // 2), pinned(local_adapters(tmp_path, specs), "team/p")
    )
    assert store.wait("team/p", WAIT_S).state == "ready"
    load(store, "team/warm")
    store.request("team/big")  # about 2 x NBYTES: fits only without the pinned adapter
    status = store.wait("team/big", WAIT_S)
    assert status.state == "failed" and status.error.reason == "CpuTierFull" and not status.retryable
    assert store.status("team/warm").state == "ready" and store.stats().evictions["cpu"] == 0
    # Unpinned by the admin: the refusal is lifted, and the next request loads it.
    store.update_registry(local_adapters(tmp_path, specs))
    load(store, "team/big")


def test_a_pinned_adapter_whose_preload_failed_is_retried_without_a_request(tmp_path, open_store):
    specs = {"team/a0": make_adapter_files(seed=0), "team/p": make_adapter_files(seed=9)}
    registry = local_adapters(tmp_path, specs)
    store = open_store(config(cpu_bytes=NBYTES), registry)
    load(store, "team/a0")
    assert store.acquire("team/a0") is not None  # in use: it fills the CPU tier
    store.update_registry(pinned(registry, "team/p"))  # the preload cannot make room
    status = store.wait("team/p", WAIT_S)
    assert status.state == "failed" and status.retryable and status.error.reason == "CpuTierFull"

    store.release("team/a0")
    store.retry_pinned(min_interval_s=3600)  # tried too recently: nothing starts
    assert store.status("team/p").state == "failed"
    store.retry_pinned(min_interval_s=0)
    assert store.wait("team/p", WAIT_S).state == "ready"  # nobody asked for it
    assert_weights(store.get("team/p"), specs["team/p"])
    assert store.status("team/a0").state == "absent"  # evicted to make room


def test_adapter_larger_than_the_cpu_tier_is_refused(tmp_path, open_store):
    store = open_store(
        config(cpu_bytes=NBYTES - 1), local_adapters(tmp_path, {"team/big": make_adapter_files()})
    )
    store.request("team/big")
    status = store.wait("team/big", WAIT_S)
    assert status.state == "failed" and not status.retryable and status.error.reason == "TooLarge"


# -- names and the registry --------------------------------------------------------------------


def test_unknown_adapter_and_path_tricks(tmp_path, open_store):
    store = open_store(config(), local_adapters(tmp_path, {"team/bot": make_adapter_files()}))
    for call in (store.request, store.get, store.status, store.acquire):
        with pytest.raises(UnknownAdapter, match="not in the registry"):
            call("team/nope")
        for bad in ("../etc", "team/../bot", "team/bot/x", "Team/bot", "team/%2e%2e", "team\\bot"):
            with pytest.raises(InvalidAdapterName, match="invalid adapter id"):
                call(bad)
    store.prefetch(["team/nope", "../etc", "team/bot"])  # skips the two it cannot request
    assert store.wait("team/bot", WAIT_S).state == "ready"
    assert store.stats().misses["cpu"] == 1


def test_adapter_dir_registry_scans_namespaces_and_skips_bad_names(tmp_path):
    good = make_adapter_files(seed=1)
    for name in ("team-a/bot", "team-b/bot.v2", "Team/x", "team-a/a..b", ".hidden/x", "team-a/x y"):
        write_dir(tmp_path / name, good)
    write_dir(tmp_path / "team-a" / "broken", {CONFIG_NAME: good[CONFIG_NAME]})  # no weights
    (tmp_path / "stray-file").write_text("not an adapter")
    watcher = AdapterDirRegistry(tmp_path, "tiny")
    registry = watcher.poll()
    assert registry is not None and registry.base_model == "tiny"
    assert sorted(registry.adapters) == ["team-a/bot", "team-a/broken", "team-b/bot.v2"]
    entry = registry.adapters["team-a/bot"]
    assert entry.version == local_version(good) and entry.rank == 4
    assert entry.uri == (tmp_path / "team-a" / "bot").resolve().as_uri() + "/"
    assert entry.bytes == len(good[WEIGHTS_NAME]) and entry.target_modules == ("q_proj", "v_proj")
    assert watcher.poll() is None  # unchanged

    (tmp_path / "team-a" / "bot" / WEIGHTS_NAME).write_bytes(make_adapter_files(seed=2)[WEIGHTS_NAME])
    changed = watcher.poll()
    assert changed is not None and changed.adapters["team-a/bot"].version != entry.version


def test_s3_prefix_registry_scans_and_skips_bad_keys(s3_bucket):
    client, bucket = s3_bucket
    files = make_adapter_files(seed=1)
    for prefix in ("ads/team/bot/", "ads/Team/x/", "ads/team/a..b/", "other/team/y/"):
        upload(client, bucket, prefix, files)
    client.put_object(Bucket=bucket, Key="ads/team/bot/nested/extra.txt", Body=b"ignored")
    client.put_object(Bucket=bucket, Key=f"ads/{MANIFEST_NAME}", Body=b"{}")  # a key list_objects refuses
    client.put_object(Bucket=bucket, Key="ads/team/incomplete/" + CONFIG_NAME, Body=files[CONFIG_NAME])
    watcher = S3PrefixRegistry(client, f"s3://{bucket}/ads", "tiny")
    registry = watcher.poll()
    assert registry is not None and sorted(registry.adapters) == ["team/bot", "team/incomplete"]
    entry = registry.adapters["team/bot"]
    etag = {
        n: client.head_object(Bucket=bucket, Key="ads/team/bot/" + n)["ETag"].strip('"') for n in FILE_NAMES
    }
    version = f"{etag[WEIGHTS_NAME]}+{etag[CONFIG_NAME]}"
    assert (entry.uri, entry.version, entry.rank) == (f"s3://{bucket}/ads/team/bot/", version, 4)
    assert registry.adapters["team/incomplete"].version.startswith("incomplete-")
    assert watcher.poll() is None

    upload(client, bucket, "ads/team/new/", files)
    changed = watcher.poll()
    assert changed is not None and "team/new" in changed.adapters


# -- refusals ------------------------------------------------------------------------------------

PICKLE = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."  # pickle.dumps({}) : never unpickled
GOOD = make_adapter_files(seed=5)
INVALID = {
    "pickle": ({CONFIG_NAME: GOOD[CONFIG_NAME], "adapter_model.bin": PICKLE}, "PickleOnly"),
    "rank": (make_adapter_files(rank=16), "RankTooHigh"),
    "truncated": ({**GOOD, WEIGHTS_NAME: GOOD[WEIGHTS_NAME][:-4]}, "CorruptSafetensors"),
    "garbage": ({**GOOD, WEIGHTS_NAME: b"\xff" * 64}, "CorruptSafetensors"),
    "large": (make_adapter_files(rank=8, targets=tuple(TINY.projection_shapes())), "TooLarge"),
    "target": (make_adapter_files(targets=("q_proj",), target_modules=["c_attn"]), "UnknownTargetModule"),
    "base": (make_adapter_files(base_model_name_or_path="meta-llama/Llama-3-8B"), "BaseModelMismatch"),
}
# "large" is above the cap, every other case below it.
MAX_BYTES = 1 + max(sum(map(len, files.values())) for case, (files, _) in INVALID.items() if case != "large")
assert sum(map(len, INVALID["large"][0].values())) > MAX_BYTES


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_s3_adapter_is_refused_before_its_weights_are_downloaded(
    case, s3_bucket, tmp_path, open_store
):
    client, bucket = s3_bucket
    files, reason = INVALID[case]
    upload(client, bucket, "ads/team/bad/", files)
    s3 = CountingS3(client)
    cfg = config(disk_dir=tmp_path / "disk", max_adapter_bytes=MAX_BYTES)
    store = open_store(cfg, s3_registry(client, bucket), s3)
    store.request("team/bad")
    status = store.wait("team/bad", WAIT_S)
    assert status.state == "failed" and status.error is not None
    assert (status.error.reason, status.retryable) == (reason, False)
    assert "team/bad" in str(status.error)
    assert s3.downloads() == 0  # refused from the listing, the config or the header bytes
    assert store.stats().resident["disk"] == 0 and store.stats().load_failures["s3"] == 1
    listings = s3.listings
    assert store.request("team/bad").state == "failed"  # the same bytes are not fetched again
    assert s3.listings == listings and store.stats().misses["cpu"] == 1


@pytest.mark.parametrize("case", ["pickle", "rank", "truncated", "large"])
def test_invalid_local_adapter_is_refused(case, tmp_path, open_store):
    files, reason = INVALID[case]
    store = open_store(config(max_adapter_bytes=MAX_BYTES), local_adapters(tmp_path, {"team/bad": files}))
    store.request("team/bad")
    status = store.wait("team/bad", WAIT_S)
    assert status.state == "failed" and status.error.reason == reason and not status.retryable


# -- the disk tier ---------------------------------------------------------------------------------


def test_disk_tier_survives_a_restart_and_refetches_a_tampered_file(s3_bucket, tmp_path, open_store):
    client, bucket = s3_bucket
    files = make_adapter_files(seed=7)
    upload(client, bucket, "ads/team/bot/", files)
    registry = s3_registry(client, bucket)
    cfg = config(disk_dir=tmp_path / "disk")

    first = open_store(cfg, registry, CountingS3(client))
    assert_weights(load(first, "team/bot"), files)
    stats = first.stats()
    assert stats.loads == {"disk": 0, "s3": 1} and stats.misses["disk"] == 1 and stats.resident["disk"] == 1
    first.close()

    s3 = CountingS3(client)  # a restart: a new store on the same directory
    second = open_store(cfg, registry, s3)
    assert_weights(load(second, "team/bot"), files)
    stats = second.stats()
    assert stats.loads == {"disk": 1, "s3": 0} and stats.hits["disk"] == 1
    assert s3.gets == [] and s3.listings == 0  # S3 was not asked at all
    second.close()

    [cached] = (tmp_path / "disk" / "adapters").glob(f"*/{WEIGHTS_NAME}")
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0x01  # still a well-formed safetensors file: only the checksum can tell
    cached.write_bytes(bytes(data))
    s3 = CountingS3(client)
    third = open_store(cfg, registry, s3)
    assert_weights(load(third, "team/bot"), files)  # the original weights, from S3
    stats = third.stats()
    assert stats.loads == {"disk": 0, "s3": 1} and stats.misses["disk"] == 1 and s3.downloads() == 1
    assert stats.evictions["disk"] == 0  # a corrupt entry is not an eviction
    assert cached.read_bytes() == files[WEIGHTS_NAME]  # and the cache holds good files again


def test_disk_cached_adapter_is_checked_against_the_current_byte_cap(s3_bucket, tmp_path, open_store):
    client, bucket = s3_bucket
    upload(client, bucket, "ads/team/bot/", make_adapter_files())
    registry = s3_registry(client, bucket)
    load(open_store(config(disk_dir=tmp_path / "disk"), registry, CountingS3(client)), "team/bot")
    s3 = CountingS3(client)
    small = open_store(config(disk_dir=tmp_path / "disk", max_adapter_bytes=100), registry, s3)
    small.request("team/bot")
    status = small.wait("team/bot", WAIT_S)
    assert status.state == "failed" and status.error.reason == "TooLarge" and s3.gets == []


def disk_put(disk: DiskTier, key: tuple[str, str], files: Files) -> None:
    staged = disk.staging_dir() / "files"
    write_dir(staged, files)
    disk.put(key, staged, files)


def test_disk_tier_lru_budget_and_recovery(tmp_path):
    adapters = {f"a{i}": make_adapter_files(seed=i) for i in range(5)}
    size = sum(len(d) for d in adapters["a0"].values())
    disk = DiskTier(tmp_path, budget_bytes=2 * size)
    disk_put(disk, ("t/a0", "v"), adapters["a0"])
    disk_put(disk, ("t/a1", "v"), adapters["a1"])
    assert disk.read(("t/a0", "v")) == adapters["a0"]  # a0 is now the most recently used
    disk_put(disk, ("t/a2", "v"), adapters["a2"])
    assert disk.read(("t/a1", "v")) is None and disk.evictions == 1
    assert disk.usage() == (2, 2 * size)

    # A restart keeps the entries and their LRU order; strays and bad index entries are dropped.
    (tmp_path / "adapters" / "0123456789abcdef0123456789abcdef").mkdir()  # owned by no entry
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    outside = tmp_path / "outside"
    write_dir(outside, adapters["a4"])
    index["entries"].append(index["entries"][0] | {"adapter_id": "t/evil", "dir": "../outside"})
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    disk = DiskTier(tmp_path, budget_bytes=2 * size)
    assert disk.usage() == (2, 2 * size)
    assert disk.read(("t/evil", "v")) is None and (outside / WEIGHTS_NAME).is_file()
    assert not (tmp_path / "adapters" / "0123456789abcdef0123456789abcdef").exists()
    assert disk.read(("t/a0", "v")) == adapters["a0"]  # now a2 is the least recently used
    disk_put(disk, ("t/a3", "v"), adapters["a3"])
    assert disk.read(("t/a2", "v")) is None and disk.read(("t/a0", "v")) == adapters["a0"]

    assert DiskTier(tmp_path, budget_bytes=size).usage() == (1, size)  # a smaller budget evicts
    disk_put(disk, ("t/huge", "v"), adapters["a4"] | {WEIGHTS_NAME: b"x" * 3 * size})
    assert disk.read(("t/huge", "v")) is None  # larger than the whole tier: not cached


# -- single flight, versions, outages --------------------------------------------------------------


def test_concurrent_requests_for_a_cold_adapter_download_it_once(s3_bucket, tmp_path, open_store):
    client, bucket = s3_bucket
    files = make_adapter_files(seed=11)
    upload(client, bucket, "ads/team/hot/", files)
    s3 = CountingS3(client, hold=WEIGHTS_NAME)
    store = open_store(config(disk_dir=tmp_path / "disk", fetch_threads=4), s3_registry(client, bucket), s3)
    n = 16
    barrier = threading.Barrier(n)
    states: list[str] = []

    def ask() -> None:
        barrier.wait(WAIT_S)
        states.append(store.request("team/hot").state)

    threads = [threading.Thread(target=ask) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert s3.held.wait(WAIT_S)  # the one download is in flight, held at the gate
    assert states == ["loading"] * n
    assert store.stats().loading == 1 and store.stats().misses["cpu"] == 1
    s3.gate.set()
    assert_weights(load(store, "team/hot"), files)
    assert s3.downloads() == 1
    assert store.stats().loads == {"disk": 0, "s3": 1}


@pytest.mark.parametrize("change", ["weights and config", "config only"])
def test_republished_adapter_serves_new_weights_from_every_tier(s3_bucket, tmp_path, open_store, change):
    client, bucket = s3_bucket
    old = make_adapter_files(seed=1)
    if change == "config only":  # a new lora_alpha: same weights object, a new scale
        new = old | {CONFIG_NAME: make_adapter_files(seed=1, lora_alpha=1)[CONFIG_NAME]}
        assert new[WEIGHTS_NAME] == old[WEIGHTS_NAME] and new[CONFIG_NAME] != old[CONFIG_NAME]
    else:
        new = make_adapter_files(seed=2)
    upload(client, bucket, "ads/team/bot/", old)
    watcher = S3PrefixRegistry(client, f"s3://{bucket}/ads/", "tiny")
    v1 = watcher.poll()
    cfg = config(disk_dir=tmp_path / "disk")
    store = open_store(cfg, v1, CountingS3(client))
    assert_weights(load(store, "team/bot"), old)
    assert store.acquire("team/bot") is not None  # the running batch still uses the old weights

    upload(client, bucket, "ads/team/bot/", new)
    v2 = watcher.poll()
    assert v2 is not None and v2.adapters["team/bot"].version != v1.adapters["team/bot"].version
    store.update_registry(v2)
    assert store.get("team/bot") is None  # old weights are never served for the new version
    assert store.status("team/bot").state == "absent"
    assert_weights(load(store, "team/bot"), new)
    assert store.stats().resident["cpu"] == 2  # the old version stays while in use ...
    store.release("team/bot")
    assert store.stats().resident["cpu"] == 1  # ... and goes when released
    store.close()

    # After a restart, the disk tier holds both versions and serves the registry's one.
    restarted = open_store(cfg, v2, NoS3())
    assert_weights(load(restarted, "team/bot"), new)
    assert restarted.stats().hits["disk"] == 1

    # A registry that lags behind S3 fails retryably rather than serve the new bytes as the old version.
    lagging = open_store(config(), v1, client)
    lagging.request("team/bot")
    status = lagging.wait("team/bot", WAIT_S)
    assert status.state == "failed" and status.retryable and status.error.reason == "VersionMismatch"


def test_load_of_a_version_republished_meanwhile_is_discarded(s3_bucket, open_store):
    client, bucket = s3_bucket
    old, new = make_adapter_files(seed=1), make_adapter_files(seed=2)
    upload(client, bucket, "ads/team/bot/", old)
    upload(client, bucket, "moved/team/bot/", new)
    v1 = s3_registry(client, bucket)
    v2 = S3PrefixRegistry(client, f"s3://{bucket}/moved/", "tiny").scan()
    s3 = CountingS3(client, hold=f"ads/team/bot/{WEIGHTS_NAME}")
    store = open_store(config(), v1, s3)
    store.request("team/bot")
    assert s3.held.wait(WAIT_S)  # the old version's download is in flight
    store.update_registry(v2)
    assert_weights(load(store, "team/bot"), new)
    s3.gate.set()
    store.close()  # waits for the old load to finish
    assert store.stats().resident["cpu"] == 1 and store.stats().loading == 0
    assert_weights(store.get("team/bot"), new)


def test_s3_outage_keeps_warm_adapters_and_fails_cold_ones_retryably(
    private_weed: WeedS3, tmp_path, open_store
):
    client = private_weed.client(max_attempts=1, connect_timeout_s=1)
    client.create_bucket(Bucket="ads")
    warm, cold = make_adapter_files(seed=1), make_adapter_files(seed=2)
    upload(client, "ads", "ads/team/warm/", warm)
    upload(client, "ads", "ads/team/cold/", cold)
    store = open_store(
        config(disk_dir=tmp_path / "disk", s3_connect_timeout_s=1), s3_registry(client, "ads"), client
    )
    load(store, "team/warm")

    private_weed.stop()
    assert_weights(store.get("team/warm"), warm)  # warm adapters keep serving
    for _ in range(2):  # a retryable failure is retried by the next request, and fails again
        store.request("team/cold")
        status = store.wait("team/cold", WAIT_S)
        assert status.state == "failed" and status.retryable and status.error is not None
        assert status.error.reason == "S3Unavailable" and "retry" in str(status.error)
    assert store.stats().load_failures["s3"] == 2 and store.stats().resident["disk"] == 1

    private_weed.start()
    # weed answers before its volume server is back (GETs fail with 500 for up to ~5 s): let a
    # patient client's backoff ride that out, so the store's own retry below meets a working S3.
    patient = private_weed.client(max_attempts=12)
    assert (
        patient.get_object(Bucket="ads", Key="ads/team/cold/" + WEIGHTS_NAME)["Body"].read()
        == cold[WEIGHTS_NAME]
    )
    assert_weights(load(store, "team/cold"), cold)
    assert store.get("team/warm") is not None


def test_close_fails_queued_loads_at_once_and_finishes_the_one_in_flight(s3_bucket, open_store):
    client, bucket = s3_bucket
    first, second = make_adapter_files(seed=1), make_adapter_files(seed=2)
    upload(client, bucket, "ads/team/first/", first)
    upload(client, bucket, "ads/team/second/", second)
    s3 = CountingS3(client, hold=f"first/{WEIGHTS_NAME}")
    store = open_store(config(fetch_threads=1), s3_registry(client, bucket), s3)
    store.request("team/first")
    assert s3.held.wait(WAIT_S)  # the only loader thread is busy ...
    assert store.request("team/second").state == "loading"  # ... so this load is queued
    closing = threading.Thread(target=store.close)
    closing.start()
    status = store.wait("team/second", WAIT_S)  # released by close(), not by a timeout
    assert status.state == "failed" and status.retryable and status.error.reason == "StoreClosed"
    assert closing.is_alive()  # still waiting for the load in flight
    s3.gate.set()
    closing.join(WAIT_S)
    assert not closing.is_alive()
    assert_weights(store.get("team/first"), first)
    assert s3.downloads() == 1


def test_stats_snapshot_is_a_copy(tmp_path, open_store):
    store = open_store(config(), local_adapters(tmp_path, {"team/bot": make_adapter_files()}))
    before = store.stats()
    load(store, "team/bot")
    assert before.misses["cpu"] == 0 and before.loads["disk"] == 0 and not before.load_seconds["disk"]
    assert store.stats().misses["cpu"] == 1


def test_half_precision_adapters_are_widened_to_float32(tmp_path, open_store):
    files = make_adapter_files(dtype=np.float16, seed=4)
    store = open_store(config(), local_adapters(tmp_path, {"team/half": files}))
    adapter = load(store, "team/half")
    assert adapter.nbytes == NBYTES and all(a.dtype == torch.float32 for a, _ in adapter.weights.values())
    assert_weights(adapter, files)


@pytest.mark.parametrize(
    ("status", "code", "final"),
    [(403, "AccessDenied", True), (404, "NoSuchBucket", False), (400, "ExpiredToken", False),
     (403, "RequestTimeTooSkewed", False), (400, "RequestTimeout", False), (503, "SlowDown", False),
     (429, "TooManyRequests", False), (400, "InvalidArgument", True)],
)  # fmt: skip
def test_only_s3_refusals_the_user_must_fix_are_final(status, code, final):
    """A passing 4xx (expired session token, skewed clock, throttling) is retried like a 5xx; a
    final refusal would keep the adapter failed in this engine until it is republished."""
    from botocore.exceptions import ClientError

    from lorafleet.engine.adapter_format import AdapterError
    from lorafleet.engine.adapter_sources import SourceUnavailable, _client_error

    e = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )
    error = _client_error(e, "s3://b/a/")
    assert isinstance(error, AdapterError if final else SourceUnavailable), error
