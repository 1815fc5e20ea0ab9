"""The parts behind the explain API: the trace ring, W3C trace context parsing,
linking reasons to the rules that made them, and OPA's explanation, asked of
the real OPA engine (Go, behind the OPA-REST test server) over HTTP."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.observability.explain import _template, link_reasons, opa_fired_rules
from proxy.observability.propagation import parse_traceparent
from proxy.observability.traces import ID, TraceRing
from tests.conftest import AGENT_KEY
from tests.support.opa_rest_server import OpaRestServer
from tests.support.procs import ROOT, RegateProcess, start_upstream


def test_ring_keeps_the_newest_and_finds_them_by_id():
    ring = TraceRing(3)
    for i in range(5):
        ring.add((f"id{i}",) + (None,) * 18)
    assert len(ring) == 3
    assert [e[ID] for e in ring.newest_first()] == ["id4", "id3", "id2"]
    assert ring.get("id1") is None and ring.get("id2")[ID] == "id2"


@pytest.mark.parametrize("value, expected", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
     ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)),
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00",
     ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 0)),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # zero trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # zero parent
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # forbidden version
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),  # v00 has no more fields
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
     ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)),  # a later version may add fields
    ("garbage", None), ("", None), (None, None),
])
def test_traceparent_parsing(value, expected):
    assert parse_traceparent(value) == expected


def test_sprintf_templates_link_reasons_to_rules():
    pat = _template("Agent '%s' may call the tool '%s' only with %s, not with '%s'.")
    assert pat.fullmatch("Agent 'a' may call the tool 'files' only with GET, not with 'PUT'.")
    assert not pat.fullmatch("Agent 'a' has no grant")
    assert _template("%s") is None and _template("shell") is None  # too little to be evidence
    assert _template("100%% sure: %d").fullmatch("100% sure: 7")
    rules = [{"rule": "data.r.deny", "location": "r.rego:9", "_patterns": [pat]},
             {"rule": "data.r.other", "location": "r.rego:20", "_patterns": []}]
    linked = link_reasons(["Agent 'x' may call the tool 'y' only with GET, not with 'POST'.", "unknown"], rules)
    assert linked == [
        {"reason": "Agent 'x' may call the tool 'y' only with GET, not with 'POST'.",
         "rules": [{"rule": "data.r.deny", "location": "r.rego:9"}]},
        {"reason": "unknown", "rules": []},
    ]


def test_opa_explanations_in_both_shapes():
    pretty = [
        "query:1                        Enter data.regate.decision = _",
        "rego/regate.rego:83            | Enter deny contains msg if { data.regate.grant = {} }",
        "rego/tools/shell.rego:23       | | Exit deny contains __local33__ if { x = 1; "
        "__local33__ = sprintf(\"The command '%s' was refused: it looks like %s.\", [a, b]) }",
        "rego/tools/shell.rego:26       | | | Exit __local29__ = __local26__[__local28__]",
        "rego/regate.rego:65            | Exit tool := __local71__ if { __local71__ = data.tools[x] }",
        "query:1                        Exit data.regate.decision = _",
    ]
    raw = [
        {"op": "exit", "type": "rule", "node": {
            "head": {"name": "deny", "key": {"type": "var", "value": "msg"}},
            "body": [{"terms": [{"type": "string", "value": "Agent '%s' has no grant for the tool '%s'."}]}],
            "location": {"file": "rego/regate.rego", "row": 83, "col": 1}}},
        {"op": "exit", "type": "expr", "node": {"terms": []}},
        {"op": "enter", "type": "rule", "node": {"head": {"name": "grant"}, "location": {"file": "x", "row": 1}}},
    ]
    p = opa_fired_rules(pretty)
    assert [(r["rule"], r["location"]) for r in p] == [("deny", "rego/tools/shell.rego:23"),
                                                        ("tool", "rego/regate.rego:65")]
    assert p[0]["_patterns"][0].fullmatch("The command 'rm -rf /' was refused: it looks like deletion.")
    r = opa_fired_rules(raw)
    assert [(x["rule"], x["location"]) for x in r] == [("deny", "rego/regate.rego:83")]
    assert r[0]["_patterns"][0].fullmatch("Agent 'a' has no grant for the tool 'b'.")


class ExplainingOpa(OpaRestServer):
    """The OPA-REST test server, answering `?explain=` with the real OPA engine's event trace."""

    async def _data(self, request: web.Request) -> web.Response:
        if "explain" not in request.query:
            return await super()._data(request)
        body = orjson.loads(await request.read())
        path = request.match_info.get("path", "").strip("/").replace("/", ".")
        value = self.engine.eval_document(path, body.get("input"), trace=True)
        return web.json_response({"result": value, "explanation": self.engine.last_trace},
                                 dumps=lambda o: orjson.dumps(o).decode())


@pytest.mark.asyncio
async def test_opa_engine_explains_a_denial_through_opas_trace(keys_file, tmp_path):
    opa = ExplainingOpa(ROOT / "rego", ROOT / "policies")
    opa_url = await opa.start()
    upstream, upstream_url = start_upstream()
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"engine": "opa", "opa": {"url": opa_url}, "timeout_ms": 2000,
                   "rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
        "tools": [{"name": "shell", "upstream": upstream_url}],
        "http": {"shutdown_grace_s": 1},
    }
    proc = await asyncio.to_thread(RegateProcess, cfg, tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(proc.url + "/tools/shell/run", json={"command": "rm -rf /"},
                              headers={"X-Api-Key": AGENT_KEY}) as r:
                assert r.status == 403
                decision_id = r.headers["X-Regate-Decision-Id"]
            for _ in range(100):
                async with s.get(f"{proc.admin_url}/admin/decisions/{decision_id}", headers=proc.admin_headers) as r:
                    t = await r.json()
                if t["explain"]["state"] != "pending":
                    break
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(proc.stop)
        upstream.stop()
        await opa.stop()
    ex = t["explain"]
    assert (ex["engine"], ex["state"]) == ("opa", "done"), ex
    assert {"rule": "deny", "location": "rego/tools/shell.rego:23"} in ex["reasons"][0]["rules"]
    assert "rego/regate.rego:43" in [r["location"] for r in ex["rules"]]  # the decision rule itself
