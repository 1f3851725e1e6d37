"""Status conditions: pure functions from observed state to `Ready` / `Progressing` / `Degraded`.

A condition's `lastTransitionTime` changes only when its status does, as Kubernetes conventions
ask; every function takes the previous conditions and the current time for that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .spec import SpecError


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None,
    new: Sequence[Condition],
    now: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """`new` as status conditions, keeping each lastTransitionTime whose status did not change.
    Conditions of other types in `previous` are kept as they were."""
    old = {c.get("type"): c for c in previous or []}
    out = []
    for c in new:
        status = {True: "True", False: "False", None: "Unknown"}[c.status]
        before = old.pop(c.type, {})
        since = before.get("lastTransitionTime") if before.get("status") == status else None
        cond = {
            "type": c.type,
            "status": status,
            "reason": c.reason,
            "message": c.message,
            "lastTransitionTime": since or now,
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    return out + [dict(c) for c in old.values()]


def condition_status(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> str | None:
    return next((c.get("status") for c in conditions or [] if c.get("type") == type_), None)


def basemodel_conditions(
    generation: int, deployment: Mapping[str, Any] | None, spec_error: SpecError | None = None
) -> tuple[str, list[Condition]]:
    """(phase, conditions) of a BaseModel from its Deployment as last read (None: not there).

    A spec error wins: its reason (e.g. ModelURIMissing) is on all three conditions, so that
    `kubectl get bm -o wide` and alerts on Degraded say what to fix."""
    if spec_error is not None:
        reason, message = spec_error.reason, str(spec_error)
        return "Degraded", [
            Condition("Ready", False, reason, message),
            Condition("Progressing", False, reason, "fix the spec to continue"),
            Condition("Degraded", True, reason, message),
        ]
    if deployment is None:
        return "Pending", [
            Condition("Ready", False, "DeploymentMissing", "the engine Deployment does not exist yet"),
            Condition("Progressing", True, "Creating", "creating the engine Deployment"),
            Condition("Degraded", False, "AsExpected"),
        ]
    desired = int((deployment.get("spec") or {}).get("replicas", 1))
    status = deployment.get("status") or {}
    ready, updated = int(status.get("readyReplicas", 0)), int(status.get("updatedReplicas", 0))
    observed = int(status.get("observedGeneration", 0))
    stale = observed < int((deployment.get("metadata") or {}).get("generation", 0))
    dep_conditions = {c.get("type"): c for c in status.get("conditions") or []}
    degraded: Condition | None = None
    progressing_cond = dep_conditions.get("Progressing", {})
    if (
        progressing_cond.get("status") == "False"
        and progressing_cond.get("reason") == "ProgressDeadlineExceeded"
    ):
        degraded = Condition(
            "Degraded", True, "ProgressDeadlineExceeded", progressing_cond.get("message", "")
        )
    elif dep_conditions.get("ReplicaFailure", {}).get("status") == "True":
        degraded = Condition(
            "Degraded", True, "ReplicaFailure", dep_conditions["ReplicaFailure"].get("message", "")
        )
    rolling = stale or updated < desired or ready < desired
    ready_cond = (
        Condition("Ready", True, "ScaledToZero", "replicas is 0: nothing serves")
        if desired == 0
        else Condition("Ready", True, "ReplicasReady", f"{ready}/{desired} engine pods ready")
        if ready > 0
        else Condition("Ready", False, "NoReplicasReady", f"0/{desired} engine pods ready")
    )
    progressing = (
        Condition("Progressing", True, "RollingOut", f"{updated}/{desired} updated, {ready}/{desired} ready")
        if rolling
        else Condition("Progressing", False, "Complete", f"generation {generation} is rolled out")
    )
    conditions = [ready_cond, progressing, degraded or Condition("Degraded", False, "AsExpected")]
    phase = (
        "Degraded" if degraded else "Progressing" if rolling else "Ready" if ready_cond.status else "Pending"
    )
    return phase, conditions


def basemodel_status(
    bm_name: str,
    generation: int,
    desired: int,
    deployment: Mapping[str, Any] | None,
    *,
    selector: str,
    endpoint: str,
    adapters: Mapping[str, int],
    previous: Sequence[Mapping[str, Any]] | None,
    now: str,
    spec_error: SpecError | None = None,
) -> dict[str, Any]:
    """The whole BaseModel status (for a merge patch of `status`)."""
    phase, conditions = basemodel_conditions(generation, deployment, spec_error)
    dep_status = (deployment or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas", 0))
    return {
        "observedGeneration": generation,
        "phase": phase,
        "replicas": int(dep_status.get("replicas", 0)),
        "readyReplicas": ready,
        "readyText": f"{ready}/{desired}",
        "selector": selector,
        "endpoint": endpoint,
        "adapters": dict(adapters),
        "conditions": merge_conditions(previous, conditions, now, generation),
    }


def adapter_status(
    *,
    generation: int,
    phase: str,
    validated: Condition,
    ready: Condition,
    previous: Sequence[Mapping[str, Any]] | None,
    now: str,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A LoRAAdapter status: phase, conditions, message (the reason of the failing condition)."""
    failing = next((c for c in (validated, ready) if c.status is not True), None)
    return {
        "observedGeneration": generation,
        "phase": phase,
        "message": failing.message if failing else ready.message,
        "conditions": merge_conditions(previous, [validated, ready], now, generation),
        **(details or {}),
    }
