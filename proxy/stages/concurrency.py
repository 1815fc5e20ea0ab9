"""Concurrency: how many calls one agent may have in flight in this process.

A rate limit bounds calls per second; it does not bound calls that stay open
(slow tools, held approvals, a client that stops reading), and an agent that
opens thousands of those holds sockets, tasks and upstream connections that
every other agent needs. Past `http.max_concurrent_per_agent` a call is
refused at once with 429 `too_many_concurrent`; the count drops as each call
ends, whatever ended it.
"""

from __future__ import annotations

from ..pipeline import Call, Rejection


class AgentConcurrency:
    name = "concurrency"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    async def enter(self, call: Call) -> Rejection | None:
        agent = call.agent or ""
        n = self.in_flight.get(agent, 0)
        if n >= self.limit:
            return Rejection(429, "too_many_concurrent",
                             f"agent {agent!r} already has {n} calls in flight, the most this Regate allows "
                             "(http.max_concurrent_per_agent); wait for one to finish", retry_after=1)
        self.in_flight[agent] = n + 1
        return None

    def leave(self, call: Call) -> None:
        # Only calls that entered get leave(): the count cannot go below zero.
        agent = call.agent or ""
        n = self.in_flight[agent] - 1
        if n:
            self.in_flight[agent] = n
        else:
            del self.in_flight[agent]
