"""The NVML GPU view: live per-device memory and utilisation from the NVIDIA driver.

``open()`` initialises NVML, finds the devices and takes a first reading (at
startup; it may block for a moment). After ``start()`` a background task samples
every device every ``interval_s`` (250 ms); the NVML calls run on one dedicated
thread, so a slow or hung driver call never blocks the event loop, and
``devices()`` only returns the last reading. A failed sample never raises: the
device keeps its last good reading (its ``sampled_at`` ages, which /admin/gpu
shows), the error is counted, and the sampler tries again next tick.

``nvml`` is the pynvml module (nvidia-ml-py) or any object with the same small
set of functions — ``nvmlInit``, ``nvmlShutdown``, ``nvmlDeviceGetCount``,
``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetName``, ``nvmlDeviceGetMemoryInfo``,
``nvmlDeviceGetUtilizationRates`` — and its ``NVMLError`` classes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .view import DeviceReading, GpuUnavailable, Listener

log = logging.getLogger("regate.gpu")

_MIB = 1 << 20


def import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise GpuUnavailable(f"the NVML bindings are not installed ({exc}); pip install nvidia-ml-py") from None
    return pynvml


def explain(nvml: Any, exc: BaseException) -> str:
    """What an NVML error means for someone setting Regate up, and what to do."""

    def is_(name: str) -> bool:
        cls = getattr(nvml, name, None)
        return isinstance(cls, type) and isinstance(exc, cls)

    if is_("NVMLError_LibraryNotFound"):
        return ("NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this machine, or, in a "
                "container, not started with the NVIDIA container runtime (--gpus)")
    if is_("NVMLError_DriverNotLoaded"):
        return "NVIDIA driver not loaded (is the kernel module installed and loaded? try nvidia-smi)"
    if is_("NVMLError_NoPermission"):
        return "no permission to open the GPU devices (/dev/nvidia*): check the user's groups or the container's device list"
    if is_("NVMLError_LibRmVersionMismatch"):
        return "NVML library and kernel driver versions differ (driver updated without a reboot?)"
    if is_("NVMLError_GpuIsLost"):
        return "a GPU fell off the bus (NVML: GPU is lost); check dmesg and nvidia-smi"
    return f"NVML error: {exc}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlView:
    source = "nvml"

    def __init__(
        self,
        nvml: Any = None,
        *,
        interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self._nvml = nvml if nvml is not None else import_pynvml()
        self.interval_s = interval_s
        self._clock = clock
        self._handles: list[Any] = []
        self._names: list[str] = []
        # Devices that answered NotSupported for utilisation (MIG, some vGPUs): not asked again.
        self._no_util: set[int] = set()
        self._readings: tuple[DeviceReading, ...] = ()
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._opened = False
        self.samples = 0
        self.sample_errors = 0
        self.last_error: str | None = None
        self._driver = ""

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Initialise NVML and take the first reading; GpuUnavailable says why not."""
        nv = self._nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise GpuUnavailable(explain(nv, exc)) from exc
        self._opened = True
        try:
            count = nv.nvmlDeviceGetCount()
            if count == 0:
                raise GpuUnavailable("NVML works but sees no GPU (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES hides them all)")
            self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._names = [_text(nv.nvmlDeviceGetName(h)) for h in self._handles]
            get_version = getattr(nv, "nvmlSystemGetDriverVersion", None)
            if get_version is not None:
                try:
                    self._driver = _text(get_version())
                except nv.NVMLError:
                    pass
            readings, errors = self._sample(())
            if errors:
                index, err = errors[0]
                raise GpuUnavailable(f"cannot read GPU {index}: {explain(nv, err)}")
        except nv.NVMLError as exc:
            self._shutdown()
            raise GpuUnavailable(explain(nv, exc)) from exc
        except GpuUnavailable:
            self._shutdown()
            raise
        self._readings = readings
        self.samples = 1

    async def start(self) -> None:
        if not self._opened:
            raise RuntimeError("NvmlView.open() must succeed before start()")
        if self._task is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regate-nvml")
            self._task = asyncio.get_running_loop().create_task(self._run(), name="regate-nvml-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        executor, self._executor = self._executor, None
        if executor is not None:
            # Queued behind any sample still running on the NVML thread. A hung
            # driver call must not hang shutdown: wait a little, then leave it.
            fut = asyncio.get_running_loop().run_in_executor(executor, self._shutdown)
            try:
                await asyncio.wait_for(fut, 2.0)
            except (asyncio.TimeoutError, Exception):
                log.warning("GPU: NVML did not shut down cleanly")
            executor.shutdown(wait=False)
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._opened:
            self._opened = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    # -- the interface -----------------------------------------------------

    @property
    def status(self) -> str:
        names = ", ".join(sorted(set(self._names))) or "-"
        driver = f", driver {self._driver}" if self._driver else ""
        return f"nvml: {len(self._handles)} device(s) ({names}){driver}, sampled every {self.interval_s * 1000:g} ms"

    def devices(self) -> tuple[DeviceReading, ...]:
        return self._readings

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "status": self.status,
            "driver": self._driver or None,
            "interval_ms": self.interval_s * 1000,
            "samples": self.samples,
            "sample_errors": self.sample_errors,
            "last_error": self.last_error,
            "sampling": self._task is not None and not self._task.done(),
        }

    # -- sampling ----------------------------------------------------------

    def _sample(self, previous: tuple[DeviceReading, ...]) -> tuple[tuple[DeviceReading, ...], list[tuple[int, BaseException]]]:
        """Read every device (on the NVML thread). A device that fails keeps its previous
        reading; the errors come back to be counted on the loop."""
        nv = self._nvml
        before = {r.index: r for r in previous}
        out: list[DeviceReading] = []
        errors: list[tuple[int, BaseException]] = []
        for i, handle in enumerate(self._handles):
            # Taken before the calls: whatever Regate admits from here on cannot
            # be in this reading, so it is counted as not yet visible.
            sampled_at = self._clock()
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                util: float | None = None
                if i not in self._no_util:
                    try:
                        util = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
                    except nv.NVMLError as exc:
                        if not isinstance(exc, getattr(nv, "NVMLError_NotSupported", ())):
                            raise
                        self._no_util.add(i)
                out.append(DeviceReading(
                    index=i,
                    name=self._names[i],
                    total_mb=int(mem.total) // _MIB,
                    free_mb=int(mem.free) // _MIB,
                    used_mb=int(mem.used) // _MIB,
                    util_percent=util,
                    sampled_at=sampled_at,
                ))
            except Exception as exc:
                errors.append((i, exc))
                if i in before:
                    out.append(before[i])
        return tuple(out), errors

    async def sample_now(self) -> None:
        """One sample, on the NVML thread; errors are counted, never raised."""
        loop = asyncio.get_running_loop()
        try:
            readings, errors = await loop.run_in_executor(self._executor, self._sample, self._readings)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the executor itself failed: count it like a driver error
            readings, errors = self._readings, [(-1, exc)]
        self.samples += 1
        if errors:
            self._count_errors(errors)
        self._readings = readings
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("GPU: reading listener failed")

    def _count_errors(self, errors: list[tuple[int, BaseException]]) -> None:
        self.sample_errors += len(errors)
        index, exc = errors[0]
        message = f"GPU {index}: {explain(self._nvml, exc)}" if index >= 0 else f"sampler: {exc!r}"
        # Logged when the error changes, not 4 times a second while it persists.
        if message != self.last_error:
            log.warning("GPU: sampling failed (%s); keeping the last good reading", message)
        self.last_error = message

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval_s
            try:
                await self.sample_now()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the sampler die; the next tick tries again
                log.exception("GPU: sampler failed")
            delay = next_at - loop.time()
            if delay < 0:
                # Behind (a slow driver call): skip the missed ticks rather than burst.
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)
