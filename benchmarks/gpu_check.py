"""Check NvmlView and GPU admission against a real NVIDIA GPU (not a pytest test: run it).

    .venv/bin/python benchmarks/gpu_check.py [--device 0] [--budget-mb 4096] [--json out.json]

The unit tests drive NvmlView through a stand-in for pynvml; only this script
meets the real driver. It checks, on one device:

1. init       gpu.source auto picks NVML; the status line names the devices.
2. smi        NVML's readings agree with nvidia-smi (name, total, free, utilisation).
3. sampling   the background sampler ticks every 250 ms (median 200-300 ms), one NVML
              sample takes well under that, and the event loop never stalls on it.
4. visible    memory allocated by another process (a CUDA upstream) shows in the
              reading, and how long after the allocation: this is what settle_ms
              (default 1000) must cover.
5. admission  a burst of calls through AdmissionController to an upstream that really
              allocates each call's memory: concurrency stays within the budget, the
              measured used memory never exceeds baseline + budget, the rest queue and
              are shed with Retry-After, and every reservation is released; then the
              same burst while another process holds half the budget, so that only
              the measured free memory can explain the lower concurrency.

The upstream allocates with the CUDA driver API through ctypes (libcuda.so.1 comes
with the driver), or PyTorch / CuPy when libcuda cannot be loaded. The budget is
carved out of the free memory with the reserved headroom, so a large GPU need not be
filled. Prints one JSON summary; exit 0 all passed, 1 a check failed, 2 no usable GPU.
``--dry-run`` exercises this script's own logic without a GPU (a fake NVML and a fake
allocator in-process); it proves nothing about the driver.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiohttp import ClientSession, ClientTimeout, web  # noqa: E402

from proxy.gpu import (  # noqa: E402
    AdmissionConfig, AdmissionController, GpuUnavailable, NvmlView, Shed, choose_view,
)

MIB = 1 << 20
CALL_MB = 1024


# -- the GPU-memory-allocating upstream ------------------------------------------


class CudaDriverAllocator:
    """cuMemAlloc/cuMemFree on the device's primary context: exact, no caching allocator."""

    name = "cuda-driver"

    def __init__(self, ordinal: int) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._check(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        self.ctx = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        self._check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUDA error {rc}")

    def alloc(self, mb: int) -> Any:
        self.lib.cuCtxSetCurrent(self.ctx)
        ptr = ctypes.c_uint64()
        rc = self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(mb * MIB))
        if rc != 0:
            raise MemoryError(f"cuMemAlloc({mb} MiB) failed with CUDA error {rc}")
        return ptr

    def free(self, ptr: Any) -> None:
        self.lib.cuCtxSetCurrent(self.ctx)
        self.lib.cuMemFree_v2(ptr)


class TorchAllocator:
    name = "torch"

    def __init__(self, ordinal: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", ordinal)
        torch.zeros(1, device=self.device)

    def alloc(self, mb: int) -> Any:
        try:
            return self.torch.empty(mb * MIB, dtype=self.torch.uint8, device=self.device)
        except self.torch.cuda.OutOfMemoryError as exc:
            raise MemoryError(str(exc)) from None

    def free(self, buf: Any) -> None:
        del buf
        self.torch.cuda.empty_cache()


class CupyAllocator:
    name = "cupy"

    def __init__(self, ordinal: int) -> None:
        import cupy

        self.cupy = cupy
        cupy.cuda.Device(ordinal).use()

    def alloc(self, mb: int) -> Any:
        try:
            return self.cupy.cuda.Memory(mb * MIB)  # unpooled
        except self.cupy.cuda.memory.OutOfMemoryError as exc:
            raise MemoryError(str(exc)) from None

    def free(self, mem: Any) -> None:
        mem.free() if hasattr(mem, "free") else None


class FakeAllocator:
    """--dry-run only: 'allocates' by moving a counter the fake NVML reads."""

    name = "fake"
    used_mb = 0

    def __init__(self, ordinal: int) -> None:
        pass

    def alloc(self, mb: int) -> Any:
        FakeAllocator.used_mb += mb
        return mb

    def free(self, mb: Any) -> None:
        FakeAllocator.used_mb -= mb


def make_allocator(ordinal: int, fake: bool = False) -> Any:
    if fake:
        return FakeAllocator(ordinal)
    errors = []
    for cls in (CudaDriverAllocator, TorchAllocator, CupyAllocator):
        try:
            return cls(ordinal)
        except Exception as exc:
            errors.append(f"{cls.name}: {exc}")
    raise RuntimeError("no way to allocate GPU memory: " + "; ".join(errors))


def upstream_app(allocator: Any) -> web.Application:
    held: dict[int, Any] = {}

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"backend": allocator.name})

    async def work(request: web.Request) -> web.Response:
        mb, hold_ms = int(request.query["mb"]), int(request.query["hold_ms"])
        try:
            buf = allocator.alloc(mb)
        except MemoryError as exc:
            return web.json_response({"error": str(exc)}, status=507)
        try:
            await asyncio.sleep(hold_ms / 1000)
        finally:
            allocator.free(buf)
        return web.json_response({"ok": True})

    async def hold(request: web.Request) -> web.Response:
        buf = allocator.alloc(int(request.query["mb"]))
        held[id(buf)] = buf
        return web.json_response({"id": id(buf)})

    async def release(request: web.Request) -> web.Response:
        allocator.free(held.pop(int(request.query["id"])))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_post("/work", work)
    app.router.add_post("/hold", hold)
    app.router.add_post("/release", release)
    return app


def serve_upstream(port: int, ordinal: int) -> None:
    allocator = make_allocator(ordinal)
    web.run_app(upstream_app(allocator), host="127.0.0.1", port=port, print=None)


# -- a fake NVML for --dry-run -------------------------------------------------------


def fake_nvml(total_mb: int = 81559, base_used_mb: int = 600) -> Any:
    import pynvml

    ns = SimpleNamespace(**{n: getattr(pynvml, n) for n in dir(pynvml) if n.startswith("NVMLError")})
    ns.nvmlInit = lambda: None
    ns.nvmlShutdown = lambda: None
    ns.nvmlDeviceGetCount = lambda: 1
    ns.nvmlDeviceGetHandleByIndex = lambda i: i
    ns.nvmlDeviceGetName = lambda h: b"Fake GPU (dry run)"

    def memory(h: Any) -> Any:
        used = base_used_mb + FakeAllocator.used_mb
        return SimpleNamespace(total=total_mb * MIB, used=used * MIB, free=(total_mb - used) * MIB)

    ns.nvmlDeviceGetMemoryInfo = memory
    ns.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=3, memory=1)
    return ns


# -- the checks ----------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.checks: dict[str, dict[str, Any]] = {}

    def check(self, name: str, ok: bool, **details: Any) -> bool:
        self.checks[name] = {"ok": bool(ok), **details}
        mark = "PASS" if ok else "FAIL"
        print(f"[{mark}] {name}: {json.dumps(details, default=str)}", file=sys.stderr, flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks.values())


def nvidia_smi() -> list[dict[str, Any]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "--query-gpu=index,name,memory.total,memory.used,memory.free,utilization.gpu",
         "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        index, name, total, used, free, util = [p.strip() for p in line.split(",")]
        rows.append({"index": int(index), "name": name, "total_mb": int(total), "used_mb": int(used),
                     "free_mb": int(free), "util_percent": None if not util.isdigit() else int(util)})
    return rows


async def wait_reading(view: NvmlView, device: int, predicate: Any, timeout: float) -> tuple[Any, float]:
    """The first reading that satisfies predicate, and how long it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while loop.time() - t0 < timeout:
        r = view.devices()[device]
        if predicate(r):
            return r, loop.time() - t0
        await asyncio.sleep(0.01)
    return None, timeout


async def check_sampling(report: Report, view: NvmlView, device: int) -> None:
    loop = asyncio.get_running_loop()
    stamps: list[float] = []
    view.add_listener(lambda: stamps.append(view.devices()[device].sampled_at))
    lags: list[float] = []
    t_end = loop.time() + 3.0
    while loop.time() < t_end:
        t0 = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - t0 - 0.01)
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if a is not None and b is not None]
    t0 = time.perf_counter()
    for _ in range(10):
        view._sample(view.devices())
    sample_ms = (time.perf_counter() - t0) * 100
    median = statistics.median(gaps) if gaps else None
    report.check(
        "sampling",
        bool(gaps) and 0.2 <= median <= 0.3 and len(stamps) >= 9 and max(lags) < 0.05 and sample_ms < 50,
        samples_in_3s=len(stamps), median_interval_ms=None if median is None else round(median * 1000, 1),
        max_interval_ms=round(max(gaps) * 1000, 1) if gaps else None,
        one_sample_ms=round(sample_ms, 2), max_loop_lag_ms=round(max(lags) * 1000, 2),
        sample_errors=view.sample_errors, last_error=view.last_error,
    )


async def check_visible(report: Report, view: NvmlView, device: int, http: ClientSession, base: str) -> float:
    await wait_reading(view, device, lambda r: True, 1.0)
    before = view.devices()[device]
    mb = 2048
    t_alloc = time.monotonic()
    async with http.post(f"{base}/hold", params={"mb": str(mb)}) as resp:
        hold_id = (await resp.json())["id"]
    t_allocated = time.monotonic()
    seen, _ = await wait_reading(view, device, lambda r: before.free_mb - r.free_mb >= mb - 64, 5.0)
    latency = None if seen is None else seen.sampled_at - t_alloc
    async with http.post(f"{base}/release", params={"id": str(hold_id)}) as resp:
        await resp.read()
    back, _ = await wait_reading(view, device, lambda r: r.free_mb >= before.free_mb - 64, 5.0)
    report.check(
        "visible", seen is not None and back is not None,
        allocated_mb=mb, alloc_call_ms=round((t_allocated - t_alloc) * 1000, 1),
        free_before_mb=before.free_mb, free_after_mb=None if seen is None else seen.free_mb,
        visible_after_ms=None if latency is None else round(latency * 1000, 1),
        freed_visible=back is not None,
        note="the first reading sampled after the allocation returned shows it; settle_ms must exceed "
             "admission-to-allocation time plus one interval",
    )
    return latency or 0.0


async def burst(view: NvmlView, device: int, http: ClientSession, base: str, budget_mb: int,
                headroom_mb: int, calls: int, hold_ms: int) -> dict[str, Any]:
    """``calls`` calls of CALL_MB each through admission; the budget is what the
    headroom (which these priorities may not use) leaves of the free memory."""
    cfg = AdmissionConfig(
        ceiling_util_percent=100, queue_max=6, queue_wait_s=2.5, settle_s=1.0,
        headroom_mb=headroom_mb, headroom_min_priority=100,
    )
    ctl = AdmissionController(view, cfg)
    baseline_used = view.devices()[device].used_mb
    peak = {"concurrent": 0, "used_mb": baseline_used}
    in_flight = 0
    results: list[dict[str, Any]] = []

    def watch() -> None:
        peak["used_mb"] = max(peak["used_mb"], view.devices()[device].used_mb)

    view.add_listener(watch)

    async def call(i: int) -> None:
        nonlocal in_flight
        t0 = time.monotonic()
        outcome = await ctl.acquire(CALL_MB, device=device, priority=i % 4, agent=f"agent{i % 3}")
        waited = time.monotonic() - t0
        if isinstance(outcome, Shed):
            results.append({"i": i, "shed": outcome.reason, "retry_after_s": round(outcome.retry_after or 0, 2),
                            "waited_s": round(waited, 3)})
            return
        with outcome:
            in_flight += 1
            peak["concurrent"] = max(peak["concurrent"], in_flight)
            try:
                async with http.post(f"{base}/work", params={"mb": str(CALL_MB), "hold_ms": str(hold_ms)}) as resp:
                    status = resp.status
                    await resp.read()
            finally:
                in_flight -= 1
        results.append({"i": i, "status": status, "priority": i % 4, "waited_s": round(waited, 3)})

    await asyncio.gather(*(call(i) for i in range(calls)))
    await asyncio.sleep(0.6)  # two more readings for the peak watcher
    view._listeners.remove(watch)
    shed: dict[str, int] = {}
    for r in results:
        if "shed" in r:
            shed[r["shed"]] = shed.get(r["shed"], 0) + 1
    return {
        "budget_mb": budget_mb, "headroom_mb": cfg.headroom_mb, "calls": calls,
        "admitted": ctl.admitted, "released": ctl.released, "shed": shed,
        "oom": sum(1 for r in results if r.get("status") == 507),
        "upstream_errors": sum(1 for r in results if r.get("status") not in (None, 200, 507)),
        "peak_concurrent": peak["concurrent"], "baseline_used_mb": baseline_used,
        "peak_used_over_baseline_mb": peak["used_mb"] - baseline_used,
        "left_reserved": ctl.reserved(), "retry_after_s": sorted({r["retry_after_s"] for r in results if "shed" in r}),
    }


async def check_admission(report: Report, view: NvmlView, device: int, http: ClientSession, base: str,
                          budget_mb: int) -> None:
    slots = budget_mb // CALL_MB
    # Fixed before the external hold below, so that the hold eats into the budget.
    headroom = view.devices()[device].free_mb - budget_mb
    a = await burst(view, device, http, base, budget_mb, headroom, calls=16, hold_ms=1000)
    report.check(
        "admission", a["peak_concurrent"] <= slots and a["admitted"] >= slots and sum(a["shed"].values()) > 0
        and a["admitted"] + sum(a["shed"].values()) == 16 and a["oom"] == 0 and a["upstream_errors"] == 0
        and a["left_reserved"] == {} and a["peak_used_over_baseline_mb"] <= budget_mb + 256,
        expected_max_concurrent=slots, **a,
    )
    # Another process takes half the budget outside Regate: only the reading shows it.
    external = (slots // 2) * CALL_MB
    before = view.devices()[device].free_mb
    async with http.post(f"{base}/hold", params={"mb": str(external)}) as resp:
        hold_id = (await resp.json())["id"]
    await wait_reading(view, device, lambda r: before - r.free_mb >= external - 64, 5.0)
    try:
        b = await burst(view, device, http, base, budget_mb, headroom, calls=16, hold_ms=1000)
    finally:
        async with http.post(f"{base}/release", params={"id": str(hold_id)}) as resp:
            await resp.read()
    report.check(
        "admission_with_external_use",
        b["peak_concurrent"] <= slots - slots // 2 and b["admitted"] >= 1 and b["oom"] == 0
        and b["left_reserved"] == {},
        external_mb=external, expected_max_concurrent=slots - slots // 2, **b,
    )


async def main_async(args: argparse.Namespace) -> int:
    report = Report()
    nvml = fake_nvml() if args.dry_run else None
    try:
        view = choose_view("nvml", nvml=nvml)
    except GpuUnavailable as exc:
        print(json.dumps({"ok": False, "no_gpu": str(exc)}))
        return 2
    assert isinstance(view, NvmlView)
    report.check("init", True, status=view.status, devices=[r.as_dict() for r in view.devices()])
    device = args.device
    if device >= len(view.devices()):
        report.check("init", False, error=f"no device {device}")
        print(json.dumps(report.checks, default=str))
        return 1

    smi = None if args.dry_run else nvidia_smi()
    mine = view.devices()[device]
    if smi is None:
        report.check("smi", True, skipped="nvidia-smi not found" if not args.dry_run else "dry run")
    else:
        theirs = next(r for r in smi if r["index"] == device)
        report.check(
            "smi", theirs["name"] == mine.name and abs(theirs["total_mb"] - mine.total_mb) <= 1
            and abs(theirs["free_mb"] - mine.free_mb) <= 256
            and (theirs["util_percent"] is None or mine.util_percent is not None),
            nvml=mine.as_dict(), nvidia_smi=theirs,
        )

    await view.start()
    upstream = None
    runner = None
    try:
        await check_sampling(report, view, device)
        if args.dry_run:
            runner = web.AppRunner(upstream_app(make_allocator(device, fake=True)))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
        else:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
            upstream = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(port),
                                         "--device", str(device)], env=env)
        base = f"http://127.0.0.1:{port}"
        async with ClientSession(timeout=ClientTimeout(total=60)) as http:
            backend = None
            for _ in range(300):
                if upstream is not None and upstream.poll() is not None:
                    break
                try:
                    async with http.get(f"{base}/ready") as resp:
                        backend = (await resp.json())["backend"]
                        break
                except Exception:
                    await asyncio.sleep(0.1)
            if not report.check("upstream", backend is not None, backend=backend):
                return 1
            await asyncio.sleep(0.6)  # the upstream's CUDA context into the baseline
            await check_visible(report, view, device, http, base)
            free = view.devices()[device].free_mb
            budget = min(args.budget_mb, (free - 2048) // CALL_MB * CALL_MB)
            if budget < 2 * CALL_MB:
                report.check("admission", False, error=f"only {free} MiB free; need at least 4096")
            else:
                await check_admission(report, view, device, http, base, budget)
    finally:
        await view.stop()
        if runner is not None:
            await runner.cleanup()
        if upstream is not None:
            upstream.terminate()
            try:
                upstream.wait(10)
            except subprocess.TimeoutExpired:
                upstream.kill()
    summary = {"ok": report.ok, "dry_run": args.dry_run, "checks": report.checks}
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report.ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=int, default=0, help="NVML index of the device to check")
    parser.add_argument("--budget-mb", type=int, default=4096, help="GPU memory the admission scenario may use")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--dry-run", action="store_true", help="fake NVML and allocator: tests this script only")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.device)
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
