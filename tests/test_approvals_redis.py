"""Approvals shared through a real redis-server: two Regate replicas, a call held
on one, the human deciding on the other."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest

from tests.support.approvals import admin, agent_call, decide, wait_pending
from tests.support.procs import ROOT, RegateProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

PAY = "/tools/payments/pay"


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def replicas(redis_server, upstream, keys_file, tmp_path_factory):
    def start(name: str) -> RegateProcess:
        tmp = tmp_path_factory.mktemp(f"approvals-replica-{name}")
        cfg = {
            "auth": {"mode": "api_key", "keys": str(keys_file)},
            "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
            "tools": [{"name": "payments", "upstream": upstream, "timeout_ms": 5000}],
            "limits": {"enabled": False, "redis_url": redis_server.url},
            "approvals": {"store": "redis", "redis_url": redis_server.url, "timeout_s": 10,
                          "tools": {"payments": "hold"}},
            "http": {"shutdown_grace_s": 1},
        }
        return RegateProcess(cfg, tmp)

    with ThreadPoolExecutor(2) as pool:  # start both at once: each takes a second or two
        procs = list(pool.map(start, ("a", "b")))
    yield procs
    for p in procs:
        p.stop()


async def events_until(proc, want: set[str], ready: asyncio.Event, timeout: float = 8.0) -> list[dict]:
    """Read `proc`'s admin event stream until every state in `want` was seen."""
    seen: list[dict] = []
    async with aiohttp.ClientSession() as s:
        async with s.get(proc.admin_url + "/admin/approvals/events", headers=proc.admin_headers,
                         timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    if block.startswith(b"retry:"):
                        ready.set()
                    for line in block.split(b"\n"):
                        if line.startswith(b"data: ") and b'"id"' in line:
                            seen.append(json.loads(line[6:]))
                if want <= {e["state"] for e in seen}:
                    return seen
    return seen


async def test_approval_on_replica_a_releases_the_call_held_on_b(replicas):
    a, b = replicas
    ready = asyncio.Event()
    stream = asyncio.create_task(events_until(a, {"pending", "approved", "used"}, ready))
    await asyncio.wait_for(ready.wait(), 5)
    task = asyncio.create_task(agent_call(b.url, PAY, {"amount": 250, "to": "acme"}))
    rec = await wait_pending(a, agent="analyst-2")  # B's call, listed by A
    assert rec["mode"] == "hold"
    assert not task.done()
    status, body = await decide(a, rec["id"], "approve", "alice", "from replica a")
    assert status == 200
    status, headers, echoed = await asyncio.wait_for(task, 5)
    assert status == 200 and headers["X-Regate-Approval"] == rec["id"]
    events = await asyncio.wait_for(stream, 8)
    mine = [e["state"] for e in events if e["id"] == rec["id"]]
    assert mine[:3] == ["pending", "approved", "used"]  # A's inbox heard all of B's steps
    status, body = await admin(b, "GET", f"/admin/approvals/{rec['id']}")
    assert body["approval"]["state"] == "used" and body["approval"]["approver"] == "alice"


async def test_denial_on_b_reaches_the_call_held_on_a(replicas):
    a, b = replicas
    task = asyncio.create_task(agent_call(a.url, PAY, {"amount": 260, "to": "acme"}))
    rec = await wait_pending(b, agent="analyst-2")
    await decide(b, rec["id"], "deny", "bob", "denied on b")
    status, _, body = await asyncio.wait_for(task, 5)
    assert status == 403 and "denied on b" in body["error"]["message"]


async def test_only_one_replica_wins_a_simultaneous_decision(replicas):
    a, b = replicas
    task = asyncio.create_task(agent_call(b.url, PAY, {"amount": 270, "to": "acme"}))
    rec = await wait_pending(a, agent="analyst-2")
    results = await asyncio.gather(decide(a, rec["id"], "approve", "alice"), decide(b, rec["id"], "deny", "bob"))
    assert sorted(s for s, _ in results) == [200, 409]
    winner = "approved" if results[0][0] == 200 else "denied"
    status, _, _ = await asyncio.wait_for(task, 5)
    assert status == (200 if winner == "approved" else 403)
