"""`regate serve --workers 2`: two processes answer on one port, and SIGTERM
drains both without dropping a call that was in flight."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import psutil
import pytest

from tests.conftest import AGENT_KEY
from tests.support.procs import RegateProcess


async def test_two_workers_share_the_port_and_drain_on_sigterm(upstream, keys_file, tmp_path):
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"engine": "off"},
        "http": {"shutdown_grace_s": 10},
        "tools": [{"name": "echo", "upstream": upstream, "timeout_ms": 10000}],
    }
    regate = RegateProcess(cfg, tmp_path, workers=2)
    try:
        workers = psutil.Process(regate.pid).children()
        assert len(workers) == 2
        # Decision ids start with a per-process prefix: collect which processes answered.
        prefixes: set[str] = set()
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            while len(prefixes) < 2 and time.monotonic() < deadline:
                async with s.get(f"{regate.url}/tools/echo/x", headers={"X-Api-Key": AGENT_KEY}) as r:
                    if r.status == 200:
                        prefixes.add(r.headers["X-Regate-Decision-Id"][:10])
        assert len(prefixes) == 2, "both worker processes should answer on the shared port"

        # In-flight calls on fresh connections (so both workers get some), then SIGTERM.
        async def slow_call():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.get(f"{regate.url}/tools/echo/slow?s=3", headers={"X-Api-Key": AGENT_KEY}) as r:
                    return r.status, r.headers["X-Regate-Decision-Id"][:10]

        async def upstream_calls() -> int:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{upstream}/_count") as r:
                    return (await r.json())["calls"]

        before = await upstream_calls()
        tasks = [asyncio.create_task(slow_call()) for _ in range(12)]
        deadline = time.monotonic() + 30
        while await upstream_calls() < before + 12:  # every call is at the tool, in flight
            assert time.monotonic() < deadline, "the 12 calls did not reach the tool within 30 s"
            await asyncio.sleep(0.02)
        regate.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
        assert [status for status, _ in results] == [200] * 12
        assert len({prefix for _, prefix in results}) == 2
        assert regate.proc.wait(15) == 0
        for w in workers:
            assert not w.is_running() or w.status() == psutil.STATUS_ZOMBIE
    finally:
        regate.stop()
