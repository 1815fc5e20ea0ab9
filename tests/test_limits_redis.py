"""Limits and budgets against a real redis-server: atomicity across processes and clients,
accuracy under load, and what each on_store_error mode does when Redis dies and returns."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import pytest

from proxy.limits import Budget, Rate, StoreHealth, open_limit_stores
from proxy.limits.redis_store import RedisBudgets, RedisRateLimiter, connect_redis

from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as srv:
        yield srv


# One replica: `calls` acquires at `concurrency`, alternating tools, starting at `start_at`
# (wall clock) so that the processes overlap; or, paced, one call every 1/`pace` s.
WORKER = r"""
import asyncio, json, sys, time
from proxy.limits import Rate
from proxy.limits.redis_store import RedisRateLimiter, connect_redis

url, prefix, start_at, calls, concurrency, pace, agent_spec, tool_spec = sys.argv[1:]
calls, concurrency, pace, start_at = int(calls), int(concurrency), float(pace), float(start_at)

async def main():
    client = connect_redis(url, timeout_s=2.0)
    limiter = RedisRateLimiter(client, timeout_s=2.0, prefix=prefix)
    agent_rate = Rate(*map(int, agent_spec.split(",")))
    tool_rate = Rate(*map(int, tool_spec.split(","))) if tool_spec else None
    await client.ping()
    admitted = {"t1": 0, "t2": 0}
    errors, span = [], []
    async def one(i):
        tool = "t1" if i % 2 else "t2"
        d = await limiter.acquire("agent", tool, agent_rate, tool_rate)
        if d.store_error:
            errors.append(d.store_error)
        admitted[tool] += d.allowed
    await asyncio.sleep(max(0.0, start_at - time.time()))
    if pace:
        t0, tasks = time.monotonic(), []
        for i in range(calls):
            await asyncio.sleep(max(0.0, t0 + i / pace - time.monotonic()))
            span.append(time.time())
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    else:
        queue = iter(range(calls))
        async def runner():
            for i in queue:
                await one(i)
        await asyncio.gather(*(runner() for _ in range(concurrency)))
    print(json.dumps({"admitted": admitted, "errors": errors, "first": span[:1], "last": span[-1:]}))
    await client.aclose()

asyncio.run(main())
"""


def run_replicas(n: int, url: str, prefix: str, calls: int, concurrency: int, pace: float,
                 agent: tuple[int, int, int], tool: tuple[int, int, int] | None) -> list[dict]:
    start_at = time.time() + 1.0  # past every worker's start-up
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER, url, prefix, str(start_at), str(calls), str(concurrency), str(pace),
         ",".join(map(str, agent)), ",".join(map(str, tool)) if tool else ""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    return results


async def test_two_processes_never_admit_more_than_the_limit(redis_server):
    """Two replicas × 16 concurrent calls hammer one agent: the agent limit (60, no refill to
    speak of) binds exactly, and the tool keys were spent only by admitted calls."""
    prefix = f"p{uuid.uuid4().hex[:8]}:"
    agent, tool = (60, 3600, 60), (40, 3600, 40)
    results = run_replicas(2, redis_server.url, prefix, calls=300, concurrency=16, pace=0,
                           agent=agent, tool=tool)
    assert all(not r["errors"] for r in results)
    per_tool = {t: sum(r["admitted"][t] for r in results) for t in ("t1", "t2")}
    assert sum(per_tool.values()) == 60
    client = connect_redis(redis_server.url, timeout_s=2.0)
    limiter = RedisRateLimiter(client, timeout_s=2.0, prefix=prefix)
    for t in ("t1", "t2"):
        d = await limiter.acquire("agent", t, None, Rate(*tool), cost=0)  # peek
        assert d.tool.remaining == 40 - per_tool[t]
    d = await limiter.acquire("agent", "t1", Rate(*agent), None, cost=0)
    assert d.agent.remaining == 0
    await client.aclose()


async def test_accuracy_two_processes_at_three_times_the_rate(redis_server):
    """R=100/s, B=10, 2 replicas each offering 1.5·R for 2 s: admitted = 2R + B within ±5%."""
    prefix = f"a{uuid.uuid4().hex[:8]}:"
    results = run_replicas(2, redis_server.url, prefix, calls=300, concurrency=0, pace=150,
                           agent=(100, 1, 10), tool=None)
    admitted = sum(sum(r["admitted"].values()) for r in results)
    # The offered window as it really ran (2 s when both replicas start together).
    window = max(r["last"][0] for r in results) - min(r["first"][0] for r in results)
    expected = 100 * window + 10
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, window)
    assert all(not r["errors"] for r in results)


async def test_budget_shared_between_two_clients(redis_server):
    """Two replicas (separate clients) spend one agent's budget; charges race atomically."""
    prefix = f"b{uuid.uuid4().hex[:8]}:"
    c1, c2 = connect_redis(redis_server.url, 2.0), connect_redis(redis_server.url, 2.0)
    a = RedisBudgets(c1, timeout_s=2.0, prefix=prefix, time_source="client")
    b = RedisBudgets(c2, timeout_s=2.0, prefix=prefix, time_source="client")
    budget = Budget(10, 3600)
    day = 1_767_225_600.0  # a window boundary
    assert (await a.charge("coder", budget, 6, now=day + 5)).remaining == 4
    assert await b.remaining("coder", budget, now=day + 6) == 4
    v = await b.charge("coder", budget, 5, now=day + 7)
    assert not v.allowed and v.remaining == 4 and v.reset_s == pytest.approx(3593)
    # The upstream reports the real cost after the call: charge the known 1, then correct.
    assert (await b.charge("coder", budget, 1, now=day + 8)).allowed
    await a.spend("coder", budget, 2.5 - 1, now=day + 9)
    assert await b.remaining("coder", budget, now=day + 9) == pytest.approx(1.5)
    v = await a.charge("coder", budget, 2, now=day + 10)
    assert not v.allowed and v.retry_after_header() == "3590"
    # The next window restores it, for both.
    assert await a.remaining("coder", budget, now=day + 3600) == 10
    assert (await b.charge("coder", budget, 10, now=day + 3600)).allowed
    # Concurrent charges from both clients: exactly the units are granted.
    budget = Budget(50, 3600)
    verdicts = await asyncio.gather(*(
        (a if i % 2 else b).charge("racer", budget, 1, now=day + 1) for i in range(200)))
    assert sum(v.allowed for v in verdicts) == 50
    await c1.aclose()
    await c2.aclose()


@pytest.mark.parametrize("mode", ["local", "deny", "allow"])
async def test_redis_killed_mid_run_then_back(mode):
    """Redis dies between calls: each mode answers as configured without raising, the answers
    are counted, Redis is not retried until the interval passes, and it is used again once back."""
    clock = [1000.0]
    events: list[tuple[str, str]] = []
    with RedisServer() as srv:
        stores = open_limit_stores("redis", redis_url=srv.url, on_store_error=mode, timeout_ms=200,
                                   retry_interval_s=5.0, clock=lambda: clock[0],
                                   on_event=lambda part, ev: events.append((part, ev)))
        rate, budget = Rate(1, 3600, 2), Budget(100, 86400)
        d = await stores.rate.acquire("a", "t", rate, rate)
        assert d.allowed and d.store_error is None and d.agent.remaining == 1
        assert (await stores.budgets.charge("a", budget, 10)).remaining == 90

        srv.kill()
        d = await stores.rate.acquire("a", "t", rate, rate)
        assert d.store_error == mode
        assert not stores.healthy
        assert ("rate", "store_error") in events
        v = await stores.budgets.charge("a", budget, 10)
        assert v.store_error == mode
        if mode == "local":
            # NOTE: lossy: the local limiter starts from a full burst.
            assert d.allowed and d.agent.remaining == 1
            assert v.allowed and v.remaining == 90
        elif mode == "allow":
            assert d.allowed and d.headers() == []
            assert v.allowed and v.remaining is None
        else:
            assert not d.allowed and d.retry_after_header() == "1"
            assert not v.allowed
            assert (await stores.budgets.spend("a", budget, 1)).allowed  # a spend is never refused
        # Within the retry interval Redis is not tried again: a try would fail (it is dead) and
        # count a store error; none is counted (a wall-clock bound here failed under load).
        errors = stores.health.counts["store_error"]
        for _ in range(20):
            await stores.rate.acquire("a", "t", rate, rate)
        assert stores.health.counts["store_error"] == errors
        answered = {"local": "fallback_local", "allow": "fail_open", "deny": "fail_closed"}[mode]
        assert stores.health.counts[answered] >= 22

        srv.start()  # same port, empty, no scripts loaded
        clock[0] += 5.0
        d = await stores.rate.acquire("a", "t", rate, rate)
        assert d.store_error is None and d.allowed and d.agent.remaining == 1
        assert stores.healthy and ("rate", "recovered") in events
        assert (await stores.budgets.charge("a", budget, 1)).store_error is None
        await stores.aclose()


async def test_slow_redis_counts_as_down(redis_server):
    """A Redis slower than the timeout is a store error (here: paused by CLIENT PAUSE)."""
    client = connect_redis(redis_server.url, timeout_s=0.05)
    admin = connect_redis(redis_server.url, timeout_s=2.0)
    health = StoreHealth("deny", retry_interval_s=0.0)
    limiter = RedisRateLimiter(client, health, timeout_s=0.05, prefix=f"s{uuid.uuid4().hex[:8]}:")
    rate = Rate(10, 1)
    assert (await limiter.acquire("a", None, rate, None)).store_error is None
    # Paused for 3 s: an answer well before that can only be the 50 ms timeout (generous
    # against load, which only makes the call slower).
    await admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")
    t0 = time.perf_counter()
    d = await limiter.acquire("a", None, rate, None)
    assert time.perf_counter() - t0 < 2.0
    assert d.store_error == "deny" and not d.allowed
    assert health.counts["store_error"] == 1 and "TimeoutError" in health.last_error
    await admin.execute_command("CLIENT", "UNPAUSE")
    deadline = time.perf_counter() + 30
    while (await limiter.acquire("a", None, rate, None)).store_error is not None:  # back once unpaused
        assert time.perf_counter() < deadline, "Redis still unusable 30 s after CLIENT UNPAUSE"
        await asyncio.sleep(0.05)
    await client.aclose()
    await admin.aclose()


async def test_password_and_database_from_the_url():
    with RedisServer(extra_args=("--requirepass", "s3cret")) as srv:
        good = connect_redis(f"redis://:s3cret@127.0.0.1:{srv.port}/3", 2.0)
        db0 = connect_redis(f"redis://:s3cret@127.0.0.1:{srv.port}/0", 2.0)
        limiter = RedisRateLimiter(good, StoreHealth("deny"), timeout_s=2.0)
        assert (await limiter.acquire("a", None, Rate(5, 1), None)).store_error is None
        assert await good.exists("regate:rl:{a}") == 1
        assert await db0.exists("regate:rl:{a}") == 0
        bad = connect_redis(f"redis://:wrong@127.0.0.1:{srv.port}/0", 2.0)
        health = StoreHealth("deny")
        d = await RedisRateLimiter(bad, health, timeout_s=2.0).acquire("a", None, Rate(5, 1), None)
        assert d.store_error == "deny" and "AuthenticationError" in health.last_error
        for c in (good, db0, bad):
            await c.aclose()


async def test_client_is_redis_py_with_its_own_retries_off(redis_server):
    """The store uses redis-py's asyncio client on one bounded pool, retries off (Regate decides),
    hiredis doing the parsing and the packing."""
    import redis.asyncio
    from redis.utils import HIREDIS_AVAILABLE

    client = connect_redis(redis_server.url, timeout_s=0.5)
    assert isinstance(client, redis.asyncio.Redis)
    pool = client.connection_pool
    assert isinstance(pool, redis.asyncio.BlockingConnectionPool) and pool.max_connections == 32
    assert HIREDIS_AVAILABLE  # redis[hiredis] is a dependency
    conn = await pool.get_connection()
    try:
        assert conn.retry.get_retries() == 0 and not conn.retry_on_timeout
        assert type(conn._parser).__name__ == "_AsyncHiredisParser"
        assert conn.pack_command("SCRIPT LOAD", "return 1", 2, 1.5) == [
            b"*5\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$8\r\nreturn 1\r\n$1\r\n2\r\n$3\r\n1.5\r\n"]
    finally:
        await pool.release(conn)
    # NOSCRIPT (a restarted or flushed server) loads the script once and runs it.
    prefix = f"n{uuid.uuid4().hex[:8]}:"
    limiter = RedisRateLimiter(client, StoreHealth("deny"), timeout_s=0.5, prefix=prefix)
    assert (await limiter.acquire("a", None, Rate(5, 1), None)).agent.remaining == 4
    await client.script_flush()
    d = await limiter.acquire("a", None, Rate(5, 1), None)
    assert d.store_error is None and d.agent.remaining == 3
    await client.aclose()


async def test_probe_recovers_readiness_without_traffic():
    """/readyz calls LimitStores.probe(): a store marked down is PINGed once the retry interval
    has passed, so a replica taken out of rotation (no calls to probe it) becomes ready again."""
    clock = [0.0]
    with RedisServer() as srv:
        stores = open_limit_stores("redis", redis_url=srv.url, on_store_error="deny", timeout_ms=500,
                                   retry_interval_s=2.0, clock=lambda: clock[0])
        assert await stores.probe()  # healthy: no round trip needed
        srv.kill()
        assert (await stores.rate.acquire("a", None, Rate(5, 1), None)).store_error == "deny"
        assert not await stores.probe()  # within the retry interval: not tried
        srv.start()
        assert not await stores.probe() and stores.health.counts["store_error"] == 1
        clock[0] += 2.0
        assert await stores.probe() and stores.healthy
        assert stores.health.counts["recovered"] == 1
        await stores.aclose()
