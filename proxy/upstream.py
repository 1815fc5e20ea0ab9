"""Forwarding: one pooled keep-alive session per upstream, streaming both ways,
header hygiene and deadlines.

Bodies are streamed in both directions, so a 1 GB upload or an endless SSE
stream never sits in Regate's memory; small responses with a known length are
read in one go, which is cheaper than chunked writes. Hop-by-hop headers are
removed both ways (RFC 9110 §7.6.1), `Host` is rebuilt from the route, and the
deadline covers the time to the upstream's response headers (504 past it);
after that an idle-read timeout of the same length guards the stream.

A stage that must see the answer before the agent does (MCP: filtered tool
lists, session binding) sets `call.response_filter`; the forwarder then hands
it the upstream response, the cleaned headers, the deadline and `relay` (this
module's own streaming answer, for whatever the filter does not rewrite).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from yarl import URL

from .breakers.outcome import CONNECT_ERROR
from .breakers.retrybudget import RetryBudget
from .config import Tool
from .pipeline import Call, Rejection, UpstreamError
from .observability.propagation import traceparent

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
# Never copied from the agent: rebuilt (Host, Content-Length) or Regate's own.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

# Responses up to this size with a declared length are read whole and sent as
# one write; anything else streams chunk by chunk.
SMALL_RESPONSE = 256 * 1024


def _connection_tokens(headers: CIMultiDict[str] | "web.BaseRequest.headers") -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


class _BodyTooLarge(Exception):
    pass


class Upstream:
    """One tool's upstream: its base URL and its own pooled session."""

    __slots__ = ("tool", "base", "base_str", "host_header", "session", "retry_budget")

    def __init__(self, tool: Tool) -> None:
        self.tool = tool
        self.base = URL(tool.upstream)
        self.base_str = tool.upstream.rstrip("/")
        port = self.base.explicit_port
        self.host_header = self.base.raw_host + (f":{port}" if port else "")
        self.session: aiohttp.ClientSession | None = None
        self.retry_budget = RetryBudget(ratio=0.1, window_s=10.0)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # no pool cap: concurrency is bounded by limits stages, not by a hidden queue
            keepalive_timeout=30,
            ttl_dns_cache=300,
            enable_cleanup_closed=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through as the upstream sent them
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            # The deadline is enforced by the socket: connect, and every read (the
            # response headers, then each chunk of a streamed body). This costs no
            # timer object per call, which asyncio.timeout would.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.tool.timeout_ms / 1000,
                                          sock_read=self.tool.timeout_ms / 1000),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        # aiohttp re-sends idempotent requests once on a dropped keep-alive
        # connection, outside Regate's retry budget; Regate decides about
        # retries (no public switch exists, hence the private attribute).
        if hasattr(self.session, "_retry_connection"):
            self.session._retry_connection = False

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class Forwarder:
    """Sends a call that every stage let through to its upstream and streams the answer back."""

    name = "forward"

    def __init__(self, tools: list[Tool], strip_request_headers: tuple[str, ...] = (),
                 body_idle_timeout_s: float = 10.0) -> None:
        self.upstreams = {t.name: Upstream(t) for t in tools}
        # Regate's own credentials (the API key header) never reach a tool.
        self._request_drop = _REQUEST_DROP | {h.lower() for h in strip_request_headers}
        # Header name -> forwarded or not, learnt as names are seen (bounded).
        self._keep_request: dict[str, bool] = {}
        self._keep_response: dict[str, bool] = {}
        # The longest pause between two chunks of a streamed request body.
        self.body_idle_timeout_s = body_idle_timeout_s

    async def start(self) -> None:
        for u in self.upstreams.values():
            await u.start()

    async def close(self) -> None:
        for u in self.upstreams.values():
            await u.close()

    def _request_headers(self, call: Call) -> CIMultiDict[str]:
        request = call.request
        drop = self._request_drop
        conn = _connection_tokens(request.headers) if "Connection" in request.headers else ()
        out: CIMultiDict[str] = CIMultiDict()
        keep = self._keep_request
        for name, value in request.headers.items():
            # Header names repeat call after call: remember each name's verdict
            # instead of lower-casing and testing it every time.
            ok = keep.get(name)
            if ok is None:
                low = name.lower()
                # X-Regate-* is Regate's to say: an agent's own (a forged approval, decision
                # id or agent header) never reaches a tool.
                ok = not (low in drop or low.startswith("x-regate-"))
                if len(keep) < 4096:
                    keep[name] = ok
            if ok and not (conn and name.lower() in conn):
                out.add(name, value)
        upstream = self.upstreams[call.tool.name]
        out["Host"] = upstream.host_header
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        out["X-Forwarded-Proto"] = request.scheme
        if "Host" in request.headers:
            out["X-Forwarded-Host"] = request.headers["Host"]
        out["X-Regate-Decision-Id"] = call.id
        if call.span is not None:
            # Tracing on: the tool's parent is Regate's span (W3C trace context). The
            # agent's tracestate passes on as it came; tracing off, so does traceparent.
            out["traceparent"] = traceparent(call.span)
        if call.remove_headers:
            for name in call.remove_headers:
                out.popall(name, None)
        if call.set_headers:
            for name, value in call.set_headers.items():
                out[name] = value
        return out

    async def _stream_body(self, call: Call) -> AsyncIterator[bytes]:
        limit = call.tool.max_body_bytes
        size = 0
        digest = hashlib.sha256()
        stream = call.request.content
        idle = self.body_idle_timeout_s
        while True:
            # aiohttp wraps whatever a body generator raises in a connection error;
            # the flags on the call say what really happened.
            try:
                async with asyncio.timeout(idle):
                    chunk = await stream.readany()
            except TimeoutError:
                call.extra["body_timeout"] = True
                raise _BodyTooLarge() from None
            except (RequestPayloadError, ConnectionError):
                call.extra["body_broken"] = True
                raise
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                call.extra["body_too_large"] = True
                raise _BodyTooLarge()
            digest.update(chunk)
            yield chunk
        call.body_size = size
        call.body_sha256 = digest.hexdigest()

    async def forward(self, call: Call) -> web.StreamResponse:
        request = call.request
        tool = call.tool
        upstream = self.upstreams[tool.name]
        # upstream_path is the raw (still percent-encoded) rest of the path plus
        # the raw query: passed on byte for byte, never decoded and re-encoded.
        url = URL(upstream.base_str + call.upstream_path, encoded=True)
        timeout_ms = tool.timeout_ms
        if call.timeout_ms is not None and call.timeout_ms < timeout_ms:
            timeout_ms = call.timeout_ms  # a decision may shorten the deadline, never extend it
        deadline = timeout_ms / 1000

        if call.body is not None:
            data: object = call.body
        elif request.body_exists:
            data = self._stream_body(call)
        else:
            data = None

        started = time.perf_counter_ns()
        call.forwarded = True
        budget = upstream.retry_budget
        budget.deposit(time.monotonic())
        # Only a call whose body can be sent again (none, or buffered) may be retried.
        replayable = data is None or data is call.body
        headers = self._request_headers(call)
        # The session's timeouts are the route's; only a decision's lower deadline needs its own.
        timeout = (aiohttp.ClientTimeout(total=None, sock_connect=deadline, sock_read=deadline)
                   if timeout_ms != tool.timeout_ms else None)
        try:
            while True:
                try:
                    resp = await upstream.session.request(
                        request.method, url, headers=headers, data=data,
                        allow_redirects=False, compress=None, chunked=None,
                        **({"timeout": timeout} if timeout is not None else {}),
                    )
                    break
                except aiohttp.ClientConnectorError:
                    # Regate's own retry: once, idempotent methods, connect errors only
                    # (the tool never saw the call), within a retry budget of 10% of
                    # calls, so Regate can never amplify a storm.
                    if not (replayable and RetryBudget.safe(request.method, CONNECT_ERROR,
                                                            call.extra.get("retries", 0))):
                        raise
                    delay = budget.withdraw(time.monotonic())
                    if delay is None:
                        raise
                    call.extra["retries"] = 1
                    await asyncio.sleep(delay)
        except TimeoutError:
            call.upstream_ns = time.perf_counter_ns() - started
            raise UpstreamError(Rejection(
                504, "upstream_timeout", f"tool {tool.name!r} did not answer within {timeout_ms} ms"))
        except (_BodyTooLarge, aiohttp.ClientConnectionError) as exc:
            call.upstream_ns = time.perf_counter_ns() - started
            if call.extra.get("body_too_large"):
                raise UpstreamError(Rejection(
                    413, "body_too_large", f"request body exceeds this tool's limit of {tool.max_body_bytes} bytes"))
            if call.extra.get("body_timeout"):
                raise UpstreamError(Rejection(
                    408, "body_timeout", f"the request body paused for more than {self.body_idle_timeout_s:g} s "
                    "(http.body_idle_timeout_s); the tool got an incomplete request and was cut off"))
            if call.extra.get("body_broken"):
                raise UpstreamError(Rejection(
                    400, "bad_body", "the request body is badly framed or was cut off; the tool got an incomplete "
                    "request and was cut off"))
            raise UpstreamError(Rejection(
                502, "upstream_unreachable", f"could not reach tool {tool.name!r}: {exc.__class__.__name__}"))
        except aiohttp.ClientError as exc:
            call.upstream_ns = time.perf_counter_ns() - started
            raise UpstreamError(Rejection(
                502, "upstream_error", f"tool {tool.name!r} sent an invalid response: {exc.__class__.__name__}"))

        call.upstream_status = resp.status
        try:
            return await self._respond(call, resp, deadline, started)
        finally:
            call.upstream_ns = time.perf_counter_ns() - started
            resp.release()

    def _response_headers(self, call: Call, resp: aiohttp.ClientResponse) -> CIMultiDict[str]:
        conn = _connection_tokens(resp.headers) if "Connection" in resp.headers else ()
        out: CIMultiDict[str] = CIMultiDict()
        keep = self._keep_response
        for name, value in resp.headers.items():
            ok = keep.get(name)
            if ok is None:
                low = name.lower()
                # X-Regate-* towards the agent is Regate's own: a tool cannot forge a
                # decision id, revision or approval id (X-Regate-Cost is read below).
                ok = low not in _RESPONSE_DROP and not low.startswith("x-regate-")
                if len(keep) < 4096:
                    keep[name] = ok
            if ok and not (conn and name.lower() in conn):
                out.add(name, value)
        cost = resp.headers.get("X-Regate-Cost")
        if cost is not None:
            # Tools that bill by tokens say what the call cost; the budget is corrected by it.
            try:
                value = float(cost)
                if value >= 0 and value != float("inf"):
                    call.extra["upstream_cost"] = value
            except ValueError:
                pass
        out["X-Regate-Decision-Id"] = call.id
        for name, value in call.response_headers.items():
            out[name] = value
        return out

    async def _respond(
        self, call: Call, resp: aiohttp.ClientResponse, deadline: float, started: int
    ) -> web.StreamResponse:
        headers = self._response_headers(call, resp)
        if call.response_filter is not None:
            return await call.response_filter(call, resp, headers, deadline, self.relay)
        return await self.relay(call, resp, headers, deadline)

    async def relay(
        self, call: Call, resp: aiohttp.ClientResponse, headers: CIMultiDict[str], deadline: float
    ) -> web.StreamResponse:
        """Send the upstream's answer on as it is: read whole when small, streamed otherwise."""
        length = resp.content_length
        chunked = "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
        if length is not None and length <= SMALL_RESPONSE and not chunked:
            try:
                body = await resp.read()  # sock_read bounds it
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise UpstreamError(Rejection(
                    502, "upstream_error", f"tool {call.tool.name!r} broke off its response: {exc.__class__.__name__}"))
            if resp.status >= 400:
                call.extra["error_body"] = body[:8192]  # the loop guard quotes it back to the agent
            return web.Response(status=resp.status, reason=resp.reason, body=body, headers=headers)

        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        if length is not None and not chunked:
            out.content_length = length
        await out.prepare(call.request)
        content = resp.content
        # Past this point the status line is sent: a broken upstream can only be
        # signalled by cutting the connection, which is what a proxy must do.
        while True:
            try:
                async with asyncio.timeout(deadline):
                    chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError):
                call.extra["upstream_broken"] = True
                if call.request.transport is not None:
                    call.request.transport.close()
                return out
            if not chunk:
                break
            try:
                # A client that stops reading stalls this write (back-pressure, so its
                # memory stays bounded); one that stalls past the deadline is cut off.
                async with asyncio.timeout(deadline):
                    await out.write(chunk)
            except (TimeoutError, ConnectionError):
                call.extra["client_gone"] = True
                if call.request.transport is not None:
                    call.request.transport.close()
                return out
        await out.write_eof()
        return out
