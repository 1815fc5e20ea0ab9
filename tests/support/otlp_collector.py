"""A minimal OTLP/HTTP trace collector: accepts `POST /v1/traces` (protobuf,
optionally gzipped) and keeps the spans it received, decoded.

In tests: ``c = OtlpCollector(); url = await c.start()`` then give Regate
``tracing.otlp_endpoint: <url>/v1/traces`` and read ``c.spans`` (dicts with
name, trace_id, span_id, parent_span_id as hex, and attributes).

As a script (a sink for benchmarks with tracing on; it decodes nothing and
answers 200 at once): ``python tests/support/otlp_collector.py PORT``.
"""

from __future__ import annotations

import asyncio
import gzip
import sys
from typing import Any

from aiohttp import web


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OtlpCollector:
    def __init__(self, decode: bool = True) -> None:
        self.decode = decode
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.arrived = asyncio.Event() if decode else None

    async def _traces(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self.decode:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            if request.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            msg = ExportTraceServiceRequest()
            msg.ParseFromString(body)
            for rs in msg.resource_spans:
                service = {a.key: _value(a.value) for a in rs.resource.attributes}.get("service.name")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append({
                            "service": service,
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex() or None,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                        })
            self.arrived.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._traces)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        return f"http://{host}:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Spans matching `predicate`, once at least one has arrived (else TimeoutError)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [s for s in self.spans if predicate(s)]
            if found:
                return found
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("no matching span arrived")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), min(left, 0.5))
            except TimeoutError:
                pass


if __name__ == "__main__":
    web.run_app(OtlpCollector(decode=False).app(), host="127.0.0.1", port=int(sys.argv[1]), print=None,
                access_log=None)
