"""The Helm chart (charts/lorafleet): CRDs, values schema, RBAC against the operator's real API calls, lint.

No helm binary is needed: the RBAC rules are a plain YAML file (files/rbac.yaml) that the templates
render verbatim, so the operator's calls can be checked against it directly. The calls are derived
from the operator's code: the kinds its handlers pass to the API client (an AST scan), the HTTP
requests that client sends for each (recorded by a server on loopback), and the resources kopf
watches and patches (read from the handler registry). Helm's own lint, which renders every template,
runs when a Python >= 3.12 with helm-sdkpy is at hand.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kopf
import pytest
import yaml
from aiohttp import web

from lorafleet.engine.cli import build_parser
from lorafleet.operator.config import OperatorConfig
from lorafleet.operator.handlers import build_registry
from lorafleet.operator.kube import KINDS, KubeClient
from lorafleet.operator.render import render_children, render_registry_configmaps
from lorafleet.operator.spec import parse_basemodel

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "lorafleet"
OPERATOR_SRC = ROOT / "operator"

Call = tuple[str, str, str]  # (API group, resource[/subresource], verb)


def load_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def load_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def load_rules() -> dict[str, list[dict[str, Any]]]:
    return yaml.safe_load((CHART / "files" / "rbac.yaml").read_text())


# -- CRDs -------------------------------------------------------------------------------------------


def test_chart_crds_are_the_top_level_crds_byte_for_byte():
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert top, "no CRDs in crds/"
    for name in top:
        chart_copy = CHART / "crds" / name
        assert chart_copy.exists(), (
            f"charts/lorafleet/crds/{name} is missing: cp crds/*.yaml charts/lorafleet/crds/"
        )
        assert chart_copy.read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/lorafleet/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/lorafleet/crds/"
        )
    extra = sorted(p.name for p in (CHART / "crds").glob("*.yaml") if p.name not in top)
    assert extra == ["kopf-peering.yaml"], f"unexpected CRD files only in the chart: {extra}"


def test_chart_peering_crds_are_the_ones_kopf_looks_for():
    docs = list(yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()))
    found = {(d["spec"]["group"], d["spec"]["names"]["plural"], d["spec"]["scope"]) for d in docs}
    from kopf._cogs.structs import references  # the selectors kopf's peering uses

    for selector, scope in (
        (references.CLUSTER_PEERINGS_K, "Cluster"),
        (references.NAMESPACED_PEERINGS_K, "Namespaced"),
    ):
        assert (selector.group, selector.plural or selector.any_name, scope) in found


# -- values -----------------------------------------------------------------------------------------


def test_values_yaml_validates_against_its_schema():
    jsonschema.Draft7Validator.check_schema(load_schema())
    jsonschema.validate(load_values(), load_schema(), cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize(
    "change, complaint",
    [
        (lambda v: v["image"].update(pullPolicy="Sometimes"), "Sometimes"),
        (lambda v: v["operator"].update(watchAllNamespaces=False), "watchNamespaces"),
        (lambda v: v["operator"].update(watchNamespaces=["Team_A"]), "Team_A"),
        (lambda v: v["operator"].update(livenessPort=0), "livenessPort"),
        (lambda v: v.update(replicaCount=3), "replicaCount"),
        (lambda v: v["serviceMonitor"].update(interval="soon"), "soon"),
    ],
    ids=["pull-policy", "namespaces-missing", "namespace-name", "port", "unknown-key", "duration"],
)
def test_values_schema_rejects_mistakes(change, complaint):
    values = copy.deepcopy(load_values())
    change(values)
    with pytest.raises(jsonschema.ValidationError) as e:
        jsonschema.validate(values, load_schema(), cls=jsonschema.Draft7Validator)
    assert complaint in str(e.value)


# -- the operator's API calls -----------------------------------------------------------------------


def kube_client_calls_in_operator() -> set[tuple[str, str | None]]:
    """(KubeClient method, kind literal or None) for every `….kube.<method>(…)` in operator/."""
    found: set[tuple[str, str | None]] = set()
    for path in OPERATOR_SRC.glob("*.py"):
        if path.name == "kube.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = node.func.value
            if not (isinstance(receiver, ast.Attribute) and receiver.attr == "kube"):
                continue
            method = node.func.attr
            first = node.args[0] if node.args else None
            kind = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
            if method in ("get", "delete", "patch_status"):
                assert kind in KINDS, (
                    f"{path.name}:{node.lineno}: kube.{method} with a kind not known statically"
                )
            assert method != "request", (
                f"{path.name}:{node.lineno}: raw kube.request: add its path to this test"
            )
            found.add((method, kind))
    return found


def applied_objects() -> list[dict[str, Any]]:
    """What `kube.apply` receives: whatever the render functions produce."""
    body = yaml.safe_load((ROOT / "examples" / "basemodel.yaml").read_text())
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    bm = parse_basemodel(body)
    return render_children(bm) + render_registry_configmaps(bm, {"registry-000.json.gz": b"{}"})


def applied_kinds() -> set[str]:
    return {obj["kind"] for obj in applied_objects()}


def owner_reference_calls() -> set[Call]:
    """An owner reference with blockOwnerDeletion needs `update` on the owner's finalizers
    subresource where the OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift)."""
    return {
        (ref["apiVersion"].split("/")[0], f"{KINDS[ref['kind']][1]}/finalizers", "update")
        for obj in applied_objects()
        for ref in obj["metadata"].get("ownerReferences", [])
        if ref.get("blockOwnerDeletion")
    }


def _rbac_call(method: str, path: str) -> Call:
    """An HTTP request as RBAC sees it."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[:1] == ["namespaces"] and len(rest) == 2:  # the namespace object itself
        resource, name, sub = "namespaces", rest[1], None
    else:
        rest = rest[2:] if rest[:1] == ["namespaces"] else rest
        resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method)
    verb = verb or ("get" if name else "list")
    return group, f"{resource}/{sub}" if sub else resource, verb


async def record_client_calls(uses: set[tuple[str, str | None]], kinds_applied: set[str]) -> set[Call]:
    """Run each KubeClient call the operator makes against a recording server; RBAC view of the requests."""
    seen: list[tuple[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        if request.content_type == "application/apply-patch+yaml":
            return web.json_response(
                {"kind": "Status", "code": 404}, status=404
            )  # exercise the create fallback
        return web.json_response({"metadata": {"name": "x", "labels": {}}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = KubeClient(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token="t"))
    try:
        for method, kind in sorted(uses, key=str):
            if method == "apply":
                for applied in sorted(kinds_applied):
                    await client.apply({"kind": applied, "metadata": {"namespace": "ns", "name": "x"}})
            elif method == "patch_status":
                await client.patch_status(str(kind), "ns", "x", {"phase": "Ready"})
            elif method in ("get", "delete"):
                await getattr(client, method)(kind, "ns", "x")
            elif method == "namespace_labels":
                await client.namespace_labels("ns")
            elif method != "close":
                raise AssertionError(f"kube.{method}: teach this test which requests it sends")
    finally:
        await client.close()
        await runner.cleanup()
    return {_rbac_call(method, path) for method, path in seen}


def _resource(selector: Any) -> tuple[str, str]:
    """(group, plural) of a kopf selector; the handlers name resources by their plural."""
    plural = selector.plural or selector.any_name
    assert plural in {p for _, p in KINDS.values()}, f"kopf handles {selector}: not a kind the test knows"
    return selector.group or "", plural


def kopf_calls(clusterwide: bool) -> set[Call]:
    """What kopf itself does with the operator's handlers, plus its events and peering."""
    registry = build_registry(OperatorConfig())
    calls: set[Call] = {("", "events", "create")}
    for group in (registry._indexing, registry._watching, registry._spawning, registry._changing):
        for handler in group.get_all_handlers():
            api_group, plural = _resource(handler.selector)
            calls |= {(api_group, plural, "list"), (api_group, plural, "watch")}
    for group in (registry._spawning, registry._changing):  # finalizers, progress, status
        for handler in group.get_all_handlers():
            api_group, plural = _resource(handler.selector)
            calls |= {(api_group, plural, "patch"), (api_group, f"{plural}/status", "patch")}
    peering = "clusterkopfpeerings" if clusterwide else "kopfpeerings"
    calls |= {("kopf.dev", peering, verb) for verb in ("list", "watch", "patch")}
    if clusterwide:  # kopf follows CRDs appearing; without this it only warns
        calls |= {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    return calls


def granted(rules: list[dict[str, Any]]) -> set[Call]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.fixture(scope="module")
def client_calls() -> set[Call]:
    uses = kube_client_calls_in_operator()
    assert ("apply", None) in uses and any(m == "get" for m, _ in uses), "the AST scan found nothing"
    return asyncio.run(record_client_calls(uses, applied_kinds()))


def test_operator_calls_are_derived_not_assumed(client_calls):
    # A sanity check of the derivation itself: these are certainly among the operator's calls.
    assert ("apps", "deployments", "patch") in client_calls  # server-side apply
    assert ("apps", "deployments", "create") in client_calls  # its fallback
    assert ("lorafleet.io", "basemodels/status", "patch") in client_calls
    assert ("", "namespaces", "get") in client_calls


@pytest.mark.parametrize("clusterwide", [True, False], ids=["all-namespaces", "namespaced"])
def test_rbac_grants_every_call_the_operator_makes(client_calls, clusterwide):
    rules = load_rules()
    role = rules["namespaced"] + (rules["clusterwide"] if clusterwide else [])
    needed = client_calls | kopf_calls(clusterwide) | owner_reference_calls()
    missing = needed - granted(role)
    assert not missing, f"charts/lorafleet/files/rbac.yaml lacks: {sorted(missing)}"


def test_rbac_grants_nothing_the_operator_does_not_use(client_calls):
    rules = load_rules()
    used = client_calls | kopf_calls(True) | kopf_calls(False) | owner_reference_calls()
    extra = granted(rules["namespaced"] + rules["clusterwide"]) - used
    assert not extra, f"files/rbac.yaml grants more than the operator uses: {sorted(extra)}"
    # Least privilege: no wildcards, and a namespaced install gets no cluster-scoped resource.
    assert all(
        "*" not in r["verbs"] and "*" not in r["resources"]
        for r in rules["namespaced"] + rules["clusterwide"]
    )
    cluster_scoped = {"customresourcedefinitions", "clusterkopfpeerings"}
    assert not {res for _, res, _ in granted(rules["namespaced"])} & cluster_scoped


def test_rbac_template_renders_the_rules_file_in_both_modes():
    text = (CHART / "templates" / "rbac.yaml").read_text()
    cluster, _, namespaced = text.partition("{{- else }}")
    assert '.Files.Get "files/rbac.yaml"' in text
    assert "kind: ClusterRole" in cluster and "concat $rules.namespaced $rules.clusterwide" in cluster
    assert "kind: Role" in namespaced and "range $namespace := .Values.operator.watchNamespaces" in namespaced
    assert "$rules.namespaced | toYaml" in namespaced and "clusterwide" not in namespaced
    assert "ClusterRole" not in namespaced


# -- the operator Deployment ------------------------------------------------------------------------


def test_deployment_passes_only_flags_the_operator_accepts():
    text = (CHART / "templates" / "deployment.yaml").read_text()
    flags = set(re.findall(r"^\s*- (--[a-z][-a-z]*)\s*$", text, re.M))
    assert {"--liveness-port", "--all-namespaces", "--namespace", "--standalone", "--peering"} <= flags
    parser = build_parser()
    operator = parser._subparsers._group_actions[0].choices["operator"]  # type: ignore[union-attr]
    known = {opt for action in operator._actions for opt in action.option_strings}
    assert flags <= known, f"flags `lorafleet operator` does not know: {sorted(flags - known)}"
    assert re.search(r"^\s*- operator\s*$", text, re.M), "the container must run `lorafleet operator`"


def test_deployment_is_hardened_and_probed():
    text = (CHART / "templates" / "deployment.yaml").read_text()
    for line in (
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [ALL]",
        "type: RuntimeDefault",
        "path: /healthz",
        "livenessProbe:",
        "startupProbe:",
        "type: Recreate",
    ):
        assert line in text, f"templates/deployment.yaml lacks {line!r}"
    # The user the Dockerfile creates is the one the pod runs as.
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"runAsUser: (\d+)", text)
    assert uid and re.search(rf"\b{uid[1]}\b", dockerfile), "runAsUser is not the image's user"


def test_every_template_carries_the_standard_labels():
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    for label in ("name", "instance", "version", "component", "part-of", "managed-by"):
        assert f"app.kubernetes.io/{label}:" in helpers
    for path in (CHART / "templates").glob("*.yaml"):
        assert 'include "lorafleet.labels"' in path.read_text(), f"{path.name} has no standard labels"


# -- helm lint --------------------------------------------------------------------------------------


def helm_python() -> str | None:
    """A Python >= 3.12 that can import helm_sdkpy ($LORAFLEET_HELM_PYTHON, python3.13, python3.12)."""
    candidates = [os.environ.get("LORAFLEET_HELM_PYTHON"), sys.executable, "python3.13", "python3.12"]
    for candidate in filter(None, candidates):
        exe = shutil.which(candidate)
        if exe is None:
            continue
        probe = subprocess.run(
            [exe, "-c", "import sys, helm_sdkpy; assert sys.version_info >= (3, 12)"],
            capture_output=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return exe
    return None


LINT = """
import asyncio, json, sys
import helm_sdkpy
result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace="lorafleet")).run(sys.argv[1]))
print(json.dumps(result))
"""

VARIANTS = {
    "defaults": {},
    "namespaced-with-extras": {
        "operator": {
            "watchAllNamespaces": False,
            "watchNamespaces": ["team-a", "team-b"],
            "peering": {"enabled": False},
        },
        "serviceMonitor": {"enabled": True},
        "exampleBaseModel": {"enabled": True},
    },
}


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chart_lints_clean(variant, tmp_path):
    python = helm_python()
    if python is None:
        pytest.skip(
            "helm lint needs helm-sdkpy, which needs Python >= 3.12: none found "
            "(set LORAFLEET_HELM_PYTHON to such an interpreter with helm-sdkpy==0.1.32 installed)"
        )
    chart = tmp_path / "lorafleet"
    shutil.copytree(CHART, chart)
    values = merged(load_values(), VARIANTS[variant])
    jsonschema.validate(values, load_schema(), cls=jsonschema.Draft7Validator)
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    run = subprocess.run([python, "-c", LINT, str(chart)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # Severity: 1 info (e.g. "icon is recommended"), 2 warning, 3 error.
    problems = [m for m in result.get("Messages") or [] if m["Severity"] >= 2]
    assert not problems and not result.get("Errors"), f"helm lint: {problems} {result.get('Errors')}"
    assert result["TotalChartsLinted"] == 1
