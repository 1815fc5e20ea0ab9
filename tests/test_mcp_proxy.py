"""MCP through Regate, end to end: the `mcp` SDK's Streamable HTTP client and raw
HTTP, Regate as a real process, and two real MCP servers on real sockets:
examples/mcp_server.py (the SDK's own server: SSE answers, no batches) and
tests/support/jsonrpc_upstream.py (JSON answers, batches, remembers what it got).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
import time

import aiohttp
import orjson
import pytest
import yaml
from multidict import CIMultiDict

from proxy.audit import list_segments
from tests.support.procs import ROOT, Process, RegateProcess, free_port

import httpx2  # the SDK's HTTP client
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

KEYS = {"support-1": "test-key-support-1", "coder-7": "test-key-coder-7", "analyst-2": "test-key-analyst-2"}
ACCEPT = "application/json, text/event-stream"
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(SDK server URL, JSON-RPC server URL)."""
    sdk_port, rpc_port = free_port(), free_port()
    sdk = Process([sys.executable, str(ROOT / "examples/mcp_server.py"), str(sdk_port)],
                  f"http://127.0.0.1:{sdk_port}/health")
    rpc = Process([sys.executable, str(ROOT / "tests/support/jsonrpc_upstream.py"), str(rpc_port)],
                  f"http://127.0.0.1:{rpc_port}/_seen")
    yield f"http://127.0.0.1:{sdk_port}", f"http://127.0.0.1:{rpc_port}"
    sdk.stop()
    rpc.stop()


@pytest.fixture(scope="module")
def regate(servers, tmp_path_factory):
    sdk, rpc = servers
    tmp = tmp_path_factory.mktemp("mcp")
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"sha256": hashlib.sha256(k.encode()).hexdigest(), "agent": a} for a, k in KEYS.items()]}))
    # The shipped bundle, plus grants on the test server and a tight limit on one MCP tool.
    data = tmp / "policies"
    shutil.copytree(ROOT / "policies", data)
    agents = yaml.safe_load((data / "agents" / "data.yaml").read_text())
    # The methods these tests send; the shipped policy refuses any a grant does not list.
    methods = ["initialize", "notifications/initialized", "ping", "tools/list", "tools/call",
               "notifications/progress", "notifications/cancelled"]
    for route in ("legacy", "legacy-gz"):
        agents["support-1"]["tools"][route] = {"methods": ["POST", "GET", "DELETE"], "mcp_methods": methods,
                                               "mcp_tools": ["ok", "fail", "limited"]}
        agents["coder-7"]["tools"][route] = {"methods": ["POST", "GET", "DELETE"], "mcp_methods": methods,
                                             "mcp_tools": ["ok"]}
    (data / "agents" / "data.yaml").write_text(yaml.safe_dump(agents))
    limits = yaml.safe_load((data / "limits" / "data.yaml").read_text())
    limits["tools"]["legacy/limited"] = {"rate": "1/min", "burst": 2}
    (data / "limits" / "data.yaml").write_text(yaml.safe_dump(limits))
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys)},
        "tools": [
            {"name": "tickets", "upstream": sdk, "protocol": "mcp", "mcp": {"batch_upstream": "split"}},
            {"name": "legacy", "upstream": rpc, "protocol": "mcp", "mcp": {"max_batch": 20}},
            {"name": "legacy-gz", "upstream": f"{rpc}/gz", "protocol": "mcp"},
        ],
        "policy": {"rego": str(ROOT / "rego"), "data": str(data)},
        # The agent back-off would step in before the loop guard; this file tests the guard.
        "breakers": {"agent": {"enabled": False}},
        "audit": {"dir": str(tmp / "audit")},
    }
    proc = RegateProcess(cfg, tmp)
    proc.audit_dir = tmp / "audit"
    yield proc
    proc.stop()


def sdk_client(regate, agent: str, mode: str = "legacy", route: str = "tickets") -> Client:
    http = httpx2.AsyncClient(headers={"X-Api-Key": KEYS[agent]}, timeout=httpx2.Timeout(30, read=60))
    return Client(streamable_http_client(f"{regate.url}/tools/{route}/mcp", http_client=http), mode=mode)


async def post(session: aiohttp.ClientSession, regate, agent: str, body: object, route: str = "legacy",
               headers: dict | None = None, raw: bytes | None = None) -> tuple[int, CIMultiDict, object]:
    h = {"X-Api-Key": KEYS[agent], "Content-Type": "application/json", "Accept": ACCEPT, **(headers or {})}
    data = raw if raw is not None else orjson.dumps(body)
    async with session.post(f"{regate.url}/tools/{route}/mcp", data=data, headers=h) as r:
        text = await r.read()
        if r.headers.get("Content-Type", "").startswith("text/event-stream"):
            # An SSE answer: the last message is the reply (the ones before are notifications).
            text = [ln[5:].strip() for ln in text.splitlines() if ln.startswith(b"data:")][-1]
        return r.status, CIMultiDict(r.headers), (orjson.loads(text) if text else None)


async def seen(session: aiohttp.ClientSession, servers) -> dict:
    async with session.get(f"{servers[1]}/_seen") as r:
        return await r.json()


def error_of(body: dict, code: int, regate_code: str) -> dict:
    assert body["jsonrpc"] == "2.0" and "result" not in body, body
    err = body["error"]
    assert err["code"] == code and err["data"]["code"] == regate_code, err
    assert err["data"]["decision_id"]
    return err


# --- the SDK client ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["legacy", "auto"])  # initialize handshake, and the 2026 stateless protocol
async def test_sdk_client_lists_calls_and_is_refused_per_policy(regate, mode):
    async with sdk_client(regate, "support-1", mode) as client:
        if mode == "legacy":
            assert client.protocol_version == "2025-11-25"  # the initialize handshake went through
        listed = await client.list_tools()
        assert [t.name for t in listed.tools] == ["search_tickets", "add_comment", "watch_ticket"]
        result = await client.call_tool("search_tickets", {"query": "invoice"})
        assert not result.is_error
        assert result.structured_content == {"result": [
            {"id": 102, "title": "Invoice PDF is blank", "status": "open", "comments": []}]}
        with pytest.raises(MCPError) as refused:
            await client.call_tool("delete_ticket", {"ticket_id": 101})
        err = refused.value.error
        assert err.code == -32001 and err.data["code"] == "policy_denied"
        reason = ("Agent 'support-1' may not call the MCP tool 'delete_ticket' on 'tickets'; "
                  "it may call: search_tickets, add_comment, watch_ticket.")
        assert err.data["reasons"] == [reason]
        assert reason in err.message  # clients that show only the message still show why
        with pytest.raises(MCPError) as refused:  # an argument rule of rego/tools/tickets.rego
            await client.call_tool("add_comment", {"ticket_id": 101, "text": "x" * 2001})
        assert "2001 characters" in refused.value.error.message

    async with sdk_client(regate, "coder-7", mode) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["search_tickets"]


async def test_sse_answers_stream_through_incrementally(regate):
    async with sdk_client(regate, "support-1") as client:
        t0 = time.monotonic()
        seen_at: list[float] = []

        async def progress(done: float, total: float | None, message: str | None) -> None:
            seen_at.append(time.monotonic() - t0)

        result = await client.call_tool("watch_ticket", {"ticket_id": 101, "updates": 3, "interval_ms": 300},
                                        progress_callback=progress)
        took = time.monotonic() - t0
    assert result.content[0].text == "ticket 101: open"
    assert len(seen_at) == 3
    # Each progress event arrived when the server sent it, not all at the end.
    assert seen_at[0] < 0.25 and seen_at[1] - seen_at[0] > 0.2 and seen_at[2] - seen_at[1] > 0.2, seen_at
    assert took - seen_at[0] > 0.5


# --- sessions ---------------------------------------------------------------

async def test_a_session_is_bound_to_the_agent_that_opened_it(regate, servers):
    async with aiohttp.ClientSession() as s:
        status, headers, body = await post(s, regate, "support-1", INIT)
        assert status == 200 and body["result"]["serverInfo"]["name"] == "jsonrpc-upstream"
        sid = headers["Mcp-Session-Id"]  # passed through untouched
        before = (await seen(s, servers))["posts"]

        ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
        status, headers, body = await post(s, regate, "coder-7", ping, headers={"Mcp-Session-Id": sid})
        assert status == 404  # as the spec answers an unknown session: the client may start anew
        error_of(body, -32014, "mcp_session_unknown")
        assert body["id"] == 7
        async with s.get(f"{regate.url}/tools/legacy/mcp",
                         headers={"X-Api-Key": KEYS["coder-7"], "Mcp-Session-Id": sid}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == -32014
        status, _, body = await post(s, regate, "coder-7", [ping], headers={"Mcp-Session-Id": sid})
        assert status == 404
        after = await seen(s, servers)
        assert after["posts"] == before  # none of it reached the server

        status, _, body = await post(s, regate, "support-1", ping, headers={"Mcp-Session-Id": sid})
        assert status == 200 and body == {"jsonrpc": "2.0", "id": 7, "result": {}}
        assert (await seen(s, servers))["sessions"][-1] == sid

        async with s.delete(f"{regate.url}/tools/legacy/mcp",
                            headers={"X-Api-Key": KEYS["support-1"], "Mcp-Session-Id": sid}) as r:
            assert r.status == 200
        # Ended: the id is unknown now, for its owner too.
        status, _, body = await post(s, regate, "support-1", ping, headers={"Mcp-Session-Id": sid})
        assert status == 404

        # A made-up session id is refused the same way.
        status, _, body = await post(s, regate, "support-1", ping, headers={"Mcp-Session-Id": "f" * 32})
        assert status == 404 and body["error"]["code"] == -32014


async def open_session(s: aiohttp.ClientSession, regate, agent: str) -> dict:
    """initialize + initialized on the SDK server through Regate; the headers to send after."""
    init = {**INIT, "params": {**INIT["params"], "protocolVersion": "2025-06-18"}}
    status, headers, _ = await post(s, regate, agent, init, route="tickets")
    assert status == 200
    h = {"Mcp-Session-Id": headers["Mcp-Session-Id"], "Mcp-Protocol-Version": "2025-06-18"}
    status, _, _ = await post(s, regate, agent, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                              route="tickets", headers=h)
    assert status == 202
    return h


async def test_get_event_stream_and_delete_pass_through(regate):
    async with aiohttp.ClientSession() as s:
        h = await open_session(s, regate, "support-1")
        url = f"{regate.url}/tools/tickets/mcp"
        get = {**h, "X-Api-Key": KEYS["support-1"], "Accept": "text/event-stream"}
        async with s.get(url, headers=get, timeout=aiohttp.ClientTimeout(total=5)) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async with s.get(url, headers={**get, "X-Api-Key": KEYS["coder-7"]}) as r:
            assert r.status == 404
        async with s.delete(url, headers={**get, "X-Api-Key": KEYS["coder-7"]}) as r:
            assert r.status == 404  # nor may another agent end it
        async with s.delete(url, headers=get) as r:
            assert r.status in (200, 204)
        status, _, body = await post(s, regate, "support-1", {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                     route="tickets", headers=h)
        assert status == 404 and body["error"]["code"] == -32014


# --- batches ----------------------------------------------------------------

def call(mid: int, name: str, **args) -> dict:
    return {"jsonrpc": "2.0", "id": mid, "method": "tools/call", "params": {"name": name, "arguments": args}}


async def test_a_batch_is_judged_message_by_message(regate, servers):
    batch = [
        call(1, "ok", n=1),                                   # allowed
        call(2, "secret"),                                    # denied by policy
        {"jsonrpc": "2.0", "id": 3, "method": "ping"},        # allowed, not a tool call
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}},
        call(4, "fail"),                                      # allowed; the server says it failed
        {"jsonrpc": "1.0", "id": 5, "method": "ping"},        # invalid
        {"jsonrpc": "2.0", "id": 6, "method": "tools/list"},  # allowed; its answer is filtered
        call(7, "ok\x1b[2J"),                                 # invalid tool name
    ]
    async with aiohttp.ClientSession() as s:
        before = (await seen(s, servers))["posts"]
        status, headers, body = await post(s, regate, "support-1", batch)
        assert status == 200 and isinstance(body, list)
        assert [m["id"] for m in body] == [1, 2, 3, 4, 5, 6, 7]  # in order; the notification gets none
        assert body[0]["result"]["content"][0]["text"] == 'ok ran with {"n":1}'
        error_of(body[1], -32001, "policy_denied")
        assert "may not call the MCP tool 'secret'" in body[1]["error"]["data"]["reasons"][0]
        assert body[2]["result"] == {}
        assert body[3]["error"] == {"code": -32602, "message": "ticket 999 does not exist"}  # the server's own
        error_of(body[4], -32600, "mcp_invalid_request")
        assert [t["name"] for t in body[5]["result"]["tools"]] == ["ok", "fail", "limited"]  # not `secret`
        error_of(body[6], -32602, "mcp_invalid_params")
        assert len({m["error"]["data"]["decision_id"] for m in body if "data" in m.get("error", {})}) == 3

        got = await seen(s, servers)
        assert got["posts"] == before + 1  # one reduced batch
        forwarded = got["bodies"][-1]
        # Only the allowed messages, in their order.
        assert [m.get("id") for m in forwarded] == [1, 3, None, 4, 6]
        assert forwarded[0] == batch[0] and forwarded[2] == batch[3]

        # Everything refused: nothing is sent, the answer is Regate's alone.
        status, _, body = await post(s, regate, "coder-7", [call(8, "secret"), call(9, "limited")])
        assert status == 200 and [m["error"]["code"] for m in body] == [-32001, -32001]
        assert (await seen(s, servers))["posts"] == before + 1

        # Only notifications: 202, no body.
        status, _, body = await post(s, regate, "coder-7", [{"jsonrpc": "2.0", "method": "notifications/x"}])
        assert status == 202 and body is None


async def test_a_batch_reaches_a_server_without_batches_one_message_at_a_time(regate):
    async with aiohttp.ClientSession() as s:
        h = await open_session(s, regate, "support-1")
        batch = [call(1, "search_tickets", query="login"), call(2, "delete_ticket", ticket_id=101),
                 {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}]
        status, _, body = await post(s, regate, "support-1", batch, route="tickets", headers=h)
        assert status == 200 and [m["id"] for m in body] == [1, 2, 3]
        assert body[0]["result"]["structuredContent"]["result"][0]["id"] == 101
        error_of(body[1], -32001, "policy_denied")
        assert [t["name"] for t in body[2]["result"]["tools"]] == ["search_tickets", "add_comment", "watch_ticket"]


# --- bad input --------------------------------------------------------------

async def test_bad_input_gets_jsonrpc_errors_and_never_reaches_the_server(regate, servers):
    async with aiohttp.ClientSession() as s:
        before = (await seen(s, servers))["posts"]
        status, _, body = await post(s, regate, "support-1", None, raw=b'{"jsonrpc": "2.0", "id": 1, "meth')
        assert status == 400 and body["id"] is None
        error_of(body, -32700, "bad_json")

        status, _, body = await post(s, regate, "support-1", {"id": 2, "method": "ping"})
        assert status == 200 and body["id"] == 2
        error_of(body, -32600, "mcp_invalid_request")
        assert '"jsonrpc": "2.0"' in body["error"]["message"]

        status, _, body = await post(s, regate, "support-1", {"jsonrpc": "2.0", "id": None, "method": "ping"})
        assert status == 400 and body["id"] is None and body["error"]["code"] == -32600

        huge = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(10_000)]
        status, _, body = await post(s, regate, "support-1", huge)
        assert status == 400 and body["id"] is None
        err = error_of(body, -32600, "mcp_batch_too_large")
        assert "10000" in err["message"] and "20" in err["message"]

        for name in ("ok\x00", "ok\nrm -rf /", "\u202eko", "x" * 129, "", 42):
            status, _, body = await post(s, regate, "support-1", call(3, name))
            assert status == 200 and body["id"] == 3, name
            error_of(body, -32602, "mcp_invalid_params")

        for odd in ([], [1, 2], "ping", 3):
            status, _, body = await post(s, regate, "support-1", odd)
            assert status in (200, 400) and "error" in (body[0] if isinstance(body, list) else body), odd

        # The header a modern server routes by must say what the body says.
        status, _, body = await post(s, regate, "support-1", call(4, "secret"), headers={"Mcp-Name": "ok"})
        error_of(body, -32600, "mcp_invalid_request")

        assert (await seen(s, servers))["posts"] == before
        async with s.get(f"{regate.admin_url}/healthz") as r:
            assert r.status == 200


async def test_notifications_are_forwarded_or_dropped_without_a_reply(regate, servers):
    note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
    async with aiohttp.ClientSession() as s:
        before = (await seen(s, servers))["posts"]
        status, _, body = await post(s, regate, "analyst-2", note)  # no grant: dropped
        assert status == 202 and body is None
        assert (await seen(s, servers))["posts"] == before
        status, _, body = await post(s, regate, "support-1", note)  # granted: forwarded
        assert status == 202 and body is None
        got = await seen(s, servers)
        assert got["posts"] == before + 1 and got["bodies"][-1] == note

        # A request from that agent gets the error, with its id, at HTTP 200.
        status, _, body = await post(s, regate, "analyst-2", {"jsonrpc": "2.0", "id": "a-1", "method": "ping"})
        assert status == 200 and body["id"] == "a-1"
        assert "no grant for the tool 'legacy'" in error_of(body, -32001, "policy_denied")["data"]["reasons"][0]


# --- tools/list -------------------------------------------------------------

async def test_tools_list_is_filtered_in_json_and_gzip_answers(regate):
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with aiohttp.ClientSession(auto_decompress=True) as s:
        for route in ("legacy", "legacy-gz"):
            _, _, body = await post(s, regate, "support-1", listing, route=route)
            assert [t["name"] for t in body["result"]["tools"]] == ["ok", "fail", "limited"], route
            status, headers, body = await post(s, regate, "coder-7", listing, route=route)
            assert [t["name"] for t in body["result"]["tools"]] == ["ok"], route
            assert "Content-Encoding" not in headers


# --- limits, loop guard, audit: keyed by the MCP tool ----------------------

async def test_rate_limit_is_keyed_by_mcp_tool(regate):
    async with aiohttp.ClientSession() as s:
        for i in range(2):
            status, _, body = await post(s, regate, "support-1", call(i, "limited"))
            assert "result" in body, body
        status, headers, body = await post(s, regate, "support-1", call(9, "limited"))
        assert status == 200 and body["id"] == 9
        err = error_of(body, -32004, "rate_limited")
        assert "'legacy/limited'" in err["message"]
        assert int(headers["Retry-After"]) >= 1 and err["data"]["retry_after"] > 0
        status, _, body = await post(s, regate, "support-1", call(10, "ok"))  # another MCP tool, same route
        assert "result" in body


async def test_loop_guard_is_keyed_by_mcp_tool(regate, servers):
    async with aiohttp.ClientSession() as s:
        for i in range(2):  # the default loop.repeats
            status, _, body = await post(s, regate, "support-1", call(100 + i, "fail", ticket_id=999))
            assert status == 400 and body["error"]["message"] == "ticket 999 does not exist"
        before = (await seen(s, servers))["posts"]
        status, _, body = await post(s, regate, "support-1", call(102, "fail", ticket_id=999))
        assert status == 200 and body["id"] == 102
        err = error_of(body, -32009, "retry_loop")
        assert "ticket 999 does not exist" in err["message"]
        assert (await seen(s, servers))["posts"] == before
        status, _, body = await post(s, regate, "support-1", call(104, "ok"))
        assert "result" in body


async def test_loop_guard_hears_tool_errors_sent_with_http_200(regate):
    async with sdk_client(regate, "support-1") as client:
        for _ in range(2):  # the default loop.repeats
            result = await client.call_tool("add_comment", {"ticket_id": 999, "text": "hello"})
            assert result.is_error
        with pytest.raises(MCPError) as refused:
            await client.call_tool("add_comment", {"ticket_id": 999, "text": "hello"})
        assert refused.value.error.code == -32009


async def test_audit_records_name_the_mcp_tool(regate):
    async with aiohttp.ClientSession() as s:
        _, headers, _ = await post(s, regate, "support-1", call(1, "ok", audit=1))
        allowed = headers["X-Regate-Decision-Id"]
        _, _, body = await post(s, regate, "support-1", call(2, "secret"))
        denied = body["error"]["data"]["decision_id"]
        _, _, body = await post(s, regate, "support-1", [call(3, "ok", audit=2), call(4, "secret")])
        part_denied = body[1]["error"]["data"]["decision_id"]
    await asyncio.sleep(0.2)
    lines = [orjson.loads(line) for _, seg in list_segments(regate.audit_dir)[0]
             for line in seg.read_bytes().splitlines() if line]
    by_id: dict[str, list[dict]] = {}
    for rec in lines:
        if "decision_id" in rec:
            by_id.setdefault(rec["decision_id"], []).append(rec)
    assert [(r["kind"], r.get("decision"), r.get("tool")) for r in by_id[allowed]] == [
        ("decision", "allow", "legacy/ok"), ("outcome", None, None)]  # an outcome names its decision by id
    assert [(r["decision"], r["tool"], r["stage"]) for r in by_id[denied]] == [("deny", "legacy/secret", "policy")]
    assert [(r["decision"], r["tool"]) for r in by_id[part_denied]] == [("deny", "legacy/secret")]
    # The allowed part of the batch has its own records too, under its own id.
    assert any(r["tool"] == "legacy/ok" and r["decision"] == "allow" and r["decision_id"] not in (allowed,)
               for r in lines if r.get("kind") == "decision")
