"""The tool breaker: stop sending calls to an upstream that is failing.

One ``CircuitBreaker`` per tool, in the classic three states. Closed: calls pass,
and outcomes feed a rolling window of counters (buckets, not a log) and a
consecutive-failure count; only 5xx, timeouts and connect errors are failures, a
4xx says the tool is healthy. Open: calls are refused until the cool-down ends;
the cool-down grows exponentially with each re-open in a row (capped). Half-open:
a fixed budget of probe calls passes; enough probe successes close the breaker,
one probe failure or the half-open timeout re-opens it.

``admit(now)`` returns a ``Ticket`` (the call may go) or a ``Refusal``. The caller
must end every ticket exactly once: ``ticket.record(now, outcome)`` when the upstream
answered, ``ticket.release()`` when the call never reached an outcome (client gone,
a later stage refused it), so a probe slot is never lost. Outcomes of calls
admitted in an earlier state (a generation ago) change nothing: a breaker opened by
failures is not re-opened by the stragglers of the same storm.

Time is whatever clock the caller passes as ``now`` (seconds, monotonic). Not
thread-safe: one breaker lives on one event loop.
"""

from __future__ import annotations

from typing import Callable

from .config import ToolBreakerConfig
from .outcome import TOOL_FAILURES, Outcome, Refusal, describe, seconds

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

_BUCKETS = 10

# on_transition(tool, from_state, to_state, now, reason)
TransitionListener = Callable[[str, str, str, float, str], None]


class Ticket:
    """A call the breaker let through; end it with ``record`` or ``release``."""

    __slots__ = ("breaker", "generation", "probe", "done")

    def __init__(self, breaker: "CircuitBreaker", generation: int, probe: bool) -> None:
        self.breaker = breaker
        self.generation = generation
        self.probe = probe
        self.done = False

    def record(self, now: float, outcome: Outcome, status: int | None = None, error: str = "") -> None:
        self.breaker.record(self, now, outcome, status, error)

    def release(self) -> None:
        """The call ended without an outcome; a no-op once recorded."""
        if not self.done:
            self.breaker.release(self)


class CircuitBreaker:
    __slots__ = (
        "name", "config", "state", "on_transition",
        "_generation", "_consecutive", "_bucket_s", "_calls", "_fails", "_head",
        "_window_calls", "_window_fails", "_opens", "_open_until", "_cooldown",
        "_probes_out", "_probes_ok", "_half_open_deadline", "last_failure", "reason",
        "rejected_open", "rejected_half_open", "abandoned_probes", "transitions",
    )

    def __init__(self, name: str, config: ToolBreakerConfig | None = None,
                 on_transition: TransitionListener | None = None) -> None:
        self.name = name
        self.config = config = config or ToolBreakerConfig()
        self.on_transition = on_transition
        # Read by the policy input (state.breaker) and the state gauge.
        self.state = CLOSED
        self._generation = 0
        self._consecutive = 0
        self._bucket_s = config.window_s / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._fails = [0] * _BUCKETS
        self._head = 0
        self._window_calls = 0
        self._window_fails = 0
        self._opens = 0              # opens in a row without a close: drives the cool-down
        self._open_until = 0.0
        self._cooldown = 0.0
        self._probes_out = 0         # probes admitted and not yet ended
        self._probes_ok = 0          # probes that succeeded this episode
        self._half_open_deadline: float | None = None
        self.last_failure = ""       # quotable, e.g. "502 bad gateway"
        self.reason = ""             # why it last opened
        # Metrics: plain counters, exported by whoever owns the registry.
        self.rejected_open = 0
        self.rejected_half_open = 0  # extra calls beyond the probe budget
        self.abandoned_probes = 0
        self.transitions: dict[tuple[str, str], int] = {}

    # --- the two calls on the hot path ---------------------------------------

    def admit(self, now: float) -> Ticket | Refusal:
        if self.state is CLOSED:
            return Ticket(self, self._generation, False)
        self._advance(now)
        if self.state is OPEN:
            self.rejected_open += 1
            wait = self._open_until - now
            return Refusal(
                503, "tool_unavailable", "open",
                f"tool {self.name!r} is failing ({self.reason}; last error: {self.last_failure}); "
                f"Regate is not sending calls to it for {seconds(wait)}. Retry after that, or use another tool.",
                wait,
            )
        # Half-open: the probe budget is spent when probes in flight plus probes that
        # already succeeded reach it; a released probe gives its slot back.
        if self._probes_out + self._probes_ok >= self.config.half_open_probes:
            self.rejected_half_open += 1
            wait = self.config.cooldown_s
            return Refusal(
                503, "tool_unavailable", "half_open_full",
                f"tool {self.name!r} is recovering: Regate is letting a few test calls through and holds "
                f"the rest; retry after {seconds(wait)}.",
                wait,
            )
        if self._half_open_deadline is None:
            self._half_open_deadline = now + self.config.half_open_timeout_s
        self._probes_out += 1
        return Ticket(self, self._generation, True)

    def record(self, ticket: Ticket, now: float, outcome: Outcome, status: int | None = None,
               error: str = "") -> None:
        if ticket.done:
            return
        ticket.done = True
        failed = outcome in TOOL_FAILURES
        if failed:
            self.last_failure = describe(outcome, status, error)
        if ticket.generation != self._generation:
            return  # admitted in an earlier state: its outcome decides nothing now
        if self.state is CLOSED:
            self._count(now, failed)
            return
        self._advance(now)  # the half-open timeout may have passed first
        if ticket.generation != self._generation:
            return
        # Still the half-open episode this probe belongs to.
        self._probes_out -= 1
        if failed:
            self._open(now, f"a test call failed after a {seconds(self._cooldown)} pause")
        else:
            self._probes_ok += 1
            if self._probes_ok >= self.config.half_open_probes:
                self._transition(CLOSED, now, "test calls succeeded")

    def release(self, ticket: Ticket) -> None:
        if ticket.done:
            return
        ticket.done = True
        if ticket.probe and ticket.generation == self._generation and self.state is HALF_OPEN:
            # NOTE: the slot comes back, so a client that hung up costs the tool no
            # recovery; the upstream may still have seen that call.
            self.abandoned_probes += 1
            self._probes_out -= 1
            if self._probes_out == 0 and self._probes_ok == 0:
                self._half_open_deadline = None

    # --- reading and steering ------------------------------------------------

    def poll(self, now: float) -> str:
        """The state at ``now`` (applies due timed transitions)."""
        if self.state is not CLOSED:
            self._advance(now)
        return self.state

    def retry_after_s(self, now: float) -> float:
        """Seconds until an open breaker half-opens (0 unless open)."""
        return max(0.0, self._open_until - now) if self.poll(now) is OPEN else 0.0

    def reset(self, now: float) -> None:
        """Close now and forget the history (``POST /admin/breakers/<tool>/reset``)."""
        self._opens = 0
        self._transition(CLOSED, now, "reset by an operator")

    def snapshot(self, now: float) -> dict:
        state = self.poll(now)
        return {
            "tool": self.name,
            "state": state,
            "reason": self.reason,
            "last_failure": self.last_failure,
            "retry_after_s": round(self._open_until - now, 3) if state is OPEN else 0.0,
            "opens_in_a_row": self._opens,
            "consecutive_failures": self._consecutive,
            "window": {"calls": self._window_calls, "failures": self._window_fails,
                       "seconds": self.config.window_s},
            "probes": {"in_flight": self._probes_out, "succeeded": self._probes_ok,
                       "budget": self.config.half_open_probes},
            "rejected": {"open": self.rejected_open, "half_open_full": self.rejected_half_open},
            "transitions": {f"{a}->{b}": n for (a, b), n in self.transitions.items()},
        }

    # --- internals -----------------------------------------------------------

    def _count(self, now: float, failed: bool) -> None:
        idx = int(now / self._bucket_s)
        if idx > self._head:
            steps = idx - self._head
            if steps >= _BUCKETS:
                self._clear_window()
            else:
                calls, fails = self._calls, self._fails
                for i in range(self._head + 1, idx + 1):
                    pos = i % _BUCKETS
                    self._window_calls -= calls[pos]
                    self._window_fails -= fails[pos]
                    calls[pos] = fails[pos] = 0
            self._head = idx
        # NOTE: a clock that steps back counts into the newest bucket: never negative.
        pos = self._head % _BUCKETS
        self._calls[pos] += 1
        self._window_calls += 1
        if not failed:
            self._consecutive = 0
            return
        self._fails[pos] += 1
        self._window_fails += 1
        self._consecutive += 1
        cfg = self.config
        if cfg.consecutive_failures and self._consecutive >= cfg.consecutive_failures:
            self._open(now, f"{self._consecutive} failures in a row")
        elif self._window_calls >= cfg.min_calls and self._window_fails >= cfg.failure_ratio * self._window_calls:
            self._open(now, f"{self._window_fails} of the last {self._window_calls} calls failed "
                            f"within {cfg.window_s:g}s")

    def _clear_window(self) -> None:
        for i in range(_BUCKETS):
            self._calls[i] = self._fails[i] = 0
        self._window_calls = self._window_fails = 0

    def _advance(self, now: float) -> None:
        if self.state is OPEN:
            if now >= self._open_until:
                self._transition(HALF_OPEN, now, "cool-down over")
        elif self.state is HALF_OPEN:
            if self._half_open_deadline is not None and now >= self._half_open_deadline:
                self._open(now, f"test calls did not succeed within {self.config.half_open_timeout_s:g}s")

    def _open(self, now: float, reason: str) -> None:
        cfg = self.config
        # Grown step by step, never by a power: a breaker flapping for days must not overflow.
        self._cooldown = cfg.cooldown_s if self._opens == 0 else min(cfg.max_cooldown_s,
                                                                     self._cooldown * cfg.cooldown_multiplier)
        self._opens += 1
        self._open_until = now + self._cooldown
        self.reason = reason
        self._transition(OPEN, now, reason)

    def _transition(self, to: str, now: float, reason: str) -> None:
        frm = self.state
        self.state = to
        self._generation += 1
        self._consecutive = 0
        self._probes_out = self._probes_ok = 0
        self._half_open_deadline = None
        if to is CLOSED:
            self._opens = 0
            self._clear_window()
            self._head = int(now / self._bucket_s)
        if frm is to:
            return
        key = (frm, to)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        if self.on_transition is not None:
            self.on_transition(self.name, frm, to, now, reason)


class ToolBreakers:
    """One ``CircuitBreaker`` per tool, made on first use with that tool's settings."""

    __slots__ = ("_config_for", "_breakers", "on_transition")

    def __init__(self, config_for: Callable[[str], ToolBreakerConfig] | ToolBreakerConfig | None = None,
                 on_transition: TransitionListener | None = None) -> None:
        if config_for is None or isinstance(config_for, ToolBreakerConfig):
            fixed = config_for or ToolBreakerConfig()
            config_for = lambda _tool: fixed  # noqa: E731
        self._config_for = config_for
        self._breakers: dict[str, CircuitBreaker] = {}
        self.on_transition = on_transition

    def get(self, tool: str) -> CircuitBreaker:
        b = self._breakers.get(tool)
        if b is None:
            b = self._breakers[tool] = CircuitBreaker(tool, self._config_for(tool), self.on_transition)
        return b

    def __iter__(self):
        return iter(self._breakers.values())

    def reset(self, tool: str, now: float) -> bool:
        b = self._breakers.get(tool)
        if b is None:
            return False
        b.reset(now)
        return True

    def snapshot(self, now: float) -> list[dict]:
        return [b.snapshot(now) for b in self._breakers.values()]
