"""Operator settings: one frozen dataclass, units in the names, the reason for each default beside it."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafleet.engine.adapter_format import DEFAULT_MAX_BYTES

from .registry_writer import WriterSettings


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # watched namespaces (kopf patterns allowed); empty: all namespaces
    writer: WriterSettings = field(default_factory=WriterSettings)
    adapter_max_bytes: int = DEFAULT_MAX_BYTES  # refuse adapters whose files are larger
    retry_delay_s: float = 10.0  # after a transient failure (API or S3 unavailable, 409 conflict)
    # BaseModel status is refreshed on every Deployment event; this timer also recounts adapters
    # and drops registry entries whose LoRAAdapter vanished without its finalizer running.
    status_interval_s: float = 30.0
    # Each adapter's S3 ETag is rechecked this often: a re-upload under the same URI is picked up,
    # and an adapter that failed (missing object, BaseModel absent) is tried again.
    revalidate_interval_s: float = 300.0
    # A credentials Secret is reread after this long: rotated keys are picked up within a minute,
    # and a burst of adapters sharing one Secret costs the API server one read.
    secret_ttl_s: float = 60.0

    @property
    def exact_namespaces(self) -> bool:
        """Watching named namespaces only (no glob, no `!` exclusion): then kopf need not list and
        watch Namespaces or CRDs (nor hold the cluster-wide RBAC for it), it watches just these."""
        return bool(self.namespaces) and not any(set("*?[!") & set(ns) for ns in self.namespaces)

    def __post_init__(self) -> None:
        for name in ("retry_delay_s", "status_interval_s", "revalidate_interval_s", "secret_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.adapter_max_bytes < 1:
            raise ValueError("adapter_max_bytes must be positive")
