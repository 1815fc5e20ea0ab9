"""GPU views: the static view, choosing a view (auto falls back to static here, where no
NVML can run, and says why), and NvmlView's own code — open, reading conversion, the
250 ms sampler, error handling — driven by a stand-in for the handful of pynvml
functions it calls, raising nvidia-ml-py's real error types. The stand-in is not the
driver: benchmarks/gpu_check.py checks NvmlView against a real GPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest

from proxy.gpu import (
    AdmissionConfig, AdmissionController, GpuUnavailable, GpuView, NvmlView, StaticDevice, StaticView, Ticket,
    choose_view, open_view,
)

MIB = 1 << 20


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # nvidia-ml-py maps the code to its subclass


def real_nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


class StandInNvml:
    """The pynvml functions NvmlView uses, over scripted devices; the error types are pynvml's own."""

    def __init__(self, devices=None, init_error=None):
        for name in dir(pynvml):
            if name.startswith("NVMLError"):
                setattr(self, name, getattr(pynvml, name))
        # (name, total MiB, free MiB, util %)
        self.devices = [list(d) for d in ([(b"Stand-in A100", 40960, 30000, 12)] if devices is None else devices)]
        self.init_error = init_error
        self.memory_errors: dict[int, BaseException] = {}
        self.util_errors: dict[int, BaseException] = {}
        self.memory_delay = 0.0
        self.util_calls = 0
        self.shutdowns = 0
        self.threads: set[str] = set()

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return self.devices[handle[1]][0]

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.threads.add(threading.current_thread().name)
        if self.memory_delay:
            time.sleep(self.memory_delay)
        index = handle[1]
        if index in self.memory_errors:
            raise self.memory_errors[index]
        _, total, free, _ = self.devices[index]
        return SimpleNamespace(total=total * MIB + 123, free=free * MIB + 456, used=(total - free) * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.util_calls += 1
        index = handle[1]
        if index in self.util_errors:
            raise self.util_errors[index]
        return SimpleNamespace(gpu=self.devices[index][3], memory=0)


# -- the static view ---------------------------------------------------------


def test_static_view_reads_declared_capacities():
    view = StaticView([{"memory_mb": 24576, "name": "L4"}, StaticDevice(memory_mb=8000, util_percent=30),
                       SimpleNamespace(memory_mb=1000, name=None, util_percent=None)])
    assert isinstance(view, GpuView)
    [a, b, c] = view.devices()
    assert (a.index, a.name, a.total_mb, a.free_mb, a.used_mb, a.util_percent, a.sampled_at) == \
        (0, "L4", 24576, 24576, 0, 0.0, None)
    assert (b.name, b.util_percent, c.name) == ("static-1", 30.0, "static-2")
    assert view.status == "static: 3 declared device(s), 33576 MiB in all; configured (gpu.source: static)"
    assert a.as_dict()["sampled_at"] is None


@pytest.mark.parametrize("spec, message", [
    ({"memory_mb": 0}, "memory_mb must be a whole number"),
    ({"memory_mb": 1.5}, "memory_mb must be a whole number"),
    ({"memory_mb": 100, "util_percent": 101}, "util_percent must be between 0 and 100"),
])
def test_static_devices_are_validated(spec, message):
    with pytest.raises(ValueError, match=message):
        StaticView([spec])


# -- choosing a view -----------------------------------------------------------


@pytest.mark.skipif(real_nvml_works(), reason="this machine has a working NVML")
def test_auto_falls_back_to_static_here_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="regate.gpu"):
        view = choose_view("auto", [{"memory_mb": 16000}])
    assert isinstance(view, StaticView) and view.source == "static"
    assert "NVML unavailable: NVML library not found" in view.status
    assert view.devices()[0].total_mb == 16000
    assert any("falling back to the static view" in r.message and "library not found" in r.message
               for r in caplog.records)


@pytest.mark.skipif(real_nvml_works(), reason="this machine has a working NVML")
def test_forced_nvml_without_nvml_fails_startup_with_the_cause():
    with pytest.raises(GpuUnavailable, match="gpu.source is nvml but NVML cannot be used: NVML library not found"):
        choose_view("nvml")


def test_static_source_never_touches_nvml():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"NVML used: {name}")

    view = choose_view("static", [{"memory_mb": 100}], nvml=Untouchable())
    assert view.status.endswith("configured (gpu.source: static)")
    with pytest.raises(ValueError, match="gpu.source must be one of"):
        choose_view("cuda")


@pytest.mark.parametrize("error, says", [
    (nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), "NVML library not found"),
    (nvml_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED), "NVIDIA driver not loaded"),
    (nvml_error(pynvml.NVML_ERROR_NO_PERMISSION), "no permission to open the GPU devices"),
    (nvml_error(pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH), "versions differ"),
    (nvml_error(pynvml.NVML_ERROR_UNKNOWN), "NVML error: Unknown Error"),
])
def test_auto_names_each_nvml_failure(error, says, caplog):
    with caplog.at_level(logging.WARNING, logger="regate.gpu"):
        view = choose_view("auto", [{"memory_mb": 100}], nvml=StandInNvml(init_error=error))
    assert isinstance(view, StaticView) and "NVML unavailable: " in view.status and says in view.status
    assert says in caplog.text
    with pytest.raises(GpuUnavailable, match=says):
        choose_view("nvml", nvml=StandInNvml(init_error=error))


def test_auto_falls_back_when_nvml_sees_no_device_or_cannot_read_one(caplog):
    nv = StandInNvml(devices=[])
    view = choose_view("auto", [], nvml=nv)
    assert "sees no GPU" in view.status and nv.shutdowns == 1
    assert "every GPU-bound call will be shed" in caplog.text
    nv = StandInNvml()
    nv.memory_errors[0] = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    view = choose_view("auto", [], nvml=nv)
    assert "cannot read GPU 0: a GPU fell off the bus" in view.status and nv.shutdowns == 1


async def test_open_view_runs_off_the_loop():
    view = await open_view("auto", [{"memory_mb": 5}], nvml=StandInNvml(init_error=nvml_error(
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED)))
    assert isinstance(view, StaticView)
    view = await open_view("auto", nvml=StandInNvml())
    assert isinstance(view, NvmlView)


# -- NvmlView over the stand-in --------------------------------------------------


def test_nvml_view_converts_readings():
    clock = iter([10.0, 20.0, 30.0]).__next__
    nv = StandInNvml(devices=[(b"NVIDIA H100 80GB HBM3", 81559, 80000, 7), ("NVIDIA L4", 23034, 100, 99)])
    view = choose_view("auto", nvml=nv, clock=clock)
    assert isinstance(view, NvmlView) and view.source == "nvml"
    a, b = view.devices()
    assert (a.index, a.name, a.total_mb, a.free_mb, a.used_mb, a.util_percent, a.sampled_at) == \
        (0, "NVIDIA H100 80GB HBM3", 81559, 80000, 1559, 7.0, 10.0)
    assert (b.name, b.free_mb, b.util_percent, b.sampled_at) == ("NVIDIA L4", 100, 99.0, 20.0)
    assert view.status == ("nvml: 2 device(s) (NVIDIA H100 80GB HBM3, NVIDIA L4), driver 550.54.15, "
                           "sampled every 250 ms")


async def test_sampler_reads_every_interval_off_the_loop_and_wakes_listeners():
    nv = StandInNvml()
    view = NvmlView(nv, interval_s=0.02)
    view.open()
    woken = []
    view.add_listener(lambda: woken.append(view.devices()[0].free_mb))
    await view.start()
    try:
        await asyncio.sleep(0.05)
        nv.devices[0][2] = 12345
        await asyncio.sleep(0.12)
    finally:
        await view.stop()
    assert 12345 in woken and woken[0] == 30000
    # ~8 ticks in 0.17 s at 20 ms; generous bounds for a loaded machine.
    assert 4 <= len(woken) <= 12
    assert nv.threads == {"MainThread", "regate-nvml_0"}   # open() at startup, then only the NVML thread
    assert nv.shutdowns == 1 and view.describe()["sampling"] is False


async def test_sampler_survives_nvml_errors_and_keeps_the_last_good_reading(caplog):
    nv = StandInNvml(devices=[("A", 1000, 900, 1), ("B", 1000, 800, 2)])
    view = NvmlView(nv, interval_s=0.01)
    view.open()
    ctl = AdmissionController(view, AdmissionConfig(settle_s=0))
    lost_b = view.devices()[1]

    def bad_listener():
        raise RuntimeError("listener bug")

    view.add_listener(bad_listener)
    nv.memory_errors[1] = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    await view.start()
    try:
        await asyncio.sleep(0.05)
        assert view.devices()[1] is lost_b          # device 1 keeps its last good reading
        nv.devices[0][2] = 500
        await asyncio.sleep(0.03)
        assert view.devices()[0].free_mb == 500     # device 0 goes on being sampled
        # The request path meanwhile: admission answers from the readings it has.
        t = ctl.submit(400, device=0).outcome
        assert isinstance(t, Ticket)
        t.release()
        nv.memory_errors[0] = RuntimeError("not even an NVML error")
        await asyncio.sleep(0.03)
        del nv.memory_errors[0], nv.memory_errors[1]
        nv.devices[1][2] = 700
        await asyncio.sleep(0.03)
        assert view.devices()[1].free_mb == 700     # recovered
    finally:
        await view.stop()
    d = view.describe()
    assert d["sample_errors"] >= 5
    assert d["last_error"] in ("GPU 1: a GPU fell off the bus (NVML: GPU is lost); check dmesg and nvidia-smi",
                               "GPU 0: NVML error: not even an NVML error")
    warnings = [r.message for r in caplog.records if "sampling failed" in r.message]
    assert 1 <= len(warnings) <= 4  # logged when the error changes, not every tick


def test_devices_without_utilisation_are_read_for_memory_alone():
    nv = StandInNvml(devices=[("MIG 1g.10gb", 9984, 9000, 0)])
    nv.util_errors[0] = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
    view = NvmlView(nv)
    view.open()
    assert view.devices()[0].util_percent is None and view.devices()[0].free_mb == 9000
    view._sample(view.devices())
    assert nv.util_calls == 1  # not asked again


async def test_a_slow_driver_call_never_blocks_the_event_loop():
    nv = StandInNvml()
    view = NvmlView(nv, interval_s=0.01)
    view.open()
    before = view.devices()
    nv.memory_delay = 0.3
    loop = asyncio.get_running_loop()
    await view.start()
    try:
        worst = 0.0
        for _ in range(20):
            t0 = loop.time()
            await asyncio.sleep(0.005)
            worst = max(worst, loop.time() - t0 - 0.005)
            assert view.devices() is before   # answers at once, from the last reading
    finally:
        t0 = loop.time()
        await view.stop()
        stopped_in = loop.time() - t0
    assert worst < 0.1
    assert stopped_in < 2.5


async def test_a_new_reading_wakes_a_waiting_call():
    nv = StandInNvml(devices=[("A", 1000, 100, 0)])
    view = NvmlView(nv, interval_s=0.01)
    view.open()
    ctl = AdmissionController(view, AdmissionConfig(settle_s=0, queue_wait_s=2))
    await view.start()
    try:
        waiting = asyncio.create_task(ctl.acquire(500))
        await asyncio.sleep(0.03)
        assert not waiting.done()
        nv.devices[0][2] = 900   # another process freed its memory
        ticket = await asyncio.wait_for(waiting, 1.0)
        assert isinstance(ticket, Ticket)
        ticket.release()
    finally:
        await view.stop()
