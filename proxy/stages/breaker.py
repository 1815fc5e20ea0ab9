"""Breaker and loop guard: stop calls that are bound to fail before they run.

Three checks, all local to this replica (as Envoy's outlier detection): the
tool breaker (the upstream is sick → 503 `tool_unavailable`), the agent×tool
back-off (this agent keeps failing against this tool → 429 `agent_backoff`) and
the loop guard (the same or a near-same call already failed → 429 `retry_loop`,
quoting the upstream's last error). The call's outcome feeds all three in
`leave`, which also gives back a half-open probe slot when no answer came.
A guard in warn mode (`breakers.mode`, a section's or a tool's `mode`, or
`breakers.agents.<id>.mode`) does not refuse: its refusal is counted in
`regate_would_refuse_total` and audited as `would_refuse`, and the call runs.
"""

from __future__ import annotations

import time
from typing import Any

from ..breakers import Admission, Breakers
from ..breakers.outcome import CLIENT_ERROR, CONNECT_ERROR, SERVER_ERROR, TIMEOUT, error_summary
from ..pipeline import Call, Rejection
from .ratelimit import note_would_refuse

# The forwarder's own rejection codes, as outcomes the breakers understand.
_FORWARD_OUTCOMES = {"upstream_timeout": TIMEOUT, "upstream_unreachable": CONNECT_ERROR,
                     "upstream_error": SERVER_ERROR}
STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class BreakerStage:
    name = "breaker"

    def __init__(self, breakers: Breakers, metrics: Any) -> None:
        self.breakers = breakers
        self.metrics = metrics

    async def enter(self, call: Call) -> Rejection | None:
        request = call.request
        body = call.body_json if call.body_json is not None else call.body
        verdict = self.breakers.admit(call.agent, call.tool_key, request.method, request.path, body,
                                      time.monotonic(), query=request.query_string,
                                      loop=body is not None or not request.body_exists)
        if not isinstance(verdict, Admission):
            return Rejection(verdict.status, verdict.code, verdict.message, retry_after=verdict.retry_after_s)
        call.extra["breaker"] = verdict
        for r in verdict.would_refuse:
            # Warn mode: counted, audited and traced with the code it would have got; the call runs.
            note_would_refuse(call, self.metrics, self.name, r.code, f"warn mode, not enforced: {r.message}")
        state = call.extra.setdefault("state", {})
        state["breaker"] = verdict.breaker_state
        state["recent_failures"] = verdict.recent_failures
        return None

    def leave(self, call: Call) -> None:
        admission: Admission | None = call.extra.pop("breaker", None)
        if admission is None:
            return
        now = time.monotonic()
        if call.upstream_status is not None and not call.extra.get("upstream_broken"):
            error = ""
            if call.upstream_status >= 400:
                error = error_summary(call.extra.get("error_body", b""))
            elif "mcp_tool_error" in call.extra:  # MCP servers report a failed tools/call with HTTP 200
                admission.record(now, outcome=CLIENT_ERROR, error=call.extra["mcp_tool_error"])
                return
            admission.record(now, status=call.upstream_status, error=error)
            return
        rejection = call.rejection
        outcome = _FORWARD_OUTCOMES.get(rejection.code) if rejection is not None and call.forwarded else None
        if call.extra.get("upstream_broken"):
            outcome = SERVER_ERROR
        if outcome is not None:
            admission.record(now, outcome=outcome, error=rejection.message if rejection else "")
        else:
            admission.release()  # never reached the tool: no verdict on it, give the slot back
