"""GCRA rate limiting: the algorithm, its outcome objects, and the in-process limiter.

The generic cell rate algorithm keeps one number per key, the theoretical arrival
time (TAT) of the next cell, and no log of past requests. A rate of R requests per
P seconds gives an emission interval T = P/R; a burst of B lets up to B cells in
at once (tolerance τ = T·B). A call of cost c is admitted when
``max(TAT, now) + c·T − τ <= now`` and then moves TAT there. All arithmetic is on
integer microseconds so the Python limiter and the Redis Lua script (doubles,
exact below 2**53) give the same answer to the same inputs, bit for bit.

Every call checks two keys, the agent and the agent×tool pair, each one window
(``Rate``) or several (``Windows``: 10/s burst 20, 600/min, 20000/day), and
commits all or nothing: a call that passes one window but fails another consumes
nothing. A key in warn mode never refuses; a call it would refuse is reported
(``RateDecision.would_refuse``) and spends none of its cells (``decide_windows``).
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

    # A plain Rate is a one-window limit whose mode comes from the table (see Windows).
    mode = None

    @property
    def windows(self) -> tuple["Rate", ...]:
        return (self,)

    @property
    def suffixes(self) -> tuple[str, ...]:
        return ("",)

    def policy_item(self, name: str) -> str:
        """One member of ``RateLimit-Policy``: ``"name";q=10;w=1``."""
        return f'"{name}"{self._policy}'

    def describe(self) -> str:
        """``10/1s burst 20``: how a refusal names this window."""
        return f"{self.requests}/{_period(self.per_s)}" + (f" burst {self.burst}" if self.burst != self.requests else "")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Rate) and self.requests == other.requests
                and self.per_s == other.per_s and self.burst == other.burst)

    def __hash__(self) -> int:
        return hash((self.requests, self.per_s, self.burst))

    def __repr__(self) -> str:
        return f"Rate({self.requests}/{self.per_s}s, burst={self.burst})"


def _period(seconds: int) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


class Windows:
    """One limit made of several GCRA windows (``10/s burst 20``, ``600/min``, ``20000/day``),
    all checked at once: a call passes only if every window admits it, and then spends a
    cell in each. Sorted shortest first; the shortest keeps the limit's own name and key
    (so one window reads exactly as a plain ``Rate``), the others are named ``<name>-<w>``
    (``agent-1m``). ``mode``: "enforce", "warn" or None (inherit the agent's / table's)."""

    __slots__ = ("windows", "mode", "suffixes")

    def __init__(self, windows: "tuple[Rate, ...] | list[Rate]", mode: str | None = None) -> None:
        ws = tuple(sorted(windows, key=lambda r: (r.per_s, r.interval_us)))
        if not ws:
            raise ValueError("a limit needs at least one window")
        periods = [r.per_s for r in ws]
        if len(set(periods)) != len(periods):
            raise ValueError("two windows of the same period: give each window a different period")
        if mode not in (None, "enforce", "warn"):
            raise ValueError(f"mode must be enforce or warn, got {mode!r}")
        self.windows = ws
        self.mode = mode
        self.suffixes = ("",) + tuple(f"-{_period(r.per_s)}" for r in ws[1:])

    def describe(self) -> str:
        return ", ".join(r.describe() for r in self.windows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Windows) and self.windows == other.windows and self.mode == other.mode

    def __hash__(self) -> int:
        return hash((self.windows, self.mode))

    def __repr__(self) -> str:
        m = f", mode={self.mode!r}" if self.mode else ""
        return f"Windows({list(self.windows)!r}{m})"


Limit = "Rate | Windows"


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
    """One key's outcome (for a limit of several windows: its tightest window). ``allowed``
    is this key's own answer; the call's is RateDecision.allowed. ``warn``: the key's limit
    is in warn mode (its refusal is reported, not enforced); ``suffix``: the window's name
    after the key's (``""`` for the shortest window, ``"-1m"``...)."""

    __slots__ = ("rate", "allowed", "remaining", "retry_after_us", "reset_us", "warn", "suffix")

    def __init__(self, rate: Rate, allowed: bool, remaining: int, retry_after_us: int, reset_us: int,
                 warn: bool = False, suffix: str = "") -> None:
        self.rate = rate
        self.allowed = allowed
        self.remaining = remaining
        self.retry_after_us = retry_after_us
        self.reset_us = reset_us
        self.warn = warn
        self.suffix = suffix

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
        return f'"{name}{self.suffix}";r={self.remaining};t={t}'

    def __repr__(self) -> str:
        w = ", warn" if self.warn else ""
        return (f"KeyResult({self.rate!r}, allowed={self.allowed}, remaining={self.remaining}, "
                f"retry_after_us={self.retry_after_us}, reset_us={self.reset_us}{w})")


def _tightest(results: tuple[KeyResult, ...]) -> KeyResult:
    """The window that binds: of the refusing ones the longest wait (never = longest),
    else the one with the fewest cells left (the shorter window on a tie)."""
    if len(results) == 1:
        return results[0]
    best = None
    for r in results:
        if not r.allowed:
            if best is None or best.allowed or (best.retry_after_us >= 0 and
                                                (r.retry_after_us < 0 or r.retry_after_us > best.retry_after_us)):
                best = r
        elif best is None or (best.allowed and r.remaining < best.remaining):
            best = r
    return best  # type: ignore[return-value]


class RateDecision:
    """The outcome of one call against its two keys (each one or more windows).

    ``allowed`` is the enforced answer; ``would_refuse`` is True when the call passes
    only because a key in warn mode was not enforced (that key's KeyResult is refused).
    ``agent`` / ``tool``: each key's tightest window; ``windows``: every window of both.
    ``store_error`` is None when the configured store answered, else the
    ``on_store_error`` mode that produced this answer: "local" (the in-process
    fallback decided), "allow" (failed open) or "deny" (failed closed → 503).
    """

    __slots__ = ("allowed", "agent", "tool", "store_error", "would_refuse", "windows")

    def __init__(self, allowed: bool, agent: KeyResult | None, tool: KeyResult | None,
                 store_error: str | None = None, would_refuse: bool = False,
                 windows: tuple[tuple[str, KeyResult], ...] | None = None) -> None:
        self.allowed = allowed
        self.agent = agent
        self.tool = tool
        self.store_error = store_error
        self.would_refuse = would_refuse
        if windows is None:
            windows = tuple((k, r) for k, r in (("agent", agent), ("tool", tool)) if r is not None)
        self.windows = windows

    def _refusing(self, warn: bool = False):
        for r in (self.agent, self.tool):
            if r is not None and not r.allowed and r.warn is warn:
                yield r

    @property
    def retry_after_s(self) -> float:
        """Seconds until the refused call could pass (max over the refusing keys); inf: never."""
        worst = 0.0
        for r in self._refusing():
            if r.retry_after_s > worst:
                worst = r.retry_after_s
        return worst

    def retry_after_header(self, warn: bool = False) -> str | None:
        """``Retry-After`` for a refused call (whole seconds, rounded up, >= 1); None when the
        call was allowed or can never pass (cost above the burst). ``warn``: the same for
        the warn-mode keys that would have refused it."""
        if self.allowed and not warn:
            return None
        worst = 0
        found = False
        for r in self._refusing(warn):
            found = True
            if r.retry_after_us < 0:
                return None
            if r.retry_after_us > worst:
                worst = r.retry_after_us
        return str(max(1, _ceil_s(worst))) if found or not warn else None

    def headers(self, agent_name: str = "agent", tool_name: str = "tool") -> list[tuple[str, str]]:
        """``RateLimit-Policy`` (every window) and ``RateLimit`` (each key's tightest window)
        for every limited key in enforce mode; [] when none is. Warn-mode keys are not
        advertised: watching a limit changes nothing the agent sees."""
        policy = []
        limit = []
        names = {"agent": agent_name, "tool": tool_name}
        for which, r in self.windows:
            if not r.warn:
                policy.append(r.rate.policy_item(names[which] + r.suffix))
        for which, r in (("agent", self.agent), ("tool", self.tool)):
            if r is not None and not r.warn:
                limit.append(r.limit_item(names[which]))
        if not policy:
            return []
        return [("RateLimit-Policy", ", ".join(policy)), ("RateLimit", ", ".join(limit))]

    def __repr__(self) -> str:
        w = ", would_refuse=True" if self.would_refuse else ""
        return (f"RateDecision(allowed={self.allowed}, agent={self.agent!r}, tool={self.tool!r}, "
                f"store_error={self.store_error!r}{w})")


UNLIMITED = RateDecision(True, None, None)


def decide_windows(tats: list, now_us: int, rates: list[Rate], warns: list[bool], cost: int
                   ) -> tuple[bool, bool, list[tuple[bool, int, int, int]], list]:
    """Every window of a call at once: (allowed, would_refuse, per window (allowed, remaining,
    retry_after_us, reset_us), per window the tat to store or None).

    Enforced windows commit when every enforced window admits the call (it runs); warn
    windows commit only when every window admits it, so a warn-mode limit's state is the
    state it would have if enforced (a call it would refuse spends none of its cells).
    The Lua script in redis_store.py is this function, line for line.
    """
    n = len(rates)
    raw = [gcra(tats[i], now_us, rates[i], cost) for i in range(n)]
    enf_ok = warn_ok = True
    for i in range(n):
        if not raw[i][0]:
            if warns[i]:
                warn_ok = False
            else:
                enf_ok = False
    out = []
    new: list = [None] * n
    for i in range(n):
        a = raw[i]
        if not a[0]:
            out.append((False, a[2], a[3], a[4]))
        elif enf_ok and (warn_ok or not warns[i]):
            out.append((True, a[2], 0, a[4]))
            if cost > 0:  # cost 0 is a peek: nothing changes
                new[i] = a[1]
        else:
            # Would pass alone, but the call was refused: reported as it stands, unconsumed.
            rem, reset = _peek(tats[i], now_us, rates[i])
            out.append((True, rem, 0, reset))
    return enf_ok, enf_ok and not warn_ok, out, new


def plan_windows(agent_limit, tool_limit, warn: tuple[bool, bool] = (False, False)):
    """The windows of a call's two keys, in the order the stores check them:
    [(which, window index, rate, warn, suffix)]."""
    plan = []
    if agent_limit is not None:
        for i, r in enumerate(agent_limit.windows):
            plan.append(("agent", i, r, warn[0], agent_limit.suffixes[i]))
    if tool_limit is not None:
        for i, r in enumerate(tool_limit.windows):
            plan.append(("tool", i, r, warn[1], tool_limit.suffixes[i]))
    return plan


def assemble(plan: list, allowed: bool, would: bool, results, store_error: str | None = None) -> RateDecision:
    """A RateDecision from decide_windows' (or the script's) per-window results."""
    if len(plan) == 1:
        which, _, rate, warn, suffix = plan[0]
        a, rem, retry, reset = results[0]
        kr = KeyResult(rate, a, rem, retry, reset, warn, suffix)
        if which == "agent":
            return RateDecision(allowed, kr, None, store_error, would, (("agent", kr),))
        return RateDecision(allowed, None, kr, store_error, would, (("tool", kr),))
    windows = []
    agent: list[KeyResult] = []
    tool: list[KeyResult] = []
    for (which, _, rate, warn, suffix), (a, rem, retry, reset) in zip(plan, results):
        kr = KeyResult(rate, a, rem, retry, reset, warn, suffix)
        windows.append((which, kr))
        (agent if which == "agent" else tool).append(kr)
    return RateDecision(allowed, _tightest(tuple(agent)) if agent else None,
                        _tightest(tuple(tool)) if tool else None, store_error, would, tuple(windows))


def decide_pair(tat_a: int | None, tat_t: int | None, now_us: int, agent_rate: Rate | None,
                tool_rate: Rate | None, cost: int) -> tuple[RateDecision, int | None, int | None]:
    """Both one-window keys at once, enforced: (decision, agent tat to store, tool tat to
    store); None = leave as is. decide_windows in its simplest and commonest case, kept
    apart because it is the hot path (half the cost of the general one)."""
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

    def decide(self, agent: str, tool: str | None, agent_rate, tool_rate,
               cost: int = 1, now: float | None = None, *, scope: str | None = None,
               warn: tuple[bool, bool] = (False, False)) -> RateDecision:
        """Check every window of both keys and commit as ``decide_windows`` says, in one
        synchronous pass: atomic on the event loop. ``agent_rate`` / ``tool_rate``: a Rate,
        a Windows, or None (unlimited). ``warn``: (agent key, tool key) in warn mode.

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
        if (agent_rate is None or agent_rate.__class__ is Rate) and \
                (tool_rate is None or tool_rate.__class__ is Rate) and not (warn[0] or warn[1]):
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
                self._sweep(now_us, 3 * (len(tats) - size))
            return decision
        plan = plan_windows(agent_rate, tool_rate, warn)
        # The shortest window of a key lives at the key itself (as a plain Rate's does);
        # the others at (key, period): a pair whose second is an int, unlike (agent, tool).
        keys = [(agent_key if w[0] == "agent" else tool_key) if w[1] == 0 else
                ((agent_key if w[0] == "agent" else tool_key), w[2].per_s) for w in plan]
        allowed, would, results, new = decide_windows(
            [tats.get(k) for k in keys], now_us, [w[2] for w in plan], [w[3] for w in plan], cost)
        size = len(tats)
        for k, v in zip(keys, new):
            if v is not None:
                tats[k] = v
        if len(tats) > size:
            # Only a new key grows the table, so only new keys pay for the sweep.
            self._sweep(now_us, 3 * (len(tats) - size))
        return assemble(plan, allowed, would, results)

    async def acquire(self, agent: str, tool: str | None, agent_rate, tool_rate, cost: int = 1,
                      now: float | None = None, *, scope: str | None = None,
                      warn: tuple[bool, bool] = (False, False)) -> RateDecision:
        """The store-neutral interface (RedisRateLimiter has the same one)."""
        return self.decide(agent, tool, agent_rate, tool_rate, cost, now, scope=scope, warn=warn)

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
