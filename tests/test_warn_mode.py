"""Warn-only mode and several windows per limit, as tables of (time, event) -> outcome with
an injected clock: the in-process limiter and budgets, the same tables through the Lua
scripts on a real redis-server, and the breakers (tool breaker, agent back-off, loop guard).

A limit in warn mode never refuses: the call runs, the refusal it would have got is
reported (RateDecision.would_refuse, Admission.would_refuse), and its state stays what
enforcing it would have made it, so switching it to enforce changes only the answers.
"""

from __future__ import annotations

import pytest

from proxy.breakers import build
from proxy.breakers.outcome import SERVER_ERROR
from proxy.limits import (
    LimitsError, MemoryBudgets, MemoryRateLimiter, Rate, compile_limits, resolve_limits,
)
from proxy.limits.budgets import Budget, BudgetWindows
from proxy.limits.gcra import Windows
from proxy.limits.redis_store import RedisBudgets, RedisRateLimiter, connect_redis
from proxy.limits.table import parse_budget_spec, parse_rate_spec
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as srv:
        yield srv


# -- the limits document ------------------------------------------------------

DOC = {
    "mode": "enforce",
    "defaults": {"agent": [{"rate": "10/s", "burst": 20}, "600/min", "20000/day"], "tool": None,
                 "budget": [{"units": 100, "window": "1h"}, {"units": 1000, "window": "1d"}]},
    "tools": {"shell": {"rate": "1/s", "mode": "warn"},
              "search": {"windows": ["5/s", "100/min"], "mode": "warn"}},
    "agents": {"canary": {"mode": "warn", "tools": {"db": "2/s"}},
               "strict": {"tools": {"shell": {"rate": "1/s", "mode": "enforce"}}}},
}


def test_windows_and_modes_compile_and_resolve() -> None:
    t = compile_limits(DOC)
    lim = resolve_limits(t, "coder", "shell")
    assert isinstance(lim.agent, Windows) and [r.per_s for r in lim.agent.windows] == [1, 60, 86400]
    assert lim.agent.suffixes == ("", "-1m", "-1d")
    assert lim.agent.windows[0] == Rate(10, 1, 20)
    assert isinstance(lim.budget, BudgetWindows) and [b.window_s for b in lim.budget.windows] == [3600, 86400]
    # The tool's own mode; the agent key and budget inherit the document's.
    assert (lim.agent_warn, lim.tool_warn, lim.budget_warn) == (False, True, False)
    assert resolve_limits(t, "coder", "search").tool.suffixes == ("", "-1m")
    # An agent's mode covers all its limits; a limit's own mode wins over it.
    c = resolve_limits(t, "canary", "db")
    assert (c.agent_warn, c.tool_warn, c.budget_warn) == (True, True, True)
    assert resolve_limits(t, "strict", "shell").tool_warn is False
    # The whole document in warn mode.
    w = resolve_limits(compile_limits({**DOC, "mode": "warn"}), "coder", "other")
    assert (w.agent_warn, w.budget_warn) == (True, True)


@pytest.mark.parametrize("spec,msg", [
    ({"mode": "watch", "rate": "1/s"}, "limits.x.mode: want enforce or warn"),
    ([], "limits.x: want at least one window"),
    (["1/s", "5/s"], "two windows of the same period"),
    ([{"units": 5, "window": "1d"}], "limits.x[0]: units/window is a budget's window"),
    ([None], "limits.x[0]: a window cannot be unlimited"),
    ({"windows": "1/s"}, "limits.x.windows: want a list of windows"),
])
def test_bad_rate_specs_name_their_field(spec, msg) -> None:
    with pytest.raises(LimitsError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        parse_rate_spec(spec, "limits.x")


def test_bad_budget_and_document_modes() -> None:
    with pytest.raises(LimitsError, match="two windows of the same length"):
        parse_budget_spec([{"units": 1, "window": "1d"}, {"units": 2, "window": 86400}], "b")
    with pytest.raises(LimitsError, match=r"limits\.mode: want enforce or warn"):
        compile_limits({"mode": "shadow"})
    with pytest.raises(LimitsError, match=r"limits\.agents\.a\.mode"):
        compile_limits({"agents": {"a": {"mode": 1}}})
    # A decision's limits are judged by the policy's mode: no mode of their own.
    from proxy.limits.table import decision_limits
    with pytest.raises(LimitsError, match="decision.limits.agent: a decision's limits take no mode"):
        decision_limits({"agent": {"rate": "1/s", "mode": "warn"}})
    assert decision_limits({"agent": ["1/s", "10/min"]})[0].suffixes == ("", "-1m")


# -- rate limits: tables ------------------------------------------------------

# agent key 2/s burst 2 and 3/min; tool key 1/s burst 1 in warn mode.
AGENT = Windows((Rate(2, 1, 2), Rate(3, 60)))
TOOL = Rate(1, 1, 1)

# (time, expected allowed, expected would_refuse, name of the agent key's binding window)
WARN_TABLE = [
    (0.0, True, False, ""),        # every window has room
    (0.0, True, True, ""),         # tool (warn) is out: runs, reported; agent key counts it
    (0.1, False, False, ""),       # 2/s burst 2 spent: refused by the agent's 1 s window
    (1.0, True, False, "-1m"),     # 1 s window back; 3/min now binds (this takes its last cell)
    (2.0, False, False, "-1m"),    # the minute's 3 cells are spent: refused by "-1m"
    (20.0, True, False, "-1m"),    # one cell of 3/min back (one per 20 s), tool has room
]


async def _run_rate_table(limiter, table, now_of=lambda t: t) -> None:
    for t, allowed, would, window in table:
        d = await limiter.acquire("a", "tool", AGENT, TOOL, 1, now_of(t), warn=(False, True))
        assert (d.allowed, d.would_refuse, d.agent.suffix) == (allowed, would, window), (t, d)
        # Warn keys are never advertised; the agent key's every window is.
        pol = dict(d.headers())["RateLimit-Policy"]
        assert pol == '"agent";q=2;w=1, "agent-1m";q=3;w=60'
        if not allowed:
            assert d.retry_after_header() is not None


async def test_warn_and_windows_in_memory() -> None:
    await _run_rate_table(MemoryRateLimiter(lambda: 0.0), WARN_TABLE)


async def test_warn_and_windows_in_redis_match_memory(redis_server) -> None:
    client = connect_redis(redis_server.url, 1.0)
    try:
        await client.flushdb()
        await _run_rate_table(RedisRateLimiter(client, timeout_s=1.0), WARN_TABLE, lambda t: 1_000_000 + t)
        # One key per extra window beside the key of the shortest.
        keys = sorted(k.decode() for k in await client.keys("regate:rl:*"))
        assert keys == ["regate:rl:{a}", "regate:rl:{a}:tool", "regate:rl:{a}~60"]
    finally:
        await client.aclose()


async def test_a_warn_limit_keeps_the_state_enforcing_would_have() -> None:
    """Calls a warn limit would refuse spend none of its cells: switched to enforce, it
    admits exactly what it would have had it been enforced all along."""
    rate = Rate(1, 1, 1)
    warned, enforced = MemoryRateLimiter(lambda: 0.0), MemoryRateLimiter(lambda: 0.0)
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2):
        w = await warned.acquire("a", None, rate, None, 1, t, warn=(True, False))
        e = await enforced.acquire("a", None, rate, None, 1, t)
        assert w.allowed and w.would_refuse == (not e.allowed)
    assert warned._tat == enforced._tat


async def test_tightest_window_is_named_in_the_refusal_headers() -> None:
    lim = MemoryRateLimiter(lambda: 0.0)
    limit = Windows((Rate(10, 1, 20), Rate(600, 60), Rate(20000, 86400)))
    for _ in range(20):
        assert (await lim.acquire("a", None, limit, None, 1, 0.0)).allowed
    d = await lim.acquire("a", None, limit, None, 1, 0.0)
    assert not d.allowed and d.agent.suffix == "" and d.retry_after_header() == "1"
    h = dict(d.headers())
    assert h["RateLimit"] == '"agent";r=0;t=1'
    assert h["RateLimit-Policy"] == '"agent";q=10;w=1, "agent-1m";q=600;w=60, "agent-1d";q=20000;w=86400'


# -- budgets ------------------------------------------------------------------

BUDGETS = BudgetWindows((Budget(3, 3600), Budget(5, 86400)))

# (time s, cost, allowed, binding window suffix)
BUDGET_TABLE = [
    (0, 2, True, ""),
    (10, 2, False, ""),          # hour: 1 left; day has 3: refused by the hour, nothing spent
    (3600, 2, True, ""),         # a new hour: 1 left after this, as in the day: the shorter binds
    (3700, 2, False, "-1d"),     # the day binds
    (86400, 3, True, ""),        # a new day
]


async def _run_budget_table(budgets, now_of=lambda t: t) -> None:
    for t, cost, allowed, window in BUDGET_TABLE:
        v = await budgets.charge("a", BUDGETS, cost, now_of(t))
        assert (v.allowed, v.suffix) == (allowed, window), (t, v)


async def test_budget_windows_in_memory() -> None:
    await _run_budget_table(MemoryBudgets(lambda: 0.0))


async def test_budget_windows_in_redis(redis_server) -> None:
    client = connect_redis(redis_server.url, 1.0)
    try:
        await client.flushdb()
        await _run_budget_table(RedisBudgets(client, timeout_s=1.0), lambda t: 1_800_000_000 - 1_800_000_000 % 86400 + t)
        assert sorted(k.decode() for k in await client.hkeys("regate:budget:{a}")) == ["s", "s86400", "w", "w86400"]
    finally:
        await client.aclose()


# -- breakers -----------------------------------------------------------------

def _breakers(mode_cfg: dict):
    return build({"tool": {"consecutive_failures": 2, "cooldown_s": 10},
                  "agent": {"enabled": False}, "loop": {"enabled": False}, **mode_cfg})


def test_tool_breaker_in_warn_mode_lets_calls_through_and_reports() -> None:
    """(time, event) -> outcome: an open breaker in warn mode admits, reports tool_unavailable,
    and is not told the outcomes of the calls it would have refused."""
    b = _breakers({"mode": "warn"})
    for t in (0.0, 0.1):
        a = b.admit("a", "t", "GET", "/x", None, t)
        assert not a.would_refuse
        a.record(t, outcome=SERVER_ERROR)
    assert b.state("t", 0.2) == "open"
    a = b.admit("a", "t", "GET", "/x", None, 0.3)
    assert [r.code for r in a.would_refuse] == ["tool_unavailable"] and a.breaker_state == "open"
    a.record(0.3, status=200)  # would not have run: changes nothing
    assert b.state("t", 0.4) == "open"
    assert b.state("t", 10.2) == "half_open"  # the cool-down runs as if enforced
    assert b.snapshot(10.2)["would_refuse"]["tool_unavailable"] == 1
    # The same config enforced refuses.
    e = _breakers({})
    for t in (0.0, 0.1):
        e.admit("a", "t", "GET", "/x", None, t).record(t, outcome=SERVER_ERROR)
    assert e.admit("a", "t", "GET", "/x", None, 0.3).code == "tool_unavailable"


def test_per_tool_and_per_agent_modes() -> None:
    cfg = {"overrides": {"t": {"tool": {"mode": "warn"}}}, "agents": {"canary": {"mode": "warn"}}}
    b = build({"tool": {"consecutive_failures": 1, "cooldown_s": 10}, "agent": {"enabled": False},
               "loop": {"enabled": False}, **cfg})
    for tool in ("t", "u"):
        b.admit("a", tool, "GET", "/", None, 0.0).record(0.0, outcome=SERVER_ERROR)
    assert b.admit("a", "t", "GET", "/", None, 1.0).would_refuse          # the tool's own mode
    assert b.admit("a", "u", "GET", "/", None, 1.0).code == "tool_unavailable"
    assert b.admit("canary", "u", "GET", "/", None, 1.0).would_refuse     # the agent's mode


def test_backoff_and_loop_guard_in_warn_mode() -> None:
    b = build({"mode": "warn", "tool": {"enabled": False},
               "agent": {"consecutive_failures": 2, "backoff_s": 5},
               "loop": {"repeats": 2, "window_s": 60}})
    body = {"q": 1}
    for t in (0.0, 1.0):
        a = b.admit("a", "t", "POST", "/x", body, t)
        assert not a.would_refuse
        a.record(t, status=400, error="bad")
    a = b.admit("a", "t", "POST", "/x", body, 2.0)
    assert sorted(r.code for r in a.would_refuse) == ["agent_backoff", "retry_loop"]
    a.record(2.0, status=200)  # would not have run: the back-off and the loop are not lifted
    again = b.admit("a", "t", "POST", "/x", body, 3.0)
    assert sorted(r.code for r in again.would_refuse) == ["agent_backoff", "retry_loop"]


def test_breaker_mode_validation() -> None:
    with pytest.raises(ValueError) as e:
        build({"mode": "audit", "loop": {"mode": "off"}, "agents": {"x": {"mode": "maybe"}}})
    text = str(e.value)
    assert "breakers.mode: must be enforce or warn" in text
    assert "breakers.loop.mode: must be enforce or warn" in text
    assert "breakers.agents.x.mode: must be enforce or warn" in text


async def test_warn_survives_the_local_fallback() -> None:
    """Redis unreachable, on_store_error local: the in-process limiter answers, warn included."""
    from proxy.limits import StoreHealth
    from tests.support.procs import free_port

    client = connect_redis(f"redis://127.0.0.1:{free_port()}/0", 0.2)
    try:
        lim = RedisRateLimiter(client, StoreHealth("local"), timeout_s=0.2, local=MemoryRateLimiter(lambda: 0.0))
        rate = Rate(1, 1, 1)
        first = await lim.acquire("a", None, rate, None, 1, 0.0, warn=(True, False))
        second = await lim.acquire("a", None, rate, None, 1, 0.0, warn=(True, False))
        assert first.store_error == second.store_error == "local"
        assert (first.allowed, first.would_refuse) == (True, False)
        assert (second.allowed, second.would_refuse) == (True, True)
    finally:
        await client.aclose()


def test_explain_carries_what_warn_mode_would_have_refused() -> None:
    from proxy.observability.explain import _warned

    class C:
        extra = {"would_refuse": [{"stage": "ratelimit", "code": "rate_limited", "message": "m"}]}

    assert _warned(C()) == {"would_refuse": [{"stage": "ratelimit", "code": "rate_limited", "message": "m"}]}
    C.extra = {}
    assert _warned(C()) == {}
