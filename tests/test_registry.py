"""Registry format: ids, round trips, shards within the ConfigMap limit, mounts, and the watcher."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from lorafleet.engine.registry import (
    Registry,
    RegistryEntry,
    RegistryError,
    RegistryWatcher,
    load_registry,
    parse_registry_bytes,
    render_shards,
    validate_adapter_id,
)


def entry(i: int = 0, **kw) -> RegistryEntry:
    fields = dict(
        uri=f"s3://adapters/team/a{i}/",
        version=hashlib.md5(str(i).encode()).hexdigest(),
        rank=16,
        bytes=1000 + i,
        target_modules=["q_proj", "v_proj"],
    )
    return RegistryEntry(**(fields | kw))


def registry(n: int, base: str = "smollm2") -> Registry:
    return Registry(base, {f"ns-{i % 7}/adapter-{i}": entry(i) for i in range(n)})


@pytest.mark.parametrize("good", ["default/a", "team-a/support.bot-v2", "a1/b", "x" * 63 + "/" + "y" * 253])
def test_valid_ids(good):
    assert validate_adapter_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "noslash",
        "a/b/c",
        "../etc",
        "ns/..",
        "ns/a..b",
        "ns/.hidden",
        "ns/a.",
        "ns/a.-b",
        "ns\\a",
        "ns/a\\b",
        "ns/a\0",
        "ns/a%2fb",
        "ns/a%2e%2e",
        "NS/a",
        "ns/A",
        "-ns/a",
        "ns/a-",
        "ns/a\n",
        "ns/ a",
        "x" * 64 + "/a",
        "ns/" + "y" * 254,
    ],
)
def test_invalid_ids(bad):
    with pytest.raises(ValueError, match="invalid adapter id"):
        validate_adapter_id(bad)


def test_json_round_trip_and_documented_shape():
    reg = Registry("smollm2", {"team-a/bot": entry(1, pinned=True)})
    doc = reg.to_json()
    assert doc == {
        "version": 1,
        "base_model": "smollm2",
        "adapters": {
            "team-a/bot": {
                "uri": "s3://adapters/team/a1/",
                "version": hashlib.md5(b"1").hexdigest(),
                "rank": 16,
                "bytes": 1001,
                "pinned": True,
                "target_modules": ["q_proj", "v_proj"],
            }
        },
    }
    assert Registry.from_json(json.loads(json.dumps(doc))) == reg


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"version": 2, "base_model": "m", "adapters": {}}, "version 1"),
        ({"version": 1, "adapters": {}}, "base_model"),
        ({"version": 1, "base_model": "m", "adapters": {"../x": entry().to_json()}}, "invalid adapter id"),
        ({"version": 1, "base_model": "m", "adapters": {"a/b": entry().to_json() | {"rank": 0}}}, "rank"),
        (
            {"version": 1, "base_model": "m", "adapters": {"a/b": entry().to_json() | {"uri": "http://x"}}},
            "uri",
        ),
        ({"version": 1, "base_model": "m", "adapters": {"a/b": entry().to_json() | {"extra": 1}}}, "unknown"),
        ({"version": 1, "base_model": "m", "adapters": {"a/b": {"uri": "s3://b/p/"}}}, "adapter entry"),
    ],
)
def test_invalid_documents(doc, match):
    with pytest.raises(RegistryError, match=match):
        parse_registry_bytes(json.dumps(doc).encode())


def test_garbage_bytes():
    with pytest.raises(RegistryError, match="not a readable registry"):
        parse_registry_bytes(b"\x1f\x8b garbage")


def test_shards_are_deterministic_and_small():
    reg = registry(3000)
    shards = render_shards(reg, max_bytes=50_000)
    assert len(shards) > 1 and all(len(b) <= 50_000 for b in shards.values())
    assert sorted(shards) == [f"registry-{i:03d}.json.gz" for i in range(len(shards))]
    assert render_shards(reg, max_bytes=50_000) == shards  # identical bytes: no needless writes
    merged = Registry.from_json(json.loads(gzip.decompress(next(iter(shards.values())))))
    assert merged.base_model == "smollm2"


def test_adding_one_adapter_rewrites_one_shard():
    reg = registry(3000)
    before = render_shards(reg, max_bytes=50_000)
    bigger = Registry(reg.base_model, reg.adapters | {"new/adapter": entry(99999)})
    after = render_shards(bigger, max_bytes=50_000)
    assert len(after) == len(before)
    assert sum(before[k] != after[k] for k in before) == 1


def test_ten_thousand_adapters_fit_one_configmap_shard():
    shards = render_shards(registry(10_000))
    assert len(shards) == 1 and len(shards["registry-000.json.gz"]) < 900_000


def test_empty_registry_still_has_one_shard(tmp_path):
    shards = render_shards(Registry("m"))
    assert list(shards) == ["registry-000.json.gz"]
    write_mount(tmp_path / "mnt", shards)
    assert load_registry(tmp_path / "mnt") == Registry("m")


def test_load_file_gz_and_dir(tmp_path):
    reg = registry(500)
    (tmp_path / "r.json").write_text(json.dumps(reg.to_json()))
    (tmp_path / "r.json.gz").write_bytes(gzip.compress(json.dumps(reg.to_json()).encode()))
    assert load_registry(tmp_path / "r.json") == reg
    assert load_registry(tmp_path / "r.json.gz") == reg
    shards = render_shards(reg, max_bytes=5_000)
    assert len(shards) > 2
    plain = tmp_path / "plain"
    plain.mkdir()
    for name, data in shards.items():
        (plain / name).write_bytes(data)
    (plain / "README").write_text("not a shard")
    assert load_registry(plain) == reg
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "missing.json")


def test_duplicate_ids_across_shards_are_an_error(tmp_path):
    one = json.dumps(Registry("m", {"a/b": entry()}).to_json()).encode()
    (tmp_path / "registry-000.json").write_bytes(one)
    (tmp_path / "registry-001.json").write_bytes(one)
    with pytest.raises(RegistryError, match="also in another shard"):
        load_registry(tmp_path)


def test_shards_must_agree_on_base_model(tmp_path):
    (tmp_path / "registry-000.json").write_text(json.dumps(Registry("m1").to_json()))
    (tmp_path / "registry-001.json").write_text(json.dumps(Registry("m2").to_json()))
    with pytest.raises(RegistryError, match="base_model"):
        load_registry(tmp_path)


def write_mount(mount: Path, files: dict[str, bytes]) -> None:
    """Update `mount` the way the kubelet updates a ConfigMap volume: a new timestamped directory,
    an atomic rename of the `..data` link, top-level links into `..data`, the old directory removed."""
    mount.mkdir(exist_ok=True)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    stamp = f"..{random.getrandbits(64):016x}"
    (mount / stamp).mkdir()
    for name, data in files.items():
        (mount / stamp / name).write_bytes(data)
    os.symlink(stamp, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            os.symlink(f"..data/{name}", mount / name)
    for link in mount.iterdir():
        if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
            link.unlink()  # a key that was removed
    if old:
        shutil.rmtree(mount / old)


def test_configmap_mount_and_watcher(tmp_path):
    mount = tmp_path / "registry"
    watcher = RegistryWatcher(mount)
    assert watcher.poll() is None  # not mounted yet
    write_mount(mount, render_shards(registry(10)))
    assert watcher.poll() == registry(10)
    assert watcher.poll() is None  # unchanged
    write_mount(mount, render_shards(registry(10)))  # a swap with the same content
    assert watcher.poll() is None
    write_mount(mount, render_shards(registry(300), max_bytes=4_000))  # more shards, atomically
    assert watcher.poll() == registry(300)
    write_mount(mount, render_shards(registry(5)))  # fewer shards: stale links are gone
    assert watcher.poll() == registry(5)
    assert load_registry(mount) == registry(5)


def test_watcher_reports_bad_content_once_then_recovers(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(registry(2).to_json()))
    watcher = RegistryWatcher(path)
    assert watcher.poll() == registry(2)
    path.write_text("{broken")
    with pytest.raises(RegistryError):
        watcher.poll()
    assert watcher.poll() is None  # reported already; the caller keeps serving the old registry
    path.write_text(json.dumps(registry(3).to_json()))
    assert watcher.poll() == registry(3)


def test_watcher_force_rereads_same_stat(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(registry(2).to_json()))
    watcher = RegistryWatcher(path)
    watcher.poll()
    stat = path.stat()
    data = json.dumps(registry(2).to_json()).replace("a0/", "b0/")  # same size
    path.write_text(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert watcher.poll() is None
    assert watcher.poll(force=True).adapters["ns-0/adapter-0"].uri == "s3://adapters/team/b0/"
