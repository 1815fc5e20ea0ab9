"""Rate limits and budgets shared by every replica and worker through Redis.

Each call is one round trip: EVALSHA of a Lua script that reads, decides and
writes atomically on the server (on NOSCRIPT, as after a Redis restart, redis-py's
registered script loads the body and runs it again). The rate script holds both
keys of a call and commits both or neither. Keys carry the agent in a hash tag
(``regate:rl:{coder-7}``, ``regate:rl:{coder-7}:shell``) so both live in one slot
on Redis Cluster too. A ``scope`` (the decision's own limits use "decision") is a
separate set of keys for the same agent: ``regate:rl:decision:{coder-7}``,
``regate:budget:decision:{coder-7}``.

The client is redis-py's asyncio ``Redis`` (hiredis parser when installed) over
one ``BlockingConnectionPool`` per process. Its own retries are off: a failed or
slow call is reported once to ``StoreHealth``, and Regate decides (the
``on_store_error`` mode, and when to try the store again). Each call runs under
one ``asyncio.timeout`` covering pool checkout, connect and the reply; a call
cut short drops its connection (redis-py disconnects on cancellation), so a late
reply can never be read by the next call.

Time comes from the Redis server (``TIME``) by default: replicas' clocks drift
apart, and a TAT written by one replica is only comparable with "now" on another
if both come from one clock. ``time_source="client"`` passes the caller's clock
instead (tests drive the same (time, event) tables through the Lua as through
the in-process limiter). Keys expire when their state is back to empty (a full
bucket, an ended budget window), so idle agents cost Redis nothing.
"""

from __future__ import annotations

import asyncio
import time
from time import perf_counter
from typing import Literal

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from redis.utils import HIREDIS_AVAILABLE

from .budgets import CHARGE, NO_BUDGET, PEEK, SPEND, Budget, BudgetVerdict, MemoryBudgets, verdict_of
from .gcra import UNLIMITED, Clock, MemoryRateLimiter, RateDecision, assemble, plan_windows
from .store import LatencyHook, StoreHealth

_US = 1_000_000
# RedisError covers redis-py's ConnectionError, TimeoutError, ResponseError
# (NOSCRIPT is handled by the script object) and AuthenticationError.
STORE_ERRORS = (RedisError, OSError, TimeoutError, EOFError)

# Connections per process. Concurrent calls each hold one for a round trip
# (redis-py does not pipeline unrelated calls); past this many, a call waits in
# line for one, and the wait counts against the store timeout.
POOL_SIZE = 32

_NOW_LUA = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
"""

# decide_windows() of gcra.py: every window of both keys of a call (KEYS, in the order
# gcra.plan_windows gives). ARGV: now_us ('' = server TIME), cost, then per window its
# interval_us, tolerance_us and warn flag ('1': warn mode). Returns, as one space-separated
# string (one bulk reply parses far faster than an array): allowed, would_refuse, then per
# window allowed, remaining, retry_after_us (-1 never), reset_us.
GCRA_LUA = _NOW_LUA + """
local cost = tonumber(ARGV[2])
local n = #KEYS
local res = {1, 0}
local tats, news, ints, tols, warns = {}, {}, {}, {}, {}
local enf_ok, warn_ok = true, true
for i = 1, n do
  local interval = tonumber(ARGV[3 * i])
  local tol = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
  if tat < now then tat = now end
  ints[i], tols[i], tats[i], warns[i] = interval, tol, tat, ARGV[3 * i + 2] == '1'
  local inc = interval * cost
  local new_tat = tat + inc
  local allow_at = new_tat - tol
  local b = 4 * i - 1
  if now < allow_at then
    if warns[i] then warn_ok = false else enf_ok = false end
    local remaining = math.floor((now - tat + tol) / interval)
    if remaining < 0 then remaining = 0 end
    res[b], res[b + 1], res[b + 3] = 0, remaining, tat - now
    if inc > tol then res[b + 2] = -1 else res[b + 2] = allow_at - now end
  else
    res[b], res[b + 1], res[b + 2], res[b + 3] = 1, math.floor((now - allow_at) / interval), 0, new_tat - now
    news[i] = new_tat
  end
end
if not enf_ok then res[1] = 0 end
if enf_ok and not warn_ok then res[2] = 1 end
for i = 1, n do
  if news[i] then
    if enf_ok and (warn_ok or not warns[i]) then
      if cost > 0 then
        redis.call('SET', KEYS[i], string.format('%.0f', news[i]),
                   'PX', math.ceil((news[i] - now) / 1000))
      end
    else
      local b = 4 * i - 1
      local remaining = math.floor((now - tats[i] + tols[i]) / ints[i])
      if remaining < 0 then remaining = 0 end
      res[b + 1], res[b + 3] = remaining, tats[i] - now
    end
  end
end
for i = 1, #res do res[i] = string.format('%.0f', res[i]) end
return table.concat(res, ' ')
"""

# budget_windows() of budgets.py, in one hash per agent: the shortest window in fields
# w (window tag) and s (spent), each other window in w<window_s> / s<window_s>. ARGV:
# now_us ('' = server TIME), cost, mode (peek | charge | spend), then per window its
# window_s, units and field suffix. Returns allowed, then per window spent (%.17g),
# reset_us and its own allowed.
BUDGET_LUA = _NOW_LUA + """
local cost = tonumber(ARGV[2])
local mode = ARGV[3]
local n = (#ARGV - 3) / 3
local allowed = true
local spents, ends, tags, oks = {}, {}, {}, {}
for i = 1, n do
  local ws = ARGV[1 + 3 * i]
  local window_us = tonumber(ws) * 1000000
  local units = tonumber(ARGV[2 + 3 * i])
  local f = ARGV[3 + 3 * i]
  local end_us = (math.floor(now / window_us) + 1) * window_us
  local tag = string.format('%.0f', end_us) .. '/' .. ws
  local spent = 0
  local cur = redis.call('HMGET', KEYS[1], 'w' .. f, 's' .. f)
  if cur[1] == tag then spent = tonumber(cur[2]) end
  oks[i] = units - spent >= cost
  allowed = allowed and oks[i]
  spents[i], ends[i], tags[i] = spent, end_us, tag
end
if mode == 'spend' then allowed = true end
local res = {allowed and 1 or 0}
local write = (mode == 'spend' or (mode == 'charge' and allowed)) and cost ~= 0
local ttl = 0
for i = 1, n do
  if write then
    spents[i] = spents[i] + cost
    redis.call('HSET', KEYS[1], 'w' .. ARGV[3 + 3 * i], tags[i], 's' .. ARGV[3 + 3 * i],
               string.format('%.17g', spents[i]))
    if ends[i] - now > ttl then ttl = ends[i] - now end
  end
  res[#res + 1] = string.format('%.17g', spents[i])
  res[#res + 1] = ends[i] - now
  res[#res + 1] = oks[i] and 1 or 0
end
if write then redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) + 60000) end
return res
"""

TimeSource = Literal["server", "client"]


_PACKERS: dict[type, type] = {}


def _hiredis_packing(connection_class: type) -> type:
    """``connection_class`` whose commands are serialised by hiredis (C) rather than in Python.

    redis-py's sync client does this already (``HiredisRespSerializer``); its asyncio
    connection always packs in Python, which was ~20 µs of the ~120 µs CPU a script call
    cost here. Replies are parsed by hiredis either way.
    """
    if not HIREDIS_AVAILABLE:
        return connection_class
    cls = _PACKERS.get(connection_class)
    if cls is None:
        from redis.connection import HiredisRespSerializer

        pack = HiredisRespSerializer().pack

        def pack_command(self, *args):
            return pack(*args)

        cls = _PACKERS[connection_class] = type(
            f"Hiredis{connection_class.__name__}", (connection_class,), {"pack_command": pack_command})
    return cls


def connect_redis(url: str, timeout_s: float = 0.02, *, max_connections: int = POOL_SIZE) -> Redis:
    """The limits store's client: ``redis://[user:password@]host[:port][/db]`` or ``rediss://``.

    One per process; connects lazily (first call). Retries off (Regate decides);
    no socket read timeout of its own (the caller's ``asyncio.timeout`` bounds the
    whole call, which costs one timer instead of one per read and write).
    """
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"limits.redis_url must be redis://host:port/db, rediss://... or unix://..., got {url!r}")
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None,
        socket_connect_timeout=timeout_s, socket_timeout=None,
        retry=None, retry_on_timeout=False, retry_on_error=[],
        health_check_interval=0, protocol=2,
    )
    pool.connection_class = _hiredis_packing(pool.connection_class)  # TCP, TLS or unix socket
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


class _RedisPart:
    def __init__(self, client: Redis, health: StoreHealth, *, timeout_s: float, time_source: TimeSource,
                 wall_clock: Clock, prefix: str, on_latency: LatencyHook | None) -> None:
        if time_source not in ("server", "client"):
            raise ValueError(f"time_source must be server or client, got {time_source!r}")
        self.client = client
        self.health = health
        self._timeout_s = timeout_s
        self._client_time = time_source == "client"
        self._wall = wall_clock
        self._prefix = prefix
        self._on_latency = on_latency

    def _now_arg(self, now: float | None) -> str:
        if now is not None:
            return str(round(now * _US))
        return str(round(self._wall() * _US)) if self._client_time else ""

    async def _run(self, part: str, script, keys: list[str], args: list):
        """The script's reply, or None when the store failed (already counted)."""
        health = self.health
        if not health.should_try():
            return None
        t0 = perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await script(keys, args)
        except STORE_ERRORS as e:
            # NOTE: a timed-out script may still have run on the server; that call's
            # cells are then spent without being admitted (errs towards limiting).
            health.failed(part, e)
            return None
        if self._on_latency is not None:
            self._on_latency(part, perf_counter() - t0)
        health.succeeded(part)
        return reply


class RedisRateLimiter(_RedisPart):
    """GCRA over both keys of a call in one atomic script; ``acquire`` as MemoryRateLimiter's."""

    def __init__(self, client: Redis, health: StoreHealth | None = None, *,
                 timeout_s: float = 0.02, time_source: TimeSource = "server",
                 wall_clock: Clock = time.time, local: MemoryRateLimiter | None = None,
                 prefix: str = "regate:", on_latency: LatencyHook | None = None) -> None:
        super().__init__(client, health or StoreHealth(), timeout_s=timeout_s, time_source=time_source,
                         wall_clock=wall_clock, prefix=prefix, on_latency=on_latency)
        self._script = client.register_script(GCRA_LUA)
        self._local = local if local is not None else MemoryRateLimiter()

    async def acquire(self, agent: str, tool: str | None, agent_rate, tool_rate, cost: int = 1,
                      now: float | None = None, *, scope: str | None = None,
                      warn: tuple[bool, bool] = (False, False)) -> RateDecision:
        if agent_rate is None and tool_rate is None:
            return UNLIMITED
        base = f"{self._prefix}rl:{{{agent}}}" if scope is None else f"{self._prefix}rl:{scope}:{{{agent}}}"
        plan = plan_windows(agent_rate, tool_rate, warn)
        keys = []
        args: list = [self._now_arg(now), cost]
        for which, i, rate, w, _ in plan:
            key = base if which == "agent" else f"{base}:{tool}"
            # The shortest window at the key itself (as a one-window limit), the others beside it.
            keys.append(key if i == 0 else f"{key}~{rate.per_s}")
            args += (rate.interval_us, rate.tolerance_us, "1" if w else "0")
        reply = await self._run("rate", self._script, keys, args)
        if reply is None:
            return self._without_store(agent, tool, agent_rate, tool_rate, cost, now, scope, warn)
        v = [int(x) for x in reply.split()]
        results = [(v[j] == 1, v[j + 1], v[j + 2], v[j + 3]) for j in range(2, 2 + 4 * len(plan), 4)]
        return assemble(plan, v[0] == 1, v[1] == 1, results)

    def _without_store(self, agent: str, tool: str | None, agent_rate, tool_rate, cost: int,
                       now: float | None, scope: str | None = None,
                       warn: tuple[bool, bool] = (False, False)) -> RateDecision:
        mode = self.health.answered_without_store("rate")
        if mode == "local":
            # NOTE: lossy by design: each process limits on its own from an empty
            # state while Redis is away, so N replicas admit up to N times the limit.
            d = self._local.decide(agent, tool, agent_rate, tool_rate, cost, now, scope=scope, warn=warn)
            return RateDecision(d.allowed, d.agent, d.tool, "local", d.would_refuse, d.windows)
        if mode == "allow":
            # NOTE: fail open, as configured: counted in fail_open.
            return RateDecision(True, None, None, "allow")
        return RateDecision(False, None, None, "deny")


class RedisBudgets(_RedisPart):
    """Budgets in one hash per agent (window tag + spent); same methods as MemoryBudgets."""

    def __init__(self, client: Redis, health: StoreHealth | None = None, *,
                 timeout_s: float = 0.02, time_source: TimeSource = "server",
                 wall_clock: Clock = time.time, local: MemoryBudgets | None = None,
                 prefix: str = "regate:", on_latency: LatencyHook | None = None) -> None:
        super().__init__(client, health or StoreHealth(), timeout_s=timeout_s, time_source=time_source,
                         wall_clock=wall_clock, prefix=prefix, on_latency=on_latency)
        self._script = client.register_script(BUDGET_LUA)
        self._local = local if local is not None else MemoryBudgets(wall_clock)

    async def step(self, agent: str, budget: Budget | None, cost: float, mode: str,
                   now: float | None = None, *, scope: str | None = None) -> BudgetVerdict:
        if budget is None:
            return NO_BUDGET
        key = f"{self._prefix}budget:{{{agent}}}" if scope is None else f"{self._prefix}budget:{scope}:{{{agent}}}"
        args: list = [self._now_arg(now), repr(float(cost)), mode]
        for b, sfx in zip(budget.windows, budget.suffixes):
            args += (b.window_s, repr(b.units), str(b.window_s) if sfx else "")
        reply = await self._run("budget", self._script, [key], args)
        if reply is None:
            return self._without_store(agent, budget, cost, mode, now, scope)
        per_window = [(float(reply[j]), int(reply[j + 1]), reply[j + 2] == 1) for j in range(1, len(reply), 3)]
        return verdict_of(budget, reply[0] == 1, per_window, 0)

    def _without_store(self, agent: str, budget: Budget, cost: float, mode: str,
                       now: float | None, scope: str | None = None) -> BudgetVerdict:
        how = self.health.answered_without_store("budget")
        if how == "local":
            # NOTE: lossy by design: the in-process budget does not know what was
            # spent through Redis this window, so the agent starts it afresh here.
            v = self._local.step(agent, budget, cost, mode, now, scope=scope)
            return BudgetVerdict(v.allowed, v.remaining, v.reset_s, v.budget, "local", v.suffix)
        if how == "allow":
            # NOTE: fail open, as configured: counted in fail_open.
            return BudgetVerdict(True, None, None, budget, "allow")
        return BudgetVerdict(mode == SPEND, None, None, budget, "deny")

    async def check(self, agent: str, budget: Budget | None, cost: float,
                    now: float | None = None, *, scope: str | None = None) -> BudgetVerdict:
        return await self.step(agent, budget, cost, PEEK, now, scope=scope)

    async def charge(self, agent: str, budget: Budget | None, cost: float,
                     now: float | None = None, *, scope: str | None = None) -> BudgetVerdict:
        return await self.step(agent, budget, cost, CHARGE, now, scope=scope)

    async def spend(self, agent: str, budget: Budget | None, cost: float,
                    now: float | None = None, *, scope: str | None = None) -> BudgetVerdict:
        return await self.step(agent, budget, cost, SPEND, now, scope=scope)

    async def remaining(self, agent: str, budget: Budget | None, now: float | None = None) -> float | None:
        return (await self.step(agent, budget, 0, PEEK, now)).remaining
