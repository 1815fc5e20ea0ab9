"""Judged = executed: the arguments a tool parses are the arguments the policy judged.

A Regate in front of the witness runs a policy that allows every call and hands the
tool, in `X-Judged`, exactly what it was given to judge (`input.request.arguments`,
`query`, `headers`). For each hostile request the test either sees Regate refuse it
(4xx, Regate's JSON error, nothing reached the tool) or reads the raw bytes the
witness received and parses them as several real tools would:

- strict: JSON only for exactly `application/json`, decoded with the declared charset
  (as a tool honouring `charset=` does), otherwise the query string;
- lenient: JSON for any media type that mentions json, otherwise the query string;
- merging: query string and JSON body together (Flask's `request.values` style).

Every one of them must see the judged arguments. Headers: the tool must receive the
headers the policy saw (credentials aside), and none of the identity headers Regate
drops.
"""

from __future__ import annotations

import base64
import codecs
import json
from pathlib import Path
from urllib.parse import parse_qsl

import orjson
import pytest

from tests.security.conftest import Judge, assert_error, exchange, request
from tests.support.procs import RegateProcess

ECHO_POLICY = """package regate

decision := {
	"allow": true,
	"headers": {"set": {"X-Judged": base64.encode(json.marshal({
		"arguments": input.request.arguments,
		"query": input.request.query,
		"headers": input.request.headers,
	}))}},
}
"""

BASE = {"timeout_ms": 5000}
TOOLS = {
    # arguments: both (the default): a JSON body and the query together.
    "both": {},
    "body": {"arguments": "body", "content_types": ["application/json"], "methods": ["POST"]},
    "strip": {"arguments": "body", "unexpected_query": "strip"},
    "query": {"arguments": "query"},
    "safe": {"json_integers": "safe"},
    "canonical": {"forward_body": "canonical"},
    "patch": {"json_types": ["application/merge-patch+json"]},
    "fwd": {"pass_headers": ["Forwarded"]},
    "form": {"content_types": ["application/x-www-form-urlencoded", "application/json"]},
    "upload": {"unread_body": "forward"},
    "repeat": {"repeated_query_keys": "list"},
}


@pytest.fixture(scope="module")
def judged(witness, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("representation")
    rego = tmp / "rego"
    rego.mkdir()
    (rego / "echo.rego").write_text(ECHO_POLICY)
    data = tmp / "data"
    data.mkdir()
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(rego), "data": str(data)},
        "limits": {"enabled": False},
        "tools": [{"name": name, "upstream": witness.upstream(name), **BASE, **extra}
                  for name, extra in TOOLS.items()],
        "audit": {"dir": str(tmp / "audit"), "fsync": "never"},
    }
    proc = RegateProcess(cfg, tmp)
    proc.audit_dir = tmp / "audit"
    yield Judge(proc, witness)
    proc.stop()


# ------------------------------------------------------------------ how tools parse


def _header(rec: dict, name: str) -> str | None:
    for k, v in rec["headers"]:
        if k.lower() == name.lower():
            return v
    return None


def _media(ct: str | None) -> tuple[str, str]:
    if not ct:
        return "", "utf-8"
    kind, _, rest = ct.partition(";")
    charset = "utf-8"
    for p in rest.split(";"):
        k, _, v = p.partition("=")
        if k.strip().lower() == "charset":
            charset = v.strip().strip('"')
    return kind.strip().lower(), charset


def _query_of(rec: dict) -> dict:
    raw = rec["raw_path"].partition("?")[2]
    out: dict = {}
    for k, v in parse_qsl(raw, keep_blank_values=True):
        out.setdefault(k, []).append(v)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def _json_of(rec: dict, charset: str) -> object:
    raw = base64.b64decode(rec["body_b64"])
    return json.loads(codecs.decode(raw, charset)) if raw else None


def tool_views(rec: dict) -> dict[str, object]:
    """The arguments each kind of tool would act on, from the raw bytes it received."""
    kind, charset = _media(_header(rec, "Content-Type"))
    query = _query_of(rec)
    body = _json_of(rec, charset) if kind == "application/json" else None
    lenient = _json_of(rec, charset) if "json" in kind else None
    merged = dict(query)
    if isinstance(lenient, dict):
        merged.update(lenient)
    return {
        "strict": body if body is not None else query,
        "lenient": lenient if lenient is not None else query,
        "merging": merged if (query or lenient is None) else lenient,
    }


def judged_view(rec: dict) -> dict:
    return orjson.loads(base64.b64decode(_header(rec, "X-Judged")))


def assert_judged_is_parsed(rec: dict) -> dict:
    """Every argument any of the tools acts on was judged, with the value it acts on;
    the merging tool (which reads every place) acts on exactly what was judged."""
    judged = judged_view(rec)
    args = judged["arguments"]
    for model, parsed in tool_views(rec).items():
        if args is None:  # nothing judged: the tool must find nothing either
            assert parsed in (None, {}), (model, parsed)
        elif model == "merging" or not isinstance(parsed, dict) or not isinstance(args, dict):
            assert parsed == args, f"{model} tool parsed {parsed!r}, the policy judged {args!r}"
        else:
            for key, value in parsed.items():
                assert key in args and args[key] == value, \
                    f"{model} tool acts on {key}={value!r}, the policy judged {args!r}"
    return judged


def post(tool: str, body: bytes, content_type: str | None, query: str = "", **kw) -> bytes:
    path = f"/tools/{tool}/run" + (f"?{query}" if query else "")
    return request("POST", path, body=body, content_type=content_type, **kw)


# ------------------------------------------------------------------ content type and charset


@pytest.mark.parametrize("ctype", [
    "application/merge-patch+json", "application/vnd.api+json", "text/json", "application/x-json",
    "application/json-patch+json", "APPLICATION/JSON+X",
])
def test_json_looking_types_are_refused_unless_the_tool_opts_in(judged, ctype):
    # The attack: a tool that reads JSON only for application/json reads the query.
    data = post("both", b'{"command": "ls"}', ctype, "command=rm%20-rf%20/")
    err = judged.refused(data, 415, "unsupported_media_type")
    assert "application/json" in err["message"]


def test_an_opted_in_json_type_is_judged_as_json(judged):
    resp, rec = judged.forwarded(post("patch", b'{"command": "ls"}', "application/merge-patch+json"), "patch")
    assert judged_view(rec)["arguments"] == {"command": "ls"}


@pytest.mark.parametrize("charset", ["utf-7", "UTF-16", "utf-32", "iso-8859-1", "latin1", "cp1252", "utf-16le"])
def test_a_json_body_in_another_charset_is_refused(judged, charset):
    # UTF-7 hides `", "amount": 5000000` in a memo that UTF-8 reads as text.
    memo = '", "amount": 5000000, "x": "'
    body = ('{"amount": 50, "memo": "' + memo + '"}').encode("utf-8")
    err = judged.refused(post("both", body, f"application/json; charset={charset}"), 415, "unsupported_charset")
    assert charset.lower() in err["message"].lower()


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", 'application/json; charset="UTF-8"',
                                   "application/json;charset=utf8", "application/json"])
def test_utf8_spelt_any_way_is_accepted(judged, ctype):
    resp, rec = judged.forwarded(post("both", '{"q": "café"}'.encode(), ctype), "both")
    assert assert_judged_is_parsed(rec)["arguments"] == {"q": "café"}


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8; charset=utf-7",
                                   "application/json, text/plain", "application/json; charset",
                                   "application/json; charset=\"utf-8", "json"])
def test_a_content_type_two_parsers_could_read_apart_is_refused(judged, ctype):
    judged.refused(post("both", b'{"a": 1}', ctype), 400, "bad_header")


@pytest.mark.parametrize("body", [
    b"\xef\xbb\xbf{\"amount\": 50}",                      # UTF-8 byte order mark
    '{"amount": 50}'.encode("utf-16"),                  # UTF-16 with its BOM
    '{"amount": 50}'.encode("utf-16-le"),               # UTF-16 without
    '{"amount": 50}'.encode("utf-32-be"),
    b'{"memo": "\xe9t\xe9"}',                           # latin-1 bytes, not UTF-8
])
def test_a_json_body_that_is_not_utf8_is_refused(judged, body):
    judged.refused(post("both", body, "application/json"), 400, "bad_json")


@pytest.mark.parametrize("ctype,body", [
    ("application/x-www-form-urlencoded", b"amount=5000000&to=evil"),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=\"amount\"\r\n\r\n5\r\n--x--\r\n"),
])
def test_form_bodies_carry_arguments_the_policy_does_not_read(judged, ctype, body):
    judged.refused(post("both", body, ctype), 415, "unsupported_media_type")


def test_a_tool_may_declare_form_bodies(judged):
    # The operator listed the form type: it passes, unjudged, as the operator decided.
    resp, rec = judged.forwarded(post("form", b"a=1", "application/x-www-form-urlencoded"), "form")
    assert base64.b64decode(rec["body_b64"]) == b"a=1"


def test_content_types_and_methods_are_enforced_before_the_policy(judged):
    err = judged.refused(post("body", b"command=ls", "text/plain"), 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    ex, got = judged(request("GET", "/tools/body/run"))
    assert_error(ex.first, 405, "method_not_allowed")
    assert ex.first.header("Allow") == "POST"
    assert got == []


# ------------------------------------------------------------------ argument sources


def test_a_key_in_the_query_and_the_body_is_ambiguous(judged):
    data = post("both", b'{"amount": 50}', "application/json", "amount=5000000&to=evil")
    err = judged.refused(data, 400, "ambiguous_arguments")
    assert "'amount'" in err["message"]


def test_query_and_body_are_judged_together(judged):
    resp, rec = judged.forwarded(post("both", b'{"amount": 50}', "application/json", "to=alice"), "both")
    assert assert_judged_is_parsed(rec)["arguments"] == {"amount": 50, "to": "alice"}


@pytest.mark.parametrize("ctype,body", [
    ("text/plain", b'{"command": "rm -rf /"}'),            # aiohttp's request.json() parses it anyway
    (None, b'{"command": "rm -rf /"}'),
    ("application/octet-stream", b'{"command": "rm -rf /"}'),
])
def test_a_body_the_policy_cannot_read_is_refused_where_arguments_come_from_it(judged, ctype, body):
    err = judged.refused(post("both", body, ctype, "command=ls"), 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    judged.refused(post("body", body, ctype), 415, "unsupported_media_type")


def test_a_tool_that_takes_unread_bodies_gets_them_and_the_query_is_judged(judged):
    # The demo tool's shape: text/plain is not parsed, so the query is what it acts on.
    resp, rec = judged.forwarded(post("upload", b"ls", "text/plain", "command=rm%20-rf%20/"), "upload")
    assert assert_judged_is_parsed(rec)["arguments"] == {"command": "rm -rf /"}
    assert base64.b64decode(rec["body_b64"]) == b"ls"


def test_a_repeated_query_key_is_refused(judged):
    # Starlette takes the last, Flask the first, Express all of them.
    err = judged.refused(request("GET", "/tools/both/x?to=alice&to=evil"), 400, "ambiguous_arguments")
    assert "'to'" in err["message"]


def test_a_tool_may_take_repeated_keys_judged_with_every_value(judged):
    resp, rec = judged.forwarded(request("GET", "/tools/repeat/x?to=alice&to=evil&n=1"), "repeat")
    seen = judged_view(rec)
    assert seen["arguments"] == {"to": ["alice", "evil"], "n": "1"}
    assert seen["query"] == {"to": ["alice", "evil"], "n": ["1"]}
    # Whatever a tool takes (first, last, all), the policy saw it.
    assert _query_of(rec)["to"] == ["alice", "evil"]


@pytest.mark.parametrize("query", ["amount[]=1", "to[name]=evil", "a%5Bb%5D=1", "__proto__[admin]=1",
                                   "__proto__=1", "=evil", "constructor=x"])
def test_query_keys_parsers_read_as_structure_or_drop_are_refused(judged, query):
    # Express's qs reads `to[name]=evil` as {"to": {"name": "evil"}} and drops `__proto__`.
    judged.refused(request("GET", f"/tools/both/x?{query}"), 400, "ambiguous_arguments")


def test_more_query_parameters_than_tools_keep_are_refused(judged):
    # Express and njs keep the first 1000.
    query = "&".join(f"k{i}=v" for i in range(1001))
    err = judged.refused(request("GET", f"/tools/both/x?{query}"), 400, "bad_query")
    assert "1000" in err["message"]
    resp, rec = judged.forwarded(request("GET", "/tools/both/x?" + "&".join(f"k{i}=v" for i in range(150))), "both")
    assert len(judged_view(rec)["arguments"]) == 150


def test_a_body_tool_refuses_a_query(judged):
    err = judged.refused(post("body", b'{"command": "ls"}', "application/json", "command=rm"), 400,
                         "ambiguous_arguments")
    assert "query" in err["message"]


def test_a_body_tool_may_strip_the_query_instead(judged):
    resp, rec = judged.forwarded(post("strip", b'{"command": "ls"}', "application/json", "command=rm"), "strip")
    assert "?" not in rec["raw_path"]
    assert assert_judged_is_parsed(rec)["arguments"] == {"command": "ls"}


def test_a_query_tool_refuses_a_json_body(judged):
    judged.refused(post("query", b'{"command": "rm"}', "application/json", "command=ls"), 400,
                   "ambiguous_arguments")
    resp, rec = judged.forwarded(request("GET", "/tools/query/x?command=ls"), "query")
    assert assert_judged_is_parsed(rec)["arguments"] == {"command": "ls"}


# ------------------------------------------------------------------ the query is decoded once


@pytest.mark.parametrize("query,expected", [
    ("cmd=%2526", {"cmd": "%26"}),
    ("path=%252e%252e%252fetc", {"path": "%2e%2e%2fetc"}),
    ("url=https://allowed.example%252F@evil.example/", {"url": "https://allowed.example%2F@evil.example/"}),
    ("q=a+b&r=%2B", {"q": "a b", "r": "+"}),
])
def test_the_query_is_judged_as_tools_decode_it(judged, query, expected):
    resp, rec = judged.forwarded(request("GET", f"/tools/both/x?{query}"), "both")
    assert assert_judged_is_parsed(rec)["arguments"] == expected


@pytest.mark.parametrize("query", ["q=%zz", "q=%", "q=%FF%FE", "q=%c0%af"])
def test_a_query_decoders_repair_differently_is_refused(judged, query):
    judged.refused(request("GET", f"/tools/both/x?{query}"), 400, "bad_query")


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("number", [str(2**63), str(2**64 - 1), str(-(2**63)), str(2**64), "1e19"])
def test_integers_outside_int64_are_refused(judged, number):
    judged.refused(post("both", f'{{"amount": {number}}}'.encode(), "application/json"), 400, "bad_json")


def test_the_largest_int64_passes_exactly(judged):
    n = 2**63 - 1
    resp, rec = judged.forwarded(post("both", f'{{"amount": {n}}}'.encode(), "application/json"), "both")
    assert assert_judged_is_parsed(rec)["arguments"] == {"amount": n}


@pytest.mark.parametrize("number", [str(2**53), str(2**53 + 1), str(-(2**53))])
def test_a_safe_integer_tool_refuses_what_javascript_would_round(judged, number):
    err = judged.refused(post("safe", f'{{"amount": {number}}}'.encode(), "application/json"), 400, "bad_json")
    assert "2**53" in err["message"]


def test_a_safe_integer_tool_takes_the_safe_range(judged):
    resp, rec = judged.forwarded(post("safe", f'{{"amount": {2**53 - 1}}}'.encode(), "application/json"), "safe")
    assert judged_view(rec)["arguments"] == {"amount": 2**53 - 1}


# ------------------------------------------------------------------ canonical bytes


def test_canonical_forwarding_sends_the_bytes_that_were_judged(judged):
    sent = b'{ "command" : "l\\u0073", "n": 1.50 }'
    resp, rec = judged.forwarded(post("canonical", sent, "application/json; charset=utf-8"), "canonical")
    got = base64.b64decode(rec["body_b64"])
    assert got == b'{"command":"ls","n":1.5}'
    assert _header(rec, "Content-Type") == "application/json"
    assert assert_judged_is_parsed(rec)["arguments"] == {"command": "ls", "n": 1.5}


def test_as_sent_forwarding_keeps_the_agents_bytes(judged):
    sent = b'{ "command" : "l\\u0073" }'
    resp, rec = judged.forwarded(post("both", sent, "application/json"), "both")
    assert base64.b64decode(rec["body_b64"]) == sent
    assert assert_judged_is_parsed(rec)["arguments"] == {"command": "ls"}


# ------------------------------------------------------------------ headers a tool receives


IDENTITY = [
    ("Remote-User", "root"), ("X-Forwarded-User", "admin"), ("X-Forwarded-Email", "ceo@example.com"),
    ("X-Forwarded-Groups", "admins"), ("X-Auth-Request-User", "admin"), ("Forwarded", "for=10.0.0.1;by=proxy"),
    ("X-Real-IP", "10.0.0.1"), ("True-Client-IP", "10.0.0.1"), ("X-HTTP-Method-Override", "DELETE"),
    ("X-Method-Override", "DELETE"), ("X-Original-URL", "/admin/delete"), ("X-Rewrite-URL", "/admin"),
    ("X-Forwarded-Prefix", "/admin"),
]


def test_identity_and_override_headers_never_reach_the_tool(judged):
    headers = IDENTITY + [("X-Forwarded-For", "10.9.8.7"), ("Authorization", "Bearer tool-token"),
                          ("Cookie", "s=1"), ("X-Trace", "t1")]
    resp, rec = judged.forwarded(request("GET", "/tools/both/x", headers=headers), "both")
    got = {k.lower(): v for k, v in rec["headers"]}
    for name, _ in IDENTITY:
        assert name.lower() not in got, name
    # Only the address Regate saw, not the chain the agent claimed.
    assert got["x-forwarded-for"] == "127.0.0.1"
    # The tool's own credentials pass; so does everything else the agent sent.
    assert got["authorization"] == "Bearer tool-token" and got["cookie"] == "s=1" and got["x-trace"] == "t1"
    seen = judged_view(rec)["headers"]
    assert "authorization" not in seen and "cookie" not in seen and "x-api-key" not in seen
    # The policy saw what the tool got (less credentials, and what Regate itself sets).
    regate_set = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-regate-decision-id",
                  "x-judged", "authorization", "cookie", "content-length", "connection"}
    assert {k for k in got if k not in regate_set} == {k for k in seen if k not in regate_set}


def test_a_tool_may_opt_into_an_identity_header(judged):
    resp, rec = judged.forwarded(request("GET", "/tools/fwd/x", headers=[("Forwarded", "for=10.0.0.1")]), "fwd")
    assert _header(rec, "Forwarded") == "for=10.0.0.1"
    assert judged_view(rec)["headers"]["forwarded"] == "for=10.0.0.1"


def test_regate_still_answers(judged):
    ex = exchange(judged.regate.port, request("GET", "/tools/both/alive"))
    assert ex.first.status == 200
