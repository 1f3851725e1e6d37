"""The operator's pure pieces, without Kubernetes: spec parsing, manifest rendering, status
conditions, admission rules and the coalescing registry writer."""

from __future__ import annotations

import asyncio
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.engine.adapter_format import DEFAULT_MAX_BYTES, AdapterError
from lorafleet.engine.cli import build_parser
from lorafleet.engine.registry import Registry, RegistryEntry
from lorafleet.engine.s3 import make_s3_client
from lorafleet.operator import conditions
from lorafleet.operator.conditions import Condition
from lorafleet.operator.registry_writer import RegistryWriter, WriterSettings
from lorafleet.operator.render import (
    MAX_REGISTRY_SHARDS,
    render_children,
    render_deployment,
    render_registry_configmaps,
)
from lorafleet.operator.spec import (
    SpecError,
    parse_adapter,
    parse_basemodel,
    parse_quantity,
    selector_matches,
)
from lorafleet.operator.validation import check_against_basemodel

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = {
    crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for crd in (yaml.safe_load(p.read_text()) for p in (ROOT / "crds").glob("*.yaml"))
}


def with_crd_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server stores: `value` with the schema's defaults filled in (structural defaulting)."""
    if isinstance(value, dict):
        out = dict(value)
        for name, sub in (schema.get("properties") or {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = with_crd_defaults(sub, out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_crd_defaults(schema["items"], v) for v in value]
    return value


def bm_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": "smol", "namespace": "models", "uid": "u-1", "generation": 1},
        "spec": spec,
    }


def adapter_body(namespace: str = "models", **spec: Any) -> dict[str, Any]:
    spec = {"baseModel": {"name": "smol"}, "source": {"uri": "s3://b/a"}} | spec
    return {"kind": "LoRAAdapter", "metadata": {"name": "a", "namespace": namespace}, "spec": spec}


# -- spec ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"model": {"source": "s3", "uri": "s3://b/models/smol/"}, "s3": {"region": "eu-west-1"}},
        {"apiKeysSecret": {"name": "engine-keys"}},
    ],
)
def test_basemodel_defaults_equal_the_crds(spec):
    body = bm_body(**spec)
    assert parse_basemodel(body) == parse_basemodel(with_crd_defaults(SCHEMAS["BaseModel"], body))


def test_adapter_defaults_equal_the_crds():
    body = adapter_body()
    assert parse_adapter(body) == parse_adapter(with_crd_defaults(SCHEMAS["LoRAAdapter"], body))
    assert parse_adapter(body).id == "models/a" and parse_adapter(body).uri == "s3://b/a/"


@pytest.mark.parametrize(
    "spec, reason, words",
    [
        ({"model": {"source": "s3"}}, "ModelURIMissing", "spec.model.uri is required"),
        (
            {"model": {"source": "pvc", "pvc": {"claimName": "c"}}},
            "PVCSourceIncomplete",
            "architecture are required",
        ),
        ({"model": {"source": "hf"}}, "UnknownModelSource", "builtin, s3 or pvc"),
        ({"adapterCache": {"cpuBytes": "lots"}}, "InvalidQuantity", "spec.adapterCache.cpuBytes"),
        ({"quantization": "gptq"}, "UnsupportedQuantization", "none, int8 or int4"),
        ({"dtype": "float8"}, "UnsupportedDtype", "float32, bfloat16, float16"),
        ({"replicas": "many"}, "InvalidSpec", "cannot read the BaseModel spec"),
    ],
)
def test_invalid_basemodel_specs_say_what_to_fix(spec, reason, words):
    with pytest.raises(SpecError, match=words) as e:
        parse_basemodel(bm_body(**spec))
    assert e.value.reason == reason


@pytest.mark.parametrize("name", ["llama-3.1-8b", "8b-chat", "chat-", "x" * 64])
def test_a_basemodel_name_that_cannot_name_a_service_is_a_spec_error(name):
    """Object names may hold dots or start with a digit; a Service's may not, and the Service is
    named after the BaseModel. The CRD's CEL rule refuses these names where the API server runs it."""
    body = bm_body()
    body["metadata"]["name"] = name
    with pytest.raises(SpecError, match="DNS-1035") as e:
        parse_basemodel(body)
    assert e.value.reason == "InvalidName"
    rule = SCHEMAS["BaseModel"]["x-kubernetes-validations"][0]["rule"]
    pattern = re.search(r"matches\('(.+)'\)", rule).group(1)  # type: ignore[union-attr]
    assert "size(self.metadata.name) <= 63" in rule
    assert len(name) > 63 or not re.fullmatch(pattern, name)
    assert re.fullmatch(pattern, "smollm2-135m") and parse_basemodel(bm_body()).name == "smol"


def test_a_spec_error_puts_its_reason_on_every_condition():
    error = SpecError("ModelURIMissing", "spec.model.uri is required")
    phase, conds = conditions.basemodel_conditions(1, None, error)
    assert phase == "Degraded"
    assert {(c.type, c.status, c.reason) for c in conds} == {
        ("Ready", False, "ModelURIMissing"),
        ("Progressing", False, "ModelURIMissing"),
        ("Degraded", True, "ModelURIMissing"),
    }


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantization_reaches_the_engine(quantization):
    bm = parse_basemodel(bm_body(quantization=quantization, dtype="float16"))
    container = render_deployment(bm)["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])  # the engine's own parser: exits if unknown
    assert (args.quantization, args.dtype) == (quantization, "float16")
    unquantized = render_deployment(parse_basemodel(bm_body()))["spec"]["template"]["spec"]
    assert build_parser().parse_args(unquantized["containers"][0]["args"]).quantization is None


@pytest.mark.parametrize("text, value", [("2Gi", 2 << 30), ("500M", 500_000_000), ("1.5Ki", 1536), (7, 7)])
def test_parse_quantity(text, value):
    assert parse_quantity(text, "x") == value


@pytest.mark.parametrize(
    "namespace, uri, allowed",
    [
        ("team-a", "s3://adapters/team-a/support/v1", True),
        ("team-a", "s3://adapters/team-a/", True),
        ("team-a", "s3://adapters/team-b/support/v1", False),  # another tenant's adapter
        ("team-a", "s3://adapters/team-ab/x", False),  # a prefix of the name is not the folder
        ("team-a", "s3://adapters/team-a/../team-b/support", False),  # normalized away by some stores
        ("team-a", "s3://adapters/team-a//x", False),
        ("team-a", "s3://other-bucket/team-a/x", False),
    ],
)
def test_adapter_uri_prefix_keeps_each_namespace_in_its_own_folder(namespace, uri, allowed):
    """Engines read every adapter with the BaseModel's credentials; the prefix is what stops a
    tenant from publishing another tenant's weights under its own name."""
    bm = parse_basemodel(bm_body(adapterURIPrefix="s3://adapters/{namespace}", adapterNamespaceSelector={}))
    adapter = parse_adapter(adapter_body(namespace, source={"uri": uri}))
    if allowed:
        check_against_basemodel(adapter, bm, {})
    else:
        with pytest.raises(AdapterError, match="only from under s3://adapters/team-a/") as e:
            check_against_basemodel(adapter, bm, {})
        assert e.value.reason == "SourceNotAllowed"
    check_against_basemodel(adapter, parse_basemodel(bm_body(adapterNamespaceSelector={})), {})  # no policy


def test_only_admitted_namespaces_the_admin_chose_may_pin():
    from lorafleet.operator.validation import pinning_allowed

    own, foreign = parse_adapter(adapter_body()), parse_adapter(adapter_body("team-a"))
    shared = parse_basemodel(bm_body(adapterNamespaceSelector={}))
    assert pinning_allowed(own, shared, None) and not pinning_allowed(foreign, shared, {"team": "a"})
    pins = parse_basemodel(
        bm_body(adapterNamespaceSelector={}, pinningNamespaceSelector={"matchLabels": {"team": "a"}})
    )
    assert pinning_allowed(foreign, pins, {"team": "a"}) and not pinning_allowed(foreign, pins, {"team": "b"})


@pytest.mark.parametrize(
    "selector, labels, matches",
    [
        ({}, {}, True),
        ({"matchLabels": {"team": "x"}}, {"team": "x", "env": "prod"}, True),
        ({"matchLabels": {"team": "x"}}, {"team": "y"}, False),
        (
            {"matchExpressions": [{"key": "team", "operator": "In", "values": ["x", "y"]}]},
            {"team": "y"},
            True,
        ),
        ({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["x"]}]}, {}, True),
        ({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}, {"team": "x"}, False),
    ],
)
def test_selector_matches(selector, labels, matches):
    assert selector_matches(selector, labels) is matches


def test_namespace_admission():
    bm = parse_basemodel(bm_body())
    check_against_basemodel(parse_adapter(adapter_body()), bm, None)  # same namespace: always
    foreign = parse_adapter(
        adapter_body(namespace="tenant", baseModel={"name": "smol", "namespace": "models"})
    )
    with pytest.raises(AdapterError) as e:
        check_against_basemodel(foreign, bm, {"team": "x"})  # no selector: own namespace only
    assert e.value.reason == "NamespaceNotAllowed"
    open_bm = parse_basemodel(bm_body(adapterNamespaceSelector={"matchLabels": {"team": "x"}}))
    check_against_basemodel(foreign, open_bm, {"team": "x"})
    with pytest.raises(AdapterError):
        check_against_basemodel(foreign, open_bm, {"team": "y"})


# -- rendering -------------------------------------------------------------------------------------

S3_SPEC = {
    "model": {"source": "s3", "uri": "s3://models/smol/"},
    "s3": {"endpointUrl": "http://s3.local:8333", "credentialsSecret": {"name": "s3"}},
    "resources": {"gpus": 1, "memory": "16Gi"},
    "nodeSelector": {"gpu": "a10"},
    "tolerations": [{"key": "gpu", "operator": "Exists"}],
    "adapterCache": {"gpuSlots": 4, "cpuBytes": "1Gi", "diskBytes": "20Gi"},
    "extraArgs": ["--max-num-seqs", "64"],
}


def test_deployment_runs_the_engine_with_flags_it_accepts():
    container = render_deployment(parse_basemodel(bm_body(**S3_SPEC)))["spec"]["template"]["spec"][
        "containers"
    ][0]
    args = build_parser().parse_args(container["args"])  # exits on an unknown flag
    assert (args.command, args.model, args.served_model_name) == ("engine", "s3://models/smol/", "smol")
    assert (args.max_loras, args.adapter_cpu_mib, args.adapter_disk_mib) == (4, 1024, 20 * 1024)
    assert args.max_num_seqs == 64 and args.registry == "/etc/lorafleet/registry"
    # Adapters are checked against the name the operator validated them with, not the directory's.
    assert args.base_model_name == parse_basemodel(bm_body(**S3_SPEC)).model_name == "smol"


def test_deployment_pod():
    deployment = render_deployment(parse_basemodel(bm_body(**S3_SPEC)))
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (pod["nodeSelector"], pod["tolerations"]) == (S3_SPEC["nodeSelector"], S3_SPEC["tolerations"])
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3",
        "key": "AWS_ACCESS_KEY_ID",
        "optional": False,
    }
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://s3.local:8333"
    args = build_parser().parse_args(container["args"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    shards = volumes["registry"]["projected"]["sources"]
    assert len(shards) == MAX_REGISTRY_SHARDS and not shards[0]["configMap"]["optional"]
    # The engine's budget, plus room for two downloads staged before it evicts (over the limit,
    # the kubelet evicts the pod).
    assert args.adapter_disk_mib << 20 == 20 << 30
    assert volumes["adapter-cache"]["emptyDir"]["sizeLimit"] == str((20 << 30) + 2 * DEFAULT_MAX_BYTES)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["adapter-cache"] in container["args"]


def test_pvc_model_and_cache_volumes():
    bm = parse_basemodel(
        bm_body(
            model={
                "source": "pvc",
                "pvc": {"claimName": "weights", "path": "/smol"},
                "architecture": {
                    "hiddenSize": 64,
                    "intermediateSize": 128,
                    "numHeads": 4,
                    "numKvHeads": 2,
                    "headDim": 16,
                    "numLayers": 2,
                },
            },
            adapterCache={"volume": {"claimName": "cache"}},
        )
    )
    pod = render_deployment(bm)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert volumes["adapter-cache"]["persistentVolumeClaim"] == {"claimName": "cache"}
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/smol"
    # A PVC is usually root-owned; the engine (uid 10001) writes the disk tier to it through its group.
    assert pod["securityContext"]["fsGroup"] == 10001 and "model-cache" not in volumes


def test_an_s3_model_is_cached_on_a_volume_that_outlives_container_restarts():
    """Not the container's writable layer: a restarted engine must not download the model again."""
    pod = render_deployment(parse_basemodel(bm_body(**S3_SPEC)))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert {v["name"]: v for v in pod["volumes"]}["model-cache"] == {"name": "model-cache", "emptyDir": {}}
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert f"LORAFLEET_CACHE_DIR={mounts['model-cache']} " in dockerfile  # where the engine downloads it


def test_children_are_owned_and_a_spec_change_rolls_the_pods():
    bm = parse_basemodel(bm_body())
    for child in render_children(bm):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("BaseModel", "u-1", True)
    before = render_deployment(bm)["spec"]["template"]
    after = render_deployment(parse_basemodel(bm_body(dtype="float16")))["spec"]["template"]
    assert before != after


def test_registry_configmaps_are_named_by_shard_and_bounded():
    bm = parse_basemodel(bm_body())
    cms = render_registry_configmaps(bm, {"registry-001.json.gz": b"b", "registry-000.json.gz": b"a"})
    assert [cm["metadata"]["name"] for cm in cms] == ["smol-registry", "smol-registry-001"]
    with pytest.raises(ValueError, match="shards"):
        render_registry_configmaps(
            bm, {f"registry-{i:03d}.json.gz": b"" for i in range(MAX_REGISTRY_SHARDS + 1)}
        )


# -- conditions ------------------------------------------------------------------------------------


def deployment(replicas: int, ready: int, updated: int, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": replicas},
        "status": {"readyReplicas": ready, "updatedReplicas": updated, "observedGeneration": 1, **status},
    }


@pytest.mark.parametrize(
    "dep, phase, ready",
    [
        (None, "Pending", "DeploymentMissing"),
        (deployment(2, 0, 0), "Progressing", "NoReplicasReady"),
        (deployment(2, 1, 2), "Progressing", "ReplicasReady"),
        (deployment(2, 2, 2), "Ready", "ReplicasReady"),
        (deployment(0, 0, 0), "Ready", "ScaledToZero"),
        (
            deployment(
                2, 0, 2, conditions=[{"type": "ReplicaFailure", "status": "True", "message": "quota"}]
            ),
            "Degraded",
            "NoReplicasReady",
        ),
    ],
)
def test_basemodel_phase_follows_the_deployment(dep, phase, ready):
    got_phase, conds = conditions.basemodel_conditions(1, dep)
    assert got_phase == phase
    assert {c.type: c.reason for c in conds}["Ready"] == ready
    assert [c.type for c in conds] == ["Ready", "Progressing", "Degraded"]


def test_transition_time_changes_only_with_the_status():
    first = conditions.merge_conditions(None, [Condition("Ready", False, "NoReplicasReady")], "t1")
    same = conditions.merge_conditions(first, [Condition("Ready", False, "Other")], "t2")
    flipped = conditions.merge_conditions(same, [Condition("Ready", True, "ReplicasReady")], "t3")
    assert [c["lastTransitionTime"] for c in (*first, *same, *flipped)] == ["t1", "t1", "t3"]


# -- registry writer -------------------------------------------------------------------------------


def entry(i: int) -> RegistryEntry:
    return RegistryEntry(f"s3://b/a{i}/", f"v{i}", 4, 100)


class FakeConfigMaps:
    """The registry writer's two callables, recording every publish; fails the first `failures`."""

    def __init__(self, published: Registry | None = None, failures: int = 0) -> None:
        self.published, self.failures, self.writes = published, failures, 0

    async def load(self, key: Any) -> Registry | None:
        return self.published

    async def flush(self, key: Any, registry: Registry) -> int:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("API server unavailable")
        self.published, self.writes = registry, self.writes + 1
        return 1


FAST = WriterSettings(debounce_s=0.01, max_delay_s=0.2, min_interval_s=0.02, retry_s=0.01)


async def test_a_burst_of_publishes_is_one_write():
    cms = FakeConfigMaps()
    writer = RegistryWriter(cms.load, cms.flush, FAST)
    key = ("models", "smol")
    await asyncio.gather(*(writer.put(key, f"models/a{i}", entry(i), base_model="smol") for i in range(200)))
    assert cms.published is not None and len(cms.published.adapters) == 200
    assert cms.writes <= 2  # every put returned only once published; a straggler may need a second write
    await writer.remove(key, "models/a0")
    await writer.put(key, "models/a1", entry(1), base_model="smol")  # unchanged: no write
    assert "models/a0" not in cms.published.adapters and cms.writes <= 3
    await writer.close()


async def test_a_trickle_of_publishes_is_rate_limited():
    cms = FakeConfigMaps()
    # Changes 30 ms apart, slower than the 10 ms debounce: without a minimum interval between
    # writes each would be a write of its own.
    writer = RegistryWriter(cms.load, cms.flush, WriterSettings(debounce_s=0.01, min_interval_s=0.2))
    key = ("models", "smol")

    async def put_later(i: int) -> None:
        await asyncio.sleep(0.03 * i)  # the arrival schedule, not a synchronization
        await writer.put(key, f"models/a{i}", entry(i), base_model="smol")

    await asyncio.gather(*(put_later(i) for i in range(10)))
    assert cms.published is not None and len(cms.published.adapters) == 10
    assert 1 <= cms.writes <= 4  # 0.3 s of arrivals, one write per 0.2 s at most (plus the last)
    await writer.close()


async def test_a_restarted_writer_keeps_what_was_published_and_retries_failures():
    cms = FakeConfigMaps(Registry("smol", {"models/old": entry(0)}), failures=2)
    writer = RegistryWriter(cms.load, cms.flush, FAST)
    key = ("models", "smol")
    for _ in range(2):
        with pytest.raises(ConnectionError):  # the caller hears of the failure (kopf retries it) ...
            await writer.put(key, "models/new", entry(1), base_model="smol")
    await writer.put(key, "models/new", entry(1), base_model="smol")  # ... and the writer kept trying
    assert set(cms.published.adapters) == {"models/old", "models/new"}
    assert await writer.retain(key, lambda: {"models/new"}) == ["models/old"]
    assert set(cms.published.adapters) == {"models/new"}
    await writer.close()


async def test_retain_compares_with_the_adapters_that_exist_when_it_runs():
    """The periodic sweep must not drop an adapter created and published while it was waiting
    (for the API server, or here for the registry's first load): it asks who exists only when
    it compares. Dropped, the adapter would stay Ready but unserved until its revalidation."""
    cms = FakeConfigMaps()
    loaded = asyncio.Event()

    async def slow_load(key):
        await loaded.wait()
        return await cms.load(key)

    writer = RegistryWriter(slow_load, cms.flush, FAST)
    key, live = ("models", "smol"), {"models/old"}
    put = asyncio.create_task(writer.put(key, "models/new", entry(1), base_model="smol"))
    retain = asyncio.create_task(writer.retain(key, lambda: set(live)))
    await asyncio.sleep(0.01)  # both wait for the load
    live.add("models/new")  # the adapter appears in the index, then its handler publishes it
    loaded.set()
    await put
    assert await retain == []
    assert set(cms.published.adapters) == {"models/new"}
    await writer.close()


@pytest.mark.parametrize(
    "namespaces, exact",
    [
        ((), False),
        (("models",), True),
        (("models", "tenant-a"), True),
        (("tenant-*",), False),
        (("!kube-system",), False),
    ],
)
def test_only_named_namespaces_turn_kopf_scanning_off(namespaces, exact):
    from lorafleet.operator.config import OperatorConfig

    assert OperatorConfig(namespaces=namespaces).exact_namespaces is exact


def test_s3_region_reaches_boto3_in_the_engine(monkeypatch):
    """botocore reads AWS_DEFAULT_REGION, not AWS_REGION; the engine builds its client from the env."""
    bm = parse_basemodel(bm_body(**S3_SPEC | {"s3": {"region": "eu-west-1"}}))
    env = {e["name"]: e["value"] for e in render_deployment(bm)["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e}  # fmt: skip
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    assert make_s3_client(None, None).meta.region_name == "eu-west-1"


SMOL_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
               "num_key_value_heads": 3, "num_hidden_layers": 30, "head_dim": 64}  # fmt: skip


async def test_base_spec_reads_config_once_but_follows_the_basemodels_spec(monkeypatch):
    """config.json is cached per model; maxLoraRank and the model name come from the BaseModel as
    it is now, so lowering the rank takes effect without an operator restart."""
    from lorafleet.operator import handlers
    from lorafleet.operator.config import OperatorConfig

    reads: list[str] = []
    monkeypatch.setattr(handlers, "read_hf_config", lambda client, uri: reads.append(uri) or SMOL_CONFIG)
    op = handlers.Operator(OperatorConfig(), kube=None)  # type: ignore[arg-type]  # no Secret to read

    def bm(rank: int, name: str) -> Any:
        return parse_basemodel(
            bm_body(model={"source": "s3", "uri": "s3://m/smol/", "name": name}, maxLoraRank=rank)
        )

    first, second = await op.base_spec(bm(64, "org/smol")), await op.base_spec(bm(8, "org/smol-v2"))
    assert (first.max_rank, first.name, second.max_rank, second.name) == (64, "org/smol", 8, "org/smol-v2")
    assert reads == ["s3://m/smol/"]


async def test_a_session_token_in_the_credentials_secret_is_used():
    """Temporary (STS) credentials: the engines use AWS_SESSION_TOKEN, so validation must too."""
    import base64

    from lorafleet.operator import handlers
    from lorafleet.operator.config import OperatorConfig

    values = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"}

    class Secrets:
        async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
            return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}}

    op = handlers.Operator(OperatorConfig(), Secrets())  # type: ignore[arg-type]
    client = await op.s3_client("http://127.0.0.1:1", "us-east-1", "tenant", "s3")
    creds = client._request_signer._credentials  # type: ignore[attr-defined]  # what requests are signed with
    assert (creds.access_key, creds.secret_key, creds.token) == ("AKIA", "secret", "token")


async def test_the_api_client_signs_in_again_when_its_token_expires():
    """Exec-plugin and rotated service-account tokens expire: a 401 gets new credentials, once."""
    import kopf
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from lorafleet.operator.kube import KubeClient

    seen: list[str] = []

    async def configmap(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != "Bearer fresh":
            return web.json_response({"reason": "Unauthorized"}, status=401)
        return web.json_response({"kind": "ConfigMap", "metadata": {"name": "x"}})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/configmaps/x", configmap)
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url("")).rstrip("/")
        logins: list[str] = []

        def relogin() -> kopf.ConnectionInfo:
            logins.append("fresh")
            return kopf.ConnectionInfo(server=url, token="fresh")

        client = KubeClient(kopf.ConnectionInfo(server=url, token="expired"), relogin=relogin)
        try:
            # Requests that meet the 401 together sign in again once (exec plugins are slow).
            both = await asyncio.gather(*(client.get("ConfigMap", "ns", "x") for _ in range(2)))
            assert [o["metadata"]["name"] for o in both] == ["x", "x"]  # type: ignore[index]
            assert (await client.get("ConfigMap", "ns", "x"))["metadata"]["name"] == "x"  # type: ignore[index]
        finally:
            await client.close()
    assert logins == ["fresh"]
    assert seen == ["Bearer expired"] * 2 + ["Bearer fresh"] * 3


def test_api_keys_pull_secrets_and_service_account_reach_the_engine_pods(tmp_path):
    """Engine authentication (namespace-scoped keys) is switched on through the BaseModel: the
    Secret is mounted where the flag points, in the format the engine parses."""
    from lorafleet.engine.auth import ApiKeys

    spec = {"apiKeysSecret": {"name": "engine-keys"}, "imagePullSecrets": [{"name": "registry"}],
            "serviceAccountName": "lorafleet-engine"}  # fmt: skip
    bm = parse_basemodel(with_crd_defaults(SCHEMAS["BaseModel"], bm_body(**spec)))
    pod = render_deployment(bm)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])
    volume = {v["name"]: v for v in pod["volumes"]}["api-keys"]["secret"]
    assert volume == {"secretName": "engine-keys", "items": [{"key": "api-keys", "path": "keys"}]}
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["api-keys"]
    assert str(args.api_keys_file) == f"{mount}/keys"
    (tmp_path / "keys").write_text("tenant-a-key-0123456789 team-a\n")  # what the Secret would hold
    assert ApiKeys.parse((tmp_path / "keys").read_text(), "keys").enabled
    assert (
        pod["imagePullSecrets"] == [{"name": "registry"}] and pod["serviceAccountName"] == "lorafleet-engine"
    )
    plain = render_deployment(parse_basemodel(bm_body()))["spec"]["template"]["spec"]
    assert (
        "imagePullSecrets" not in plain
        and build_parser().parse_args(plain["containers"][0]["args"]).api_keys_file is None
    )
