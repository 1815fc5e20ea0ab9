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

import orjson
from aiohttp.web_protocol import RequestPayloadError

from ..pipeline import Call, Rejection

# On a body orjson accepted this tokenization is exact: each string (escapes
# included), and whether ':' follows it (then it is an object key).
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"([ \t\r\n]*:)?')
# orjson turns an integer beyond 64 bits into a float; such a float (or any number
# this large) may be a different value to the tool's parser.
_HUGE = 9.223372036854776e18


def _count_keys(doc: Any) -> int:
    """Entries of every object in the document; -1 if it holds a number at or past 2**63."""
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


def parse_json(body: bytes) -> tuple[Any, str | None]:
    """(document, None), or (None, why the body is refused)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return None, f"request body is not valid JSON: {exc}"
    # Fewer brackets than the limit (in strings too): cannot be too deep, no walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _too_deep(doc, MAX_DEPTH):
        return None, f"request body nests deeper than {MAX_DEPTH} levels"
    n = _count_keys(doc)
    if n < 0:
        return None, "request body has a number beyond 64 bits; parsers disagree on its value (send it as a string)"
    # Every key is followed by one ':' outside strings, so when the colons are as many
    # as the parsed keys, no key was repeated; otherwise count the keys exactly.
    if n and body.count(b":") != n and n != sum(1 for colon in _STRINGS.findall(body) if colon):
        return None, ("request body repeats a key within one object; the policy and the tool could read "
                      "different values: send each key once")
    return doc, None


def _too_large(limit: int) -> Rejection:
    return Rejection(413, "body_too_large", f"request body exceeds this tool's limit of {limit} bytes")


def is_json(content_type: str) -> bool:
    ct = content_type.split(";", 1)[0].strip().lower()
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


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
    name = "read_body"

    def __init__(self, needs_body: bool, timeout_s: float = 30.0) -> None:
        # Whether any stage reads the body (the policy engine, MCP recognition).
        self.needs_body = needs_body
        self.timeout_s = timeout_s

    async def enter(self, call: Call) -> Rejection | None:
        request = call.request
        tool = call.tool
        limit = tool.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            return _too_large(limit)
        call.body_size = declared
        if not request.body_exists:
            call.body_size = 0
            return None
        headers = request.headers
        content_types = headers.getall("Content-Type", ())
        if len(content_types) > 1:
            return Rejection(400, "bad_header", "more than one Content-Type header: send one")
        wants_json = tool.protocol == "mcp" or (bool(content_types) and is_json(content_types[0]))
        if not (self.needs_body and wants_json):
            return None  # streamed by the forwarder, which enforces the limit as it goes
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding and encoding != "identity":
            return Rejection(415, "unsupported_content_encoding", "policy reads this body, so it must be sent "
                             f"uncompressed (Content-Encoding: {encoding[:40]})")

        rejection = await buffer_body(call, self.timeout_s)
        if rejection is not None:
            return rejection
        body = call.body
        if body:
            call.body_json, problem = parse_json(body)
            if problem is not None:
                return Rejection(400, "bad_json", problem)
        return None

    def leave(self, call: Call) -> None:
        pass
