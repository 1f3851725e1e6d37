"""docs/tenant.md, step by step, with its example scripts (examples/tenant/) on loopback.

Train a PEFT adapter of a tiny model, upload it to a real S3 server (`weed mini`), check the
LoRAAdapter manifest against the CRD and the uploaded files with the operator's own validation,
then serve it with a real `lorafleet engine` process and call it with the OpenAI client. Only the
cluster is missing: the registry entry the operator would write is written here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import jsonschema
import openai
import pytest
import yaml

from lorafleet.engine.adapter_format import BaseModelSpec
from lorafleet.engine.registry import Registry, RegistryEntry
from lorafleet.operator.validation import validate_in_s3

ROOT = Path(__file__).resolve().parents[1]
TENANT = ROOT / "examples" / "tenant"
DOC = ROOT / "docs" / "tenant.md"
ADAPTER_ID = "team-a/support-bot"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tenant_{name}", TENANT / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_doc_uses_every_example_and_only_existing_ones():
    text = DOC.read_text()
    named = set(re.findall(r"examples/tenant/([\w.-]+)", text))
    present = {p.name for p in TENANT.iterdir() if p.is_file()}
    assert named == present, f"only in the doc: {named - present}; never in the doc: {present - named}"


def test_the_manifest_validates_against_the_crd():
    crd = yaml.safe_load((ROOT / "crds" / "loraadapters.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    doc = yaml.safe_load((TENANT / "loraadapter.yaml").read_text())
    assert doc["kind"] == "LoRAAdapter"
    jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(doc)
    # The id the doc tells tenants to call is the manifest's namespace/name.
    assert f"{doc['metadata']['namespace']}/{doc['metadata']['name']}" == ADAPTER_ID
    assert ADAPTER_ID in DOC.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the engine exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"the engine at {url} was not ready within {timeout_s} s")


def test_train_upload_publish_and_call(tiny_llama_dir, weed, s3_bucket, tmp_path, monkeypatch):
    client, bucket = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", weed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", weed.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")

    # 1. Train. (The doc trains on SmolLM2; the tiny model has the same architecture.)
    out = tmp_path / "support-bot"
    losses = load_script("train_adapter").main(
        ["--base", str(tiny_llama_dir), "--base-name", tiny_llama_dir.name, "--data", str(TENANT / "data.jsonl"),
         "--out", str(out), "--rank", "4", "--steps", "18", "--lr", "5e-3"]
    )  # fmt: skip
    assert losses["last_loss"] < losses["first_loss"], "training did not lower the loss"
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not list(out.glob("*.bin"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == tiny_llama_dir.name

    # 2. Upload.
    uri = f"s3://{bucket}/team-a/support-bot/v1/"
    etag = load_script("upload_adapter").main([str(out), uri, "--endpoint-url", weed.endpoint_url])
    assert etag

    # 3. Publish: what the operator checks before the adapter enters the registry. (The engine
    # names a model directory's base model after the directory, as a BaseModel's model.name would.)
    hf_config = json.loads((tiny_llama_dir / "config.json").read_text())
    base = BaseModelSpec.from_hf_config(hf_config, name=tiny_llama_dir.name, max_rank=64)
    checked = validate_in_s3(client, uri, base, 64 << 20)
    assert checked.version == etag and checked.manifest.rank == 4
    m = checked.manifest
    registry = Registry(
        "tiny", {ADAPTER_ID: RegistryEntry(uri, etag, m.rank, m.bytes, False, m.target_modules)}
    )
    registry_path = tmp_path / "registry.json"
    registry_path.write_text(json.dumps(registry.to_json()))

    # 4. Serve it as an engine pod would, and call it.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = subprocess.Popen(
        [str(Path(sys.executable).parent / "lorafleet"), "engine", "--model", str(tiny_llama_dir),
         "--served-model-name", "tiny", "--registry", str(registry_path), "--host", "127.0.0.1",
         "--port", str(port), "--s3-endpoint-url", weed.endpoint_url, "--kv-cache-mib", "16",
         "--adapter-cpu-mib", "64"],
        env=os.environ | {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "engine.log", "w"),  # noqa: SIM115 - closed with the process
    )  # fmt: skip
    try:
        wait_ready(url, engine)
        chat = load_script("chat")
        text = chat.main(["--base-url", f"{url}/v1", "--model", ADAPTER_ID, "--max-tokens", "8",
                          "My order has not arrived."])  # fmt: skip
        assert isinstance(text, str)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none") as client:
            reply = client.chat.completions.create(
                model=ADAPTER_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        assert reply.model == ADAPTER_ID and reply.usage and reply.usage.completion_tokens > 0
        with pytest.raises(openai.NotFoundError):  # the name routes through the registry
            chat.chat(f"{url}/v1", "team-a/not-published", "hello", "none", 4)
    finally:
        engine.terminate()
        try:
            engine.wait(timeout=30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
    assert engine.returncode == 0, (tmp_path / "engine.log").read_text()[-3000:]
