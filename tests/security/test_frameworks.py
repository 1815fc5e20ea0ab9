"""Judged = executed, against real tool frameworks (issue 26).

Real tool servers — aiohttp, Starlette on uvicorn (h11 and httptools), Flask on
gunicorn, Node's `http` — each echo, as JSON, what their own framework parsed from
the request: the path as the framework exposes it (decoded), the query through the
framework's own query APIs (the multi-valued view and the dict view tools index), the
JSON body as the framework parses it (aiohttp's and Starlette's `request.json()`
whatever the Content-Type, Flask's `get_json(silent=True)` and `get_json(force=True)`,
Node's `JSON.parse`), forms, and the Content-Type. One Regate sits in front of all of
them with a policy that allows every call and hands the tool what it judged (the
`X-Judged` header, see ECHO_POLICY), so one response holds both sides.

For every (request shape, server), sent as raw bytes: Regate refuses the call (a 4xx
in Regate's JSON error shape), or the server parsed exactly what the policy judged —
the query (the framework's multi-valued view equals `input.request.query`, every key
of its dict view is in `input.request.arguments` with the value it gives), the path
(the judged path with the route prefix removed), the JSON body (equal to
`input.request.body` whenever the framework parses one), the Content-Type, and every
argument the tool would act on is in `input.request.arguments` with that value. A
response the framework itself makes without running the handler (a redirect, its own
400) is a tool that acted on nothing; it is allowed and counted.

Tools: one per server with default settings, one with `arguments: query` (`<server>_q`)
and one with `json_integers: safe` (`<server>_safe`). Node's tools all declare
`json_integers: safe`, as the README tells JavaScript tools to (JSON.parse rounds
integers past 2**53).
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import signal
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import AGENT_KEY
from tests.security.conftest import ERROR_KEYS, exchange, request
from tests.support.procs import Process, RegateProcess, free_port

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent / "frameworks"

ECHO_POLICY = """package regate

decision := {
	"allow": true,
	"headers": {"set": {"X-Judged": base64.encode(json.marshal({
		"path": input.request.path,
		"query": input.request.query,
		"body": input.request.body,
		"arguments": input.request.arguments,
		"content_type": object.get(input.request.headers, "content-type", null),
	}))}},
}
"""

# ------------------------------------------------------------------ the servers


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


# name -> (command for a port, extra environment). Every server listens on 127.0.0.1 only.
SERVERS: dict[str, Callable[[int], tuple[list[str], dict[str, str]]]] = {
    "aiohttp": lambda port: (_python(str(HERE / "aiohttp_echo.py"), str(port)), {}),
    "starlette_h11": lambda port: (_python(
        "-m", "uvicorn", "tests.security.frameworks.starlette_echo:app", "--http", "h11",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log",
        "--h11-max-incomplete-event-size", str(1 << 20)), {"ECHO_HTTP": "h11"}),
    "starlette_httptools": lambda port: (_python(
        "-m", "uvicorn", "tests.security.frameworks.starlette_echo:app", "--http", "httptools",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"),
        {"ECHO_HTTP": "httptools"}),
    "flask": lambda port: (_python(
        "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "1", "--log-level", "warning",
        # The judged view travels in a header; a 1000-key query makes it large.
        "--limit-request-line", "8190", "--limit-request-field_size", str(1 << 20),
        "tests.security.frameworks.flask_echo:app"), {}),
    "node": lambda port: (["node", str(HERE / "node_echo.js"), str(port)], {}),
}
# What each server calls itself in its echo.
ECHO_NAME = {"aiohttp": "aiohttp", "starlette_h11": "starlette-h11", "starlette_httptools": "starlette-httptools",
             "flask": "flask", "node": "node"}


def _available(name: str) -> str | None:
    if name == "node":
        return None if shutil.which("node") else "node is not installed"
    for module in {"starlette_h11": ("starlette", "uvicorn", "h11"),
                   "starlette_httptools": ("starlette", "uvicorn", "httptools"),
                   "flask": ("flask", "gunicorn")}.get(name, ()):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[test]')"
    return None


@dataclass
class Server:
    name: str
    url: str
    proc: Process

    def count(self) -> int:
        with urllib.request.urlopen(self.url + "/_count", timeout=5) as r:
            return json.loads(r.read())["n"]


@pytest.fixture(scope="module")
def servers():
    started: dict[str, Server] = {}
    missing = {}
    try:
        for name, command in SERVERS.items():
            why = _available(name)
            if why is not None:
                missing[name] = why
                continue
            port = free_port()
            cmd, env = command(port)
            url = f"http://127.0.0.1:{port}"
            started[name] = Server(name, url, Process(cmd, f"{url}/_count", env=env))
        if missing:
            pytest.fail(f"tool frameworks missing: {missing}")
        yield started
    finally:
        for server in started.values():
            server.proc.stop(signal.SIGTERM, timeout=5)


def _tools(server: str, url: str) -> list[dict]:
    base: dict[str, Any] = {"upstream": url, "timeout_ms": 5000}
    if server == "node":
        base["json_integers"] = "safe"
    return [{"name": server, **base},
            {"name": f"{server}_q", **base, "arguments": "query"},
            {"name": f"{server}_safe", **base, "json_integers": "safe"}]


@pytest.fixture(scope="module")
def regate(servers, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frameworks")
    rego = tmp / "rego"
    rego.mkdir()
    (rego / "echo.rego").write_text(ECHO_POLICY)
    (tmp / "data").mkdir()
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(rego), "data": str(tmp / "data")},
        "limits": {"enabled": False},
        "tools": [t for name, s in servers.items() for t in _tools(name, s.url)],
        "audit": {"dir": str(tmp / "audit"), "fsync": "never"},
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()


# ------------------------------------------------------------------ request shapes


@dataclass(frozen=True)
class Shape:
    name: str
    build: Callable[[str], bytes]  # the route prefix (/tools/<tool>) -> the raw request
    tool: str = ""                 # "" (the default tool), "_q" or "_safe"
    expect: str | None = None      # "refused" / "forwarded" where the README says which; None: either


def get(target: str, headers: list[tuple[str, str]] | None = None) -> Callable[[str], bytes]:
    return lambda prefix: request("GET", prefix + target, headers=headers)


def post(target: str, body: bytes, ctype: str | None = "application/json",
         headers: list[tuple[str, str]] | None = None, method: str = "POST") -> Callable[[str], bytes]:
    return lambda prefix: request(method, prefix + target, body=body, content_type=ctype, headers=headers)


def raw(head: str, body: bytes = b"") -> Callable[[str], bytes]:
    """A request written out by hand; {p} is the route prefix, {key} the API key."""
    return lambda prefix: head.format(p=prefix, key=AGENT_KEY).replace("\n", "\r\n").encode("latin-1") + body


def chunked(body: bytes) -> bytes:
    return b"".join(f"{len(body[i:i + 7]):x}\r\n".encode() + body[i:i + 7] + b"\r\n"
                    for i in range(0, len(body), 7)) + b"0\r\n\r\n"


MULTIPART = (b'--x\r\nContent-Disposition: form-data; name="command"\r\n\r\nrm -rf /\r\n--x--\r\n')
THOUSAND = "&".join(f"k{i}=v" for i in range(1000))
R, F = "refused", "forwarded"

SHAPES = [
    # -- the query is decoded once, as tools decode it
    Shape("query_plain", get("/echo?cmd=ls&n=1"), expect=F),
    Shape("query_double_encoded_amp", get("/echo?cmd=%2526"), expect=F),
    Shape("query_double_encoded_dotdot", get("/echo?path=%252e%252e%252fetc"), expect=F),
    Shape("query_double_encoded_userinfo", get("/echo?url=https://allowed.example%252F@evil.example/"), expect=F),
    Shape("query_encoded_separators", get("/echo?a=1%26b%3D2"), expect=F),
    Shape("query_plus_vs_space", get("/echo?q=a+b&r=a%20b&s=%2B"), expect=F),
    Shape("query_plus_in_key", get("/echo?a+b=1"), expect=F),
    Shape("query_equals_in_value", get("/echo?a=b=c"), expect=F),
    Shape("query_semicolon", get("/echo?a=1;b=2")),
    Shape("query_key_without_value", get("/echo?flag")),
    Shape("query_empty_value", get("/echo?a=&b=1")),
    Shape("query_empty_pairs", get("/echo?&&a=1&&")),
    Shape("query_question_mark_only", get("/echo?")),
    Shape("query_question_mark_in_query", get("/echo?a=1?b=2")),
    Shape("query_utf8_encoded", get("/echo?name=caf%C3%A9"), expect=F),
    Shape("query_utf8_raw_bytes", get("/echo?name=caf\xc3\xa9")),
    Shape("query_nul", get("/echo?a=%00")),
    Shape("query_crlf", get("/echo?a=%0d%0aSet-Cookie:%20x")),
    Shape("query_encoded_key", get("/echo?%61mount=1"), expect=F),
    Shape("query_bom_in_value", get("/echo?a=%EF%BB%BFx")),
    # -- query shapes frameworks read differently
    Shape("query_repeated_key", get("/echo?to=alice&to=evil"), expect=R),
    Shape("query_repeated_key_encoded", get("/echo?to=alice&%74o=evil"), expect=R),
    Shape("query_repeated_key_plus", get("/echo?a+b=1&a%20b=2"), expect=R),
    Shape("query_keys_differ_in_case", get("/echo?to=a&TO=b")),
    Shape("query_bracket_array", get("/echo?a[]=1"), expect=R),
    Shape("query_bracket_object", get("/echo?to[name]=evil"), expect=R),
    Shape("query_bracket_encoded", get("/echo?a%5Bb%5D=1"), expect=R),
    Shape("query_proto_bracket", get("/echo?__proto__[admin]=1"), expect=R),
    Shape("query_proto_encoded", get("/echo?%5F%5Fproto%5F%5F=1"), expect=R),
    Shape("query_constructor", get("/echo?constructor=x"), expect=R),
    Shape("query_empty_key", get("/echo?=evil"), expect=R),
    Shape("query_dotted_key", get("/echo?a.b=1")),
    Shape("query_1000_params", get("/echo?" + THOUSAND), expect=F),
    Shape("query_1001_params", get("/echo?" + THOUSAND + "&k1000=v"), expect=R),
    # -- invalid escapes and bytes
    Shape("query_escape_zz", get("/echo?q=%zz"), expect=R),
    Shape("query_escape_ff", get("/echo?q=%ff"), expect=R),
    Shape("query_escape_latin1", get("/echo?q=caf%e9"), expect=R),
    Shape("query_lone_percent", get("/echo?q=100%"), expect=R),
    Shape("query_overlong_slash", get("/echo?q=%c0%af"), expect=R),
    Shape("query_iis_unicode", get("/echo?q=%u002e"), expect=R),
    Shape("query_encoded_surrogate", get("/echo?q=%ed%a0%80"), expect=R),
    # -- '#' in the target
    Shape("fragment_in_path", get("/echo/secret.key#.txt?x=1"), expect=R),
    Shape("fragment_before_query", get("/echo#x?cmd=rm"), expect=R),
    Shape("fragment_after_query", get("/echo?x=1#frag"), expect=R),
    Shape("fragment_encoded_in_path", get("/echo/a%23b")),
    # -- paths
    Shape("path_plain", get("/echo/a/b"), expect=F),
    Shape("path_no_rest", get("")),
    Shape("path_invalid_utf8", get("/echo/%FF")),
    Shape("path_latin1_escape", get("/echo/caf%e9")),
    Shape("path_utf8_encoded", get("/echo/caf%C3%A9")),
    Shape("path_utf8_raw_bytes", get("/echo/caf\xc3\xa9")),
    Shape("path_double_slash_leading", get("//echo//x")),
    Shape("path_double_slash_inner", get("/echo//x")),
    Shape("path_space_encoded", get("/echo/a%20b")),
    Shape("path_plus", get("/echo/a+b")),
    Shape("path_tilde_encoded", get("/echo/%7Euser")),
    Shape("path_question_encoded", get("/echo/a%3Fx=1")),
    Shape("path_dot_segment", get("/echo/./x"), expect=R),
    Shape("path_dotdot_encoded", get("/echo/%2e%2e/x"), expect=R),
    Shape("path_slash_encoded", get("/echo/a%2Fb"), expect=R),
    Shape("path_semicolon", get("/echo/a;x=1")),
    Shape("path_backslash", get("/echo/a\\..\\x"), expect=R),
    Shape("path_backslash_encoded", get("/echo/a%5C..%5Cx"), expect=R),
    Shape("path_fullwidth_dots", get("/echo/%EF%BC%8E%EF%BC%8E/x"), expect=R),
    Shape("path_double_encoded", get("/echo/%252e%252e/x"), expect=R),
    # -- JSON bodies read one way
    Shape("json_object", post("/run", b'{"command": "ls", "n": 1}'), expect=F),
    Shape("json_with_query", post("/run?to=alice", b'{"amount": 50}'), expect=F),
    Shape("json_key_in_query_and_body", post("/run?amount=5000000", b'{"amount": 50}'), expect=R),
    Shape("json_array", post("/run", b'[1, 2, "x"]'), expect=F),
    Shape("json_scalar", post("/run", b'"ls"'), expect=F),
    Shape("json_null", post("/run", b"null")),
    Shape("json_empty_body", post("/run", b"")),
    Shape("json_whitespace_only", post("/run", b"  \r\n ")),
    Shape("json_trailing_garbage", post("/run", b'{"a": 1} {"a": 2}'), expect=R),
    Shape("json_comment", post("/run", b'{"a": 1 /* x */}'), expect=R),
    Shape("json_duplicate_keys", post("/run", b'{"amount": 50, "amount": 5000000}'), expect=R),
    Shape("json_duplicate_keys_escaped", post("/run", b'{"amount": 50, "\\u0061mount": 5000000}'), expect=R),
    Shape("json_nested_duplicate", post("/run", b'{"a": {"b": 1, "b": 2}}'), expect=R),
    Shape("json_escaped_key", post("/run", b'{"\\u0061mount": 5}'), expect=F),
    Shape("json_proto_key", post("/run", b'{"__proto__": {"admin": true}, "x": 1}')),
    Shape("json_nul_in_string", post("/run", b'{"a": "x\\u0000y"}')),
    Shape("json_lone_surrogate", post("/run", b'{"a": "\\ud800"}')),
    Shape("json_nan", post("/run", b'{"a": NaN}'), expect=R),
    Shape("json_infinity", post("/run", b'{"a": Infinity}'), expect=R),
    Shape("json_huge_exponent", post("/run", b'{"a": 1e400}'), expect=R),
    Shape("json_floats", post("/run", b'{"a": 1.0, "b": 1e2, "c": -0, "d": 0.1, "e": 1e-400, "f": -1.5E+3}'),
          expect=F),
    Shape("json_float_long_digits", post("/run", b'{"pi": 3.14159265358979323846264338327950288}')),
    Shape("json_float_huge", post("/run", b'{"a": 1.5e300}'), expect=R),
    Shape("json_line_separator", post("/run", '{"a": "x\u2028y z"}'.encode())),
    Shape("json_too_deep", post("/run", b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}"), expect=R),
    Shape("json_on_get", post("/run", b'{"command": "ls"}', method="GET")),
    Shape("json_chunked", raw("POST {p}/run HTTP/1.1\nHost: regate.test\nX-Api-Key: {key}\n"
                              "Content-Type: application/json\nTransfer-Encoding: chunked\n"
                              "Connection: close\n\n", chunked(b'{"command": "ls", "n": 2}')), expect=F),
    # -- numbers every parser reads alike
    Shape("int_2_63_minus_1", post("/run", f'{{"n": {2**63 - 1}}}'.encode())),
    Shape("int_minus_2_63_plus_1", post("/run", f'{{"n": {-(2**63 - 1)}}}'.encode())),
    Shape("int_2_63", post("/run", f'{{"n": {2**63}}}'.encode()), expect=R),
    Shape("int_minus_2_63", post("/run", f'{{"n": {-(2**63)}}}'.encode()), expect=R),
    Shape("int_2_64_minus_1", post("/run", f'{{"n": {2**64 - 1}}}'.encode()), expect=R),
    Shape("int_2_64", post("/run", f'{{"n": {2**64}}}'.encode()), expect=R),
    Shape("float_1e19", post("/run", b'{"n": 1e19}'), expect=R),
    Shape("int_2_53_plus_1", post("/run", f'{{"n": {2**53 + 1}}}'.encode())),
    Shape("int_2_53_plus_1_safe", post("/run", f'{{"n": {2**53 + 1}}}'.encode()), tool="_safe", expect=R),
    Shape("int_minus_2_53_plus_1_safe", post("/run", f'{{"n": {-(2**53 + 1)}}}'.encode()), tool="_safe",
          expect=R),
    Shape("int_2_53_safe", post("/run", f'{{"n": {2**53}}}'.encode()), tool="_safe", expect=R),
    Shape("int_2_53_minus_1_safe", post("/run", f'{{"n": {2**53 - 1}}}'.encode()), tool="_safe", expect=F),
    # -- content types and charsets
    Shape("ctype_upper_case", post("/run", b'{"a": 1}', "APPLICATION/JSON"), expect=F),
    Shape("ctype_charset_utf8", post("/run", b'{"a": "caf\xc3\xa9"}', "application/json; charset=utf-8"), expect=F),
    Shape("ctype_charset_utf8_quoted", post("/run", b'{"a": 1}', 'application/json; charset="UTF-8"'), expect=F),
    Shape("ctype_extra_parameter", post("/run", b'{"a": 1}', "application/json; x=1")),
    Shape("ctype_charset_utf7", post("/run", b'{"amount": 50, "memo": "+ACIALAAi-amount+ACI-: 5000000"}',
                                     "application/json; charset=utf-7"), expect=R),
    Shape("ctype_charset_utf16", post("/run", '{"a": 1}'.encode("utf-16"), "application/json; charset=utf-16"),
          expect=R),
    Shape("ctype_charset_latin1", post("/run", b'{"a": "caf\xe9"}', "application/json; charset=iso-8859-1"),
          expect=R),
    Shape("ctype_charset_twice", post("/run", b'{"a": 1}', "application/json; charset=utf-8; charset=utf-7"),
          expect=R),
    Shape("ctype_list", post("/run", b'{"a": 1}', "application/json, text/plain"), expect=R),
    Shape("ctype_two_headers", post("/run", b'{"a": 1}', None, headers=[("Content-Type", "application/json"),
                                                                       ("Content-Type", "text/plain")]),
          expect=R),
    Shape("body_bom_utf8", post("/run", b'\xef\xbb\xbf{"a": 1}'), expect=R),
    Shape("body_utf16_undeclared", post("/run", '{"a": 1}'.encode("utf-16-le")), expect=R),
    Shape("body_utf32_undeclared", post("/run", '{"a": 1}'.encode("utf-32-be")), expect=R),
    Shape("body_latin1_bytes", post("/run", b'{"a": "caf\xe9"}'), expect=R),
    Shape("ctype_merge_patch", post("/run?command=rm%20-rf%20/", b'{"command": "ls"}',
                                    "application/merge-patch+json"), expect=R),
    Shape("ctype_vnd_json", post("/run", b'{"a": 1}', "application/vnd.api+json"), expect=R),
    Shape("ctype_text_json", post("/run", b'{"a": 1}', "text/json"), expect=R),
    # -- bodies the policy never reads
    Shape("unread_text_plain", post("/run?command=ls", b'{"command": "rm -rf /"}', "text/plain"), expect=R),
    Shape("unread_no_content_type", post("/run", b'{"command": "rm -rf /"}', None), expect=R),
    Shape("unread_octet_stream", post("/run", b'{"command": "rm -rf /"}', "application/octet-stream"), expect=R),
    Shape("unread_form", post("/run", b"command=rm+-rf+/", "application/x-www-form-urlencoded"), expect=R),
    Shape("unread_multipart", post("/run", MULTIPART, "multipart/form-data; boundary=x"), expect=R),
    Shape("unread_gzip_no_type", post("/run", gzip.compress(b'{"command": "rm -rf /"}'), None,
                                      headers=[("Content-Encoding", "gzip")]), expect=R),
    Shape("unread_gzip_json", post("/run", gzip.compress(b'{"command": "rm -rf /"}'),
                                   headers=[("Content-Encoding", "gzip")]), expect=R),
    # -- a tool that reads its arguments from the query
    Shape("query_tool_query", get("/echo?command=ls"), tool="_q", expect=F),
    Shape("query_tool_json_body", post("/run?command=ls", b'{"command": "rm"}'), tool="_q", expect=R),
    Shape("query_tool_form_body", post("/run?command=ls", b"command=rm", "application/x-www-form-urlencoded"),
          tool="_q", expect=R),
    Shape("query_tool_text_body", post("/run?command=ls", b'{"command": "rm -rf /"}', "text/plain"),
          tool="_q"),
    Shape("query_tool_repeated_key", get("/echo?command=ls&command=rm"), tool="_q", expect=R),
    Shape("query_tool_bracket", get("/echo?command[]=rm"), tool="_q", expect=R),
]
assert len({s.name for s in SHAPES}) == len(SHAPES)

# ------------------------------------------------------------------ the comparison


def same(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (1 == 1.0), but a boolean is not a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _grouped(pairs: list[list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in pairs:
        out.setdefault(k, []).append(v)
    return out


def differences(echo: dict, judged: dict, prefix: str) -> list[str]:
    """Where what the framework parsed differs from what the policy judged."""
    diffs = []
    path = judged["path"]
    if not path.startswith(prefix):
        diffs.append(f"judged path {path!r} is not under {prefix}")
    else:
        for view, seen in echo["paths"].items():
            if seen != (path[len(prefix):] or "/"):
                diffs.append(f"path {view}: tool {seen!r}, policy judged {path[len(prefix):] or '/'!r}")
    query, args = judged["query"], judged["arguments"]
    for view, pairs in echo["pairs"].items():
        if _grouped(pairs) != query:
            diffs.append(f"query {view}: tool {_grouped(pairs)!r}, policy {query!r}")
    acted: list[tuple[str, str | None, Any]] = []
    for view, d in echo["dicts"].items():
        if set(d) != set(query):
            diffs.append(f"query {view} keys: tool {sorted(d)!r}, policy {sorted(query)!r}")
        acted += [(view, k, v) for k, v in d.items()]
    for view, doc in echo["json"].items():
        if not same(doc, judged["body"]):
            diffs.append(f"body {view}: tool parsed {doc!r}, policy judged {judged['body']!r}")
        acted += [(view, k, v) for k, v in doc.items()] if isinstance(doc, dict) else [(view, None, doc)]
    acted += [("form", k, v) for k, v in echo["form"]]
    for view, key, value in acted:
        if key is None:
            ok = same(args, value)
        else:
            ok = isinstance(args, dict) and key in args and same(args[key], value)
        if not ok:
            diffs.append(f"arguments: tool acts on {view} {key!r}={value!r}, policy judged arguments {args!r}")
    if echo["content_type"] != judged["content_type"]:
        diffs.append(f"content type: tool {echo['content_type']!r}, policy {judged['content_type']!r}")
    return diffs


# The outcome of every (shape, server), for the summary at the end.
MATRIX: dict[str, dict[str, str]] = {}
# Refusals for the request's representation (a 401 or a 404 would pass every shape vacuously).
REPRESENTATION_CODES = {"bad_request", "bad_path", "bad_query", "bad_header", "bad_json", "ambiguous_arguments",
                        "unsupported_media_type", "unsupported_charset", "unsupported_content_encoding"}


def outcome(port: int, data: bytes, server: str, prefix: str) -> tuple[str, str, list[str]]:
    """("refused" | "forwarded" | "tool-<status>" | ..., Regate's error code, differences)."""
    ex = exchange(port, data, timeout=5)
    if not ex.responses:
        return "no-answer", "", [f"no response (closed={ex.closed}, timed_out={ex.timed_out})"]
    resp = ex.responses[0]
    if resp.status >= 500:
        return f"{resp.status}", "", [f"Regate or the tool answered {resp.status}: {resp.body[:300]!r}"]
    try:
        doc = json.loads(resp.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], dict) \
            and set(doc["error"]) == ERROR_KEYS:
        problems = []
        if not 400 <= resp.status < 500:
            problems.append(f"Regate's refusal has status {resp.status}")
        if doc["error"]["decision_id"] != resp.decision_id or not doc["error"]["message"]:
            problems.append(f"refusal {doc['error']} does not name its decision id {resp.decision_id}")
        if doc["error"]["code"] not in REPRESENTATION_CODES:
            problems.append(f"refused for a reason that is not the request's shape: {doc['error']}")
        return R, doc["error"]["code"], problems
    if resp.status == 200 and isinstance(doc, dict) and doc.get("server") == ECHO_NAME[server]:
        if not doc["judged"]:
            return F, "", ["the tool got no X-Judged header: the call was not judged by the echo policy"]
        judged = json.loads(base64.b64decode(doc["judged"]))
        return F, "", differences(doc, judged, prefix)
    # The framework answered without running the handler (its own 400, a redirect): the
    # tool acted on nothing.
    return f"tool-{resp.status}", "", []


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_every_framework_parses_what_the_policy_judged(regate, servers, shape):
    failures = []
    for name in servers:
        prefix = f"/tools/{name}{shape.tool}"
        got, code, diffs = outcome(regate.port, shape.build(prefix), name, prefix)
        MATRIX.setdefault(shape.name, {})[name] = got if not diffs else f"{got}: DIFFERS"
        if got == R:
            MATRIX[shape.name][name] += f" {code}"
        if diffs:
            failures.append(f"{name}: " + "; ".join(diffs))
        elif shape.expect is not None and got != shape.expect:
            failures.append(f"{name}: expected {shape.expect}, got {got}")
    assert not failures, f"{shape.name}:\n  " + "\n  ".join(failures)


def test_each_server_ran_exactly_the_calls_it_echoed(servers):
    # Nothing Regate refused reached a tool, and nothing reached one twice.
    if not MATRIX:
        pytest.skip("no shape ran")
    ran = {name: s.count() for name, s in servers.items()}
    echoed = {name: sum(1 for row in MATRIX.values() if row.get(name, "").startswith(F)) for name in servers}
    assert ran == echoed, (ran, echoed)
    assert len(SHAPES) >= 60
    width = max(map(len, MATRIX))
    lines = [" " * width + "  " + "  ".join(f"{n:>30}" for n in servers)]
    lines += [f"{shape:<{width}}  " + "  ".join(f"{row.get(n, '-'):>30}" for n in servers)
              for shape, row in MATRIX.items()]
    print("\n" + "\n".join(lines))
