"""resolve_model: local directories, S3 prefixes against a real S3 server, and the built-in model."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.exceptions import EndpointConnectionError
from botocore.response import StreamingBody
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.engine.model_source import (
    BUILTIN_DIR_NAME,
    ModelSourceError,
    builtin_gguf_path,
    default_cache_dir,
    resolve_model,
)
from lorafleet.engine.s3 import MANIFEST_NAME, S3Client, S3SourceError, parse_s3_uri, safe_name
from lorafleet.engine.weed import WeedS3

PREFIX = "models/tiny"


def model_files(weights: torch.Tensor | None = None) -> dict[str, bytes]:
    """A small Hugging Face-shaped directory; the weights are real safetensors bytes."""
    weights = torch.arange(2000, dtype=torch.float32) if weights is None else weights
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "model.safetensors": save_safetensors({"w": weights}),
    }


def write_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def upload(client: S3Client, bucket: str, files: dict[str, bytes], prefix: str = PREFIX) -> str:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{bucket}/{prefix}"


def record_downloads(client: S3Client) -> list[str]:
    """The keys of every GetObject the client sends from now on."""
    keys: list[str] = []

    def remember(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        keys.append(params["Key"])
        context["test_key"] = params["Key"]  # lets after-call hooks know which object they see

    client.meta.events.register("before-parameter-build.s3.GetObject", remember)
    return keys


def tamper_downloads(client: S3Client, key: str, change: Callable[[bytes], bytes]) -> None:
    """Alter the bytes the client receives for `key`, as a faulty network path or disk would.

    The S3 server and the response headers stay honest; only the body the client reads changes.
    """

    def corrupt(parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if context.get("test_key") == key and "Body" in parsed:
            data = change(parsed["Body"].read())
            parsed["Body"] = StreamingBody(io.BytesIO(data), len(data))

    client.meta.events.register("after-call.s3.GetObject", corrupt)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def leftovers(dest: Path) -> list[str]:
    """Anything but the lock file next to `dest`: temp directories would mean a leak."""
    return sorted(p.name for p in dest.parent.iterdir() if p != dest and not p.name.endswith(".lock"))


# --- local directories -------------------------------------------------------------------


def test_local_directory_is_returned_as_is(tmp_path: Path) -> None:
    model = write_dir(tmp_path / "m", model_files())
    assert resolve_model(str(model), tmp_path / "cache") == model
    assert not (tmp_path / "cache").exists()  # nothing copied


def test_local_directory_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    model = write_dir(tmp_path / "m", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x02"})
    with pytest.raises(ModelSourceError, match=r"pickle weights \(pytorch_model\.bin\)"):
        resolve_model(str(model), tmp_path / "cache")


def test_local_directory_with_safetensors_may_also_hold_pickles(tmp_path: Path) -> None:
    model = write_dir(tmp_path / "m", {**model_files(), "training_args.bin": b"\x80\x02"})
    assert resolve_model(str(model), tmp_path / "cache") == model


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"model.safetensors": b""}, "no config.json"),
        ({"config.json": b"{}", "tokenizer.json": b"{}"}, r"no \*\.safetensors"),
    ],
)
def test_incomplete_local_directory_is_refused(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    model = write_dir(tmp_path / "m", files)
    with pytest.raises(ModelSourceError, match=message):
        resolve_model(str(model), tmp_path / "cache")


def test_unknown_spec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="not a directory, an s3://bucket/prefix URI"):
        resolve_model(str(tmp_path / "missing"), tmp_path / "cache")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LORAFLEET_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "lorafleet"


# --- S3 names ----------------------------------------------------------------------------


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_uri("s3://my.bucket-1") == ("my.bucket-1", "")


@pytest.mark.parametrize(
    "uri", ["bucket/a", "https://bucket/a", "s3://", "s3:///a", "s3://Bucket/a", "s3://ab/x"]
)
def test_bad_s3_uri_is_refused(uri: str) -> None:
    with pytest.raises(ValueError, match=r"URI|bucket name"):
        parse_s3_uri(uri)


@pytest.mark.parametrize(
    "key",
    ["m/../x", "m/a/../../x", "m//etc/passwd", "m/./x", "m/a\\..\\x", "m/", f"m/{MANIFEST_NAME}", "n/x"],
)
def test_keys_that_could_escape_are_refused(key: str) -> None:
    with pytest.raises(S3SourceError, match="refusing object key"):
        safe_name(key, "m/")


def test_nested_keys_keep_their_relative_path() -> None:
    assert safe_name("m/sub/dir/f.json", "m/") == "sub/dir/f.json"


# --- S3 prefixes, against a real S3 server -----------------------------------------------


def test_s3_model_is_downloaded_verified_and_reused(s3_bucket: tuple[S3Client, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    files = model_files()
    uri = upload(client, bucket, files)
    downloads = record_downloads(client)

    path = resolve_model(uri, tmp_path, s3_client=client, progress=False)

    assert path.is_relative_to(tmp_path / "models" / "s3" / bucket)
    assert {name: (path / name).read_bytes() for name in files} == files
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert sorted(manifest) == sorted(files)
    assert manifest["config.json"]["size"] == len(files["config.json"])
    assert sorted(downloads) == sorted(f"{PREFIX}/{name}" for name in files)
    inode = (path / "model.safetensors").stat().st_ino

    assert resolve_model(uri + "/", tmp_path, s3_client=client, progress=False) == path
    assert len(downloads) == len(files)  # nothing downloaded the second time
    assert (path / "model.safetensors").stat().st_ino == inode
    assert leftovers(path) == []


def test_republished_object_is_downloaded_again(s3_bucket: tuple[S3Client, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    uri = upload(client, bucket, model_files())
    path = resolve_model(uri, tmp_path, s3_client=client, progress=False)
    downloads = record_downloads(client)

    new_weights = model_files(torch.ones(10))["model.safetensors"]
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/model.safetensors", Body=new_weights)

    assert resolve_model(uri, tmp_path, s3_client=client, progress=False) == path
    assert downloads == [f"{PREFIX}/model.safetensors"]  # unchanged files are reused
    assert (path / "model.safetensors").read_bytes() == new_weights
    assert (path / "config.json").read_bytes() == model_files()["config.json"]


def test_locally_damaged_cache_is_repaired(s3_bucket: tuple[S3Client, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    uri = upload(client, bucket, model_files())
    path = resolve_model(uri, tmp_path, s3_client=client, progress=False)
    (path / "tokenizer.json").write_bytes(b"truncated")
    downloads = record_downloads(client)

    resolve_model(uri, tmp_path, s3_client=client, progress=False)

    assert downloads == [f"{PREFIX}/tokenizer.json"]
    assert (path / "tokenizer.json").read_bytes() == model_files()["tokenizer.json"]


def test_corrupted_download_is_refused_and_not_cached(
    s3_bucket: tuple[S3Client, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    uri = upload(client, bucket, model_files())
    record_downloads(client)
    tamper_downloads(client, f"{PREFIX}/model.safetensors", flip_last_byte)
    dest_parent = tmp_path / "models" / "s3" / bucket

    with pytest.raises(ModelSourceError, match="does not match ETag"):
        resolve_model(uri, tmp_path, s3_client=client, progress=False)

    assert [p.name for p in dest_parent.iterdir() if not p.name.endswith(".lock")] == []


def test_failed_update_keeps_the_verified_copy(s3_bucket: tuple[S3Client, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    uri = upload(client, bucket, model_files())
    path = resolve_model(uri, tmp_path, s3_client=client, progress=False)
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/model.safetensors", Body=b"new weights")
    record_downloads(client)
    tamper_downloads(client, f"{PREFIX}/model.safetensors", flip_last_byte)

    with pytest.raises(ModelSourceError, match="does not match ETag"):
        resolve_model(uri, tmp_path, s3_client=client, progress=False)

    assert (path / "model.safetensors").read_bytes() == model_files()["model.safetensors"]
    assert leftovers(path) == []


def test_multipart_object_is_checked_by_size(
    weed: WeedS3, s3_bucket: tuple[S3Client, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    files = model_files()
    uri = upload(client, bucket, {k: v for k, v in files.items() if k != "model.safetensors"})
    key = f"{PREFIX}/model.safetensors"
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    part = client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=files["model.safetensors"]
    )
    client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    assert "-" in client.head_object(Bucket=bucket, Key=key)["ETag"]  # not an MD5: size is all we can check
    record_downloads(client)
    tamper_downloads(client, key, lambda data: data[:-1])

    with pytest.raises(ModelSourceError, match="bytes, the listing says"):
        resolve_model(uri, tmp_path, s3_client=client, progress=False)

    path = resolve_model(uri, tmp_path, s3_client=weed.client(), progress=False)  # an honest path
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_object_changed_during_download_is_refused(
    weed: WeedS3, s3_bucket: tuple[S3Client, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    uri = upload(client, bucket, model_files())
    publisher = weed.client()

    def republish_once(params: dict[str, Any], **_: Any) -> None:
        if params["Key"].endswith("model.safetensors") and not republished:
            republished.append(True)
            publisher.put_object(Bucket=bucket, Key=params["Key"], Body=b"version 2")

    republished: list[bool] = []
    client.meta.events.register("before-parameter-build.s3.GetObject", republish_once)

    with pytest.raises(ModelSourceError, match=r"PreconditionFailed|changed while downloading"):
        resolve_model(uri, tmp_path, s3_client=client, progress=False)
    assert [
        p.name for p in (tmp_path / "models" / "s3" / bucket).iterdir() if not p.name.endswith(".lock")
    ] == []

    path = resolve_model(uri, tmp_path, s3_client=client, progress=False)  # the next try sees version 2
    assert (path / "model.safetensors").read_bytes() == b"version 2"


def test_traversal_key_in_listing_is_refused_before_any_download(
    s3_bucket: tuple[S3Client, str], tmp_path: Path
) -> None:
    # SeaweedFS refuses to store such keys, but AWS S3 stores them: inject one into the listing.
    client, bucket = s3_bucket
    uri = upload(client, bucket, model_files())

    def add_hostile_key(parsed: dict[str, Any], **_: Any) -> None:
        parsed.setdefault("Contents", []).append(
            {"Key": f"{PREFIX}/../../evil.json", "Size": 2, "ETag": '"x"'}
        )

    client.meta.events.register("after-call.s3.ListObjectsV2", add_hostile_key)
    downloads = record_downloads(client)

    with pytest.raises(ModelSourceError, match="refusing object key"):
        resolve_model(uri, tmp_path, s3_client=client, progress=False)
    assert downloads == []
    assert not any(p.name == "evil.json" for p in tmp_path.rglob("*"))


def test_s3_pickle_only_model_is_refused(s3_bucket: tuple[S3Client, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    uri = upload(client, bucket, {"config.json": b"{}", "pytorch_model.bin": b"\x80\x02"})
    downloads = record_downloads(client)
    with pytest.raises(ModelSourceError, match=r"pytorch_model\.bin"):
        resolve_model(uri, tmp_path, s3_client=client, progress=False)
    assert downloads == []


def test_s3_pickles_beside_safetensors_are_not_downloaded(
    s3_bucket: tuple[S3Client, str], tmp_path: Path
) -> None:
    client, bucket = s3_bucket
    uri = upload(client, bucket, {**model_files(), "training_args.bin": b"\x80\x02"})
    path = resolve_model(uri, tmp_path, s3_client=client, progress=False)
    assert not (path / "training_args.bin").exists()
    assert (path / "model.safetensors").exists()


def test_missing_bucket_or_prefix_is_a_clear_error(s3_bucket: tuple[S3Client, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    with pytest.raises(ModelSourceError, match="NoSuchBucket"):
        resolve_model("s3://no-such-bucket-here/m", tmp_path, s3_client=client, progress=False)
    with pytest.raises(ModelSourceError, match="no objects under"):
        resolve_model(f"s3://{bucket}/nothing-here", tmp_path, s3_client=client, progress=False)


def test_concurrent_resolves_download_once(s3_bucket: tuple[S3Client, str], tmp_path: Path) -> None:
    client, bucket = s3_bucket
    files = model_files()
    uri = upload(client, bucket, files)
    downloads = record_downloads(client)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(resolve_model(uri, tmp_path, s3_client=client, progress=False))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(downloads) == len(files)


def test_progress_is_shown_in_bytes(
    s3_bucket: tuple[S3Client, str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    client, bucket = s3_bucket
    files = model_files()
    uri = upload(client, bucket, files)
    resolve_model(uri, tmp_path, s3_client=client, progress=True)
    total_mb = sum(len(v) for v in files.values()) / 1e6
    assert f"/ {total_mb:.1f} MB" in capfd.readouterr().err


def test_s3_outage_fails_loudly_and_the_cache_survives(private_weed: WeedS3, tmp_path: Path) -> None:
    client = private_weed.client(max_attempts=1, connect_timeout_s=1)
    client.create_bucket(Bucket="models")
    files = model_files()
    uri = upload(client, "models", files)
    path = resolve_model(uri, tmp_path, s3_client=client, progress=False)

    private_weed.stop()
    with pytest.raises(EndpointConnectionError):
        resolve_model(uri, tmp_path, s3_client=client, progress=False)
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]

    private_weed.start()
    downloads = record_downloads(client)
    assert resolve_model(uri, tmp_path, s3_client=client, progress=False) == path
    assert downloads == []


# --- the built-in model --------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$LORAFLEET_CACHE_DIR when set (the Makefile sets it), so the conversion runs once across runs."""
    configured = os.environ.get("LORAFLEET_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_builtin_model_converts_once_and_matches_the_gguf(model_cache: Path) -> None:
    path = resolve_model(None, model_cache, progress=False)
    assert path == model_cache / "models" / BUILTIN_DIR_NAME
    assert resolve_model("builtin", model_cache) == path
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "quantization_config" not in json.loads((path / "config.json").read_text())

    gguf = builtin_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")[
        "input_ids"
    ]
    reference_ids = reference_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    assert torch.equal(ids, reference_ids)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        reference_out = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, reference_out)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
