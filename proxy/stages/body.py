"""Read body: buffer the request body when a later stage reads it, bounded by
the tool's `max_body_bytes`; otherwise leave it to be streamed to the upstream.

Only JSON bodies (by content type, or any body on an MCP route) are buffered
and parsed, and only when some stage reads them: a 1 GB upload to a file tool
streams through without touching memory. A declared Content-Length over the
limit is refused before a byte is read.

A body policy reads must mean one thing to policy and to the tool, so it is
refused (400 `bad_json`) when parsers could disagree on it: a key twice in one
object (orjson keeps the last, others the first), a number of 2**63 or more
in size (orjson makes a big integer a float), nesting deeper than policy
engines read (MAX_DEPTH), and, 415, a compressed body
(policy would judge bytes the tool decodes into something else). Reading it has a deadline
(`http.body_timeout_s`, 408 `body_timeout`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

from urllib.parse import parse_qsl

import orjson
from aiohttp.web_protocol import RequestPayloadError

from ..pipeline import Call, Rejection

# On a body orjson accepted this tokenization is exact: each string (escapes
# included), and whether ':' follows it (then it is an object key).
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"([ \t\r\n]*:)?')
# orjson turns an integer beyond 64 bits into a float; such a float (or any number
# this large) may be a different value to the tool's parser.
_HUGE = 9.223372036854776e18
# The integers every parser reads exactly: int64 (Go, Rust, Java, OPA), and the
# doubles' safe range (JavaScript: 2**53 + 1 reads as 2**53).
INT_LIMITS = {"int64": 2**63 - 1, "safe": 2**53 - 1}


def _count_keys(doc: Any, int_limit: int = INT_LIMITS["int64"]) -> int:
    """Entries of every object in the document; -1 if it holds an integer beyond
    +-int_limit or a float at or past 2**63."""
    n = 0
    stack = [doc]
    pop, push = stack.pop, stack.extend
    while stack:
        v = pop()
        t = type(v)
        if t is dict:
            n += len(v)
            push(v.values())
        elif t is list:
            push(v)
        elif t is int:
            if v > int_limit or v < -int_limit:
                return -1
        elif t is float and (v >= _HUGE or v <= -_HUGE):
            return -1
    return n


# Deeper than this, policy engines refuse the input (regorus at ~126 levels, orjson
# writes at most 254): refused up front, as bad JSON, not later as a policy error.
MAX_DEPTH = 64


def _too_deep(doc: Any, limit: int) -> bool:
    stack = [(doc, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        t = type(v)
        if t is dict or t is list:
            if depth > limit:
                return True
            for x in (v.values() if t is dict else v):
                if type(x) is dict or type(x) is list:
                    push((x, depth + 1))
    return False


def parse_json(body: bytes, integers: str = "int64") -> tuple[Any, str | None]:
    """(document, None), or (None, why the body is refused). `integers`: the tool's
    json_integers (int64, or safe for tools that read numbers as doubles)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return None, f"request body is not valid UTF-8 JSON: {exc}"
    # Fewer brackets than the limit (in strings too): cannot be too deep, no walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _too_deep(doc, MAX_DEPTH):
        return None, f"request body nests deeper than {MAX_DEPTH} levels"
    n = _count_keys(doc, INT_LIMITS[integers])
    if n < 0:
        bound = "(2**63-1)" if integers == "int64" else "(2**53-1), the integers this tool reads exactly"
        return None, (f"request body has a number outside +-{bound}; parsers disagree on its value "
                      "(send it as a string)")
    # Every key is followed by one ':' outside strings, so when the colons are as many
    # as the parsed keys, no key was repeated; otherwise count the keys exactly.
    if n and body.count(b":") != n and n != sum(1 for colon in _STRINGS.findall(body) if colon):
        return None, ("request body repeats a key within one object; the policy and the tool could read "
                      "different values: send each key once")
    return doc, None


def _too_large(limit: int) -> Rejection:
    return Rejection(413, "body_too_large", f"request body exceeds this tool's limit of {limit} bytes")


# Bodies that carry arguments in a form Regate does not judge: refused unless the tool's
# content_types lists them (then the operator has decided the tool does not read them as
# arguments, or that the policy need not see them).
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+/[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def media_type(content_type: str) -> tuple[str, dict[str, str] | None]:
    """(type/subtype lower-cased, parameters) of a Content-Type; parameters None when the
    header is malformed or names a parameter twice, so two parsers could read it apart."""
    kind, _, rest = content_type.partition(";")
    kind = kind.strip()
    if not _TOKEN.fullmatch(kind):
        return kind.lower(), None
    params: dict[str, str] = {}
    if rest:
        for part in rest.split(";"):
            name, eq, value = part.partition("=")
            name = name.strip().lower()
            if not name and not eq:
                continue  # a trailing ';'
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if not eq or not name or name in params or '"' in value or "," in value:
                return kind.lower(), None
            params[name] = value
    return kind.lower(), params


def looks_like_json(kind: str) -> bool:
    sub = kind.partition("/")[2]
    return "json" in sub


def is_json(content_type: str) -> bool:
    """Whether a Content-Type is exactly application/json (parameters aside)."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


# Express and njs keep the first 1000 parameters and drop the rest: more are refused.
MAX_QUERY_PARAMS = 1000


def parse_query(raw: str) -> tuple[list[tuple[str, str]], str | None]:
    """The raw (still percent-encoded) query string as ordered (key, value) pairs,
    decoded once, '+' as space as every web framework reads it; or why it is refused:
    an escape that is not %XX or bytes that are not UTF-8 (frameworks repair both
    differently), more than MAX_QUERY_PARAMS pairs."""
    if _BAD_ESCAPE.search(raw):
        return [], "the query string has a '%' not followed by two hex digits"
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_PARAMS)
    except UnicodeDecodeError:
        return [], "the query string decodes to bytes that are not UTF-8"
    except ValueError:
        return [], f"the query string has more than {MAX_QUERY_PARAMS} parameters"
    return pairs, None


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Keys JavaScript query parsers drop or treat as structure (Express's qs).
_DROPPED_KEYS = frozenset({"", "__proto__", "constructor", "prototype"})


def _ambiguous(message: str) -> Rejection:
    return Rejection(400, "ambiguous_arguments", message)


def _query_arguments(query: dict[str, list[str]]) -> dict[str, Any]:
    # A key given once is its string; a repeated key is the list of every value, so a
    # policy judges them all (a tool may take the first, the last or all: each was judged).
    return {k: v[0] if len(v) == 1 else v for k, v in query.items()}


def _arguments(call: Call, tool: Any, query: dict[str, list[str]]) -> Rejection | None:
    """The call's arguments from the one place the tool reads them (tool.arguments),
    refusing what the tool could read from a second place or in a second way."""
    body = call.body_json
    if tool.arguments == "body":
        call.extra["arguments"] = body
        return None
    for key, values in query.items():
        if "[" in key or "]" in key:
            return _ambiguous(f"the query key {key[:60]!r} has brackets, which some tools read as a nested "
                              "argument: send plain keys")
        if key in _DROPPED_KEYS:
            return _ambiguous(f"the query key {key!r} is dropped by some tools' parsers: send named keys")
        if len(values) > 1 and tool.repeated_query_keys == "refuse":
            return _ambiguous(f"the query names {key[:60]!r} {len(values)} times; tools take the first, the "
                              "last or all of them: send each argument once")
    if tool.arguments == "query" or not query:
        call.extra["arguments"] = _query_arguments(query) if query or tool.arguments == "query" else body
        return None
    if body is None:
        call.extra["arguments"] = _query_arguments(query)
        return None
    if body.__class__ is not dict:
        return _ambiguous("this tool reads arguments from the query and the body, and the JSON body is not an "
                          "object: send the arguments in one place")
    both = [k for k in query if k in body]
    if both:
        return _ambiguous(f"{', '.join(repr(k) for k in both[:5])} given in the query and in the body; the tool "
                          "could read either: send each argument in one place")
    merged = _query_arguments(query)
    merged.update(body)
    call.extra["arguments"] = merged
    return None


async def _read(stream: Any, limit: int) -> bytes | None:
    """The whole body, or None past `limit` bytes."""
    chunks = []
    size = 0
    while True:
        chunk = await stream.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


async def buffer_body(call: Call, timeout_s: float) -> Rejection | None:
    """Read the call's whole body (`read_whole`, within the tool's max_body_bytes) onto
    the call: body, size and SHA-256; or the refusal. Parsing is the caller's."""
    body = await read_whole(call.request, call.tool.max_body_bytes, timeout_s)
    if body.__class__ is Rejection:
        return body  # type: ignore[return-value]
    call.body = body
    call.body_size = len(body)
    call.body_sha256 = hashlib.sha256(body).hexdigest()
    return None


async def read_whole(request: Any, limit: int, timeout_s: float) -> bytes | Rejection:
    """The whole request body, read within `timeout_s` (http.body_timeout_s) and at
    most `limit` bytes, or the refusal saying which bound it broke. Every stage that
    buffers a body reads it here, so a client trickling one cannot hold a call."""
    stream = request.content
    try:
        if stream.is_eof():  # it all came with the head (the usual small call): no wait, no timer
            body = await _read(stream, limit)
        else:
            async with asyncio.timeout(timeout_s):
                body = await _read(stream, limit)
    except TimeoutError:
        return Rejection(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s "
                         "(http.body_timeout_s)")
    except (RequestPayloadError, ConnectionError) as exc:
        return Rejection(400, "bad_body", f"the request body is badly framed or was cut off ({exc.__class__.__name__})")
    return _too_large(limit) if body is None else body


class ReadBody:
    """The request's shape against what its tool declares (methods, content types, where
    arguments live), then the body, read and parsed when a stage judges it."""

    name = "read_body"

    def __init__(self, needs_body: bool, timeout_s: float = 30.0, judged: bool | None = None) -> None:
        # Whether any stage reads the body (the policy engine, MCP recognition, the loop
        # guard), and whether a policy judges the call: only then must the arguments have
        # one reading (with the policy off, the loop guard only tells calls apart).
        self.needs_body = needs_body
        self.judged = needs_body if judged is None else judged
        self.timeout_s = timeout_s

    async def enter(self, call: Call) -> Rejection | None:
        request = call.request
        tool = call.tool
        methods = tool.methods
        if methods is not None and request.method not in methods:
            return Rejection(405, "method_not_allowed",
                             f"tool {tool.name!r} takes {', '.join(methods)}, not {request.method[:20]}",
                             headers={"Allow": ", ".join(methods)})
        if not self.judged:
            return await self._unjudged(call)
        raw_query = call.upstream_path.partition("?")[2]
        if raw_query and tool.arguments == "body":
            if tool.unexpected_query == "strip":
                call.upstream_path = call.upstream_path.partition("?")[0]
                raw_query = ""
            else:
                return _ambiguous(f"tool {tool.name!r} reads its arguments from the JSON body only; send no "
                                  "query string")
        query: dict[str, list[str]] = {}
        if raw_query:
            pairs, problem = parse_query(raw_query)
            if problem is not None:
                return Rejection(400, "bad_query", problem)
            for k, v in pairs:
                query.setdefault(k, []).append(v)
            call.extra["query"] = query
            call.extra["query_pairs"] = pairs

        head = _body_head(call)
        if head is None:
            return _arguments(call, tool, query)
        if head.__class__ is Rejection:
            return head  # type: ignore[return-value]
        headers = request.headers
        kind, params = media_type(head) if head else ("", {})
        if params is None:
            return Rejection(400, "bad_header", "the Content-Type header is malformed or repeats a parameter; "
                             "send one media type, e.g. application/json")
        allowed = tool.content_types
        if kind and allowed is not None and kind not in allowed:
            return _unsupported(f"tool {tool.name!r} takes {', '.join(allowed)}, not {kind[:60]}")
        if not kind and allowed is not None:
            return _unsupported(f"tool {tool.name!r} takes {', '.join(allowed)}; send a Content-Type")
        json_body = kind in tool.json_types
        if not json_body:
            if kind in FORM_TYPES and (allowed is None or kind not in allowed):
                return _unsupported(f"{kind} bodies carry arguments the policy does not read; send "
                                    "application/json")
            if looks_like_json(kind):
                return _unsupported(f"{kind[:60]} is read as JSON by some tools and not by others; send "
                                    "application/json")
            if (tool.unread_body == "refuse" and tool.protocol != "mcp"
                    and (allowed is None or kind not in allowed)):
                # Some tools (aiohttp's and Starlette's request.json()) parse JSON whatever the
                # type, even tools said to read only their query: a body the policy did not
                # read could carry arguments it never judged.
                return _unsupported(f"the policy reads only application/json bodies, not "
                                    f"{kind[:60] or 'one without a Content-Type'}; tool {tool.name!r} does not "
                                    "take unread bodies (unread_body: forward)")
        if tool.arguments == "query" and (json_body or kind in FORM_TYPES):
            return _ambiguous(f"tool {tool.name!r} reads its arguments from the query string; send no "
                              f"{kind} body")
        if json_body:
            charset = params.get("charset")
            if charset is not None and charset.lower() not in ("utf-8", "utf8"):
                return _unsupported(f"a JSON body must be UTF-8, not charset={charset[:40]}; send "
                                    "application/json without a charset or with charset=utf-8",
                                    code="unsupported_charset")
        elif tool.protocol != "mcp":
            return _arguments(call, tool, query)  # streamed by the forwarder, which enforces the limit
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding and encoding != "identity":
            return Rejection(415, "unsupported_content_encoding", "policy reads this body, so it must be sent "
                             f"uncompressed (Content-Encoding: {encoding[:40]})")

        rejection = await self._read_json(call)
        if rejection is not None:
            return rejection
        body = call.body
        if body:
            if tool.forward_body == "canonical" and tool.protocol != "mcp":
                canonical = orjson.dumps(call.body_json)
                if canonical != body:
                    call.body = canonical
                    call.body_size = len(canonical)
                    call.body_sha256 = hashlib.sha256(canonical).hexdigest()
                call.extra["canonical_json"] = True
        return _arguments(call, tool, query)

    async def _read_json(self, call: Call) -> Rejection | None:
        rejection = await buffer_body(call, self.timeout_s)
        if rejection is not None:
            return rejection
        if call.body:
            call.body_json, problem = parse_json(call.body, call.tool.json_integers)
            if problem is not None:
                return Rejection(400, "bad_json", problem)
        return None

    async def _unjudged(self, call: Call) -> Rejection | None:
        """No policy judges the call: read a JSON body only for a stage that tells calls
        apart by it (the loop guard, MCP recognition); everything else streams as sent."""
        request = call.request
        tool = call.tool
        head = _body_head(call)
        if head is None or head.__class__ is Rejection:
            return head  # type: ignore[return-value]
        kind = media_type(head)[0] if head else ""
        if tool.content_types is not None and kind not in tool.content_types:
            return _unsupported(f"tool {tool.name!r} takes {', '.join(tool.content_types)}, not "
                                f"{kind[:60] or 'a body without a Content-Type'}")
        if not self.needs_body or not (tool.protocol == "mcp" or kind in tool.json_types):
            return None
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding and encoding != "identity":
            return Rejection(415, "unsupported_content_encoding", "a stage reads this body, so it must be sent "
                             f"uncompressed (Content-Encoding: {encoding[:40]})")
        return await self._read_json(call)

    def leave(self, call: Call) -> None:
        pass


def _body_head(call: Call) -> str | Rejection | None:
    """What is known of the body before a byte of it is read: None when there is none,
    else its one Content-Type ("" when absent); a refusal when its declared length is
    over the tool's limit or it has two Content-Types."""
    request = call.request
    limit = call.tool.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        return _too_large(limit)
    call.body_size = declared
    if not request.body_exists:
        call.body_size = 0
        return None
    content_types = request.headers.getall("Content-Type", ())
    if len(content_types) > 1:
        return Rejection(400, "bad_header", "more than one Content-Type header: send one")
    return content_types[0] if content_types else ""


def _unsupported(message: str, code: str = "unsupported_media_type") -> Rejection:
    return Rejection(415, code, message)
