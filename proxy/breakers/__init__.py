"""Breakers: the tool breaker, the agent x tool back-off and the loop guard, together.

``build(mapping)`` turns the ``breakers:`` section of regate.yaml into a
``Breakers`` with the three parts as ``.tools``, ``.agents`` and ``.loops``.
``Breakers.admit`` asks them in order: an open tool breaker first (a sick tool
is the truest diagnosis), then the agent's back-off, then the loop guard, and the
tool breaker's admission last, because only it takes something (a half-open
probe slot). It returns an ``Admission`` or the first ``Refusal``. The caller
ends every admission exactly once: ``record`` with the upstream's outcome, or
``release`` when the call ended without one (a later stage refused it, the
client went away); ``release`` after ``record`` is a no-op, so it fits a
``finally``. One event loop, no locks; ``now`` is the caller's monotonic clock.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .backoff import AgentBackoff
from .circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Ticket, ToolBreakers, TransitionListener
from .config import (
    AgentBackoffConfig,
    BreakersConfig,
    LoopGuardConfig,
    ToolBreakerConfig,
    parse,
)
from .fingerprint import Fingerprint, fingerprint, similarity
from .loopguard import LoopGuard
from .outcome import Outcome, Refusal, error_summary, outcome_of
from .retrybudget import IDEMPOTENT, RetryBudget

__all__ = [
    "AgentBackoff", "AgentBackoffConfig", "Admission", "Breakers", "BreakersConfig", "CLOSED",
    "CircuitBreaker", "Fingerprint", "HALF_OPEN", "LoopGuard", "LoopGuardConfig", "OPEN", "Outcome",
    "Refusal", "RetryBudget", "IDEMPOTENT", "Ticket", "ToolBreakerConfig", "ToolBreakers", "build", "error_summary", "fingerprint",
    "outcome_of", "parse", "similarity",
]


class Admission:
    """A call the breakers let through. ``breaker_state`` and ``recent_failures`` are
    the policy input's ``state.breaker`` and ``state.recent_failures``."""

    __slots__ = ("ticket", "_agents", "_loops", "agent", "tool", "method", "path", "body", "query",
                 "breaker_state", "recent_failures", "_fingerprint", "would_refuse")

    def __init__(self, ticket: Ticket, agents: AgentBackoff | None, loops: LoopGuard | None, agent: str,
                 tool: str, method: str, path: str, body: Any, query: str, breaker_state: str,
                 recent_failures: int, fingerprint: Fingerprint | None = None,
                 would_refuse: "tuple[Refusal, ...]" = ()) -> None:
        self.ticket = ticket
        self._agents = agents
        self._loops = loops
        self.agent = agent
        self.tool = tool
        self.method = method
        self.path = path
        self.body = body
        self.query = query
        self.breaker_state = breaker_state
        self.recent_failures = recent_failures
        self._fingerprint = fingerprint
        # Refusals of guards in warn mode, not enforced: the call runs. The guard that
        # would have refused it is not told its outcome (enforcing, it would not have run).
        self.would_refuse = would_refuse

    @property
    def probe(self) -> bool:
        """This call is a half-open test call."""
        return self.ticket.probe

    def record(self, now: float, status: int | None = None, outcome: Outcome | None = None,
               error: str = "") -> None:
        """The upstream answered ``status``, or the call ended in ``outcome``
        (``Outcome.TIMEOUT`` / ``Outcome.CONNECT_ERROR`` when there is no status).
        ``error``: a short quote of the error response (see ``error_summary``)."""
        if self.ticket.done:
            return
        if outcome is None:
            if status is None:
                raise ValueError("Admission.record: give the upstream's status or an outcome")
            outcome = outcome_of(status)
        t = self.ticket
        t.breaker.record(t, now, outcome, status, error)
        if self._agents is not None:
            self._agents.record(self.agent, self.tool, now, outcome, status, error)
        if self._loops is not None:
            self._loops.record(self.agent, self.tool, self.method, self.path, self.body, now, outcome, status,
                               error, self.query, self._fingerprint)

    def release(self) -> None:
        """The call ended without reaching the upstream's answer; a no-op after ``record``."""
        if not self.ticket.done:
            self.ticket.breaker.release(self.ticket)


class Breakers:
    """The three guards over one config. Parts switched off by config are ``None``."""

    __slots__ = ("config", "tools", "agents", "loops", "rejections", "would_refuse", "_plans")

    def __init__(self, config: BreakersConfig | None = None,
                 on_transition: TransitionListener | None = None) -> None:
        self.config = config = config or BreakersConfig()
        self.tools = ToolBreakers(config.tool_config, on_transition)
        self.agents = AgentBackoff(config.agent_config) if any_enabled(config, "agent") else None
        self.loops = LoopGuard(config.loop_config) if any_enabled(config, "loop") else None
        # Refusals by code, for the rejection metric.
        self.rejections = {"tool_unavailable": 0, "agent_backoff": 0, "retry_loop": 0}
        # Refusals of guards in warn mode (the calls ran), by code.
        self.would_refuse = {"tool_unavailable": 0, "agent_backoff": 0, "retry_loop": 0}
        # tool -> (breaker, agents, loops, warn tool, warn agent, warn loop), None where off
        self._plans: dict[str, tuple] = {}

    def admit(self, agent: str, tool: str, method: str, path: str, body: Any, now: float,
              query: str = "", loop: bool = True) -> Admission | Refusal:
        """``body``: the parsed JSON when the read-body stage parsed it, else the raw
        bytes (or None). ``path``: the request path, without the query string."""
        plan = self._plans.get(tool)
        if plan is None:
            plan = self._plan(tool)
        breaker, agents, loops, w_tool, w_agent, w_loop = plan
        if self.config.agent_modes:
            m = self.config.agent_modes.get(agent)
            if m is not None:
                w_tool = w_agent = w_loop = m == "warn"
        if not loop:
            loops = None  # a body the guard cannot read: it cannot tell such calls apart
        warned: list[Refusal] = []
        tool_warned = False
        if breaker is not None and breaker.state is not CLOSED and breaker.poll(now) is OPEN:
            # A sick tool is the truer diagnosis than this agent's own failures against it.
            r = breaker.admit(now)
            if not w_tool:
                self.rejections["tool_unavailable"] += 1
                return r  # type: ignore[return-value]
            warned.append(r)  # type: ignore[arg-type]
            tool_warned = True
        if agents is not None:
            r = agents.check(agent, tool, now)
            if r is not None:
                if not w_agent:
                    self.rejections["agent_backoff"] += 1
                    return r
                warned.append(r)
                agents = None
        recent = 0
        fp = None
        if loops is not None:
            r, fp = loops.inspect(agent, tool, method, path, body, now, query)
            if r is not None:
                if not w_loop:
                    self.rejections["retry_loop"] += 1
                    return r
                warned.append(r)
                recent = loops.recent_failures(agent, tool, now)
                loops = None
            else:
                recent = loops.recent_failures(agent, tool, now)
        if breaker is not None and not tool_warned:
            t = breaker.admit(now)
            if t.__class__ is Refusal:
                if not w_tool:
                    self.rejections["tool_unavailable"] += 1
                    return t  # type: ignore[return-value]
                warned.append(t)  # type: ignore[arg-type]
                t = Ticket(breaker, -1, False)  # never matches a generation: changes nothing
            state = breaker.state
        elif breaker is not None:
            t = Ticket(breaker, -1, False)
            state = breaker.state
        else:
            t = Ticket(self.tools.get(tool), -1, False)  # never matches a generation: changes nothing
            state = CLOSED
        if warned:
            for r in warned:
                self.would_refuse[r.code] = self.would_refuse.get(r.code, 0) + 1
            return Admission(t, agents, loops, agent, tool, method, path, body, query, state, recent, fp,  # type: ignore[arg-type]
                             tuple(warned))
        return Admission(t, agents, loops, agent, tool, method, path, body, query, state, recent, fp)  # type: ignore[arg-type]

    def _plan(self, tool: str) -> tuple:
        cfg = self.config
        breaker = self.tools.get(tool)
        plan = self._plans[tool] = (
            breaker if breaker.config.enabled else None,
            self.agents if self.agents is not None and cfg.agent_config(tool).enabled else None,
            self.loops if self.loops is not None and cfg.loop_config(tool).enabled else None,
            breaker.config.mode == "warn",
            cfg.agent_config(tool).mode == "warn",
            cfg.loop_config(tool).mode == "warn",
        )
        return plan

    def state(self, tool: str, now: float) -> str:
        return self.tools.get(tool).poll(now)

    def reset(self, tool: str, now: float) -> bool:
        """Close the tool's breaker and forget every agent's back-off and loop history on it."""
        found = self.tools.reset(tool, now)
        if self.agents is not None:
            found = bool(self.agents.reset(tool=tool)) or found
        if self.loops is not None:
            found = bool(self.loops.reset(tool=tool)) or found
        return found

    def snapshot(self, now: float) -> dict:
        """What ``GET /admin/breakers`` shows."""
        return {
            "tools": self.tools.snapshot(now),
            "agents": self.agents.snapshot(now) if self.agents is not None else [],
            "loops": self.loops.snapshot(now) if self.loops is not None else [],
            "rejections": dict(self.rejections),
            "would_refuse": dict(self.would_refuse),
        }


def any_enabled(config: BreakersConfig, section: str) -> bool:
    """Whether a guard ("tool", "agent", "loop") is on for some tool."""
    if getattr(config, section).enabled:
        return True
    return any(getattr(o, section).enabled for o in config.overrides.values())


def build(mapping: Mapping[str, Any] | None = None, tools: Iterable[str] | None = None,
          on_transition: TransitionListener | None = None) -> Breakers:
    """The breakers for a ``breakers:`` mapping; ValueError naming each bad field.

    ``tools``: the configured tool names, so an override of an unknown tool is an error.
    ``on_transition(tool, from_state, to_state, now, reason)`` is called on every
    tool breaker state change (for logs and the transition metric).
    """
    return Breakers(parse(mapping, tools), on_transition)
