"""Cost budgets: how many cost units an agent may spend per window, and the in-process store.

A budget is ``units`` per ``window_s`` seconds in fixed windows aligned to the Unix
epoch, so a 1-day window runs from UTC midnight to UTC midnight. Fixed windows
were chosen over rolling ones because every replica agrees on the window from
the clock alone, the state is one number per agent (no log of spends), and the
refusal can say exactly when the budget comes back. The price is the usual
fixed-window edge: an agent may spend a full budget just before a boundary and
another just after it.

Costs may be fractional (tokens priced in dollars). ``charge`` checks and spends
in one step before the call, so concurrent calls cannot all pass on the same
remaining units; ``spend`` records a correction afterwards (the actual cost from
an upstream header minus what was charged; negative refunds) and may take the
budget below zero: a cost already incurred is never dropped.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from functools import lru_cache

from .gcra import Clock

_US = 1_000_000
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@lru_cache(maxsize=256)
def _parse_duration_str(spec: str) -> int:
    m = _DURATION.match(spec.lower())
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"want a duration such as 30s, 5m, 1h or 1d, got {spec!r}")
    return int(m.group(1)) * _SECONDS[m.group(2)]


def parse_duration(spec: object) -> int:
    """Whole seconds >= 1 from ``86400``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1d"``, ``"1w"``."""
    if isinstance(spec, bool):
        raise ValueError(f"want a duration such as 30s, 5m, 1h or 1d, got {spec!r}")
    if isinstance(spec, int) or (isinstance(spec, float) and spec.is_integer()):
        if spec < 1:
            raise ValueError(f"want a duration of at least 1 second, got {spec!r}")
        return int(spec)
    if isinstance(spec, str):
        return _parse_duration_str(spec)
    raise ValueError(f"want a duration such as 30s, 5m, 1h or 1d, got {spec!r}")


class Budget:
    """``units`` of cost per fixed window of ``window_s`` seconds."""

    __slots__ = ("units", "window_s", "window_us")

    def __init__(self, units: float, window_s: int = 86400) -> None:
        if isinstance(units, bool) or not isinstance(units, (int, float)) or not units > 0 \
                or units == float("inf"):
            raise ValueError(f"units must be a number > 0, got {units!r}")
        if isinstance(window_s, bool) or not isinstance(window_s, int) or window_s < 1:
            raise ValueError(f"window must be a whole number of seconds >= 1, got {window_s!r}")
        self.units = float(units)
        self.window_s = window_s
        self.window_us = window_s * _US

    # A plain Budget is a one-window budget whose mode comes from the table (see BudgetWindows).
    mode = None

    @property
    def windows(self) -> tuple["Budget", ...]:
        return (self,)

    @property
    def suffixes(self) -> tuple[str, ...]:
        return ("",)

    def policy_item(self, name: str = "budget") -> str:
        """A ``RateLimit-Policy`` member (q is whole units, rounded down)."""
        return f'"{name}";q={int(self.units)};w={self.window_s}'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Budget) and self.units == other.units and self.window_s == other.window_s

    def __hash__(self) -> int:
        return hash((self.units, self.window_s))

    def __repr__(self) -> str:
        return f"Budget({self.units:g} per {self.window_s}s)"


def _period(seconds: int) -> str:
    for unit, n in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


class BudgetWindows:
    """One budget of several windows (100 units per hour and 1000 per day): a charge
    passes only if every window has room, and is then spent in each. Shortest first; the
    shortest keeps the budget's name and key, the others are named ``budget-<w>``.
    ``mode``: "enforce", "warn" or None (inherit)."""

    __slots__ = ("windows", "mode", "suffixes")

    def __init__(self, windows, mode: str | None = None) -> None:
        ws = tuple(sorted(windows, key=lambda b: b.window_s))
        if not ws:
            raise ValueError("a budget needs at least one window")
        if len({b.window_s for b in ws}) != len(ws):
            raise ValueError("two windows of the same length: give each window a different window")
        if mode not in (None, "enforce", "warn"):
            raise ValueError(f"mode must be enforce or warn, got {mode!r}")
        self.windows = ws
        self.mode = mode
        self.suffixes = ("",) + tuple(f"-{_period(b.window_s)}" for b in ws[1:])

    def policy_item(self, name: str = "budget") -> str:
        """Every window's ``RateLimit-Policy`` member."""
        return ", ".join(b.policy_item(name + sfx) for b, sfx in zip(self.windows, self.suffixes))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BudgetWindows) and self.windows == other.windows and self.mode == other.mode

    def __hash__(self) -> int:
        return hash((self.windows, self.mode))

    def __repr__(self) -> str:
        m = f", mode={self.mode!r}" if self.mode else ""
        return f"BudgetWindows({list(self.windows)!r}{m})"


class BudgetVerdict:
    """``allowed``; ``remaining`` units (never below 0; None: no budget applies);
    ``reset_s`` until the window ends and the budget is whole again; ``store_error``
    as on RateDecision (None, "local", "allow" or "deny")."""

    __slots__ = ("allowed", "remaining", "reset_s", "budget", "store_error", "suffix")

    def __init__(self, allowed: bool, remaining: float | None, reset_s: float | None,
                 budget: Budget | None, store_error: str | None = None, suffix: str = "") -> None:
        self.allowed = allowed
        self.remaining = remaining
        self.reset_s = reset_s
        # For a budget of several windows: the binding one (the refusing window that
        # resets last, else the one with the least left), and its name's suffix.
        self.budget = budget
        self.store_error = store_error
        self.suffix = suffix

    def retry_after_header(self) -> str | None:
        """Whole seconds until the window resets (rounded up, >= 1), or None without a budget."""
        if self.reset_s is None:
            return None
        return str(max(1, -int(-self.reset_s // 1)))

    def limit_item(self, name: str = "budget") -> str | None:
        """A ``RateLimit`` member (r is whole units, rounded down), or None without a budget."""
        if self.remaining is None:
            return None
        return f'"{name}{self.suffix}";r={int(self.remaining)};t={-int(-self.reset_s // 1)}'

    def __repr__(self) -> str:
        return (f"BudgetVerdict(allowed={self.allowed}, remaining={self.remaining!r}, "
                f"reset_s={self.reset_s!r}, store_error={self.store_error!r})")


NO_BUDGET = BudgetVerdict(True, None, None, None)

PEEK, CHARGE, SPEND = "peek", "charge", "spend"


def budget_step(stored_end_us: int | None, stored_window_s: int | None, stored_spent: float,
                now_us: int, budget: Budget, cost: float, mode: str
                ) -> tuple[bool, float, int, bool]:
    """(allowed, spent after, window end µs, write?) — mirrored by the Redis Lua script.

    peek: allowed when remaining >= cost, nothing written; charge: the same, and
    spends when allowed; spend: always spends (the call already happened).
    """
    window_us = budget.window_us
    end_us = (now_us // window_us + 1) * window_us
    spent = stored_spent if (stored_end_us == end_us and stored_window_s == budget.window_s) else 0.0
    allowed = mode == SPEND or budget.units - spent >= cost
    write = (mode == SPEND or (mode == CHARGE and allowed)) and cost != 0
    if write:
        spent = spent + cost
    return allowed, spent, end_us, write


def budget_windows(stored: list, now_us: int, windows, cost: float, mode: str
                   ) -> tuple[bool, list[tuple[float, int, bool]], list[bool]]:
    """Every window of a budget at once: (allowed, per window (spent after, end µs,
    own allowed), per window write?). Mirrored by the Redis Lua script.

    ``stored``: per window (end µs, window_s, spent) or None. A charge is spent in every
    window or in none: it is allowed only when each window has room for it.
    """
    steps = []
    allowed = True
    for st, b in zip(stored, windows):
        r = budget_step(st[0], st[1], st[2], now_us, b, cost, PEEK) if st is not None else \
            budget_step(None, None, 0.0, now_us, b, cost, PEEK)
        steps.append(r)
        allowed = allowed and r[0]
    if mode == SPEND:
        allowed = True
    write = (mode == SPEND or (mode == CHARGE and allowed)) and cost != 0
    return allowed, [((r[1] + cost) if write else r[1], r[2], r[0]) for r in steps], [write] * len(steps)


def verdict_of(budget, allowed: bool, per_window: list[tuple[float, int, bool]], now_us: int,
               store_error: str | None = None) -> BudgetVerdict:
    """The verdict of a budget from its windows' (spent, end µs, own allowed)."""
    best = None
    for i, (spent, end_us, ok) in enumerate(per_window):
        b = budget.windows[i]
        left = b.units - spent
        cand = (ok, left if left > 0 else 0.0, (end_us - now_us) / _US, b, budget.suffixes[i])
        if best is None:
            best = cand
        elif not cand[0] and (best[0] or cand[2] > best[2]):
            best = cand  # refusing: the one that resets last binds
        elif cand[0] and best[0] and cand[1] < best[1]:
            best = cand
    return BudgetVerdict(allowed, best[1], best[2], best[3], store_error, best[4])


class MemoryBudgets:
    """Per-process budgets; an agent's entry is dropped once its window has ended.

    ``clock`` is wall-clock seconds since the epoch (windows are calendar-aligned).
    """

    def __init__(self, clock: Clock = time.time, *, max_keys: int = 1_000_000) -> None:
        self._clock = clock
        # agent -> (window end µs, window_s, spent)
        self._spent: OrderedDict = OrderedDict()
        self._max_keys = max_keys
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._spent)

    def step(self, agent: str, budget: Budget | None, cost: float, mode: str,
             now: float | None = None, *, scope: str | None = None) -> BudgetVerdict:
        """``scope`` names a separate account of the same agent (the decision's own budget
        uses "decision"): its spending never counts against the unscoped one."""
        if budget is None:
            return NO_BUDGET
        now_us = round((self._clock() if now is None else now) * _US)
        entries = self._spent
        key: object = agent if scope is None else (scope, agent)
        windows = budget.windows
        if len(windows) == 1:
            stored = entries.get(key)
            if stored is None:
                allowed, spent, end_us, write = budget_step(None, None, 0.0, now_us, windows[0], cost, mode)
            else:
                allowed, spent, end_us, write = budget_step(stored[0], stored[1], stored[2], now_us,
                                                             windows[0], cost, mode)
            if write:
                entries[key] = (end_us, windows[0].window_s, spent)
                if stored is None:
                    self._sweep(now_us)
            remaining = windows[0].units - spent
            return BudgetVerdict(allowed, remaining if remaining > 0 else 0.0,
                                 (end_us - now_us) / _US, windows[0])
        # The shortest window at the key itself, the others at (key, window_s).
        keys = [key] + [(key, b.window_s) for b in windows[1:]]
        stored_all = [entries.get(k) for k in keys]
        allowed, per_window, writes = budget_windows(stored_all, now_us, windows, cost, mode)
        new = False
        for k, st, b, (spent, end_us, _), w in zip(keys, stored_all, windows, per_window, writes):
            if w:
                entries[k] = (end_us, b.window_s, spent)
                new = new or st is None
        if new:
            self._sweep(now_us)
        return verdict_of(budget, allowed, per_window, now_us)

    async def check(self, agent: str, budget: Budget | None, cost: float,
                    now: float | None = None, *, scope: str | None = None) -> BudgetVerdict:
        """Would ``cost`` fit? Spends nothing."""
        return self.step(agent, budget, cost, PEEK, now, scope=scope)

    async def charge(self, agent: str, budget: Budget | None, cost: float,
                     now: float | None = None, *, scope: str | None = None) -> BudgetVerdict:
        """Spend ``cost`` if it fits, in one step; refused: nothing spent."""
        return self.step(agent, budget, cost, CHARGE, now, scope=scope)

    async def spend(self, agent: str, budget: Budget | None, cost: float,
                    now: float | None = None, *, scope: str | None = None) -> BudgetVerdict:
        """Record ``cost`` (negative refunds) whatever is left; verdict.allowed is always True."""
        return self.step(agent, budget, cost, SPEND, now, scope=scope)

    async def remaining(self, agent: str, budget: Budget | None, now: float | None = None) -> float | None:
        """Units left in the current window (for ``state.budget_left``); None without a budget."""
        return self.step(agent, budget, 0, PEEK, now).remaining

    def _sweep(self, now_us: int) -> None:
        entries = self._spent
        for _ in range(3):
            agent, entry = entries.popitem(last=False)
            if entry[0] > now_us:
                entries[agent] = entry
            elif not entries:
                return
        if len(entries) > self._max_keys:
            # NOTE: lossy by design: past max_keys an agent's spend in the current
            # window is forgotten rather than letting memory grow without bound.
            entries.popitem(last=False)
            self.evictions += 1
