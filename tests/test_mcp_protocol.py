"""proxy/mcp.py: reading JSON-RPC messages, the error shapes, SSE framing, and
the bounded session and tool-name tables."""

from __future__ import annotations

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from proxy import mcp
from proxy.config import validate
from proxy.pipeline import Call, Rejection, rejection_response

MAX = 128


@pytest.mark.parametrize("obj, kind, problem", [
    ({"jsonrpc": "2.0", "id": 1, "method": "ping"}, mcp.REQUEST, None),
    ({"jsonrpc": "2.0", "id": "a", "method": "tools/list", "params": {}}, mcp.REQUEST, None),
    ({"jsonrpc": "2.0", "method": "notifications/initialized"}, mcp.NOTIFICATION, None),
    ({"jsonrpc": "2.0", "id": 4, "result": {}}, mcp.RESPONSE, None),
    ({"jsonrpc": "2.0", "id": 4, "error": {"code": 1, "message": "x"}}, mcp.RESPONSE, None),
    ({"id": 1, "method": "ping"}, mcp.INVALID, "mcp_invalid_request"),
    ({"jsonrpc": "1.0", "id": 1, "method": "ping"}, mcp.INVALID, "mcp_invalid_request"),
    ({"jsonrpc": "2.0", "id": None, "method": "ping"}, mcp.INVALID, "mcp_invalid_request"),
    ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, mcp.INVALID, "mcp_invalid_request"),
    ({"jsonrpc": "2.0", "id": True, "method": "ping"}, mcp.INVALID, "mcp_invalid_request"),
    ({"jsonrpc": "2.0", "id": 1}, mcp.INVALID, "mcp_invalid_request"),
    ({"jsonrpc": "2.0", "id": 1, "method": 7}, mcp.INVALID, "mcp_invalid_request"),
    ({"jsonrpc": "2.0", "id": 1, "method": "a\nb"}, mcp.INVALID, "mcp_invalid_request"),
    ({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"}, mcp.INVALID, "mcp_invalid_params"),
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, mcp.INVALID, "mcp_invalid_params"),
    ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": [1]}},
     mcp.INVALID, "mcp_invalid_params"),
    ("ping", mcp.INVALID, "mcp_invalid_request"),
    ([1], mcp.INVALID, "mcp_invalid_request"),
])
def test_parse_message(obj, kind, problem):
    msg = mcp.parse_message(obj, MAX)
    assert msg.kind is kind
    assert (msg.problem[0] if msg.problem else None) == problem


def test_a_tools_call_gives_the_policy_its_tool_and_arguments():
    msg = mcp.parse_message({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                             "params": {"name": "create_issue", "arguments": {"title": "t"}}}, MAX)
    assert msg.policy_view() == {"method": "tools/call", "id": 3, "tool": "create_issue",
                                 "arguments": {"title": "t"}, "purpose": None}
    # An invalid message keeps its id when it had a usable one, so the error matches it.
    bad = mcp.parse_message({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "a\x07"}}, MAX)
    assert bad.kind is mcp.INVALID and bad.has_id and bad.id == 3


@pytest.mark.parametrize("name, ok", [
    ("create_issue", True), ("github.create-issue", True), ("créer", True), ("x" * 128, True),
    ("x" * 129, False), ("", False), (None, False), (3, False), ("a\x00", False), ("a\x1b[31m", False),
    ("a\x7f", False), ("a\x85", False), ("\u202eevil", False), ("zero\u200bwidth", False), ("a\ud800", False),
])
def test_tool_names(name, ok):
    assert (mcp.name_problem(name, MAX) is None) is ok


def test_rejection_codes_are_stable_per_kind():
    assert mcp.jsonrpc_code("bad_json") == -32700
    assert mcp.jsonrpc_code("mcp_batch_too_large") == -32600
    assert mcp.jsonrpc_code("policy_denied") == -32001
    assert mcp.jsonrpc_code("approval_timeout") == mcp.jsonrpc_code("approval_pending") == -32003
    assert mcp.jsonrpc_code("gpu_saturated") == -32010
    assert mcp.jsonrpc_code("something_new") == -32000
    numbers = [v for k, v in mcp.JSONRPC_CODES.items() if k not in ("upstream_unreachable", "upstream_error",
                                                                    "mcp_no_reply", "mcp_invalid_request",
                                                                    "mcp_batch_too_large")]
    assert len(numbers) == len(set(numbers))


def _call(tool_protocol: str = "mcp", body: object = None) -> Call:
    cfg = validate({"tools": [{"name": "t", "upstream": "http://127.0.0.1:1", "protocol": tool_protocol}]})
    call = Call(make_mocked_request("POST", "/tools/t/mcp"))
    call.tool = cfg.tools[0]
    if body is not None:
        call.extra["mcp_msg"] = mcp.parse_message(body, MAX)
    return call


@pytest.mark.parametrize("body, rejection, status, mid", [
    ({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "x"}},
     Rejection(403, "policy_denied", "no", reasons=["because"]), 200, 5),
    ({"jsonrpc": "2.0", "id": "r", "method": "ping"}, Rejection(429, "rate_limited", "slow", retry_after=2.5), 200, "r"),
    ({"jsonrpc": "2.0", "method": "notifications/x"}, Rejection(403, "policy_denied", "no"), 202, None),
    ({"jsonrpc": "2.0", "id": 5, "result": {}}, Rejection(403, "policy_denied", "no"), 202, None),
    (None, Rejection(400, "bad_json", "broken"), 400, None),
    ({"jsonrpc": "2.0", "id": 6, "method": "ping"}, Rejection(404, "mcp_session_unknown", "who?"), 404, 6),
    (None, Rejection(404, "mcp_session_unknown", "who?"), 404, None),
])
def test_rejections_on_mcp_routes_are_jsonrpc_errors(body, rejection, status, mid):
    call = _call(body=body)
    resp = rejection_response(call, rejection)
    assert resp.status == status
    assert resp.headers["X-Regate-Decision-Id"] == call.id
    if status == 202:
        assert not resp.body
        return
    doc = orjson.loads(resp.body)
    assert doc["jsonrpc"] == "2.0" and doc["id"] == mid
    err = doc["error"]
    assert err["code"] == mcp.jsonrpc_code(rejection.code)
    assert err["data"]["code"] == rejection.code and err["data"]["decision_id"] == call.id
    assert err["data"]["reasons"] == rejection.reasons
    for reason in rejection.reasons:
        assert reason in err["message"]
    if rejection.retry_after:
        assert err["data"]["retry_after"] == rejection.retry_after
        assert resp.headers["Retry-After"] == "3"


def test_http_routes_keep_the_plain_error_shape():
    resp = rejection_response(_call("http"), Rejection(403, "policy_denied", "no"))
    assert resp.status == 403 and orjson.loads(resp.body)["error"]["code"] == "policy_denied"


SSE = (b"event: message\r\nid: 1\r\ndata: {\"a\":1}\r\n\r\n"
       b": a comment\n\n"
       b"data: {\"b\":\ndata: 2}\n\n"
       b"retry: 100\rdata: {\"c\":3}\r\r")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_sse_events_are_cut_whole_whatever_the_chunking(size):
    reader = mcp.SseReader()
    events = []
    for i in range(0, len(SSE), size):
        events += reader.feed(SSE[i:i + size])
    # The last event ends in a lone CR, which may be half of a CRLF until the stream ends.
    assert [orjson.loads(e.data) for e in events if e.data is not None] == [{"a": 1}, {"b": 2}]
    events += reader.feed(b"", final=True)
    assert reader.pending == 0
    assert [orjson.loads(e.data) for e in events if e.data is not None] == [{"a": 1}, {"b": 2}, {"c": 3}]
    first = events[0]
    assert first.raw == b"event: message\r\nid: 1\r\ndata: {\"a\":1}\r\n\r\n"
    assert first.with_data(b"{}") == b"event: message\nid: 1\ndata: {}\n\n"


def test_sessions_table_is_bounded():
    table = mcp.Sessions(max_sessions=3)
    for i in range(5):
        table.bind(f"s{i}", "a")
    assert len(table) == 3 and table.evicted == 2
    assert table.owner("s0") is None and table.owner("s4") == "a"
    table.owner("s2")  # used: kept over s3
    table.bind("s5", "b")
    assert table.owner("s3") is None and table.owner("s2") == "a"
    table.forget("s2")
    assert table.owner("s2") is None


def test_tool_names_bound_the_keys_an_agent_can_make():
    names = mcp.ToolNames("gh", max_names=3)
    names.learn("create_issue")  # listed by the server
    assert names.key("create_issue") == "gh/create_issue"
    assert names.key("a") == "gh/a" and names.key("b") == "gh/b"
    for i in range(10_000):
        assert names.key(f"invented-{i}") == "gh/*"
    assert len(names) == 3 and names.overflowed == 10_000
    assert names.key("a") == "gh/a"  # never evicted: no flood resets a real tool's state


def test_mcp_settings_only_on_mcp_routes():
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match="protocol: mcp"):
        validate({"tools": [{"name": "t", "upstream": "http://x:1", "mcp": {"max_batch": 5}}]})
    cfg = validate({"tools": [{"name": "t", "upstream": "http://x:1", "protocol": "mcp"}]})
    assert cfg.tools[0].mcp.max_batch == 100
    with pytest.raises(ConfigError, match="batch_upstream"):
        validate({"tools": [{"name": "t", "upstream": "http://x:1", "protocol": "mcp",
                             "mcp": {"batch_upstream": "sometimes"}}]})


@pytest.mark.parametrize("mode, outcome", [("refuse", ["mcp_session_unknown", "mcp_session_unknown"]),
                                           ("bind", [None, "mcp_session_unknown"])])
def test_unknown_session_ids_are_refused_or_bound_to_their_first_agent(mode, outcome):
    from proxy.stages.mcp import McpStage

    cfg = validate({"tools": [{"name": "t", "upstream": "http://127.0.0.1:1", "protocol": "mcp",
                               "mcp": {"unknown_sessions": mode}}]})
    stage = McpStage(cfg.tools)
    route = stage.routes["t"]
    got = []
    for agent in ("a", "b"):  # the same id, presented by two agents in turn
        call = Call(make_mocked_request("POST", "/tools/t/mcp", headers={"Mcp-Session-Id": "s1"}))
        call.tool, call.agent = cfg.tools[0], agent
        rejection = stage._check_session(route, call)
        got.append(rejection.code if rejection else None)
    assert got == outcome
    route.sessions.bind("s2", "a")  # opened by a (seen in its initialize answer)
    call = Call(make_mocked_request("POST", "/tools/t/mcp", headers={"Mcp-Session-Id": "s2"}))
    call.tool, call.agent = cfg.tools[0], "a"
    assert stage._check_session(route, call) is None


def test_an_event_sent_in_many_small_pieces_is_scanned_once():
    """A hostile tool trickling one huge SSE event must not stall Regate: each
    byte is scanned once (this took ~13 s of CPU when every chunk rescanned)."""
    import time

    from proxy.mcp import SseReader

    reader = SseReader()
    data = b"data: " + b"x" * 2_000_000
    started = time.process_time()
    for i in range(0, len(data), 1024):
        assert reader.feed(data[i:i + 1024]) == []
    (event,) = reader.feed(b"\n\n")
    assert event.raw == data + b"\n\n"
    assert time.process_time() - started < 2.0
