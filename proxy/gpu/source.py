"""Which GPU view Regate runs with: ``gpu.source`` (auto | nvml | static) decided once, at startup.

``auto`` uses NVML when it initialises and sees a GPU, else falls back to the
static view with a warning that names the cause (no library, no driver, no
permission, no device). ``nvml`` insists: without NVML, startup fails with that
cause. ``static`` never touches NVML. Whichever is chosen, ``view.status`` is the
line for the startup log and /readyz.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable

from .nvml import NvmlView, import_pynvml
from .static import StaticView
from .view import GpuUnavailable, GpuView

log = logging.getLogger("regate.gpu")

SOURCES = ("auto", "nvml", "static")


def choose_view(
    source: str = "auto",
    static_devices: Iterable[Any] = (),
    *,
    nvml: Any = None,
    interval_s: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
) -> GpuView:
    """The view for ``gpu.source``; may block briefly while NVML initialises.

    ``static_devices``: the declared capacities (``gpu.static``), used by the
    static view. ``nvml``: the pynvml module or a stand-in with its functions.
    Raises GpuUnavailable only when ``source`` is ``nvml`` and NVML cannot be used.
    """
    if source not in SOURCES:
        raise ValueError(f"gpu.source must be one of {', '.join(SOURCES)}, got {source!r}")
    static_devices = list(static_devices)
    if source == "static":
        view: GpuView = StaticView(static_devices)
    else:
        try:
            view = NvmlView(nvml if nvml is not None else import_pynvml(), interval_s=interval_s, clock=clock)
            view.open()
        except GpuUnavailable as exc:
            if source == "nvml":
                raise GpuUnavailable(
                    f"gpu.source is nvml but NVML cannot be used: {exc}. "
                    "Fix the driver access, or set gpu.source to auto or static"
                ) from None
            view = StaticView(static_devices, reason=f"NVML unavailable: {exc}")
            log.warning(
                "GPU: %s; falling back to the static view (%d device(s) declared in gpu.static)",
                view.reason, len(static_devices),
            )
    if not view.devices():
        log.warning("GPU: no devices (gpu.static is empty); every GPU-bound call will be shed")
    log.info("GPU: %s", view.status)
    return view


async def open_view(source: str = "auto", static_devices: Iterable[Any] = (), **kwargs: Any) -> GpuView:
    """``choose_view`` off the event loop (nvmlInit can take a second on a cold driver)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: choose_view(source, static_devices, **kwargs))
