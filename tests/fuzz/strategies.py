"""Hypothesis strategies for the fuzz targets and for the hostile-request
differential (tests/security/test_differential.py): inputs built from the pieces
that have broken proxies before, not only random bytes."""

from __future__ import annotations

import json

import orjson
from hypothesis import strategies as st


ROUTE_TOKENS = [
    "..", ".", "...", "%2e", "%2E", "%2e%2e", ".%2e", "%252e", "%252f", "%2f", "%2F", "%5c", "\\", ";", "..;", ";x=1",
    "%3b", "..%3b", ".%3b", "..%3B;", "%c0%ae", "%c0%af", "%e0%80%ae", "%ef%bc%8e", "%ef%bc%8f", "%ef%bc%bc", "\uff0e", "\uff0f", "\u2025",
    "\u2024", "%e2%80%a5", "%", "%u002e", "%g1", "%00", "%0a", "%0d", "%20", "%41", "%7e", "a", "shell", "search",
    "deep", "files", "tools", "", "/", "?", "#", "%3f", "%23", "~", "-", "_", "\u00e9", "%c3%a9",
]


@st.composite
def route_paths(draw):
    prefix = draw(st.sampled_from(["/tools/search", "/tools/shell", "/tools/search/deep", "/tools/files", "/tools",
                                   "", "/tools/searc", "/TOOLS/search"]))
    parts = draw(st.lists(st.one_of(st.sampled_from(ROUTE_TOKENS),
                                    st.text(alphabet=".%/;\\2eEfF5c0a3bB", min_size=1, max_size=6)),
                          max_size=8))
    sep = draw(st.sampled_from(["/", "", "/"]))
    return (prefix + sep + "/".join(parts)).encode("utf-8")


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from([":", '":', '\\":', "a:b", '"', "\\", "\u0000", "\ud7ff", "\U0001f600"]),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=4), kids, max_size=4)), max_leaves=12)
KEYS = st.one_of(st.text(max_size=4), st.sampled_from(["a", "amount", "", ":", '"', "\\"]))


def _render(draw, value) -> bytes:
    """JSON text of value, written the ways senders write it (spacing, escapes) and
    sometimes with a key repeated or a number spelled in a way parsers differ on."""
    if isinstance(value, dict):
        items = list(value.items())
        if items and draw(st.integers(0, 9)) == 0:
            items.insert(draw(st.integers(0, len(items))), (items[0][0], draw(JSON_SCALARS)))  # a duplicate key
        ws = draw(st.sampled_from(["", " ", "\n", "\t", "\r\n "]))
        parts = []
        for k, v in items:
            key = orjson.dumps(k)
            if k and draw(st.integers(0, 5)) == 0:  # escape the first character: same key, other bytes
                key = b'"' + f"\\u{ord(k[0]):04x}".encode() + orjson.dumps(k[1:])[1:]
            parts.append(key + ws.encode() + b":" + ws.encode() + _render(draw, v))
        return b"{" + b",".join(parts) + b"}"
    if isinstance(value, list):
        return b"[" + b", ".join(_render(draw, v) for v in value) + b"]"
    if isinstance(value, int) and not isinstance(value, bool) and draw(st.integers(0, 20)) == 0:
        return str(value).encode() + b".0e0"
    try:
        return orjson.dumps(value)
    except TypeError:
        return b"null"


@st.composite
def json_bodies(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        depth = draw(st.integers(1, 3000))
        return b"[" * depth + b"]" * depth
    if kind == 2:
        return draw(st.sampled_from([b"1" + b"0" * 25, b"-1" + b"0" * 19, b"1e400", b"9223372036854775808",
                                     b"18446744073709551616", b"-9223372036854775809", b"1E19", b"-0", b"0e0"]))
    return _render(draw, draw(JSON_VALUES))


HEADER_NAMES = st.sampled_from(["Authorization", "authorization", "Cookie", "X-Api-Key", "x-api-key", "X-API-KEY",
                                "Set-Cookie", "Proxy-Authorization", "Content-Type", "X-Agent-Id", "X-A", "x-a",
                                "Host", "Accept", "X-Regate-Approval"])


@st.composite
def policy_inputs(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "get", "X", ""]))
    path = draw(st.text(alphabet="abc/%.?=&;\u00e9", max_size=20))
    headers = draw(st.lists(st.tuples(st.one_of(HEADER_NAMES, st.text(alphabet="abXY-", min_size=1, max_size=6)),
                                      st.text(alphabet=st.characters(blacklist_characters="\n\r"), max_size=10)),
                            max_size=6))
    body = draw(st.one_of(st.just(b""), json_bodies()))
    head = f"{method} {path}\n" + "".join(f"{k}: {v}\n" for k, v in headers)
    return head.encode("utf-8", "surrogatepass") + b"\n" + body


MCP_NAMES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["search_tickets", "a\u202eb", "x\u200by", "\u0000", "a" * 200, "\ud7ff", "\U000e0001"]),
    st.integers(), st.none())


@st.composite
def mcp_messages(draw):
    msg: dict = {}
    if draw(st.booleans()) or draw(st.booleans()):
        msg["jsonrpc"] = draw(st.sampled_from(["2.0", "2.0", "1.0", 2, None]))
    if draw(st.booleans()):
        msg["id"] = draw(st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats(allow_nan=False),
                                   st.lists(st.integers(), max_size=2), st.booleans()))
    if draw(st.integers(0, 4)):
        msg["method"] = draw(st.one_of(st.sampled_from(["tools/call", "tools/list", "initialize", "ping"]),
                                       st.text(max_size=8), st.integers(), st.none()))
    if draw(st.booleans()):
        params = draw(st.one_of(st.none(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                                st.fixed_dictionaries({}, optional={"name": MCP_NAMES,
                                                                    "arguments": st.one_of(JSON_VALUES, st.none())})))
        msg["params"] = params
    if draw(st.integers(0, 5)) == 0:
        msg["result" if draw(st.booleans()) else "error"] = draw(JSON_VALUES)
    return msg


def _dumps(value) -> bytes:
    return json.dumps(value).encode()  # the stdlib writes what orjson will not (big integers)


@st.composite
def mcp_bodies(draw):
    if draw(st.integers(0, 3)) == 0:
        return _dumps(draw(st.lists(mcp_messages(), max_size=5)))
    if draw(st.integers(0, 10)) == 0:
        return _dumps(draw(st.text(max_size=20)))
    return _dumps(draw(mcp_messages()))


SSE_PIECES = [b"data: x", b"data: {\"a\": 1}", b"data:", b"data", b"event: m", b": comment", b"id: 1", b"retry: 5",
              b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n", b"\r\r", b" ", b"\xff"]


@st.composite
def sse_streams(draw):
    step = draw(st.integers(0, 255))
    body = b"".join(draw(st.lists(st.one_of(st.sampled_from(SSE_PIECES), st.binary(max_size=4)), max_size=30)))
    return bytes([step]) + body




# --------------------------------------------------------------------- whole hostile requests

HOSTILE_HEADERS = [
    ("X-Agent-Id", "analyst-2"), ("X-Regate-Approval", "apr_" + "0" * 24), ("X-Regate-Decision-Id", "forged"),
    ("X-Regate-Agent", "root"), ("X_Api_Key", "x"), ("Content_Length", "0"), ("X-A ", "1"), (" X-A", "1"),
    ("X-A", "a\rb"), ("X-A", "a\nb"), ("X-A", "a\x00b"), ("X-A", "\xff\xfe"), ("X\x00A", "1"), ("X-A", " padded "),
    ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "xchunked"), ("Transfer-Encoding", "chunked, identity"),
    ("Content-Length", "+5"), ("Content-Length", "1_0"), ("Content-Length", "0"), ("Content-Length", "5, 5"),
    ("Content-Encoding", "gzip"), ("Content-Type", "application/json"), ("Content-Type", "text/plain"),
    ("Host", "evil.example"), ("Connection", "keep-alive, X-A"), ("Upgrade", "websocket"), ("Expect", "100-continue"),
    ("Authorization", "Bearer stolen"), ("X-Forwarded-For", "10.0.0.1"), ("TE", "trailers"),
]


@st.composite
def hostile_requests(draw, keys: dict[str, str]):
    """(raw bytes, description) of one request: a route path, the agent's key (or a wrong
    one, or none), a few hostile headers, and a body framed by Content-Length, by chunks,
    or by both."""
    # Weighted towards requests a policy lets through, so "reached exactly the tool judged"
    # is exercised as often as "refused, nothing reached".
    method = draw(st.sampled_from(["GET", "GET", "POST", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get"]))
    if draw(st.integers(0, 2)) == 0:
        path = draw(route_paths()).decode("utf-8")
    else:
        tool = draw(st.sampled_from(["search", "search", "shell", "files/workspace/reports", "payments"]))
        rest = draw(st.lists(st.sampled_from(["a", "b%20c", "x.json", "%41", "~u", "q=1", "-", "deep"]), max_size=3))
        query = draw(st.sampled_from(["", "?q=1", "?x=/../shell", "?a=%2f&a=2", "?%00=%ff"]))
        path = f"/tools/{tool}/" + "/".join(rest) + query
    if not path.startswith("/"):
        path = "/" + path
    agent = draw(st.sampled_from([*keys, *keys, *keys, "none", "wrong"]))
    headers: list[tuple[str, str]] = [("Host", "regate.test")]
    if agent in keys:
        headers.append(("X-Api-Key", keys[agent]))
    elif agent == "wrong":
        headers.append(("X-Api-Key", "not-a-key"))
    if draw(st.integers(0, 2)) == 0:
        headers += draw(st.lists(st.sampled_from(HOSTILE_HEADERS), max_size=3))
    body = draw(st.one_of(st.none(), st.none(), json_bodies(),
                          st.sampled_from([b'{"command": "ls"}', b'{"amount": 5, "to": "A"}', b"plain bytes"])))
    if body is not None and draw(st.booleans()):
        headers.append(("Content-Type", "application/json"))
    framing = draw(st.sampled_from(["length", "length", "length", "chunked", "both"])) if body is not None else "none"
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    data = head.encode("utf-8", "surrogateescape")
    if framing == "length":
        data += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    elif framing == "chunked":
        data += b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        if body:
            data += b"%x\r\n" % len(body) + body + b"\r\n"
        data += b"0\r\n\r\n"
    elif framing == "both":
        data += b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" % len(body)
        data += body
    else:
        data += b"Connection: close\r\n\r\n"
    return data
