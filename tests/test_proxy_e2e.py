"""The data plane end to end: a real upstream process, Regate as a real
process in front of it, a real HTTP client. Policy is off here; the policy
stage has its own end-to-end tests."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import psutil
import pytest
import yarl

from tests.conftest import AGENT_KEY
from tests.support.procs import RegateProcess, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

MB = 1024 * 1024


@pytest.fixture(scope="module")
def regate(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regate")
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"engine": "off"},
        "tools": [
            {"name": "echo", "upstream": upstream, "max_body_bytes": 1024},
            {"name": "big", "upstream": upstream, "max_body_bytes": 200 * MB},
            {"name": "slowtool", "upstream": upstream, "timeout_ms": 300},
            {"name": "dead", "upstream": dead, "timeout_ms": 2000},
            {"name": "based", "prefix": "/tools/based", "upstream": f"{upstream}/base/v1"},
        ],
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()


def H(**extra):
    return {"X-Api-Key": AGENT_KEY, **extra}


async def _json_error(resp, status, code):
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    err = body["error"]
    assert err["code"] == code
    assert err["message"]
    assert err["decision_id"] == resp.headers["X-Regate-Decision-Id"]
    assert isinstance(err["reasons"], list)
    return err


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
async def test_round_trip_keeps_method_body_and_query(regate, method):
    body = b'{"q": "caf\xc3\xa9", "n": 1}' if method != "GET" else b""
    async with aiohttp.ClientSession() as s:
        url = yarl.URL(f"{regate.url}/tools/echo/a/b%20c?x=1&y=%2F&y=2", encoded=True)
        async with s.request(method, url, data=body,
                             headers=H(**{"Content-Type": "application/json"})) as r:
            assert r.status == 200
            assert r.headers["X-Regate-Decision-Id"]
            seen = await r.json()
    assert seen["method"] == method
    assert seen["raw_path"] == "/a/b%20c?x=1&y=%2F&y=2"
    assert seen["body"].encode() == body


async def test_upstream_base_path_is_kept(regate):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{regate.url}/tools/based/items?id=3", headers=H()) as r:
            seen = await r.json()
    assert seen["raw_path"] == "/base/v1/items?id=3"


async def test_hop_by_hop_headers_never_cross(regate, upstream):
    headers = H(**{
        "Connection": "keep-alive, X-Agent-Hop",
        "X-Agent-Hop": "drop me",
        "Keep-Alive": "timeout=1",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Upgrade": "websocket",
        "X-End-To-End": "keep me",
        "Host": "evil.example",
    })
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{regate.url}/tools/echo/h", headers=headers) as r:
            seen = await r.json()
            resp_headers = {k.lower() for k in r.headers}
    got = {k.lower(): v for k, v in seen["headers"].items()}
    for h in ("x-agent-hop", "keep-alive", "te", "proxy-authorization", "upgrade", "x-api-key"):
        assert h not in got, h
    assert got["x-end-to-end"] == "keep me"
    # Host is rebuilt from the route, never the agent's; the agent's goes in X-Forwarded-Host.
    assert got["host"] == upstream.removeprefix("http://")
    assert got["x-forwarded-host"] == "evil.example"
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert "x-upstream-hop" not in resp_headers and "keep-alive" not in resp_headers
    assert "x-upstream-end" in resp_headers


async def test_deadline_gives_504(regate):
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.get(f"{regate.url}/tools/slowtool/slow?s=3", headers=H()) as r:
            await _json_error(r, 504, "upstream_timeout")
        assert time.monotonic() - t0 < 2


async def test_dead_upstream_gives_502(regate):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{regate.url}/tools/dead/x", headers=H()) as r:
            await _json_error(r, 502, "upstream_unreachable")


async def test_unknown_tool_gives_404(regate):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{regate.url}/tools/nosuch/x", headers=H()) as r:
            await _json_error(r, 404, "unknown_tool")
        async with s.get(f"{regate.url}/tools/echoes", headers=H()) as r:
            await _json_error(r, 404, "unknown_tool")


@pytest.mark.parametrize("headers", [{}, {"X-Api-Key": "wrong"}, {"X-Agent-Id": "coder-7"}])
async def test_missing_or_unknown_key_gives_401(regate, headers):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{regate.url}/tools/echo/x", headers=headers) as r:
            await _json_error(r, 401, "unauthenticated")


async def test_body_over_limit_gives_413(regate):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{regate.url}/tools/echo/x", data=b"x" * 2000, headers=H()) as r:
            await _json_error(r, 413, "body_too_large")

        async def chunks():  # no Content-Length: the limit is enforced while streaming
            for _ in range(4):
                yield b"y" * 600

        async with s.post(f"{regate.url}/tools/echo/x", data=chunks(), headers=H()) as r:
            await _json_error(r, 413, "body_too_large")
        async with s.post(f"{regate.url}/tools/echo/x", data=b'{"a": 1' + b" " * 2000 + b"}",
                          headers=H(**{"Content-Type": "application/json"})) as r:
            await _json_error(r, 413, "body_too_large")


@pytest.mark.parametrize("path", [
    "/tools/echo/../big/x", "/tools/echo/%2e%2e/big", "/tools/echo/a%2fb", "/tools/echo/%252e%252e/x",
    "/tools/echo/a%5cb",
])
async def test_paths_that_could_escape_the_route_are_refused(regate, path):
    # aiohttp's client would normalise "..": send the raw path as an encoded URL.
    async with aiohttp.ClientSession() as s:
        async with s.get(yarl.URL(f"{regate.url}{path}", encoded=True), headers=H()) as r:
            await _json_error(r, 400, "bad_path")


def _peak_rss_during(pid: int, stop: threading.Event, out: list[int]) -> None:
    proc = psutil.Process(pid)
    peak = 0
    while not stop.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.01)
    out.append(peak)


async def test_100mb_upload_and_download_stream_without_buffering(regate):
    proc = psutil.Process(regate.pid)
    base = proc.memory_info().rss
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=_peak_rss_during, args=(regate.pid, stop, peak))
    sampler.start()
    try:
        async def body():
            block = b"z" * (256 * 1024)
            for _ in range(400):
                yield block

        async with aiohttp.ClientSession() as s:
            async with s.post(f"{regate.url}/tools/big/upload", data=body(), headers=H()) as r:
                assert r.status == 200
                assert (await r.json())["size"] == 100 * MB
            async with s.get(f"{regate.url}/tools/big/download?size={100 * MB}", headers=H()) as r:
                assert r.status == 200
                got = 0
                async for chunk in r.content.iter_any():
                    got += len(chunk)
                    await asyncio.sleep(0)  # a reader slower than the upstream
            assert got == 100 * MB
    finally:
        stop.set()
        sampler.join()
    growth = (peak[0] - base) / MB
    assert growth < 50, f"Regate's RSS grew {growth:.1f} MB while streaming 100 MB each way"


async def test_sse_events_arrive_one_by_one(regate):
    arrivals = []
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.get(f"{regate.url}/tools/echo/sse?n=4&gap=0.4", headers=H()) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data:"):
                    arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 4
    # The first event is seen long before the stream ends, and they are spread out.
    assert arrivals[0] < 0.35
    assert arrivals[-1] - arrivals[0] > 1.0


@pytest.mark.parametrize("method, path", [
    ("POST", "/admin/reload"), ("GET", "/admin/breakers"), ("POST", "/admin/breakers/echo/reset"),
    ("GET", "/admin/gpu"), ("GET", "/admin/approvals"),
])
async def test_admin_api_needs_the_token_and_is_not_on_the_data_plane(regate, method, path):
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-admin-token"}):
            async with s.request(method, regate.admin_url + path, headers=headers) as r:
                assert r.status == 401, (path, headers)
                assert (await r.json())["error"]["code"] == "unauthenticated"
        async with s.request(method, regate.url + path, headers=H()) as r:
            assert r.status == 404  # the data plane serves no admin path


async def test_health_and_metrics_are_open(regate):
    async with aiohttp.ClientSession() as s:
        async with s.get(regate.admin_url + "/healthz") as r:
            assert r.status == 200
        async with s.get(regate.url + "/tools/echo/m", headers=H()) as r:
            assert r.status == 200
        async with s.get(regate.admin_url + "/metrics") as r:
            text = await r.text()
    assert 'regate_calls_total{outcome="forwarded",status="200",tool="echo"}' in text
    assert "regate_added_seconds_bucket" in text and "regate_upstream_seconds_bucket" in text
