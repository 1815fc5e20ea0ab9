"""Hostile bytes on the data port, sent raw over real sockets to a running Regate.

Each case says what the caller sees (a 4xx in Regate's JSON shape, never a hang or
a 5xx) and what crossed Regate: nothing, or exactly one request that carries the
decision id of an allow record for the same tool, method, path and body. After
every case Regate still answers.
"""

from __future__ import annotations

import pytest

from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.security.conftest import assert_error, assert_judged, audit_for, request

pytestmark = pytest.mark.timeout(30)

K = f"X-Api-Key: {AGENT_KEY}\r\n".encode()
HEAD = b"POST /tools/search/q HTTP/1.1\r\nHost: x\r\n" + K


@pytest.fixture(autouse=True)
def still_alive(judge):
    yield
    judge.alive()


# ------------------------------------------------------------------ framing / smuggling

SMUGGLED = b"GET /tools/shell/x HTTP/1.1\r\nHost: x\r\n" + K + b"\r\n"

FRAMING = {
    "cl_and_te": HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_and_cl": HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 48\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "duplicate_cl_conflicting": HEAD + b"Content-Length: 5\r\nContent-Length: 44\r\n\r\nhello" + SMUGGLED,
    "duplicate_cl_equal": HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl_list": HEAD + b"Content-Length: 5, 5\r\n\r\nhello",
    "cl_plus": HEAD + b"Content-Length: +5\r\n\r\nhello",
    "cl_underscore": HEAD + b"Content-Length: 1_0\r\n\r\nhellohello",
    "cl_negative": HEAD + b"Content-Length: -1\r\n\r\nhello",
    "cl_hex": HEAD + b"Content-Length: 0x5\r\n\r\nhello",
    "cl_overflow": HEAD + b"Content-Length: 99999999999999999999999\r\n\r\nhello",
    "te_xchunked": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_space_before_colon": HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te_chunked_identity": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te_twice": HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "te_leading_space_line": HEAD + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_obs_fold": HEAD + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "chunk_size_plus": HEAD + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_bare_lf": HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
    "chunk_size_overflow": HEAD + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nx\r\n0\r\n\r\n",
    "bare_lf_everywhere": b"GET /tools/search/q HTTP/1.1\nHost: x\n" + K.replace(b"\r\n", b"\n") + b"\n",
    "bare_lf_one_header": b"GET /tools/search/q HTTP/1.1\r\nHost: x\nX-Foo: a\r\n" + K + b"\r\n",
    "bare_cr": b"GET /tools/search/q HTTP/1.1\r\nHost: x\rX-Foo: a\r\n" + K + b"\r\n",
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "not_http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    "bad_version": b"GET /tools/search/q HTTP/9.9\r\nHost: x\r\n" + K + b"\r\n",
    "asterisk_form_post": b"POST * HTTP/1.1\r\nHost: x\r\n" + K + b"Content-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_ambiguous_framing_is_refused_before_it_is_a_call(judge, name):
    err = judge.parser_refused(FRAMING[name])
    assert "\\x" not in err["message"] and "b'" not in err["message"], "raw bytes echoed back"


def test_a_request_after_a_chunked_body_is_its_own_call_and_judged(judge, witness):
    """TE framing honoured: what follows the last chunk is the next request on the connection,
    judged on its own (coder-7 may not GET the shell tool: 403), never glued to the first."""
    data = (HEAD + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n" + SMUGGLED[:-2] + b"Connection: close\r\n\r\n")
    ex, got = judge(data, responses=2)
    assert [r.status for r in ex.responses] == [200, 403], [(r.status, r.body[:100]) for r in ex.responses]
    assert_error(ex.responses[1], 403, "policy_denied")
    assert len(got) == 1 and got[0]["decision_id"] == ex.responses[0].decision_id
    assert got[0]["raw_path"] == "/t/search/q" and got[0]["body_size"] == 2
    assert_judged(judge.regate.audit_dir, got[0], "search")


def test_pipelined_requests_each_reach_their_own_tool_once(judge):
    one = request("GET", "/tools/search/one", close=False)
    two = request("POST", "/tools/shell/run", body=b'{"command": "ls"}', content_type="application/json")
    ex, got = judge(one + two, responses=2)
    assert [r.status for r in ex.responses] == [200, 200]
    assert [g["decision_id"] for g in got] == [r.decision_id for r in ex.responses]
    assert_judged(judge.regate.audit_dir, got[0], "search")
    assert_judged(judge.regate.audit_dir, got[1], "shell")


def test_chunked_body_with_extensions_reaches_the_tool_reframed(judge):
    data = HEAD + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" \
        b"3;ext=1\r\n{\"a\r\n5\r\n\": 1}\r\n0\r\n\r\n"
    _, rec = judge.forwarded(data, "search")
    assert rec["body_size"] == 8
    names = {k.lower() for k, _ in rec["headers"]}
    assert "transfer-encoding" not in names or "content-length" not in names  # one framing, Regate's own


# ------------------------------------------------------------------ sizes (limits from the config: 4096 / 48)

def test_request_line_over_max_line_size_is_431(judge):
    judge.parser_refused(request("GET", "/tools/search/" + "a" * 5000), 431, "request_head_too_large")


def test_header_name_over_max_field_size_is_431(judge):
    judge.parser_refused(request("GET", "/tools/search/q", headers=[("X-" + "n" * 5000, "1")]), 431,
                         "request_head_too_large")


def test_header_value_over_max_field_size_is_431(judge):
    judge.parser_refused(request("GET", "/tools/search/q", headers=[("X-Big", "v" * 5000)]), 431,
                         "request_head_too_large")


def test_too_many_headers_is_431(judge):
    judge.parser_refused(request("GET", "/tools/search/q", headers=[(f"X-H{i}", "1") for i in range(60)]), 431,
                         "request_head_too_large")


def test_just_under_the_limits_is_served(judge):
    judge.forwarded(request("GET", "/tools/search/q", headers=[("X-Big", "v" * 3900)]
                            + [(f"X-H{i}", "1") for i in range(40)]), "search")


# ------------------------------------------------------------------ header syntax

HEADER_SYNTAX = {
    "cr_in_value": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX-A: a\rX-Injected: 1\r\n" + K + b"\r\n",
    "lf_in_value": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX-A: a\nX-Injected: 1\r\n" + K + b"\r\n",
    "nul_in_value": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n" + K + b"\r\n",
    "nul_in_name": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX-\x00A: ab\r\n" + K + b"\r\n",
    "nul_in_path": b"GET /tools/search/q\x00x HTTP/1.1\r\nHost: x\r\n" + K + b"\r\n",
    "space_before_colon": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX-Api-Key : other\r\n" + K + b"\r\n",
    "tab_before_colon": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX-A\t: 1\r\n" + K + b"\r\n",
    "space_in_name": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX A: 1\r\n" + K + b"\r\n",
    "colon_less_line": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX-A\r\n" + K + b"\r\n",
    "del_in_value": b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n" + K + b"\r\n",
    "space_in_path": b"GET /tools/search/a b HTTP/1.1\r\nHost: x\r\n" + K + b"\r\n",
}


@pytest.mark.parametrize("name", sorted(HEADER_SYNTAX))
def test_malformed_header_syntax_is_400(judge, name):
    judge.parser_refused(HEADER_SYNTAX[name])


@pytest.mark.parametrize("name", ["X_Api_Key", "X-Agent_Id", "Content_Length", "_"])
def test_underscore_in_a_header_name_is_refused(judge, name):
    err = judge.refused(request("GET", "/tools/search/q", headers=[(name, "analyst-2")]), 400, "bad_header")
    assert "'_'" in err["message"]
    recs = audit_for(judge.regate.audit_dir, err["decision_id"], "decision")
    assert len(recs) == 1 and recs[0]["code"] == "bad_header", recs


def test_encoded_crlf_in_the_path_stays_encoded_and_injects_nothing(judge):
    _, rec = judge.forwarded(request("GET", "/tools/search/q%0d%0aX-Injected:%201"), "search")
    assert rec["raw_path"] == "/t/search/q%0d%0aX-Injected:%201"
    assert "x-injected" not in {k.lower() for k, _ in rec["headers"]}


# ------------------------------------------------------------------ paths: the tool reached is the one judged

TRAVERSAL = [
    "/tools/search/../shell/run",
    "/tools/search/./q",
    "/tools/search/%2e%2e/shell/run",
    "/tools/search/%2E%2E/shell/run",
    "/tools/search/.%2e/shell/run",
    "/tools/search/%252e%252e/shell/run",
    "/tools/search%2f..%2fshell/run",
    "/tools/search/..%2fshell/run",
    "/tools/search/..%5cshell/run",
    "/tools/search/..\\shell/run",
    "/tools/search/..;/shell/run",
    "/tools/search/..;x=1/shell/run",
    "/tools/search/..%3b/shell/run",
    "/tools/search/..%3Bx/shell/run",
    "/tools/search/%c0%ae%c0%ae/shell/run",
    "/tools/search/%u002e%u002e/shell/run",
    "/tools/search/%/shell",
    "/tools/search/%g0",
    "/tools/search/%00/x",
    "/tools/search/x/../../shell/run",
    "/tools/files/workspace/reports/../../etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSAL)
def test_paths_that_could_leave_their_route_are_refused(judge, path):
    judge.refused(request("POST", path, body=b'{"command": "id"}', content_type="application/json"), 400, "bad_path")


def test_an_empty_path_segment_is_refused(judge):
    # Flask, Node and nginx read `//x` three ways.
    judge.refused(request("POST", "//tools/shell/run", body=b'{"command": "id"}', content_type="application/json"),
                  400, "bad_path")
    judge.refused(request("GET", "/tools/search/a//b"), 400, "bad_path")


@pytest.mark.parametrize("path", ["/TOOLS/shell/run", "/tools/searchshell/run", "/tools",
                                  "/tools/%73hell/run"])
def test_paths_outside_every_route_are_404(judge, path):
    judge.refused(request("POST", path, body=b'{"command": "id"}', content_type="application/json"), 404,
                  "unknown_tool")


def test_query_and_harmless_encodings_pass_byte_for_byte_to_the_judged_tool(judge):
    _, rec = judge.forwarded(request("GET", "/tools/search/a%20b/c?x=/../shell&y=%2F&z=%252e"), "search")
    assert rec["raw_path"] == "/t/search/a%20b/c?x=/../shell&y=%2F&z=%252e"


def test_files_root_is_checked_on_the_path_the_tool_receives(judge):
    ok = request("GET", "/tools/files/workspace/reports/q1.csv", key=OTHER_KEY)
    _, rec = judge.forwarded(ok, "files")
    assert rec["raw_path"] == "/t/files/workspace/reports/q1.csv"
    judge.refused(request("GET", "/tools/files/workspace/secrets/keys", key=OTHER_KEY), 403, "policy_denied")
    judge.refused(request("GET", "/tools/files/workspace/reports/..;/secrets/keys", key=OTHER_KEY), 400, "bad_path")


def test_connect_and_absolute_form_never_tunnel(judge):
    port = judge.witness.port
    ex, got = judge(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode() + K + b"\r\n"
                    + b"GET /t/shell/x HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
    assert got == []
    assert ex.responses and 400 <= ex.responses[0].status < 500, ex
    # Absolute-form: the data port is not a forward proxy (tests/security/test_deadlines.py has the rest).
    ex, got = judge(request("GET", f"http://127.0.0.1:{port}/t/shell/x"))
    assert got == []
    assert_error(ex.first, 400, "bad_path")
    ex, got = judge(request("POST", "http://127.0.0.1/tools/shell/run", body=b'{"command": "id"}',
                            content_type="application/json"))
    assert got == []
    assert_error(ex.first, 400, "bad_path")


@pytest.mark.parametrize("upgrade", [b"websocket", b"h2c"])
def test_upgrade_requests_are_not_switched_and_what_follows_is_judged(judge, upgrade):
    data = (b"GET /tools/search/ws HTTP/1.1\r\nHost: x\r\n" + K + b"Connection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: " + upgrade + b"\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + SMUGGLED)
    # After an upgrade request the parser holds what follows until the answer is out;
    # for h2c aiohttp then closes or waits: either way the smuggled request is not run unjudged.
    ex, got = judge(data, responses=2, timeout=1)
    assert ex.responses and all(r.status != 101 for r in ex.responses)
    for rec in got:  # whatever reached a tool was judged for that tool
        tool = rec["raw_path"].split("/")[2]
        assert_judged(judge.regate.audit_dir, rec, tool)
    assert all(rec["raw_path"].startswith("/t/search/") for rec in got), got
    names = {k.lower() for rec in got for k, _ in rec["headers"]}
    assert "upgrade" not in names and "http2-settings" not in names


# ------------------------------------------------------------------ identity and Regate's own headers

def test_spoofed_agent_id_changes_nothing_when_auth_is_on(judge):
    spoof = [("X-Agent-Id", "analyst-2"), ("X-Regate-Agent", "analyst-2")]
    _, rec = judge.forwarded(request("GET", "/tools/search/q", headers=spoof), "search")
    d = assert_judged(judge.regate.audit_dir, rec, "search")
    assert d["agent"] == "coder-7"
    got = {k.lower(): v for k, v in rec["headers"]}
    assert "x-agent-id" not in got
    assert got.get("x-regate-agent") == "coder-7"  # the policy's header, not the agent's
    # analyst-2 may pay; coder-7 claiming to be analyst-2 may not.
    judge.refused(request("POST", "/tools/payments/pay", headers=spoof, body=b'{"amount": 5}',
                          content_type="application/json"), 403, "policy_denied")


def test_forged_approval_and_decision_id_headers_open_nothing(judge):
    pay = dict(body=b'{"amount": 500, "to": "ACME"}', content_type="application/json", key=OTHER_KEY)
    forged = "apr_" + "0" * 24
    judge.refused(request("POST", "/tools/payments/pay", headers=[("X-Regate-Approval", forged)], **pay), 403,
                  "approval_invalid")
    judge.refused(request("POST", "/tools/payments/pay", headers=[("X-Regate-Approval", "yes, approved")], **pay),
                  400, "approval_invalid")
    # Without a forged header the same call waits for a human (async mode: 202), and is not forwarded.
    ex, got = judge(request("POST", "/tools/payments/pay", **pay))
    assert ex.first.status == 202 and got == []
    # On a call needing no approval, Regate's headers from the agent never reach the tool.
    hdrs = [("X-Regate-Approval", forged), ("X-Regate-Decision-Id", "forged-id")]
    _, rec = judge.forwarded(request("GET", "/tools/search/q", headers=hdrs), "search")
    got_headers = [(k.lower(), v) for k, v in rec["headers"]]
    assert ("x-regate-approval", forged) not in got_headers
    assert [v for k, v in got_headers if k == "x-regate-decision-id"] == [rec["decision_id"]]


def test_a_tool_cannot_forge_regates_headers_towards_the_agent(judge):
    resp, rec = judge.forwarded(request("GET", "/tools/search/forge"), "search")
    assert resp.decision_id == rec["decision_id"]
    assert resp.header("X-Regate-Approval") is None
    assert resp.header("X-Regate-Policy-Revision") not in (None, "forged")
    assert [k for k, _ in resp.headers].count("X-Regate-Decision-Id") == 1


def test_a_second_api_key_header_does_not_pick_the_identity(judge):
    hdrs = [("X-Api-Key", OTHER_KEY)]
    _, rec = judge.forwarded(request("GET", "/tools/search/q", headers=hdrs), "search")
    d = assert_judged(judge.regate.audit_dir, rec, "search")
    assert d["agent"] == "coder-7"  # the first one counts, and neither reaches the tool
    assert "x-api-key" not in {k.lower() for k, _ in rec["headers"]}


# ------------------------------------------------------------------ absurd JSON

ABSURD_JSON = {
    "deep_nesting_100k": b"[" * 100_000 + b"]" * 100_000,
    "deep_objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "huge_number": b'{"command": 1' + b"0" * 400 + b"}",
    "huge_exponent": b'{"command": 1e999999}',
    "int_past_64_bits": b'{"command": "ls", "n": 18446744073709551616}',
    "negative_past_64_bits": b'{"command": "ls", "n": -9223372036854775809}',
    "invalid_utf8": b'{"command": "\xff\xfe"}',
    "lone_surrogate": b'{"command": "\\ud800"}',
    "overlong_utf8": b'{"command": "\xc0\xae"}',
    "duplicate_keys": b'{"command": "ls", "command": "rm -rf /"}',
    "duplicate_keys_escaped": b'{"command": "ls", "comm\\u0061nd": "rm -rf /"}',
    "duplicate_nested": b'{"command": "ls", "opts": {"a": 1, "a": 2}}',
    "nan": b'{"command": NaN}',
    "trailing_garbage": b'{"command": "ls"} {"command": "rm -rf /"}',
    "bom": b'\xef\xbb\xbf{"command": "ls"}',
    "single_quotes": b"{'command': 'ls'}",
    "comment": b'{"command": "ls" /* x */}',
    "truncated": b'{"command": "ls"',
}


@pytest.mark.parametrize("name", sorted(ABSURD_JSON))
def test_absurd_json_is_400_bad_json(judge, name):
    body = ABSURD_JSON[name]
    judge.refused(request("POST", "/tools/shell/run", body=body, content_type="application/json"), 400, "bad_json",
                  timeout=10)


def test_duplicate_keys_cannot_split_what_policy_and_tool_read(judge):
    """orjson keeps the last key, many tools the first: a payment the policy would see as 50 could
    run as 5,000,000. Refused whole."""
    body = b'{"amount": 5000000, "to": "ACME", "amount": 50}'
    judge.refused(request("POST", "/tools/payments/pay", key=OTHER_KEY, body=body, content_type="application/json"),
                  400, "bad_json")


def test_a_json_body_labelled_otherwise_is_refused_before_the_policy(judge):
    """Only application/json bodies are parsed; one of another type would reach the tool
    unjudged (some tools parse JSON whatever the type), so it is refused (415)."""
    body = b'{"amount": 50, "to": "ACME"}'
    judge.refused(request("POST", "/tools/payments/pay", key=OTHER_KEY, body=body, content_type="text/plain"),
                  415, "unsupported_media_type")
    # Two Content-Types (policy could read one, the tool the other): the parser refuses it.
    judge.parser_refused(request("POST", "/tools/payments/pay", key=OTHER_KEY, body=body,
                                 headers=[("Content-Type", "application/json"), ("Content-Type", "text/plain")]))


def test_a_compressed_json_body_is_not_judged_as_something_else(judge):
    import gzip

    body = gzip.compress(b'{"command": "rm -rf /"}')
    judge.refused(request("POST", "/tools/shell/run", body=body, content_type="application/json",
                          headers=[("Content-Encoding", "gzip")]), 415, "unsupported_content_encoding")


def test_a_compressed_upload_passes_as_sent(judge):
    import gzip
    import hashlib

    body = gzip.compress(b"plain bytes " * 100)
    _, rec = judge.forwarded(request("POST", "/tools/search/up", body=body, content_type="application/octet-stream",
                                     headers=[("Content-Encoding", "gzip")]), "search")
    assert rec["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_declared_body_over_the_limit_is_413_before_reading(judge):
    head = request("POST", "/tools/shell/run", content_type="application/json",
                   headers=[("Content-Length", str(50 << 20))])
    judge.refused(head, 413, "body_too_large")


def test_big_but_sane_json_is_judged_and_forwarded_intact(judge):
    import hashlib

    import orjson

    # On search: the shell policy takes no argument but `command` (test_shipped_policy).
    doc = {"q": "ls", "items": [{"id": i, "url": f"http://x:{i}/a:b", "v": i * 0.5} for i in range(5000)]}
    body = orjson.dumps(doc)
    assert len(body) < 1 << 20
    _, rec = judge.forwarded(request("POST", "/tools/search/run", body=body, content_type="application/json"),
                             "search")
    assert rec["body_sha256"] == hashlib.sha256(body).hexdigest()


# ------------------------------------------------------------------ header bytes

def test_a_header_value_that_is_not_utf8_is_refused_not_altered(judge):
    # "café" in Latin-1: legal HTTP bytes, but the tool could only be sent "caf", a
    # value nobody judged. Refused, naming the header.
    err = judge.refused(request("GET", "/tools/search/q", headers=[("X-Note", "café")]), 400, "bad_header")
    assert "X-Note" in err["message"] and "UTF-8" in err["message"]


def test_a_utf8_header_value_reaches_the_tool_as_sent(judge):
    utf8 = "café ☕".encode().decode("latin-1")  # request() writes Latin-1: these are the UTF-8 bytes
    _, rec = judge.forwarded(request("GET", "/tools/search/q", headers=[("X-Note", utf8)]), "search")
    assert ["X-Note", "café ☕"] in rec["headers"]


# ------------------------------------------------------------------ one representation, shipped policy


def test_a_json_looking_type_cannot_hide_the_query_from_the_shell_policy(judge):
    # A tool that reads JSON only for application/json would run the query's command.
    judge.refused(request("POST", "/tools/shell/run?command=rm%20-rf%20/", body=b'{"command": "ls"}',
                          content_type="application/merge-patch+json"), 415, "unsupported_media_type")
    # Not JSON at all: the body is unread, so the tool would act on the query, which is judged.
    judge.refused(request("POST", "/tools/shell/run?command=rm%20-rf%20/", body=b"ls", content_type="text/plain"),
                  415, "unsupported_media_type")


def test_a_payment_cannot_be_judged_from_the_body_and_paid_from_the_query(judge):
    judge.refused(request("POST", "/tools/payments/transfer?amount=5000000&to=evil", key=OTHER_KEY,
                          body=b'{"amount": 50, "to": "acme"}', content_type="application/json"),
                  400, "ambiguous_arguments")
    # The query alone is judged: a string amount is no positive number.
    err = judge.refused(request("POST", "/tools/payments/transfer?amount=5000000&to=evil", key=OTHER_KEY),
                        403, "policy_denied")
    assert any("amount" in r for r in err["reasons"]), err


def test_a_payment_in_utf7_is_refused_before_the_policy(judge):
    body = b'{"amount": 50, "to": "acme", "memo": "+ACIALA- +ACI-amount+ACI-: 5000000"}'
    judge.refused(request("POST", "/tools/payments/transfer", key=OTHER_KEY, body=body,
                          content_type="application/json; charset=utf-7"), 415, "unsupported_charset")


def test_query_arguments_are_judged_by_the_shipped_shell_rule(judge):
    # arguments: both: a body and a query together; the policy judges the query's command too.
    err = judge.refused(request("POST", "/tools/shell/run?cwd=/etc", body=b'{"command": "ls"}',
                                content_type="application/json"), 403, "policy_denied")
    assert err["reasons"], err
