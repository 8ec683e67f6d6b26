"""What a runtime and its host store say about themselves (start-up panels, `--json`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class StoreInfo:
    bytes: int
    pinned: bool
    pin_error: str | None
    load_seconds: float
    tiers: dict = field(default_factory=dict)  # tiered store: RAM / staging / disk counts

    def to_dict(self) -> dict:
        out = {"bytes": self.bytes, "pinned": self.pinned, "pin_error": self.pin_error,
               "load_seconds": round(self.load_seconds, 3)}
        if self.tiers:
            out["tiers"] = self.tiers
        return out


@dataclass(frozen=True)
class RuntimeInfo:
    """An expert runtime's configuration as built (fields that do not apply are None)."""

    policy: str
    kernel: str | None = None
    experts_format: str | None = None  # a compressed (lossy) format of the routed experts
    tau: int | None = None
    stall_refresh: bool | None = None
    warm_start: bool | None = None
    skip_last_step: bool | None = None
    follow_pool: bool | None = None  # tide on a block-routed model: follows the routing pool
    misses: str | None = None
    prefetch: str | None = None  # streamed misses: "layer", "step" (read ahead on a guess), "off"
    experts_per_layer: dict[int, int] | None = None
    cpu_threads: int | None = None
    cpu_mode: str | None = None
    cpu_dtype: str | None = None
    host_store: StoreInfo | None = None
    slot_pool_bytes: int | None = None
    scratch_bytes: int | None = None

    def to_dict(self) -> dict:
        out: dict = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "experts_per_layer":
                v = {str(k): b for k, b in v.items()}
            elif f.name == "host_store":
                v = v.to_dict()
            out[f.name] = v
        return out
