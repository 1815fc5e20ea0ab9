"""The static GPU view: capacities declared in config, for machines without a GPU or
without NVML access.

Each declared device reads as entirely free at its declared utilisation, for
ever; nothing is measured, so the admission controller counts every
reservation against the declared capacity (``sampled_at`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .view import DeviceReading, Listener


@dataclass(frozen=True, slots=True)
class StaticDevice:
    memory_mb: int
    name: str | None = None
    util_percent: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.memory_mb, bool) or not isinstance(self.memory_mb, int) or self.memory_mb <= 0:
            raise ValueError(f"memory_mb must be a whole number of MiB > 0, got {self.memory_mb!r}")
        if not 0 <= self.util_percent <= 100:
            raise ValueError(f"util_percent must be between 0 and 100, got {self.util_percent!r}")

    @classmethod
    def of(cls, spec: Any) -> "StaticDevice":
        """From a StaticDevice, a mapping, or any object with the same attribute names
        (the pydantic model of ``gpu.static[]``)."""
        if isinstance(spec, StaticDevice):
            return spec
        get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None: getattr(spec, k, d))
        util = get("util_percent", 0.0)
        memory_mb: Any = get("memory_mb")
        return cls(memory_mb=memory_mb, name=get("name"), util_percent=float(util or 0.0))


class StaticView:
    source = "static"

    def __init__(self, devices: Iterable[Any] = (), reason: str = "") -> None:
        specs = [StaticDevice.of(d) for d in devices]
        self._readings = tuple(
            DeviceReading(
                index=i,
                name=s.name or f"static-{i}",
                total_mb=s.memory_mb,
                free_mb=s.memory_mb,
                used_mb=0,
                util_percent=float(s.util_percent),
                sampled_at=None,
            )
            for i, s in enumerate(specs)
        )
        # Why static was chosen: "configured", or the NVML failure when auto fell back.
        self.reason = reason or "configured (gpu.source: static)"

    @property
    def status(self) -> str:
        total = sum(r.total_mb for r in self._readings)
        return f"static: {len(self._readings)} declared device(s), {total} MiB in all; {self.reason}"

    def devices(self) -> tuple[DeviceReading, ...]:
        return self._readings

    def add_listener(self, listener: Listener) -> None:
        # Declared numbers never change: there is nothing to announce.
        pass

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "status": self.status, "reason": self.reason}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
