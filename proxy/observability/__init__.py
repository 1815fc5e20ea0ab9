"""Observability: why each call ended as it did, joined on its decision id.

`Observability` is the pipeline's observer. `begin(call)` gives the call its
list of stage marks (and, with tracing on, its span); `finish(call, ...)`,
called once when the call is accounted, stores the call's trace in the ring
(traces.py), asks for the rule locations behind a denial (explain.py), ends
the spans (otel.py) and writes the decision log line (logs.py). With the ring
at 0, tracing off and the decision log silent, the pipeline gets no observer
at all. Metrics and their label caps live in proxy/metrics.py; the admin API
and the overview page in api.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .explain import build_explainer
from .logs import DecisionLog, use_json_logs
from .traces import TraceRing, notes_of

log = logging.getLogger("regate.observability")

__all__ = ["Observability", "ObservabilityError"]


class ObservabilityError(Exception):
    """The observability config cannot be honoured; the message says what to fix."""


class Observability:
    def __init__(self, cfg: Any, engine: Any = None, policy: Any = None, *, exporter: Any = None) -> None:
        o = cfg.observability
        if o.log_format == "json":
            use_json_logs()
        self.engine = engine
        self.ring: TraceRing | None = TraceRing(o.traces) if o.traces else None
        self.tracing: Any = None
        if cfg.tracing.otlp_endpoint or exporter is not None:
            from .otel import Tracing, TracingUnavailable

            try:
                self.tracing = Tracing(cfg.tracing, exporter)
            except TracingUnavailable as exc:
                raise ObservabilityError(str(exc)) from None
        self.explainer = build_explainer(o.explain, engine, policy, cfg.policy.opa.token) if self.ring is not None else None
        self.log = DecisionLog()
        self._marks = self.ring is not None or self.tracing is not None
        self.started = time.time()

    @property
    def observer(self) -> "Observability | None":
        """What the pipeline calls; None when there is nothing to observe (zero cost)."""
        return self if (self.ring is not None or self.tracing is not None or self.log.on) else None

    def begin(self, call: Any, steps: tuple[str, ...]) -> None:
        if self._marks:
            call.marks = [steps]  # then one perf_counter_ns per step passed, in this order
        if self.tracing is not None:
            self.tracing.begin(call)

    def finish(self, call: Any, status: int, outcome: str, total_ns: int, added_ns: int) -> None:
        """Called once per call, when it is accounted: keep it cheap (see traces.py)."""
        try:
            rejection = call.rejection
            revision = call.revision
            if revision is None and self.engine is not None:
                revision = self.engine.revision  # refused before the policy: the bundle in force
            span = call.span
            trace_id = self.tracing.finish(call, status, outcome, total_ns, decision_label(call)) \
                if span is not None else None
            ring = self.ring
            if ring is not None:
                explain = None
                ex = self.explainer
                if ex is not None and (rejection is not None or call.shadow_denied or "would_refuse" in call.extra or ex.every) and ex.wants(call):
                    explain = ex.explain(call)
                # References (decision, rejection) and the few extras a trace shows; JSON is made
                # when asked. An entry outlives its call by `traces` calls, so it keeps neither the
                # parsed request (freeing a cold one when its slot was reused cost ~5 us a call)
                # nor the extras (an MCP call's arguments and replies: megabytes).
                request = call.request
                ring.add((call.id, call.started_ns, call.agent, call.tool_key, request.method, request.path,
                          request.headers.get("traceparent") if span is None else None, status,
                          outcome, call.ended_by, call.marks, total_ns, call.upstream_ns, call.upstream_status,
                          revision, call.decision, rejection, notes_of(call.extra), call.shadow_denied, trace_id, explain))
            lg = self.log
            if rejection is not None and lg.rejections or lg.decisions:
                lg.write(call, status, outcome, added_ns, decision_label(call), revision, trace_id)
        except Exception:  # noqa: BLE001 - observing a call must never break it
            log.exception("observability failed on call %s", call.id)

    async def close(self) -> None:
        if self.explainer is not None:
            await self.explainer.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)


def decision_label(call: Any) -> str | None:
    """What the policy said, as the audit log names it."""
    if call.shadow_denied:
        return "shadow_deny"
    if "fail_open" in call.extra:
        return "allow_fail_open"
    d = call.decision
    if d is None:
        return None
    return "allow" if d.allow else "deny"
