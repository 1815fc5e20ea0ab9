"""The agent x tool breaker: isolate one agent that keeps failing against one tool.

Every failure of the pair counts, 4xx included (a 4xx is this agent's call being
wrong, which the tool breaker deliberately ignores). After ``consecutive_failures``
in a row the pair is refused for ``backoff_s``, and each further failure after a
back-off doubles it (``backoff_multiplier``), up to ``max_backoff_s``. One success
forgets the pair. Other agents, and this agent's other tools, are untouched.

Memory holds only pairs that are failing: a success deletes the entry, entries
idle for ``idle_ttl_s`` expire, and at most ``max_entries`` are kept (least
recently failing evicted first). ``now`` is the caller's clock, in seconds.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .config import AgentBackoffConfig
from .outcome import SUCCESS, Outcome, Refusal, describe, forget, seconds

_SWEEP_EVERY_S = 1.0


class _Pair:
    __slots__ = ("failures", "until", "backoff", "last_seen", "last_error", "config")

    def __init__(self, config: AgentBackoffConfig) -> None:
        self.failures = 0
        self.until = 0.0
        self.backoff = 0.0
        self.last_seen = 0.0
        self.last_error = ""
        self.config = config


class AgentBackoff:
    __slots__ = ("_config_for", "_pairs", "_next_sweep", "rejected", "backoffs", "evicted", "expired",
                 "_max_entries", "_idle_ttl_s")

    def __init__(self, config_for: Callable[[str], AgentBackoffConfig] | AgentBackoffConfig | None = None) -> None:
        if config_for is None or isinstance(config_for, AgentBackoffConfig):
            fixed = config_for or AgentBackoffConfig()
            config_for = lambda _tool: fixed  # noqa: E731
        self._config_for = config_for
        base = config_for("")  # the memory bounds are global (config forbids them per tool)
        self._max_entries = base.max_entries
        self._idle_ttl_s = base.idle_ttl_s
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()
        self._next_sweep = 0.0
        # Metrics.
        self.rejected = 0     # calls refused with agent_backoff
        self.backoffs = 0     # times a pair started (or extended) a back-off
        self.evicted = 0      # pairs dropped because max_entries was reached
        self.expired = 0      # pairs dropped after idle_ttl_s

    def check(self, agent: str, tool: str, now: float) -> Refusal | None:
        p = self._pairs.get((agent, tool))
        if p is None or now >= p.until:
            return None
        self.rejected += 1
        wait = p.until - now
        return Refusal(
            429, "agent_backoff", "backoff",
            f"your last {p.failures} calls to tool {tool!r} failed (last error: {p.last_error}); "
            f"wait {seconds(wait)} before calling it again, and change the request first.",
            wait,
        )

    def record(self, agent: str, tool: str, now: float, outcome: Outcome, status: int | None = None,
               error: str = "") -> None:
        key = (agent, tool)
        pairs = self._pairs
        if outcome == SUCCESS:
            # NOTE: also lifts a back-off whose calls were already in flight: the pair just
            # showed it can make a good call.
            if key in pairs:
                del pairs[key]
            return
        p = pairs.get(key)
        if p is None:
            p = pairs[key] = _Pair(self._config_for(tool))
        else:
            pairs.move_to_end(key)
        p.last_seen = now
        p.last_error = describe(outcome, status, error)
        if now < p.until:
            return  # admitted before the back-off began: it does not lengthen it
        p.failures += 1
        cfg = p.config
        over = p.failures - cfg.consecutive_failures
        if over >= 0:
            # Grown step by step, never by a power: no overflow however long it fails.
            p.backoff = cfg.backoff_s if over == 0 else min(cfg.max_backoff_s, p.backoff * cfg.backoff_multiplier)
            p.until = now + p.backoff
            self.backoffs += 1
        if len(pairs) > self._max_entries or now >= self._next_sweep:
            self._sweep(now)

    def failures(self, agent: str, tool: str) -> int:
        """Consecutive failures of the pair so far (0 when it last succeeded)."""
        p = self._pairs.get((agent, tool))
        return p.failures if p is not None else 0

    def reset(self, agent: str | None = None, tool: str | None = None) -> int:
        """Forget matching pairs (None matches all); returns how many."""
        return forget(self._pairs, agent, tool)

    def __len__(self) -> int:
        return len(self._pairs)

    def snapshot(self, now: float) -> list[dict]:
        return [
            {"agent": a, "tool": t, "failures": p.failures, "last_error": p.last_error,
             "retry_after_s": round(max(0.0, p.until - now), 3)}
            for (a, t), p in self._pairs.items()
        ]

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_EVERY_S
        pairs = self._pairs
        ttl = self._idle_ttl_s
        # Least recently failing first: stop at the first one still live.
        while pairs:
            key, p = next(iter(pairs.items()))
            if now - p.last_seen >= ttl and now >= p.until:
                del pairs[key]
                self.expired += 1
            else:
                break
        while len(pairs) > self._max_entries:
            # NOTE: fails open: the evicted pair's back-off is forgotten. It is the pair that
            # failed least recently, and the bound keeps a flood of agent ids from taking memory.
            pairs.popitem(last=False)
            self.evicted += 1
