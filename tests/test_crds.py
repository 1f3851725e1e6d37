"""CRDs: structural, presented as the operator issue asks, and every example manifest valid.

Each manifest in examples/ is validated against its CRD's own openAPIV3Schema (jsonschema's
Draft 4, the dialect OpenAPI v3 schemas are built on), and a set of invalid manifests is rejected,
each at the stated field for the stated reason.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency (pyproject [dev])")

ROOT = Path(__file__).resolve().parent.parent
CRDS = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))}
BY_KIND = {crd["spec"]["names"]["kind"]: crd for crd in CRDS.values()}
EXAMPLES = [
    (f"{path.name}#{i}", doc)
    for path in sorted((ROOT / "examples").glob("*.yaml"))
    for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
    if doc and doc.get("apiVersion", "").startswith("lorafleet.io/")
]


def schema_of(kind: str) -> dict[str, Any]:
    (version,) = BY_KIND[kind]["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def errors(doc: dict[str, Any]) -> list[Any]:
    return list(jsonschema.Draft4Validator(schema_of(doc["kind"])).iter_errors(doc))


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_both_crds_are_there():
    assert set(BY_KIND) == {"BaseModel", "LoRAAdapter"}
    assert set(CRDS) == {"basemodels.yaml", "loraadapters.yaml"}


@pytest.mark.parametrize("kind", ["BaseModel", "LoRAAdapter"])
def test_crd_metadata(kind):
    crd = BY_KIND[kind]
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.lorafleet.io"
    assert (spec["group"], spec["scope"]) == ("lorafleet.io", "Namespaced")
    assert spec["names"]["categories"] == ["lorafleet"] and spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    expected = (
        ["Phase", "Ready", "Adapters", "Age"]
        if kind == "BaseModel"
        else ["Base Model", "Rank", "Phase", "Age"]
    )
    assert columns == expected


def test_basemodel_scale_subresource_points_at_real_fields():
    scale = BY_KIND["BaseModel"]["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    props = schema_of("BaseModel")["properties"]
    assert props["spec"]["properties"]["replicas"]["type"] == "integer"
    assert props["status"]["properties"]["replicas"]["type"] == "integer"
    assert props["status"]["properties"]["selector"]["type"] == "string"


@pytest.mark.parametrize("kind", ["BaseModel", "LoRAAdapter"])
def test_printer_columns_point_at_schema_fields(kind):
    schema = schema_of(kind)
    for column in BY_KIND[kind]["spec"]["versions"][0]["additionalPrinterColumns"]:
        node = schema
        if column["jsonPath"].startswith(".metadata."):
            continue
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"], column


@pytest.mark.parametrize("kind", ["BaseModel", "LoRAAdapter"])
def test_schema_is_structural(kind):
    """What the API server requires of a v1 CRD schema (the parts a typo would break)."""
    for path, node in walk(schema_of(kind)):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), f"{path}: arrays need an items schema"
        if path == ".metadata":
            assert node == {"type": "object"}, "metadata may only say it is an object"


@pytest.mark.parametrize("kind", ["BaseModel", "LoRAAdapter"])
def test_defaults_are_valid_for_their_own_schema(kind):
    for path, node in walk(schema_of(kind)):
        if "default" in node:
            sub = {k: v for k, v in node.items() if k != "default"}
            assert not list(jsonschema.Draft4Validator(sub).iter_errors(node["default"])), path


def test_there_are_examples_of_both_kinds():
    assert {doc["kind"] for _, doc in EXAMPLES} == {"BaseModel", "LoRAAdapter"}


@pytest.mark.parametrize(("name", "doc"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_examples_validate(name, doc):
    assert errors(doc) == []


def _basemodel() -> dict[str, Any]:
    return copy.deepcopy(next(doc for name, doc in EXAMPLES if name == "basemodel.yaml#0"))


def _adapter() -> dict[str, Any]:
    return copy.deepcopy(next(doc for name, doc in EXAMPLES if name == "loraadapters.yaml#0"))


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()
INVALID = [
    # (what is wrong, kind, field, value, failing path, failing keyword)
    ("no spec", "BaseModel", "spec", _DELETE, "", "required"),
    ("negative replicas", "BaseModel", "spec.replicas", -1, "spec.replicas", "minimum"),
    ("replicas as text", "BaseModel", "spec.replicas", "two", "spec.replicas", "type"),
    ("unknown dtype", "BaseModel", "spec.dtype", "int4", "spec.dtype", "enum"),
    ("unknown quantization", "BaseModel", "spec.quantization", "gptq", "spec.quantization", "enum"),
    ("unknown model source", "BaseModel", "spec.model.source", "http", "spec.model.source", "enum"),
    ("model uri not s3", "BaseModel", "spec.model.uri", "https://x/y", "spec.model.uri", "pattern"),
    ("pvc without claim", "BaseModel", "spec.model.pvc", {"path": "/m"}, "spec.model.pvc", "required"),
    (
        "architecture incomplete",
        "BaseModel",
        "spec.model.architecture",
        {"hiddenSize": 8},
        "spec.model.architecture",
        "required",
    ),
    ("zero max rank", "BaseModel", "spec.maxLoraRank", 0, "spec.maxLoraRank", "minimum"),
    ("no gpu slots", "BaseModel", "spec.adapterCache.gpuSlots", 0, "spec.adapterCache.gpuSlots", "minimum"),
    (
        "cpu bytes not a quantity",
        "BaseModel",
        "spec.adapterCache.cpuBytes",
        "lots",
        "spec.adapterCache.cpuBytes",
        "pattern",
    ),
    (
        "lower-case binary suffix",
        "BaseModel",
        "spec.adapterCache.diskBytes",
        "10gi",
        "spec.adapterCache.diskBytes",
        "pattern",
    ),
    (
        "memory not a quantity",
        "BaseModel",
        "spec.resources.memory",
        "4 GB",
        "spec.resources.memory",
        "pattern",
    ),
    ("negative gpus", "BaseModel", "spec.resources.gpus", -1, "spec.resources.gpus", "minimum"),
    ("port out of range", "BaseModel", "spec.service.port", 70000, "spec.service.port", "maximum"),
    ("unknown service type", "BaseModel", "spec.service.type", "ExternalName", "spec.service.type", "enum"),
    ("served name upper case", "BaseModel", "spec.servedName", "SmolLM2", "spec.servedName", "pattern"),
    (
        "adapter prefix not s3",
        "BaseModel",
        "spec.adapterURIPrefix",
        "https://x/{namespace}/",
        "spec.adapterURIPrefix",
        "pattern",
    ),
    (
        "service account upper case",
        "BaseModel",
        "spec.serviceAccountName",
        "Engine",
        "spec.serviceAccountName",
        "pattern",
    ),
    (
        "api keys secret unnamed",
        "BaseModel",
        "spec.apiKeysSecret",
        {"key": "k"},
        "spec.apiKeysSecret",
        "required",
    ),
    (
        "pull secret unnamed",
        "BaseModel",
        "spec.imagePullSecrets",
        [{}],
        "spec.imagePullSecrets.0",
        "required",
    ),
    (
        "pinning selector operator",
        "BaseModel",
        "spec.pinningNamespaceSelector.matchExpressions",
        [{"key": "team", "operator": "Like"}],
        "spec.pinningNamespaceSelector.matchExpressions.0.operator",
        "enum",
    ),
    ("endpoint not http", "BaseModel", "spec.s3.endpointUrl", "minio:9000", "spec.s3.endpointUrl", "pattern"),
    (
        "selector operator",
        "BaseModel",
        "spec.adapterNamespaceSelector.matchExpressions",
        [{"key": "team", "operator": "Like"}],
        "spec.adapterNamespaceSelector.matchExpressions.0.operator",
        "enum",
    ),
    (
        "node selector value not text",
        "BaseModel",
        "spec.nodeSelector",
        {"gpu": 1},
        "spec.nodeSelector.gpu",
        "type",
    ),
    ("no base model", "LoRAAdapter", "spec.baseModel", _DELETE, "spec", "required"),
    ("no source", "LoRAAdapter", "spec.source", _DELETE, "spec", "required"),
    (
        "base model name invalid",
        "LoRAAdapter",
        "spec.baseModel.name",
        "Smol_LM",
        "spec.baseModel.name",
        "pattern",
    ),
    (
        "base model namespace path trick",
        "LoRAAdapter",
        "spec.baseModel.namespace",
        "../x",
        "spec.baseModel.namespace",
        "pattern",
    ),
    ("uri not s3", "LoRAAdapter", "spec.source.uri", "file:///etc/passwd", "spec.source.uri", "pattern"),
    ("uri without bucket", "LoRAAdapter", "spec.source.uri", "s3://", "spec.source.uri", "pattern"),
    ("pinned not boolean", "LoRAAdapter", "spec.pinned", "yes", "spec.pinned", "type"),
    ("description too long", "LoRAAdapter", "spec.description", "x" * 1025, "spec.description", "maxLength"),
]


@pytest.mark.parametrize(
    ("why", "kind", "field", "value", "path", "keyword"), INVALID, ids=[i[0] for i in INVALID]
)
def test_invalid_manifests_are_rejected_for_the_stated_reason(why, kind, field, value, path, keyword):
    doc = _set(_basemodel() if kind == "BaseModel" else _adapter(), field, value)
    found = [(".".join(map(str, e.absolute_path)), e.validator) for e in errors(doc)]
    assert set(found) == {(path, keyword)}, why


@pytest.mark.parametrize("prefix", ["s3://adapters/{namespace}/", "s3://team-{namespace}/", "s3://bkt"])
def test_adapter_uri_prefixes_may_place_the_namespace_in_the_bucket_or_the_path(prefix):
    assert errors(_set(_basemodel(), "spec.adapterURIPrefix", prefix)) == []


@pytest.mark.parametrize("quantity", ["512Ki", "10Gi", "500M", "2k", "1024"])
def test_kubernetes_quantities_are_accepted(quantity):
    for field in ("spec.adapterCache.cpuBytes", "spec.adapterCache.diskBytes", "spec.resources.memory"):
        assert errors(_set(_basemodel(), field, quantity)) == [], field


def test_cel_rules_guard_source_specific_fields():
    """jsonschema cannot run CEL; the operator enforces the same rules (see test_operator_render)."""
    model = schema_of("BaseModel")["properties"]["spec"]["properties"]["model"]
    rules = [r["rule"] for r in model["x-kubernetes-validations"]]
    assert any("'s3'" in r and "uri" in r for r in rules)
    assert any("'pvc'" in r and "architecture" in r for r in rules)
