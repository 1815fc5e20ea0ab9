"""What Regate knows about its GPUs: one reading per device, behind one small interface.

A ``GpuView`` answers ``devices()`` with the latest ``DeviceReading`` of every
device, without I/O, so the request path can call it freely. Where the numbers
come from is the view's business: ``NvmlView`` (nvml.py) samples the driver in
the background, ``StaticView`` (static.py) repeats capacities declared in
config. A view tells its listeners when a new reading has arrived, so that the
admission controller can wake the calls waiting for memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

Listener = Callable[[], None]


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One device at one moment. Memory in MiB (2**20 bytes).

    ``util_percent`` is None when the device cannot report it (some MIG and
    virtual GPUs). ``sampled_at`` is the view's clock when the sample began, or
    None for a reading that was declared rather than measured (the static view):
    nothing Regate admitted is ever visible in such a reading.
    """

    index: int
    name: str
    total_mb: int
    free_mb: int
    used_mb: int
    util_percent: float | None
    sampled_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "total_mb": self.total_mb,
            "free_mb": self.free_mb,
            "used_mb": self.used_mb,
            "util_percent": self.util_percent,
            "sampled_at": self.sampled_at,
        }


@runtime_checkable
class GpuView(Protocol):
    # "nvml" or "static": what the numbers are.
    source: str

    @property
    def status(self) -> str:
        """One line for the startup log and /readyz: the source and why it was chosen."""
        ...

    def devices(self) -> Sequence[DeviceReading]:
        """The latest reading of every device, ordered by index. Never does I/O."""
        ...

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener()`` on the event loop after each new reading."""
        ...

    def describe(self) -> dict[str, Any]:
        """The view's own state as JSON (for /admin/gpu and /readyz)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class GpuUnavailable(Exception):
    """The configured GPU source cannot be used; the message says why and what to do."""
