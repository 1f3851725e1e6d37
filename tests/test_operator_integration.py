"""The real operator against kmock's API emulator and a real S3 server (weed mini), on loopback.

Few objects per test (the emulator slows as they pile up); no sleeps, only polling for the
state the operator is expected to reach.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json

import kmock
import pytest

from lorafleet.engine.adapter_format import CONFIG_NAME, SMOLLM2_135M, WEIGHTS_NAME
from lorafleet.engine.registry import Registry
from tests.plugins.kube import Cluster
from tests.test_adapter_format import make_adapter_files

NS = "models"
API = "lorafleet.io/v1alpha1"


def basemodel(weed, name: str = "smol", **spec) -> dict:
    return {
        "apiVersion": API,
        "kind": "BaseModel",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 2,
            "maxLoraRank": 16,
            "s3": {"endpointUrl": weed.endpoint_url, "credentialsSecret": {"name": "s3"}},
            **spec,
        },
    }


def adapter(name: str, uri: str, namespace: str = NS, base_namespace: str | None = None) -> dict:
    base = {"name": "smol"} | ({"namespace": base_namespace} if base_namespace else {})
    return {
        "apiVersion": API,
        "kind": "LoRAAdapter",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"baseModel": base, "source": {"uri": uri}},
    }


def upload(s3_bucket, prefix: str, files: dict[str, bytes]) -> str:
    client, bucket = s3_bucket
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{bucket}/{prefix}/"


def smol_adapter(rank: int = 2, **config) -> dict[str, bytes]:
    return make_adapter_files(SMOLLM2_135M, rank=rank, targets=("v_proj",), **config)


async def setup_secret(kube: Cluster, weed) -> None:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    data = {"AWS_ACCESS_KEY_ID": b64(weed.access_key), "AWS_SECRET_ACCESS_KEY": b64(weed.secret_key)}
    await kube.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": NS}, "data": data}
    )


async def published(kube: Cluster, name: str = "smol") -> Registry:
    cm = await kube.get("ConfigMap", NS, f"{name}-registry")
    assert cm is not None
    (data,) = cm["binaryData"].values()
    return Registry.from_json(json.loads(gzip.decompress(base64.b64decode(data))))


def phase(expected: str):
    return lambda obj: obj is not None and (obj.get("status") or {}).get("phase") == expected


def condition(obj: dict, type_: str) -> dict:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


async def test_basemodel_children_and_status(kube, operator, weed):
    created = await kube.create(basemodel(weed))
    uid = created["metadata"]["uid"]
    deployment = await kube.wait_for("Deployment", NS, "smol", lambda o: o is not None)
    service = await kube.wait_for("Service", NS, "smol", lambda o: o is not None)
    pdb = await kube.wait_for("PodDisruptionBudget", NS, "smol", lambda o: o is not None)
    cm = await kube.wait_for("ConfigMap", NS, "smol-registry", lambda o: o is not None)
    for child in (deployment, service, pdb, cm):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "BaseModel",
            "smol",
            uid,
            True,
        )
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "lorafleet-operator"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--registry") + 1] == "/etc/lorafleet/registry"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert {e["name"] for e in container["env"]} >= {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL_S3",
    }
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert await published(kube) == Registry("smol", {})

    # No controllers in the emulator: play the Deployment controller, then watch the status follow.
    status = {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "observedGeneration": 1}
    await kube.patch("Deployment", NS, "smol", {"metadata": {"generation": 1}, "status": status}, "status")
    bm = await kube.wait_for("BaseModel", NS, "smol", phase("Ready"))
    assert bm["status"]["readyText"] == "2/2" and bm["status"]["selector"]
    assert condition(bm, "Ready")["status"] == "True"

    # A spec change rolls the Deployment; an invalid one becomes a condition, not a crash loop.
    await kube.patch("BaseModel", NS, "smol", {"metadata": {"generation": 2}, "spec": {"dtype": "float16"}})
    await kube.wait_for(
        "Deployment",
        NS,
        "smol",
        lambda o: "float16" in o["spec"]["template"]["spec"]["containers"][0]["args"],
    )
    await kube.patch(
        "BaseModel", NS, "smol", {"metadata": {"generation": 3}, "spec": {"model": {"source": "s3"}}}
    )
    bm = await kube.wait_for("BaseModel", NS, "smol", phase("Degraded"))
    assert condition(bm, "Degraded")["reason"] == "ModelURIMissing"
    assert "spec.model.uri is required" in condition(bm, "Ready")["message"]


async def test_adapters_publish_fail_and_clean_up(kube, operator, weed, s3_bucket):
    await setup_secret(kube, weed)
    kube.create_namespace(NS)
    kube.create_namespace("tenant", {"team": "x"})
    await kube.create(basemodel(weed))
    await kube.wait_for("ConfigMap", NS, "smol-registry", lambda o: o is not None)

    good = upload(s3_bucket, "good", smol_adapter(rank=4))
    cases = {
        "good": good,
        "missing": upload(s3_bucket, "missing-prefix-only", {"README.md": b"nothing here"}),
        "rank": upload(s3_bucket, "rank", smol_adapter(rank=32)),
        "pickle": upload(
            s3_bucket, "pickle", {CONFIG_NAME: smol_adapter()[CONFIG_NAME], "adapter_model.bin": b"\x80\x04."}
        ),
        "wrongbase": upload(
            s3_bucket, "wrongbase", smol_adapter(base_model_name_or_path="meta-llama/Llama-3.1-8B")
        ),
    }
    for name, uri in cases.items():
        await kube.create(adapter(name, uri))
    await kube.create(adapter("foreign", good, namespace="tenant", base_namespace=NS))

    ready = await kube.wait_for("LoRAAdapter", NS, "good", phase("Ready"))
    assert ready["status"]["rank"] == 4 and ready["status"]["targetModules"] == ["v_proj"]
    assert condition(ready, "Validated")["status"] == "True"
    expected = {
        "missing": "MissingFile",
        "rank": "RankTooHigh",
        "pickle": "PickleOnly",
        "wrongbase": "BaseModelMismatch",
    }
    for name, reason in expected.items():
        failed = await kube.wait_for("LoRAAdapter", NS, name, phase("Failed"))
        validated = condition(failed, "Validated")
        assert (validated["status"], validated["reason"]) == ("False", reason), failed["status"]
    foreign = await kube.wait_for("LoRAAdapter", "tenant", "foreign", phase("Failed"))
    assert condition(foreign, "Validated")["reason"] == "NamespaceNotAllowed"

    registry = await published(kube)
    assert set(registry.adapters) == {f"{NS}/good"}
    entry = registry.adapters[f"{NS}/good"]
    assert (entry.uri, entry.rank, entry.version) == (good, 4, ready["status"]["version"])

    # Allowing the tenant namespace (and a retry by the revalidation path) admits the adapter.
    await kube.patch(
        "BaseModel", NS, "smol", {"spec": {"adapterNamespaceSelector": {"matchLabels": {"team": "x"}}}}
    )
    await kube.patch(
        "LoRAAdapter", "tenant", "foreign", {"metadata": {"generation": 2}, "spec": {"pinned": True}}
    )
    foreign = await kube.wait_for("LoRAAdapter", "tenant", "foreign", phase("Ready"))
    # A tenant's pin is ignored (it would hold CPU memory for ever) until the admin allows it.
    assert not (await published(kube)).adapters["tenant/foreign"].pinned
    assert "pinned is ignored" in condition(foreign, "Ready")["message"]
    await kube.patch(
        "BaseModel", NS, "smol", {"spec": {"pinningNamespaceSelector": {"matchLabels": {"team": "x"}}}}
    )
    await kube.patch(
        "LoRAAdapter", "tenant", "foreign", {"metadata": {"generation": 3}, "spec": {"description": "x"}}
    )
    await kube.wait_for(
        "LoRAAdapter", "tenant", "foreign", lambda o: o["status"].get("observedGeneration") == 3
    )
    assert (await published(kube)).adapters["tenant/foreign"].pinned

    # Deleting an adapter removes its entry (the finalizer holds the object until then).
    await kube.delete("LoRAAdapter", NS, "good")
    await kube.wait_for("LoRAAdapter", NS, "good", lambda o: o is None)
    assert set((await published(kube)).adapters) == {"tenant/foreign"}

    # Deleting the BaseModel leaves its adapters with a clear condition.
    await kube.delete("BaseModel", NS, "smol")
    orphan = await kube.wait_for("LoRAAdapter", "tenant", "foreign", phase("Orphaned"))
    assert condition(orphan, "Ready")["reason"] == "BaseModelDeleted"


async def test_a_recreated_basemodel_gets_its_registry_back(kube, operator, weed):
    """Deleted, its ConfigMap garbage-collected, created again under the same name: the registry
    must be written again even though its bytes equal what the operator wrote the first time
    (the engine pods mount it and do not start without it)."""
    await kube.create(basemodel(weed))
    await kube.wait_for("ConfigMap", NS, "smol-registry", lambda o: o is not None)
    await kube.delete("BaseModel", NS, "smol")
    await kube.wait_for("BaseModel", NS, "smol", lambda o: o is None)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap"):  # the GC's part
        await kube.delete(kind, NS, "smol-registry" if kind == "ConfigMap" else "smol")
    await kube.create(basemodel(weed))
    await kube.wait_for("Deployment", NS, "smol", lambda o: o is not None)
    await kube.wait_for("ConfigMap", NS, "smol-registry", lambda o: o is not None)
    assert await published(kube) == Registry("smol", {})


async def test_children_deleted_by_hand_come_back(kube, operator, weed):
    """The Service, PDB, Deployment and registry ConfigMap are the operator's: deleted behind its
    back (a mistaken kubectl delete), each is re-created without any change to the BaseModel."""
    await kube.create(basemodel(weed))
    children = [("Deployment", "smol"), ("Service", "smol"), ("PodDisruptionBudget", "smol"),
                ("ConfigMap", "smol-registry")]  # fmt: skip
    for kind, name in children:
        await kube.wait_for(kind, NS, name, lambda o: o is not None)
    for kind, name in children:
        await kube.delete(kind, NS, name)
    for kind, name in children:
        await kube.wait_for(kind, NS, name, lambda o: o is not None)
    assert await published(kube) == Registry("smol", {})


async def test_restart_leaves_no_duplicates(kube, operator, weed, s3_bucket):
    await setup_secret(kube, weed)
    await kube.create(basemodel(weed))
    uris = [upload(s3_bucket, f"a{i}", smol_adapter(seed=i)) for i in range(3)]
    for i, uri in enumerate(uris[:2]):
        await kube.create(adapter(f"a{i}", uri))
    for i in range(2):
        await kube.wait_for("LoRAAdapter", NS, f"a{i}", phase("Ready"))
    before = await published(kube)

    # Down, as if it died mid-reconcile: the Deployment it had not created yet, an adapter it had
    # not seen yet.
    await operator.stop()
    await kube.delete("Deployment", NS, "smol")
    await kube.create(adapter("a2", uris[2]))
    await operator.start()
    await kube.wait_for("LoRAAdapter", NS, "a2", phase("Ready"))
    await kube.wait_for("Deployment", NS, "smol", lambda o: o is not None)

    after = await published(kube)
    assert set(after.adapters) == {f"{NS}/a0", f"{NS}/a1", f"{NS}/a2"}
    assert {k: after.adapters[k] for k in before.adapters} == before.adapters
    live = {(key[0].plural, key[2]) for key, obj in kube.emulator.objects.items() if not obj.deleted}
    assert live == {
        ("secrets", "s3"),
        ("basemodels", "smol"),
        ("deployments", "smol"),
        ("services", "smol"),
        ("poddisruptionbudgets", "smol"),
        ("configmaps", "smol-registry"),
        ("loraadapters", "a0"),
        ("loraadapters", "a1"),
        ("loraadapters", "a2"),
    }
    for name in ("a0", "a1", "a2"):
        status = (await kube.get("LoRAAdapter", NS, name) or {})["status"]
        assert sorted(c["type"] for c in status["conditions"]) == ["Ready", "Validated"]


async def test_a_burst_of_adapters_costs_two_writes_each(kube, operator, weed, s3_bucket):
    """The API server is the shared resource: per adapter the operator adds its finalizer and
    patches status once (kopf's bookkeeping rides in that patch), and a burst sharing one
    credentials Secret reads it once."""
    await setup_secret(kube, weed)
    await kube.create(basemodel(weed))
    await kube.wait_for("ConfigMap", NS, "smol-registry", lambda o: o is not None)
    uri = upload(s3_bucket, "shared", smol_adapter())
    names = [f"burst{i}" for i in range(6)]
    for name in names:
        await kube.create(adapter(name, uri))
    for name in names:
        await kube.wait_for("LoRAAdapter", NS, name, phase("Ready"))
    assert set((await published(kube)).adapters) == {f"{NS}/{name}" for name in names}
    await asyncio.sleep(1.0)  # a late extra write would land here

    def requests(plural: str, *actions) -> list:
        return [
            r for r in kube.emulator if r.resource and r.resource.plural == plural and r.action in actions
        ]

    writes = requests("loraadapters", kmock.action.CREATE, kmock.action.UPDATE)
    assert len(writes) == 3 * len(names), [(r.action, r.name, r.subresource) for r in writes]
    assert len(requests("secrets", kmock.action.FETCH)) == 1
    for name in names:
        obj = await kube.get("LoRAAdapter", NS, name)
        assert obj["metadata"]["finalizers"] == ["lorafleet.io/finalizer"]
        assert "last-handled-configuration" in obj["status"]["kopf"]


async def test_a_secret_without_the_key_pair_fails_validation_and_is_not_cached(
    kube, operator, weed, s3_bucket
):
    await kube.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": NS}, "data": {}}
    )
    await kube.create(basemodel(weed))
    await kube.create(adapter("a", upload(s3_bucket, "a", smol_adapter())))
    failed = await kube.wait_for("LoRAAdapter", NS, "a", phase("Failed"))
    validated = condition(failed, "Validated")
    assert validated["reason"] == "CredentialsMissing" and "AWS_SECRET_ACCESS_KEY" in validated["message"]

    # Fixed: the next reconcile reads the Secret again (a refusal is not cached).
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    keys = {"AWS_ACCESS_KEY_ID": b64(weed.access_key), "AWS_SECRET_ACCESS_KEY": b64(weed.secret_key)}
    await kube.patch("Secret", NS, "s3", {"data": keys})
    await kube.patch("LoRAAdapter", NS, "a", {"metadata": {"generation": 2}, "spec": {"pinned": True}})
    ready = await kube.wait_for("LoRAAdapter", NS, "a", phase("Ready"))
    assert weed.secret_key not in json.dumps(ready["status"])


@pytest.mark.parametrize("corrupt", [b"not safetensors at all", b""])
async def test_corrupt_weights(kube, operator, weed, s3_bucket, corrupt):
    await setup_secret(kube, weed)
    await kube.create(basemodel(weed))
    # Settled before the adapter: stopping kopf amid a BaseModel handler leaks its timer for 5 s.
    await kube.wait_for("BaseModel", NS, "smol", lambda o: o is not None and "status" in o)
    files = smol_adapter() | {WEIGHTS_NAME: corrupt}
    await kube.create(adapter("bad", upload(s3_bucket, "bad", files)))
    failed = await kube.wait_for("LoRAAdapter", NS, "bad", phase("Failed"))
    assert condition(failed, "Validated")["reason"] == "CorruptSafetensors"


async def test_concurrent_applies_of_a_new_object_all_succeed(kube):
    # Against the emulator `apply` is "patch, else create": racing writers all find it missing,
    # all create, and all but one get 409, which must become an update, not an error.
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "race", "namespace": NS}}
    results = await asyncio.gather(*(kube.api.apply(cm | {"data": {"i": str(i)}}) for i in range(4)))
    assert len(results) == 4
    assert len(kube.emulator["post"]) > 1  # the race did happen: more than one create was tried
    assert (await kube.get("ConfigMap", NS, "race") or {})["data"]["i"] in {"0", "1", "2", "3"}


async def test_adapter_becomes_ready_after_an_s3_outage(kube, operator, private_weed, s3_bucket):
    await setup_secret(kube, private_weed)
    await kube.create(basemodel(private_weed))
    await kube.wait_for("ConfigMap", NS, "smol-registry", lambda o: o is not None)
    client = private_weed.client()
    client.create_bucket(Bucket="outage")
    uri = upload((client, "outage"), "a", smol_adapter())

    await asyncio.to_thread(private_weed.stop)
    await kube.create(adapter("a", uri))
    waiting = await kube.wait_for(
        "LoRAAdapter",
        NS,
        "a",
        lambda o: "cannot validate yet" in ((o or {}).get("status") or {}).get("message", ""),
    )
    assert waiting["status"].get("phase") != "Ready"
    assert f"{NS}/a" not in (await published(kube)).adapters

    # S3 back: the retry (not a re-apply: the generation stays 1) validates and publishes it.
    await asyncio.to_thread(private_weed.start)
    ready = await kube.wait_for("LoRAAdapter", NS, "a", phase("Ready"))
    assert ready["metadata"]["generation"] == 1
    assert condition(ready, "Validated")["status"] == "True"
    assert (await published(kube)).adapters[f"{NS}/a"].uri == uri
