"""Store health and the one place that decides what happens when the shared store fails.

``limits.on_store_error`` when Redis is unreachable, errs, or is slower than the
store timeout:

- ``local`` (default): answer from an in-process limiter/budget instead;
- ``deny``: refuse (the stage answers 503 with ``Retry-After``), fail closed;
- ``allow``: let the call through without a limit, fail open.

After a failure the store is not tried again for ``retry_interval_s`` (calls go
straight to the mode above instead of each waiting out a timeout); the first
call after that probes it, and a success marks it healthy again. Every answer
not given by Redis is counted, by mode, in ``StoreHealth`` and reported through
``on_event(part, event)`` so metrics and ``/readyz`` can say so.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Literal

from .gcra import Clock

OnStoreError = Literal["local", "deny", "allow"]
ON_STORE_ERROR_MODES = ("local", "deny", "allow")

# Events passed to on_event(part, event); part is "rate" or "budget".
STORE_ERROR = "store_error"        # one failed or timed-out Redis call
FALLBACK_LOCAL = "fallback_local"  # one call answered by the in-process store
FAIL_OPEN = "fail_open"            # one call let through unlimited
FAIL_CLOSED = "fail_closed"        # one call refused because the store is down
RECOVERED = "recovered"            # the store answered again after failing

EventHook = Callable[[str, str], None]
LatencyHook = Callable[[str, float], None]

_MODE_EVENT = {"local": FALLBACK_LOCAL, "allow": FAIL_OPEN, "deny": FAIL_CLOSED}


class StoreHealth:
    """Up/down state and counters of one shared store; rate limiter and budgets share one."""

    __slots__ = ("mode", "healthy", "last_error", "counts", "_clock", "_retry_s", "_down_until",
                 "_on_event")

    def __init__(self, mode: OnStoreError = "local", *, retry_interval_s: float = 1.0,
                 clock: Clock = time.monotonic, on_event: EventHook | None = None) -> None:
        if mode not in ON_STORE_ERROR_MODES:
            raise ValueError(f"on_store_error must be one of {', '.join(ON_STORE_ERROR_MODES)}, got {mode!r}")
        self.mode = mode
        self.healthy = True
        self.last_error: str | None = None
        self.counts = {STORE_ERROR: 0, FALLBACK_LOCAL: 0, FAIL_OPEN: 0, FAIL_CLOSED: 0, RECOVERED: 0}
        self._clock = clock
        self._retry_s = retry_interval_s
        self._down_until = 0.0
        self._on_event = on_event

    def should_try(self) -> bool:
        """True unless the store failed less than retry_interval_s ago."""
        return self.healthy or self._clock() >= self._down_until

    def failed(self, part: str, exc: BaseException) -> None:
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._down_until = self._clock() + self._retry_s
        self._count(part, STORE_ERROR)

    def succeeded(self, part: str) -> None:
        if not self.healthy:
            self.healthy = True
            self.last_error = None
            self._count(part, RECOVERED)

    def answered_without_store(self, part: str) -> str:
        """Count one call answered by the on_store_error mode; returns the mode."""
        self._count(part, _MODE_EVENT[self.mode])
        return self.mode

    def _count(self, part: str, event: str) -> None:
        self.counts[event] += 1
        if self._on_event is not None:
            self._on_event(part, event)

    def __repr__(self) -> str:
        return f"StoreHealth(mode={self.mode!r}, healthy={self.healthy}, counts={self.counts})"


class LimitStores:
    """The rate limiter and the budgets of one process, as configured; ``aclose`` at shutdown.

    ``healthy`` is False while the shared store is failing (for ``/readyz``);
    ``health.counts`` holds the fallback counters.
    """

    __slots__ = ("rate", "budgets", "health", "_client", "_timeout_s")

    def __init__(self, rate, budgets, health: StoreHealth | None = None, client=None,
                 timeout_s: float = 0.02) -> None:
        self.rate = rate
        self.budgets = budgets
        self.health = health
        self._client = client
        self._timeout_s = timeout_s

    @property
    def healthy(self) -> bool:
        return self.health is None or self.health.healthy

    async def probe(self) -> bool:
        """``healthy``, after one PING when the store is marked down and its retry interval has
        passed, so that readiness recovers without traffic (a replica that fails /readyz gets
        none). No round trip while healthy or within the retry interval. Counted as part "probe"."""
        health = self.health
        if health is None or health.healthy or self._client is None:
            return True
        if not health.should_try():
            return False
        from .redis_store import STORE_ERRORS

        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
        except STORE_ERRORS as e:
            health.failed("probe", e)
            return False
        health.succeeded("probe")
        return True

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def open_limit_stores(store: Literal["memory", "redis"] = "memory", *,
                      redis_url: str = "redis://127.0.0.1:6379/0",
                      on_store_error: OnStoreError = "local", timeout_ms: float = 20,
                      retry_interval_s: float = 1.0, prefix: str = "regate:",
                      on_event: EventHook | None = None, on_latency: LatencyHook | None = None,
                      clock: Clock = time.monotonic, wall_clock: Clock = time.time) -> LimitStores:
    """Build the stores from the ``limits`` config section. Connects lazily (first call)."""
    from .budgets import MemoryBudgets
    from .gcra import MemoryRateLimiter

    if store == "memory":
        return LimitStores(MemoryRateLimiter(clock), MemoryBudgets(wall_clock))
    if store != "redis":
        raise ValueError(f"limits.store must be memory or redis, got {store!r}")
    from .redis_store import RedisBudgets, RedisRateLimiter, connect_redis

    timeout_s = timeout_ms / 1000
    health = StoreHealth(on_store_error, retry_interval_s=retry_interval_s, clock=clock, on_event=on_event)
    client = connect_redis(redis_url, timeout_s)
    common = dict(timeout_s=timeout_s, wall_clock=wall_clock, prefix=prefix, on_latency=on_latency)
    return LimitStores(
        RedisRateLimiter(client, health, local=MemoryRateLimiter(clock), **common),
        RedisBudgets(client, health, local=MemoryBudgets(wall_clock), **common),
        health, client, timeout_s,
    )
