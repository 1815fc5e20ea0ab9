"""GCRA and budgets as (time, event) → outcome tables, each run against the in-process store
and the Redis Lua scripts (client time source), so both implement the same algorithm."""

from __future__ import annotations

import math
import uuid

import pytest

from proxy.limits import (
    Budget, MemoryBudgets, MemoryRateLimiter, Rate, StoreHealth, compile_limits, gcra,
)
from proxy.limits.redis_store import RedisBudgets, RedisRateLimiter, connect_redis

from tests.support.redis_server import RedisServer

INF = math.inf


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture(params=["memory", "redis"])
async def stores(request, redis_server):
    """(rate limiter, budgets) of one kind; Redis ones on a fresh key prefix, client time."""
    if request.param == "memory":
        yield MemoryRateLimiter(clock=lambda: pytest.fail("the tables pass now")), \
            MemoryBudgets(clock=lambda: pytest.fail("the tables pass now"))
        return
    client = connect_redis(redis_server.url, timeout_s=2.0)
    health = StoreHealth("deny")
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    yield (RedisRateLimiter(client, health, timeout_s=2.0, time_source="client", prefix=prefix),
           RedisBudgets(client, health, timeout_s=2.0, time_source="client", prefix=prefix))
    assert health.counts["store_error"] == 0, health.last_error
    await client.aclose()


# Rate 1/s, burst 5: interval 1 s, tolerance 5 s.
# (now_s, cost) -> (allowed, remaining, reset_after_s, retry_after_s)
ONE_PER_SECOND_BURST_5 = [
    ((0, 1), (True, 4, 1, 0)),
    ((0, 1), (True, 3, 2, 0)),
    ((0, 3), (True, 0, 5, 0)),        # cost 3 takes the rest of the burst at once
    ((0, 1), (False, 0, 5, 1)),
    ((0, 0), (True, 0, 5, 0)),        # cost 0 is a peek
    ((0, 6), (False, 0, 5, INF)),     # cost above the burst: never
    ((1, 1), (True, 0, 5, 0)),        # one cell came back
    ((1.5, 1), (False, 0, 4.5, 0.5)),
    ((3, 0), (True, 2, 3, 0)),        # peek: two cells back, nothing spent
    ((3, 2), (True, 0, 5, 0)),
    ((20, 0), (True, 5, 0, 0)),       # idle: full burst again
    ((20, 5), (True, 0, 5, 0)),       # cost equal to the burst passes when full
    ((20.25, 1), (False, 0, 4.75, 0.75)),
    ((20.25, 5), (False, 0, 4.75, 4.75)),
]

# 100/min, burst 10: interval 0.6 s, tolerance 6 s.
HUNDRED_PER_MINUTE_BURST_10 = [
    ((100, 4), (True, 6, 2.4, 0)),
    ((100, 6), (True, 0, 6, 0)),
    ((100, 1), (False, 0, 6, 0.6)),
    ((100.3, 1), (False, 0, 5.7, 0.3)),
    ((100.6, 1), (True, 0, 6, 0)),
    ((103.6, 0), (True, 5, 3, 0)),
    ((103.6, 6), (False, 5, 3, 0.6)),  # refused: the 5 cells it saw are left unspent
]


@pytest.mark.parametrize("rate,table", [
    (Rate(1, 1, 5), ONE_PER_SECOND_BURST_5),
    (Rate.parse("100/min", 10), HUNDRED_PER_MINUTE_BURST_10),
], ids=["1/s-burst5", "100/min-burst10"])
async def test_gcra_table(stores, rate, table):
    limiter, _ = stores
    for i, ((now, cost), (allowed, remaining, reset_s, retry_s)) in enumerate(table):
        d = await limiter.acquire("agent-1", "search", rate, None, cost, now=now)
        got = (d.allowed, d.agent.remaining, d.agent.reset_s, d.agent.retry_after_s)
        assert d.store_error is None
        assert d.tool is None
        assert got == (allowed, remaining, pytest.approx(reset_s), pytest.approx(retry_s)), f"row {i}: {now=} {cost=}"


def test_gcra_function_matches_definition():
    r = Rate(2, 1, 3)  # interval 500 ms, tolerance 1.5 s
    assert gcra(None, 0, r, 1) == (True, 500_000, 2, 0, 500_000)
    assert gcra(1_500_000, 0, r, 1) == (False, 1_500_000, 0, 500_000, 1_500_000)
    assert gcra(1_500_000, 0, r, 4) == (False, 1_500_000, 0, -1, 1_500_000)


# Agent 10/s burst 3; agent×tool 1/s burst 2. (now, tool) -> (allowed, agent r, tool r, tool allowed)
TWO_KEYS = [
    ((0, "shell"), (True, 2, 1, True)),
    ((0, "shell"), (True, 1, 0, True)),
    ((0, "shell"), (False, 1, 0, False)),   # the tool key refuses: the agent key is not spent
    ((0, "search"), (True, 0, 1, True)),    # ...which is why this one still passes
    ((0, "search"), (False, 0, 1, True)),   # the agent key refuses: the tool key is not spent
    ((0.1, "search"), (True, 0, 0, True)),
]


async def test_two_keys_commit_both_or_neither(stores):
    limiter, _ = stores
    agent_rate, tool_rate = Rate(10, 1, 3), Rate(1, 1, 2)
    for i, ((now, tool), (allowed, a_rem, t_rem, t_allowed)) in enumerate(TWO_KEYS):
        d = await limiter.acquire("agent-2", tool, agent_rate, tool_rate, 1, now=now)
        assert (d.allowed, d.agent.remaining, d.tool.remaining, d.tool.allowed) == \
            (allowed, a_rem, t_rem, t_allowed), f"row {i}: {now=} {tool=}"


async def test_headers_allowed_and_refused(stores):
    limiter, _ = stores
    agent_rate, tool_rate = Rate.parse("100/min", 2), Rate.parse("10/s", 5)
    d = await limiter.acquire("agent-3", "shell", agent_rate, tool_rate, now=50)
    assert d.headers() == [
        ("RateLimit-Policy", '"agent";q=100;w=60, "tool";q=10;w=1'),
        ("RateLimit", '"agent";r=1;t=1, "tool";r=4;t=1'),
    ]
    assert d.retry_after_header() is None
    await limiter.acquire("agent-3", "shell", agent_rate, tool_rate, now=50)
    d = await limiter.acquire("agent-3", "shell", agent_rate, tool_rate, now=50)
    assert not d.allowed
    assert d.retry_after_header() == "1"  # 0.6 s, rounded up
    assert d.headers(agent_name="coder", tool_name="coder/shell")[1] == \
        ("RateLimit", '"coder";r=0;t=1, "coder/shell";r=3;t=1')
    d = await limiter.acquire("agent-3", "shell", agent_rate, tool_rate, cost=3, now=50)
    assert d.retry_after_header() is None  # above the burst: it will never pass


async def test_unlimited_needs_no_store(stores):
    limiter, _ = stores
    d = await limiter.acquire("agent-4", "x", None, None, now=0)
    assert d.allowed and d.headers() == [] and d.retry_after_header() is None


async def test_accuracy_at_three_times_the_rate():
    """R=50/s, B=10, offered 150/s evenly for 5 s: admitted = R·5 + B (±5%)."""
    limiter = MemoryRateLimiter()
    rate = Rate(50, 1, 10)
    admitted = sum(limiter.decide("a", None, rate, None, now=k / 150).allowed for k in range(750))
    assert abs(admitted - (50 * 5 + 10)) <= 0.05 * (50 * 5 + 10)


def test_memory_state_is_bounded():
    """A million one-off agents do not stay in memory once their limits have refilled."""
    now = [0.0]
    limiter = MemoryRateLimiter(clock=lambda: now[0])
    rate = Rate(10, 1, 10)  # one call leaves 0.1 s of state
    for i in range(20_000):
        limiter.decide(f"old-{i}", "t", rate, rate)
    assert len(limiter) <= 40_000
    now[0] = 10.0  # every earlier key is idle now
    for i in range(20_000):
        limiter.decide(f"new-{i}", "t", rate, rate)
        now[0] += 1e-3  # each new key is idle 0.1 s (100 calls) after its call
    assert len(limiter) < 2_000
    assert limiter.evictions == 0


def test_memory_hard_ceiling_evicts_and_counts():
    limiter = MemoryRateLimiter(clock=lambda: 0.0, max_keys=100)
    rate = Rate(1, 3600, 1)
    for i in range(1000):
        limiter.decide(f"a{i}", None, rate, None)
    assert len(limiter) == 100
    assert limiter.evictions == 900


# Budget 10 units per 60 s (windows start at multiples of 60 s since the epoch).
# (now, op, cost) -> (allowed, remaining, reset_s)
BUDGET_TABLE = [
    ((0, "remaining", 0), (None, 10, None)),
    ((1, "charge", 4), (True, 6, 59)),
    ((2, "check", 7), (False, 6, 58)),
    ((2, "charge", 7), (False, 6, 58)),      # refused: nothing spent
    ((3, "spend", 2.5), (True, 3.5, 57)),    # the upstream said it cost more
    ((4, "charge", 3.5), (True, 0, 56)),
    ((5, "charge", 0), (True, 0, 55)),       # free calls pass on an empty budget
    ((6, "spend", 1), (True, 0, 54)),        # a cost already incurred is recorded (spent 11)
    ((7, "charge", 0), (False, 0, 53)),      # ...and now even free calls wait
    ((59.5, "check", 1), (False, 0, 0.5)),
    ((60, "check", 1), (True, 10, 60)),      # next window: whole again
    ((61, "charge", 0.1), (True, 9.9, 59)),
    ((61, "charge", 0.2), (True, 9.7, 59)),
    ((62, "spend", -0.3), (True, 10, 58)),   # a refund
]


async def test_budget_table(stores):
    _, budgets = stores
    budget = Budget(10, 60)
    for i, ((now, op, cost), (allowed, remaining, reset_s)) in enumerate(BUDGET_TABLE):
        if op == "remaining":
            assert await budgets.remaining("agent-5", budget, now=now) == remaining
            continue
        v = await getattr(budgets, op)("agent-5", budget, cost, now=now)
        assert v.store_error is None
        assert (v.allowed, v.remaining, v.reset_s) == \
            (allowed, pytest.approx(remaining), pytest.approx(reset_s)), f"row {i}: {now=} {op=} {cost=}"


async def test_budget_verdict_headers_and_no_budget(stores):
    _, budgets = stores
    v = await budgets.charge("agent-6", Budget(1000, 86400), 1, now=86400 * 3 + 3600.5)
    assert v.limit_item() == '"budget";r=999;t=82800'
    assert v.budget.policy_item() == '"budget";q=1000;w=86400'
    v = await budgets.charge("agent-6", Budget(1, 86400), 5, now=86400 * 3 + 3600.5)
    assert not v.allowed and v.retry_after_header() == "82800"
    v = await budgets.charge("agent-6", None, 5, now=0)
    assert v.allowed and v.remaining is None and v.retry_after_header() is None


def test_sample_limits_compile():
    table = compile_limits({
        "defaults": {"agent": {"rate": "20/s", "burst": 40}, "tool": "5/s",
                     "budget": {"units": 1000, "window": "1d"}},
        "tools": {"shell": {"requests": 1, "per": "2s", "burst": 2}},
        "agents": {"coder-7": {"agent": None, "tools": {"shell": "2/s"}}},
    })
    assert table.agent == Rate(20, 1, 40)
    assert table.tools["shell"] == Rate(1, 2, 2)
    assert table.agents["coder-7"].agent is None
    assert table.agents["coder-7"].budget == Budget(1000, 86400)
