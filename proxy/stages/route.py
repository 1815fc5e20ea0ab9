"""Route: which tool a call is for, by path prefix (`/tools/<name>/…`) or Host.

The tool a call reaches must always be the one the policy judged, so paths
that could be read differently by Regate and by the upstream (dot segments,
encoded slashes or backslashes, double encoding) are refused outright, and so
is any request target that is not a path (absolute-form `http://host/x`,
CONNECT's `host:443`, `OPTIONS *`) or carries a fragment: the data port is not
a forward proxy. Route is also the last stage before the body is read, so it
answers `Expect: 100-continue` itself (the expectation is never forwarded).
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

from aiohttp import web

from ..config import Tool
from ..pipeline import Call, Rejection

# %2e (.), %2f (/), %5c (\), %25 (%, i.e. double encoding), %00: each lets a path
# look one way to Regate and another to the upstream. So do %c0/%c1 (overlong UTF-8
# for '.' and '/', which lax decoders accept) and a '%' not followed by two hex digits
# (IIS's %u002e, or garbage each decoder repairs its own way).
# %23 (#) and %3f (?) are decoded into the path by some frameworks and kept by others
# (Starlette's request.url.path), so they are refused too.
_AMBIGUOUS = re.compile(r"%(2e|2f|5c|25|00|c0|c1|23|3f)|%(?![0-9a-f]{2})", re.IGNORECASE)
# Encoded non-ASCII: checked for characters that Unicode normalisation (NFKC, which
# some servers apply) turns into '.', '/', '\\', '%' or ';' (fullwidth dots, slashes).
_NON_ASCII = re.compile(r"%[89a-f][0-9a-f]", re.IGNORECASE)
_STRUCTURAL = "./\\%;"
# Path parameters (`;x`), also encoded: `..;x` and `..%3bx` are `..` to servers that
# strip parameters (Tomcat, Spring, Jetty; some after decoding).
_PARAMS = re.compile(r";|%3b", re.IGNORECASE)


# The interim answer to an agent that waits before sending its body (RFC 9110 §10.1.1).
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _decodes_as_utf8(path: str) -> bool:
    try:
        unquote(path, errors="strict")
    except UnicodeDecodeError:
        return False
    return True


def _normalises_into_structure(path: str) -> bool:
    decoded = unquote(path, errors="replace")
    norm = unicodedata.normalize("NFKC", decoded)
    return norm != decoded and any(norm.count(c) != decoded.count(c) for c in _STRUCTURAL)


class Route:
    name = "route"

    def __init__(self, tools: list[Tool]) -> None:
        # Longest prefix first, so /tools/a/b wins over /tools/a.
        self.by_prefix = sorted(
            ((t.prefix, t) for t in tools if t.prefix is not None), key=lambda p: len(p[0]), reverse=True
        )
        self.by_host = {t.host.lower(): t for t in tools if t.host is not None}

    def match(self, path: str, host: str | None) -> tuple[Tool, str] | None:
        """The tool for a raw path, and the rest of the path to send upstream."""
        if self.by_host and host:
            tool = self.by_host.get(host.lower().rsplit(":", 1)[0]) or self.by_host.get(host.lower())
            if tool is not None:
                return tool, path
        for prefix, tool in self.by_prefix:
            if path == prefix:
                return tool, "/"
            if path.startswith(prefix) and (prefix == "/" or path[len(prefix)] == "/"):
                return tool, path[len(prefix):] if prefix != "/" else path
        return None

    async def enter(self, call: Call) -> Rejection | None:
        request = call.request
        raw = request.raw_path
        if raw[:1] != "/" or "#" in raw:
            # Origin-form only (RFC 9112 §3.2.1). An absolute-form target names a host the
            # route table never judged, and Regate builds the upstream URL from the path.
            return Rejection(400, "bad_path", "the request target must be a path such as /tools/<name>/…, "
                             "without a fragment: this is a policy proxy in front of its tools, not a forward "
                             "proxy (no http://host/… targets, CONNECT or OPTIONS *)")
        path = raw.split("?", 1)[0]
        if "\\" in path or _AMBIGUOUS.search(path):
            return Rejection(400, "bad_path", "path contains encoded dots, slashes, backslashes, percent signs, "
                             "'#' or '?'")
        if "//" in path:
            # Flask, Node and nginx read `//echo//x` three ways (a host, a merged slash, kept).
            return Rejection(400, "bad_path", "path contains an empty segment ('//'); send single slashes")
        if "%" in path and _NON_ASCII.search(path):
            if not _decodes_as_utf8(path):
                # Starlette and Flask decode %FF to U+FFFD, Node throws, aiohttp keeps it.
                return Rejection(400, "bad_path", "path has percent-escapes that are not UTF-8 (like %FF); "
                                 "encode non-ASCII characters as UTF-8")
            if _normalises_into_structure(path):
                return Rejection(400, "bad_path", "path contains encoded characters that normalise to dots or "
                                 "slashes")
        if "/." in path:
            for segment in path.split("/"):
                if _PARAMS.split(segment, 1)[0] in (".", ".."):
                    return Rejection(400, "bad_path", "path contains '.' or '..' segments")
        found = self.match(path, call.request.headers.get("Host"))
        if found is None:
            return Rejection(404, "unknown_tool", f"no tool is routed at {path!r}; tools live under /tools/<name>/")
        call.tool, rest = found
        call.tool_key = call.tool.name
        call.upstream_path = rest + raw[len(path):]  # the raw query string, untouched
        if "Expect" in request.headers:
            return _expect(request)
        return None

    def leave(self, call: Call) -> None:
        pass


def _expect(request: web.BaseRequest) -> Rejection | None:
    """Answer the agent's expectation here: `100-continue` gets its `100 Continue`
    now (the body is read next), anything else is 417. The forwarder never passes
    `Expect` on, so no upstream can keep a call waiting for an interim answer."""
    for value in request.headers.getall("Expect"):
        for token in value.split(","):
            token = token.strip().lower()
            if token and token != "100-continue":
                return Rejection(417, "expectation_failed",
                                 f"Regate meets no expectation but 100-continue; drop the Expect: {token[:100]} header")
    transport = request.transport
    # An HTTP/1.0 client gets no interim response (RFC 9110 §10.1.1); neither does a
    # request with no body, nor one whose connection is already gone.
    if request.version >= (1, 1) and request.body_exists and transport is not None:
        # Written straight to the socket, not through the response writer: no
        # response has started, and the writer's byte count must not say one has.
        transport.write(_CONTINUE)
    return None
