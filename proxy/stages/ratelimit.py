"""Rate limit and budget: slow an agent down before it costs anything.

Runs before the policy stage, so a flood of calls is throttled before any of
them is evaluated. Two GCRA keys per call (the agent, and the agent×tool pair)
and a cost budget per agent, with limits from the bundle's `limits` data file
(`policies/limits.yaml`). The call's known cost (the route's `cost`) is charged
up front; when the call ends the charge is corrected to the decision's `cost`,
the upstream's `X-Regate-Cost` header, or refunded if the call never ran.
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

LIMITS_FILES = ("limits.yaml", "limits.yml", "limits.json")


def load_limits_table(data_dir: Path) -> LimitsTable:
    """Compile `<data>/limits.yaml`; no file means no limits. Raises LimitsError naming the field."""
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
        decision = await self.stores.rate.acquire(agent, key, limits.agent, limits.tool)
        if decision.store_error is not None:
            self.metrics.limit_store_fallback.labels("rate", decision.store_error).inc()
            if decision.store_error == "deny":
                return Rejection(503, "limits_unavailable",
                                 "the shared rate-limit store is unreachable and this Regate fails closed",
                                 retry_after=1)
        headers = decision.headers()
        if not decision.allowed:
            rej = Rejection(429, "rate_limited", _rate_message(decision, key))
            retry = decision.retry_after_header()
            rej.headers = dict(headers)
            if retry is not None:
                rej.headers["Retry-After"] = retry
            self.metrics.rate_limited.labels("rate", agent).inc()
            return rej

        budget = limits.budget
        if budget is not None:
            cost = tool.cost
            verdict = await self.stores.budgets.charge(agent, budget, cost)
            if verdict.store_error is not None:
                self.metrics.limit_store_fallback.labels("budget", verdict.store_error).inc()
                if verdict.store_error == "deny":
                    return Rejection(503, "limits_unavailable",
                                     "the shared budget store is unreachable and this Regate fails closed",
                                     retry_after=1)
            item = verdict.limit_item("budget")
            if not verdict.allowed:
                rej = Rejection(
                    429, "budget_exhausted",
                    f"agent {agent!r} has {verdict.remaining:g} of {budget.units:g} budget units left in this "
                    f"window and this call costs {cost:g}; the budget is restored in "
                    f"{verdict.retry_after_header()} s", retry_after=verdict.reset_s)
                rej.headers = _with_budget(headers, budget.policy_item("budget"), item)
                self.metrics.rate_limited.labels("budget", agent).inc()
                return rej
            call.extra["charged"] = (budget, cost)
            headers = _with_budget(headers, budget.policy_item("budget"), item)
            call.extra.setdefault("state", {})["budget_left"] = verdict.remaining
        for name, value in (headers.items() if isinstance(headers, dict) else headers):
            call.response_headers[name] = value
        return None

    def leave(self, call: Call) -> None:
        charged = call.extra.get("charged")
        if charged is None:
            return
        budget, paid = charged
        if not call.forwarded or call.upstream_status is None:
            actual = 0.0  # the call never ran: refund what it was charged
        else:
            actual = call.extra.get("upstream_cost", call.cost if call.cost is not None else paid)
        delta = actual - paid
        if delta:
            task = asyncio.ensure_future(self.stores.budgets.spend(call.agent, budget, delta))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)


def _rate_message(decision: Any, tool: str) -> str:
    which = []
    if decision.agent is not None and not decision.agent.allowed:
        which.append("this agent's overall rate")
    if decision.tool is not None and not decision.tool.allowed:
        which.append(f"this agent's rate for tool {tool!r}")
    retry = decision.retry_after_header()
    when = f"retry in {retry} s" if retry else "this call costs more than the burst allows and can never pass"
    return f"rate limit exceeded ({' and '.join(which) or 'rate'}); {when}"


def _with_budget(headers: Any, policy_item: str, limit_item: str | None) -> dict[str, str]:
    out = dict(headers)
    if limit_item is None:
        return out
    out["RateLimit-Policy"] = f"{out['RateLimit-Policy']}, {policy_item}" if "RateLimit-Policy" in out else policy_item
    out["RateLimit"] = f"{out['RateLimit']}, {limit_item}" if "RateLimit" in out else limit_item
    return out
