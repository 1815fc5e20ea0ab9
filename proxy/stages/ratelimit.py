"""Rate limit and budget: slow an agent down before it costs anything.

Runs before the policy stage, so a flood of calls is throttled before any of
them is evaluated. Two GCRA keys per call (the agent, and the agent×tool pair)
and a cost budget per agent, with limits from the bundle's `data.limits`
(`policies/limits/data.yaml`). The call's known cost (the route's `cost`) is
charged up front; when the call ends the charge is corrected to the decision's `cost`,
the upstream's `X-Regate-Cost` header, or refunded if the call never ran.

The decision's `limits` come after the policy, when the data's limits have been
checked and spent, so they cannot replace them: the policy stage hands them to
`enforce_decision`, which checks them as *additional* limits on keys of their own
(scope "decision"), through the same stores and GCRA as the data's. A decision
can tighten a call's limits (one more key it must pass), never loosen them.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import yaml

from ..limits import LimitsError, LimitsTable, LimitStores, compile_limits, resolve_limits
from ..pipeline import Call, Rejection

log = logging.getLogger("regate.limits")

LIMITS_FILES = ("limits/data.yaml", "limits/data.yml", "limits/data.json")
# The layout before data was mounted as OPA mounts it (refused with where to move it).
OLD_LIMITS_FILES = ("limits.yaml", "limits.yml", "limits.json")

# The keys of the decision's own limits (agent, agent×tool, budget), apart from the data's.
DECISION_SCOPE = "decision"
# Their names in RateLimit-Policy / RateLimit.
DECISION_NAMES = ("decision-agent", "decision-tool", "decision-budget")


def load_limits_table(data_dir: Path) -> LimitsTable:
    """Compile `<data>/limits/data.yaml`; no file means no limits. Raises LimitsError naming the field.

    The embedded engine's limits come from its bundle (`data.limits`); this reads
    them from the data directory for an engine that has no local bundle (`opa`).
    """
    for name in OLD_LIMITS_FILES:
        if (data_dir / name).is_file():
            moved = f"limits/data{Path(name).suffix}"
            raise LimitsError(f"{data_dir / name}: data is mounted as OPA mounts it, by directory: move it to "
                              f"{data_dir / moved} (see the README's upgrade notes)")
    for name in LIMITS_FILES:
        path = data_dir / name
        if path.is_file():
            try:
                doc = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise LimitsError(f"{path}: cannot read limits ({exc})") from None
            return compile_limits(doc, where=str(path))
    return LimitsTable()


class RateLimit:
    """The data's limits for every call (``enter``) and a decision's own (``enforce_decision``).
    A limit in warn mode (the limits file's ``mode``) never refuses: what it would have
    refused is noted on the call (``note_would_refuse``) and the call goes on."""

    name = "ratelimit"

    def __init__(self, table: LimitsTable, stores: LimitStores, metrics: Any) -> None:
        self.table = table
        self.stores = stores
        self.metrics = metrics
        self._pending: set[asyncio.Task] = set()

    async def enter(self, call: Call) -> Rejection | None:
        agent = call.agent
        tool = call.tool
        key = call.tool_key
        limits = resolve_limits(self.table, agent, key)
        if limits.agent_warn or limits.tool_warn:
            decision = await self.stores.rate.acquire(agent, key, limits.agent, limits.tool,
                                                      warn=(limits.agent_warn, limits.tool_warn))
        else:
            decision = await self.stores.rate.acquire(agent, key, limits.agent, limits.tool)
        if decision.store_error is not None:
            rej = self._store_error("rate", decision.store_error)
            if rej is not None:
                return rej
        headers = decision.headers()
        if not decision.allowed:
            rej = Rejection(429, "rate_limited", _rate_message(decision, key))
            retry = decision.retry_after_header()
            rej.headers = dict(headers)
            if retry is not None:
                rej.headers["Retry-After"] = retry
            self.metrics.rate_limited.labels("rate", agent).inc()
            return rej
        if decision.would_refuse:
            # Warn mode: the refusal is counted, audited and traced; the call runs.
            note_would_refuse(call, self.metrics, self.name, "rate_limited",
                              _rate_message(decision, key, warn=True))

        budget = limits.budget
        if budget is not None:
            cost = tool.cost
            verdict = await self.stores.budgets.charge(agent, budget, cost)
            if verdict.store_error is not None:
                rej = self._store_error("budget", verdict.store_error)
                if rej is not None:
                    return rej
            if not verdict.allowed:
                message = (
                    f"agent {agent!r} has {verdict.remaining:g} of {verdict.budget.units:g} budget units left in "
                    f"{_window_name(verdict)} and this call costs {cost:g}; the budget is restored in "
                    f"{verdict.retry_after_header()} s")
                if limits.budget_warn:
                    # NOTE: warn mode: nothing was charged (as if refused), so the account
                    # shows what enforcing it would have left; the call runs uncharged.
                    note_would_refuse(call, self.metrics, self.name, "budget_exhausted", message)
                else:
                    rej = Rejection(429, "budget_exhausted", message, retry_after=verdict.reset_s)
                    rej.headers = _with_budget(headers, budget.policy_item("budget"), verdict.limit_item("budget"))
                    self.metrics.rate_limited.labels("budget", agent).inc()
                    return rej
            else:
                call.extra["charged"] = (budget, cost)
                if not limits.budget_warn:
                    headers = _with_budget(headers, budget.policy_item("budget"), verdict.limit_item("budget"))
                    call.extra.setdefault("state", {})["budget_left"] = verdict.remaining
        for name, value in (headers.items() if isinstance(headers, dict) else headers):
            call.response_headers[name] = value
        return None

    async def enforce_decision(self, call: Call, checks: tuple[Any, Any, Any], *,
                               advertise: bool = True) -> Rejection | None:
        """The decision's ``limits`` for this call (``Decision.limit_checks``: agent Rate,
        agent×tool Rate, Budget, each None for none), called by the policy stage right
        after the decision.

        Each is one more limit the call must pass, on keys of its own (scope "decision"),
        so a call counts once against the data's keys and once against the decision's,
        and calls whose decision sets no limits never touch the decision's keys. The
        decision's agent key counts this agent's calls that carried a decision ``agent``
        limit; its tool key, those to this tool that carried a ``tool`` limit; its budget
        is an account of its own, charged this call's cost (the decision's ``cost``, else
        the route's) and corrected when the call ends like the data's budget.

        Refused: 429 ``rate_limited`` / ``budget_exhausted`` with Retry-After, as the data's
        limits answer; the RateLimit headers then carry both the data's items and the
        decision's (``decision-agent``, ``decision-tool``, ``decision-budget``).
        """
        agent_rate, tool_rate, budget = checks
        agent = call.agent
        key = call.tool_key
        if key is None:
            tool_rate = None
        headers = call.response_headers
        if agent_rate is not None or tool_rate is not None:
            decision = await self.stores.rate.acquire(agent, key, agent_rate, tool_rate, scope=DECISION_SCOPE)
            if decision.store_error is not None:
                rej = self._store_error("rate", decision.store_error)
                if rej is not None:
                    return rej
            if advertise:
                _append_items(headers, decision.headers(DECISION_NAMES[0], DECISION_NAMES[1]))
            if not decision.allowed:
                rej = Rejection(429, "rate_limited", _rate_message(decision, key, by_policy=True))
                retry = decision.retry_after_header()
                if retry is not None:
                    rej.headers = {"Retry-After": retry}
                self.metrics.rate_limited.labels("rate", agent).inc()
                return rej
        if budget is not None:
            cost = call.cost if call.cost is not None else call.tool.cost
            verdict = await self.stores.budgets.charge(agent, budget, cost, scope=DECISION_SCOPE)
            if verdict.store_error is not None:
                rej = self._store_error("budget", verdict.store_error)
                if rej is not None:
                    return rej
            item = verdict.limit_item(DECISION_NAMES[2])
            if item is not None and advertise:
                _append_items(headers, [("RateLimit-Policy", budget.policy_item(DECISION_NAMES[2])),
                                        ("RateLimit", item)])
            if not verdict.allowed:
                self.metrics.rate_limited.labels("budget", agent).inc()
                return Rejection(
                    429, "budget_exhausted",
                    f"the policy gives this call a budget of {verdict.budget.units:g} units per "
                    f"{verdict.budget.window_s} s; "
                    f"{verdict.remaining:g} are left in this window and this call costs {cost:g}; "
                    f"the budget is restored in {verdict.retry_after_header()} s", retry_after=verdict.reset_s)
            call.extra["charged_decision"] = (budget, cost)
        return None

    def _store_error(self, part: str, mode: str) -> Rejection | None:
        """Count an answer the shared store did not give; the 503 when it fails closed."""
        self.metrics.limit_store_fallback.labels(part, mode).inc()
        if mode == "deny":
            what = "rate-limit" if part == "rate" else "budget"
            return Rejection(503, "limits_unavailable",
                             f"the shared {what} store is unreachable and this Regate fails closed",
                             retry_after=1)
        return None

    def leave(self, call: Call) -> None:
        extra = call.extra
        charged = extra.get("charged")
        if charged is not None:
            self._correct(call, charged, None)
        charged = extra.get("charged_decision")
        if charged is not None:
            self._correct(call, charged, DECISION_SCOPE)

    def _correct(self, call: Call, charged: tuple, scope: str | None) -> None:
        budget, paid = charged
        if not call.forwarded or call.upstream_status is None:
            actual = 0.0  # the call never ran: refund what it was charged
        else:
            actual = call.extra.get("upstream_cost", call.cost if call.cost is not None else paid)
        delta = actual - paid
        if delta:
            task = asyncio.ensure_future(self.stores.budgets.spend(call.agent, budget, delta, scope=scope))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)


def note_would_refuse(call: Call, metrics: Any, stage: str, code: str, message: str) -> None:
    """A warn-mode limit or breaker would have refused this call: count it
    (``regate_would_refuse_total{stage,code,tool}``) and keep it on the call for the audit
    record (decision ``would_refuse``, with this code) and the trace. The call runs."""
    call.extra.setdefault("would_refuse", []).append({"stage": stage, "code": code, "message": message})
    counter = getattr(metrics, "would_refuse", None)
    if counter is not None:
        counter.labels(stage, code, call.tool.name if call.tool is not None else "").inc()


def _window_name(verdict: Any) -> str:
    b = verdict.budget
    return "this window" if not verdict.suffix else f"its {b.window_s} s window"


def _rate_message(decision: Any, tool: str, *, by_policy: bool = False, warn: bool = False) -> str:
    which = []
    whose = "the policy's limit on " if by_policy else ""
    if decision.agent is not None and not decision.agent.allowed and decision.agent.warn is warn:
        which.append(f"{whose}this agent's overall rate ({decision.agent.rate.describe()})")
    if decision.tool is not None and not decision.tool.allowed and decision.tool.warn is warn:
        which.append(f"{whose}this agent's rate for tool {tool!r} ({decision.tool.rate.describe()})")
    retry = decision.retry_after_header(warn)
    when = f"retry in {retry} s" if retry else "this call costs more than the burst allows and can never pass"
    prefix = "warn mode, not enforced: " if warn else ""
    return f"{prefix}rate limit exceeded ({' and '.join(which) or 'rate'}); {when}"


def _append_items(headers: dict[str, str], items: Any) -> None:
    """Add RateLimit-Policy / RateLimit members to the ones a call already carries."""
    for name, value in items:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value


def _with_budget(headers: Any, policy_item: str, limit_item: str | None) -> dict[str, str]:
    out = dict(headers)
    if limit_item is None:
        return out
    out["RateLimit-Policy"] = f"{out['RateLimit-Policy']}, {policy_item}" if "RateLimit-Policy" in out else policy_item
    out["RateLimit"] = f"{out['RateLimit']}, {limit_item}" if "RateLimit" in out else limit_item
    return out
