"""Distributed tracing: W3C trace context in and out, OpenTelemetry spans.

Over real sockets: with `tracing.otlp_endpoint` set, the tool receives a
`traceparent` in the agent's trace whose parent is Regate's call span (as
exported over OTLP/HTTP to a collector), and the agent's `tracestate` as sent;
with tracing off, the agent's header passes on untouched. In-process, with
the SDK's in-memory exporter: one span per call, a child per stage, and the
attributes the issue names.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import pytest

from proxy import config as config_mod
from proxy.app import Regate, StartupError
from proxy.observability import Observability
from tests.conftest import AGENT_KEY
from tests.support.otlp_collector import OtlpCollector
from tests.support.procs import ROOT, RegateProcess, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"


def _cfg(keys_file, upstream, **extra) -> dict:
    return {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
        "tools": [{"name": "echo", "upstream": upstream}, {"name": "shell", "upstream": upstream}],
        "http": {"shutdown_grace_s": 1},
        **extra,
    }


async def _echo(url: str, headers: dict[str, str]) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/tools/echo/t", json={"x": 1}, headers={"X-Api-Key": AGENT_KEY, **headers}) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


async def test_traceparent_reaches_the_tool_with_regates_span_as_parent(keys_file, upstream, tmp_path):
    collector = OtlpCollector()
    otlp = await collector.start()
    cfg = _cfg(keys_file, upstream, tracing={"otlp_endpoint": otlp + "/v1/traces", "service_name": "regate-t"})
    proc = await asyncio.to_thread(RegateProcess, cfg, tmp_path)
    try:
        status, headers, seen = await _echo(proc.url, {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
        assert status == 200
        upstream_tp = seen["headers"]["traceparent"]
        version, trace_id, parent_id, flags = upstream_tp.split("-")
        assert (version, trace_id, flags) == ("00", AGENT_TRACE, "01")
        assert parent_id != AGENT_SPAN  # Regate is a hop of its own in the trace
        assert seen["headers"]["tracestate"] == "vendor=abc"

        decision_id = headers["X-Regate-Decision-Id"]
        [call_span] = await collector.wait_for(lambda s: s["name"] == "regate.call"
                                               and s["attributes"].get("regate.decision_id") == decision_id)
        assert call_span["span_id"] == parent_id  # the tool's parent is Regate's span ...
        assert call_span["parent_span_id"] == AGENT_SPAN  # ... itself a child of the agent's
        assert call_span["trace_id"] == AGENT_TRACE and call_span["service"] == "regate-t"
        children = await collector.wait_for(lambda s: s["parent_span_id"] == parent_id)
        assert {"regate.identify", "regate.policy", "regate.forward"} <= {s["name"] for s in children}

        # The trace names the distributed trace it belongs to.
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proc.admin_url}/admin/decisions/{decision_id}", headers=proc.admin_headers) as r:
                assert (await r.json())["trace_id"] == AGENT_TRACE

        # No traceparent from the agent: Regate starts the trace, and still parents the tool.
        _, headers, seen = await _echo(proc.url, {})
        _, trace_id, parent_id, _ = seen["headers"]["traceparent"].split("-")
        [root] = await collector.wait_for(lambda s: s["span_id"] == parent_id)
        assert root["trace_id"] == trace_id and root["parent_span_id"] is None
    finally:
        await asyncio.to_thread(proc.stop)
        await collector.stop()


async def test_tracing_off_passes_the_agents_trace_context_untouched(keys_file, upstream, tmp_path):
    proc = await asyncio.to_thread(RegateProcess, _cfg(keys_file, upstream), tmp_path)
    try:
        _, _, seen = await _echo(proc.url, {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
        assert seen["headers"]["traceparent"] == TRACEPARENT and seen["headers"]["tracestate"] == "vendor=abc"
        _, _, seen = await _echo(proc.url, {})
        assert "traceparent" not in {k.lower() for k in seen["headers"]}
    finally:
        await asyncio.to_thread(proc.stop)


async def test_in_memory_exporter_gets_one_span_per_call_with_stage_children(keys_file, upstream, tmp_path):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    port, admin_port = free_port(), free_port()
    cfg = config_mod.validate({**_cfg(keys_file, upstream), "listen": f"127.0.0.1:{port}",
                               "admin": {"listen": f"127.0.0.1:{admin_port}"},
                               "audit": {"dir": str(tmp_path / "audit")}})
    exporter = InMemorySpanExporter()
    app = Regate(cfg)
    app.observability = Observability(cfg, app.engine, app.policy, exporter=exporter)
    app.pipeline.observer = app.observability.observer
    stop = asyncio.Event()
    server = asyncio.create_task(app.serve(stop))
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin_port}/healthz"):
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        ok_status, ok_headers, _ = await _echo(url, {"traceparent": TRACEPARENT})
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/tools/shell/run", json={"command": "rm -rf /"},
                              headers={"X-Api-Key": AGENT_KEY}) as r:
                denied_status, denied_id = r.status, r.headers["X-Regate-Decision-Id"]
            async with s.get(url + "/tools/nowhere/x", headers={"X-Api-Key": AGENT_KEY}) as r:
                missing_status = r.status
        assert (ok_status, denied_status, missing_status) == (200, 403, 404)
    finally:
        stop.set()
        await server

    spans = exporter.get_finished_spans()
    calls = [s for s in spans if s.name == "regate.call"]
    assert len(calls) == 3  # one span per call
    by_id = {s.attributes["regate.decision_id"]: s for s in calls}
    ok = by_id[ok_headers["X-Regate-Decision-Id"]]
    denied = by_id[denied_id]

    def children(parent):
        kids = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
        return sorted(kids, key=lambda s: s.start_time)

    assert format(ok.context.trace_id, "032x") == AGENT_TRACE and format(ok.parent.span_id, "016x") == AGENT_SPAN
    names = [s.name for s in children(ok)]
    assert names[0] == "regate.identify" and names[-2:] == ["regate.audit", "regate.forward"]
    assert {"regate.route", "regate.ratelimit", "regate.policy"} <= set(names)
    for key, value in {"regate.agent": "coder-7", "regate.tool": "echo", "regate.decision": "allow",
                       "regate.stage": "forward", "regate.code": "forwarded",
                       "http.response.status_code": 200}.items():
        assert ok.attributes[key] == value, key
    for key, value in {"regate.decision": "deny", "regate.stage": "policy", "regate.code": "policy_denied",
                       "http.response.status_code": 403}.items():
        assert denied.attributes[key] == value, key
    kids = children(denied)
    assert kids[-1].name == "regate.policy" and kids[-1].attributes["regate.code"] == "policy_denied"
    assert all(k.attributes["regate.stage"] == k.name.removeprefix("regate.") for k in kids)
    # Children sit inside their parent, one after another.
    for parent in (ok, denied):
        kids = children(parent)
        assert parent.start_time <= kids[0].start_time and kids[-1].end_time <= parent.end_time
        assert all(a.end_time <= b.start_time for a, b in zip(kids, kids[1:]))


async def test_otlp_endpoint_without_the_sdk_is_a_startup_error(keys_file, upstream, monkeypatch):
    cfg = config_mod.validate({**_cfg(keys_file, upstream),
                               "tracing": {"otlp_endpoint": "http://127.0.0.1:4318/v1/traces"}})
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(StartupError, match=r"pip install 'regate\[otel\]'"):
        Regate(cfg)


async def test_config_rejects_a_bad_otlp_endpoint():
    with pytest.raises(config_mod.ConfigError, match="tracing.otlp_endpoint: .*not an http"):
        config_mod.validate({"tools": [{"name": "a", "upstream": "http://x"}], "tracing": {"otlp_endpoint": "4318"}})
