"""The trace ring in-process: what an entry keeps alive after its call is over."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import config
from proxy.observability import Observability
from proxy.observability.traces import trace_json


class Payload:
    """Stands for a big MCP message or reply held in a call's extras."""


def _call(extra: dict) -> SimpleNamespace:
    request = SimpleNamespace(method="POST", path="/tools/tickets/mcp",
                              headers=CIMultiDictProxy(CIMultiDict({"traceparent": "x"})))
    return SimpleNamespace(
        id="d1", started_ns=0, agent="coder-7", tool_key="tickets/add_comment", request=request,
        ended_by="forward", marks=None, upstream_ns=1000, upstream_status=200, revision="sha256:r",
        decision=None, rejection=None, extra=extra, shadow_denied=False, span=None)


def test_a_trace_keeps_the_notes_it_shows_but_not_the_calls_payloads():
    cfg = config.validate({"tools": [{"name": "tickets", "upstream": "http://127.0.0.1:9/"}],
                           "policy": {"engine": "off"}})
    obs = Observability(cfg)
    big = Payload()
    extra = {"mcp_msg": big, "mcp_reply": big, "mcp_replies": [big], "error_body": big, "retries": 1,
             "mcp": {"method": "tools/call", "tool": "add_comment", "arguments": big}}
    call = _call(extra)
    obs.finish(call, 200, "forwarded", 5000, 4000)
    gone = weakref.ref(big)
    del big, call, extra
    gc.collect()
    assert gone() is None, "the trace ring keeps a call's payloads alive"
    doc = trace_json(obs.ring.get("d1"))
    assert doc["notes"] == {"upstream_retries": 1, "mcp": {"method": "tools/call", "tool": "add_comment"}}
    assert (doc["method"], doc["path"], doc["tool"]) == ("POST", "/tools/tickets/mcp", "tickets/add_comment")
