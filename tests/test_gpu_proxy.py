"""GPU admission through the proxy, over real sockets, on the static view
(this machine has no GPU; NVML's own code is covered in test_gpu_view.py and
by benchmarks/gpu_check.py on a GPU machine)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import AGENT_KEY
from tests.support.procs import RegateProcess, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")
H = {"X-Api-Key": AGENT_KEY}


@pytest.fixture(scope="module")
def regate(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"engine": "off"},
        "gpu": {"source": "static", "static": [{"memory_mb": 1000, "name": "declared"}],
                "queue": {"max": 0}},
        "tools": [
            {"name": "infer", "upstream": upstream, "gpu": {"memory_mb": 600}, "timeout_ms": 5000},
            {"name": "deadgpu", "upstream": f"http://127.0.0.1:{free_port()}", "gpu": {"memory_mb": 600}},
            {"name": "huge", "upstream": upstream, "gpu": {"memory_mb": 5000}},
            {"name": "cpu", "upstream": upstream},
        ],
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()


async def get(s, url, path):
    async with s.get(url + path, headers=H) as r:
        return r.status, dict(r.headers), await r.json()


async def reserved_mb(s, regate) -> int:
    async with s.get(regate.admin_url + "/admin/gpu", headers=regate.admin_headers) as r:
        return (await r.json())["devices"][0]["reserved_mb"]


async def wait_reserved(s, regate, want: int, timeout_s: float = 30.0) -> None:
    """Poll the admin GPU view until ``want`` MiB are reserved (generous deadline: load only slows it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (got := await reserved_mb(s, regate)) != want:
        assert loop.time() < deadline, f"{got} MiB reserved after {timeout_s:g}s, expected {want}"
        await asyncio.sleep(0.02)


async def test_second_call_that_does_not_fit_is_shed_with_retry_after(regate):
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(get(s, regate.url, "/tools/infer/slow?s=3"))
        await wait_reserved(s, regate, 600)  # the first call holds its reservation
        status, headers, body = await get(s, regate.url, "/tools/infer/x")
        assert status == 503 and body["error"]["code"] == "gpu_saturated"
        assert int(headers["Retry-After"]) >= 1
        # A call with no GPU demand is not held up.
        assert (await get(s, regate.url, "/tools/cpu/x"))[0] == 200
        assert (await first)[0] == 200
        # Released when the first response completed: the next one fits.
        assert (await get(s, regate.url, "/tools/infer/x"))[0] == 200


async def test_demand_that_never_fits_is_shed_without_retry_after(regate):
    async with aiohttp.ClientSession() as s:
        status, headers, body = await get(s, regate.url, "/tools/huge/x")
    assert status == 503 and body["error"]["code"] == "gpu_saturated"
    assert "Retry-After" not in headers


async def test_reservation_released_on_upstream_error_and_client_disconnect(regate):
    async with aiohttp.ClientSession() as s:
        assert (await get(s, regate.url, "/tools/deadgpu/x"))[0] == 502
        assert (await get(s, regate.url, "/tools/infer/x"))[0] == 200

        # A client that gives up mid-call: its reservation must not leak.
        with pytest.raises(asyncio.TimeoutError):
            async with s.get(regate.url + "/tools/infer/slow?s=1", headers=H,
                             timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                await r.read()
        await wait_reserved(s, regate, 0)  # the upstream call finishes; Regate releases
        assert (await get(s, regate.url, "/tools/infer/x"))[0] == 200


async def test_readyz_says_which_gpu_view_is_used(regate):
    async with aiohttp.ClientSession() as s:
        async with s.get(regate.admin_url + "/readyz") as r:
            body = await r.json()
    assert body["gpu"].startswith("static")
