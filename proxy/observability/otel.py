"""OpenTelemetry spans: one per call, a child per stage, exported over OTLP/HTTP.

Optional: needs `opentelemetry-sdk` and `opentelemetry-exporter-otlp-proto-http`
(pip install 'regate[otel]'), and is on only when `tracing.otlp_endpoint` is
set. The call span starts when the call arrives (a child of the agent's
`traceparent`, if it sent one) so that the forwarder can name it as the
tool's parent; the stage spans are made when the call ends, from the marks the
pipeline took, so no span work happens between stages. Export runs on the
SDK's batch thread, never on the event loop. Regate keeps its own tracer
provider: it does not touch the process-global one.
"""

from __future__ import annotations

import time
from typing import Any


class TracingUnavailable(Exception):
    pass


class Tracing:
    def __init__(self, section: Any, exporter: Any = None) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise TracingUnavailable(
                f"tracing.otlp_endpoint is set but the OpenTelemetry SDK is not installed ({exc.name}): "
                "pip install 'regate[otel]' (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http), "
                "or remove tracing.otlp_endpoint") from None
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise TracingUnavailable(
                    "tracing.otlp_endpoint is set but the OTLP exporter is not installed: "
                    "pip install 'regate[otel]' (opentelemetry-exporter-otlp-proto-http)") from None
            exporter = OTLPSpanExporter(endpoint=section.otlp_endpoint, headers=dict(section.headers) or None)
            # NOTE: deliberately lossy: when the collector cannot keep up, the SDK drops
            # spans past this queue rather than slow calls down (it logs that it did).
            processor = BatchSpanProcessor(exporter, max_queue_size=8192, schedule_delay_millis=1000)
        else:
            processor = SimpleSpanProcessor(exporter)  # tests: spans are there when the call ends
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": section.service_name}),
            sampler=ParentBased(TraceIdRatioBased(section.sample_ratio)),
        )
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("regate")
        self._trace = trace
        self._server = SpanKind.SERVER
        self._internal = SpanKind.INTERNAL
        self._error = (Status, StatusCode.ERROR)
        self._propagator = TraceContextTextMapPropagator()

    def begin(self, call: Any) -> None:
        headers = call.request.headers
        ctx = self._propagator.extract(headers) if "traceparent" in headers else None
        call.span = self.tracer.start_span("regate.call", context=ctx, kind=self._server,
                                           start_time=time.time_ns())

    def finish(self, call: Any, status: int, outcome: str, total_ns: int, decision: str | None) -> str:
        """End the call's span and make its stage spans; returns the trace id (hex)."""
        span = call.span
        ctx = span.get_span_context()
        if span.is_recording():
            t0 = span.start_time
            base = call.started_ns
            rejection = call.rejection
            parent = self._trace.set_span_in_context(span)
            tracer = self.tracer
            marks = call.marks or [()]
            times = marks[1:]
            last = len(times) - 1
            prev = base
            for i, (name, t) in enumerate(zip(marks[0], times)):
                child = tracer.start_span(f"regate.{name}", context=parent, kind=self._internal,
                                          start_time=t0 + (prev - base))
                child.set_attribute("regate.stage", name)
                if i == last and rejection is not None:
                    child.set_attribute("regate.code", rejection.code)
                child.end(end_time=t0 + (t - base))
                prev = t
            request = call.request
            attrs = {
                "regate.decision_id": call.id,
                "regate.stage": call.ended_by or "-",
                "regate.code": outcome,
                "http.request.method": request.method,
                "http.response.status_code": status,
                "url.path": request.path,
            }
            if call.agent is not None:
                attrs["regate.agent"] = call.agent
            if call.tool_key is not None:
                attrs["regate.tool"] = call.tool_key
            if decision is not None:
                attrs["regate.decision"] = decision
            if call.revision is not None:
                attrs["regate.policy.revision"] = call.revision
            span.set_attributes(attrs)
            if status >= 500:
                status_cls, code = self._error
                span.set_status(status_cls(code, outcome))
            span.end(end_time=t0 + total_ns)
        return f"{ctx.trace_id:032x}"

    def close(self) -> None:
        self.provider.shutdown()  # flushes what the batch processor still holds
