"""GCRA rate limiting: the algorithm, its outcome objects, and the in-process limiter.

The generic cell rate algorithm keeps one number per key, the theoretical arrival
time (TAT) of the next cell, and no log of past requests. A rate of R requests per
P seconds gives an emission interval T = P/R; a burst of B lets up to B cells in
at once (tolerance τ = T·B). A call of cost c is admitted when
``max(TAT, now) + c·T − τ <= now`` and then moves TAT there. All arithmetic is on
integer microseconds so the Python limiter and the Redis Lua script (doubles,
exact below 2**53) give the same answer to the same inputs, bit for bit.

Every call checks two keys, the agent and the agent×tool pair, and commits both
or neither: a call that passes one key but fails the other consumes nothing.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from functools import lru_cache
from typing import Callable

Clock = Callable[[], float]

_US = 1_000_000

_UNITS = {
    "s": 1, "sec": 1, "second": 1,
    "m": 60, "min": 60, "minute": 60,
    "h": 3600, "hr": 3600, "hour": 3600,
    "d": 86400, "day": 86400,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)?\s*([a-z]+)\s*$")


class Rate:
    """``requests`` per ``per_s`` seconds with a burst of ``burst`` cells (default: ``requests``)."""

    __slots__ = ("requests", "per_s", "burst", "interval_us", "tolerance_us", "_policy")

    def __init__(self, requests: int, per_s: int = 1, burst: int | None = None) -> None:
        if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
            raise ValueError(f"requests must be a whole number >= 1, got {requests!r}")
        if isinstance(per_s, bool) or not isinstance(per_s, int) or per_s < 1:
            raise ValueError(f"per must be a whole number of seconds >= 1, got {per_s!r}")
        if burst is None:
            burst = requests
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a whole number >= 1, got {burst!r}")
        self.requests = requests
        self.per_s = per_s
        self.burst = burst
        # Rounded to whole µs: 1/3 s becomes 333333 µs, a 3e-6 relative error, in
        # exchange for integer arithmetic that Redis reproduces exactly.
        self.interval_us = max(1, round(per_s * _US / requests))
        self.tolerance_us = self.interval_us * burst
        self._policy = f";q={requests};w={per_s}"

    @classmethod
    def parse(cls, spec: str, burst: int | None = None) -> "Rate":
        """``"10/s"``, ``"100/min"``, ``"5/10s"``, ``"1000/day"``; ValueError says what is wrong."""
        return _parse_rate(spec, burst)

    def policy_item(self, name: str) -> str:
        """One member of ``RateLimit-Policy``: ``"name";q=10;w=1``."""
        return f'"{name}"{self._policy}'

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Rate) and self.requests == other.requests
                and self.per_s == other.per_s and self.burst == other.burst)

    def __hash__(self) -> int:
        return hash((self.requests, self.per_s, self.burst))

    def __repr__(self) -> str:
        return f"Rate({self.requests}/{self.per_s}s, burst={self.burst})"


@lru_cache(maxsize=1024)
def _parse_rate(spec: str, burst: int | None) -> Rate:
    m = _RATE.match(spec.lower()) if isinstance(spec, str) else None
    unit = None
    if m:
        word = m.group(3)
        # Plurals of the long names only: "ms" must not read as "m".
        unit = _UNITS.get(word) or (_UNITS.get(word[:-1]) if len(word) > 2 and word[-1] == "s" else None)
    if unit is None:
        raise ValueError(f"want REQUESTS/PERIOD such as 10/s, 100/min or 5/10s, got {spec!r}")
    return Rate(int(m.group(1)), int(m.group(2) or 1) * unit, burst)


def gcra(tat_us: int | None, now_us: int, rate: Rate, cost: int) -> tuple[bool, int, int, int, int]:
    """One key's verdict: (allowed, tat to store, remaining, retry_after_us, reset_us).

    retry_after_us is -1 when the cost exceeds the burst (it can never pass).
    The Lua script in redis_store.py is this function, line for line.
    """
    interval = rate.interval_us
    tol = rate.tolerance_us
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    inc = interval * cost
    new_tat = tat + inc
    allow_at = new_tat - tol
    if now_us < allow_at:
        remaining = (now_us - tat + tol) // interval
        return (False, tat, remaining if remaining > 0 else 0,
                -1 if inc > tol else allow_at - now_us, tat - now_us)
    return True, new_tat, (now_us - allow_at) // interval, 0, new_tat - now_us


def _peek(tat_us: int | None, now_us: int, rate: Rate) -> tuple[int, int]:
    """(remaining, reset_us) without consuming: what a key shows when the other key refused."""
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    remaining = (now_us - tat + rate.tolerance_us) // rate.interval_us
    return (remaining if remaining > 0 else 0), tat - now_us


def _ceil_s(us: int) -> int:
    return -(-us // _US)


class KeyResult:
    """One key's outcome. ``allowed`` is this key's own answer; the call's is RateDecision.allowed."""

    __slots__ = ("rate", "allowed", "remaining", "retry_after_us", "reset_us")

    def __init__(self, rate: Rate, allowed: bool, remaining: int, retry_after_us: int, reset_us: int) -> None:
        self.rate = rate
        self.allowed = allowed
        self.remaining = remaining
        self.retry_after_us = retry_after_us
        self.reset_us = reset_us

    @property
    def retry_after_s(self) -> float:
        """Seconds until this key admits the cost; 0 when it does now; inf when never (cost > burst)."""
        return math.inf if self.retry_after_us < 0 else self.retry_after_us / _US

    @property
    def reset_s(self) -> float:
        """Seconds until this key is back to its full burst."""
        return self.reset_us / _US

    def limit_item(self, name: str) -> str:
        """One member of ``RateLimit``: ``"name";r=3;t=1``.

        t is the whole seconds until the key is full again; on a refused key it is
        the wait before the call could pass, so ``Retry-After`` is never earlier
        than the end of the effective window (draft-ietf-httpapi-ratelimit-headers §6).
        """
        if self.allowed or self.retry_after_us < 0:
            t = _ceil_s(self.reset_us)
        else:
            t = _ceil_s(self.retry_after_us)
        return f'"{name}";r={self.remaining};t={t}'

    def __repr__(self) -> str:
        return (f"KeyResult({self.rate!r}, allowed={self.allowed}, remaining={self.remaining}, "
                f"retry_after_us={self.retry_after_us}, reset_us={self.reset_us})")


class RateDecision:
    """The outcome of one call against its two keys.

    ``store_error`` is None when the configured store answered, else the
    ``on_store_error`` mode that produced this answer: "local" (the in-process
    fallback decided), "allow" (failed open) or "deny" (failed closed → 503).
    """

    __slots__ = ("allowed", "agent", "tool", "store_error")

    def __init__(self, allowed: bool, agent: KeyResult | None, tool: KeyResult | None,
                 store_error: str | None = None) -> None:
        self.allowed = allowed
        self.agent = agent
        self.tool = tool
        self.store_error = store_error

    @property
    def retry_after_s(self) -> float:
        """Seconds until the refused call could pass (max over the refusing keys); inf: never."""
        worst = 0.0
        for r in (self.agent, self.tool):
            if r is not None and not r.allowed and r.retry_after_s > worst:
                worst = r.retry_after_s
        return worst

    def retry_after_header(self) -> str | None:
        """``Retry-After`` for a refused call (whole seconds, rounded up, >= 1); None when the
        call was allowed or can never pass (cost above the burst)."""
        if self.allowed:
            return None
        worst = 0
        for r in (self.agent, self.tool):
            if r is not None and not r.allowed:
                if r.retry_after_us < 0:
                    return None
                if r.retry_after_us > worst:
                    worst = r.retry_after_us
        return str(max(1, _ceil_s(worst)))

    def headers(self, agent_name: str = "agent", tool_name: str = "tool") -> list[tuple[str, str]]:
        """``RateLimit-Policy`` and ``RateLimit`` for every limited key; [] when neither is."""
        policy = []
        limit = []
        if self.agent is not None:
            policy.append(self.agent.rate.policy_item(agent_name))
            limit.append(self.agent.limit_item(agent_name))
        if self.tool is not None:
            policy.append(self.tool.rate.policy_item(tool_name))
            limit.append(self.tool.limit_item(tool_name))
        if not policy:
            return []
        return [("RateLimit-Policy", ", ".join(policy)), ("RateLimit", ", ".join(limit))]

    def __repr__(self) -> str:
        return (f"RateDecision(allowed={self.allowed}, agent={self.agent!r}, tool={self.tool!r}, "
                f"store_error={self.store_error!r})")


UNLIMITED = RateDecision(True, None, None)


def decide_pair(tat_a: int | None, tat_t: int | None, now_us: int, agent_rate: Rate | None,
                tool_rate: Rate | None, cost: int) -> tuple[RateDecision, int | None, int | None]:
    """Both keys at once: (decision, agent tat to store, tool tat to store); None = leave as is."""
    allowed = True
    a = t = None
    if agent_rate is not None:
        a = gcra(tat_a, now_us, agent_rate, cost)
        allowed = a[0]
    if tool_rate is not None:
        t = gcra(tat_t, now_us, tool_rate, cost)
        allowed = allowed and t[0]
    ra = rt = None
    new_a = new_t = None
    if allowed:
        if a is not None:
            ra = KeyResult(agent_rate, True, a[2], 0, a[4])
            new_a = a[1]
        if t is not None:
            rt = KeyResult(tool_rate, True, t[2], 0, t[4])
            new_t = t[1]
        if cost <= 0:
            new_a = new_t = None  # cost 0 is a peek: nothing changes
    else:
        # A key that would have passed alone is reported as it stands, unconsumed.
        if a is not None:
            if a[0]:
                rem, reset = _peek(tat_a, now_us, agent_rate)
                ra = KeyResult(agent_rate, True, rem, 0, reset)
            else:
                ra = KeyResult(agent_rate, False, a[2], a[3], a[4])
        if t is not None:
            if t[0]:
                rem, reset = _peek(tat_t, now_us, tool_rate)
                rt = KeyResult(tool_rate, True, rem, 0, reset)
            else:
                rt = KeyResult(tool_rate, False, t[2], t[3], t[4])
    return RateDecision(allowed, ra, rt), new_a, new_t


class MemoryRateLimiter:
    """GCRA state for one process, bounded.

    A key whose TAT is not in the future is at full burst, the same as no entry,
    so it can be dropped without changing any answer. Each new key looks at the
    three oldest entries and drops those that are idle (or moves them to the
    back): a clock sweep that costs O(1) per new key, nothing per known key, and
    reclaims idle agents faster than new ones arrive. ``max_keys`` is a hard ceiling past which live entries are evicted.
    """

    def __init__(self, clock: Clock = time.monotonic, *, max_keys: int = 1_000_000) -> None:
        self._clock = clock
        self._tat: OrderedDict = OrderedDict()
        self._max_keys = max_keys
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._tat)

    def decide(self, agent: str, tool: str | None, agent_rate: Rate | None, tool_rate: Rate | None,
               cost: int = 1, now: float | None = None, *, scope: str | None = None) -> RateDecision:
        """Check both keys and commit both or neither. Synchronous: atomic on the event loop.

        ``scope`` names a separate set of keys for the same agent and tool (the decision's
        own limits use "decision"): its cells never count against the unscoped keys."""
        if agent_rate is None and tool_rate is None:
            return UNLIMITED
        now_us = round((self._clock() if now is None else now) * _US)
        tats = self._tat
        if scope is None:
            agent_key: object = agent
            tool_key: object = (agent, tool)
        else:
            # Three-tuples: never equal to an agent (a str) or an agent×tool pair.
            agent_key = (scope, agent, None)
            tool_key = (scope, agent, tool)
        decision, new_a, new_t = decide_pair(
            tats.get(agent_key) if agent_rate is not None else None,
            tats.get(tool_key) if tool_rate is not None else None,
            now_us, agent_rate, tool_rate, cost)
        size = len(tats)
        if new_a is not None:
            tats[agent_key] = new_a
        if new_t is not None:
            tats[tool_key] = new_t
        if len(tats) > size:
            # Only a new key grows the table, so only new keys pay for the sweep.
            self._sweep(now_us, 3 * (len(tats) - size))
        return decision

    async def acquire(self, agent: str, tool: str | None, agent_rate: Rate | None,
                      tool_rate: Rate | None, cost: int = 1, now: float | None = None, *,
                      scope: str | None = None) -> RateDecision:
        """The store-neutral interface (RedisRateLimiter has the same one)."""
        return self.decide(agent, tool, agent_rate, tool_rate, cost, now, scope=scope)

    def _sweep(self, now_us: int, looks: int) -> None:
        # Three looks per new key: the sweep goes round the table faster than it
        # fills, so every idle key is reclaimed within about a third of a round.
        tats = self._tat
        for _ in range(looks):
            key, tat = tats.popitem(last=False)
            if tat > now_us:
                tats[key] = tat  # still limiting: to the back of the line
            elif not tats:
                return
        if len(tats) > self._max_keys:
            # NOTE: lossy by design: past max_keys a live limiter is forgotten (that
            # key gets its full burst back) rather than letting memory grow without bound.
            tats.popitem(last=False)
            self.evictions += 1
