"""Forwarding: one pooled keep-alive session per upstream, streaming both ways,
header hygiene and deadlines.

Bodies are streamed in both directions, so a 1 GB upload or an endless SSE
stream never sits in Regate's memory; small responses with a known length are
read in one go, which is cheaper than chunked writes. Hop-by-hop headers are
removed both ways (RFC 9110 §7.6.1), `Host` is rebuilt from the route, and the
deadline covers the time to the upstream's response headers (504 past it):
connecting, sending the request and its body, and waiting, whatever the
request's shape. After that an idle-read timeout of the same length guards the
stream. The head deadlines of all calls in flight share one timer
(`HeadDeadlines`); a timer object per call costs more than the rest of the
bookkeeping together.

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
from .pipeline import Call, Rejection, UpstreamError, client_disconnected
from .forwarded_headers import HOP_BY_HOP, dropped_for, is_regate_own
from .observability.propagation import traceparent

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


class HeadDeadlines:
    """The deadline for each call in flight to get its upstream's response head, on one timer.

    A forward registers its task with `add` and removes it with `discard` once the
    head has come (or the call failed). Calls with the same timeout end in the order
    they started, so each timeout has its own queue (an insertion-ordered dict) and
    only the front of each queue is ever looked at. The timer is armed for the
    earliest deadline: while calls finish in time it fires about once per timeout
    period, not once per call. A call past its deadline has `call.extra["deadline"]`
    set and its task cancelled; the forwarder turns that cancellation into 504.
    """

    __slots__ = ("_queues", "_timer", "_timer_at", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        # timeout (s) -> {call: (deadline, task)}, oldest first.
        self._queues: dict[float, dict[Call, tuple[float, asyncio.Task]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # The clock and the timer: the running loop's, unless a test brings its own.
        self._loop = loop

    def add(self, call: Call, timeout: float, task: asyncio.Task) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        when = loop.time() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = {}
        queue[call] = (when, task)
        timer = self._timer
        if timer is None:
            self._arm(when)
        elif when < self._timer_at:  # only a shorter timeout than any in flight re-arms
            timer.cancel()
            self._arm(when)

    def discard(self, call: Call, timeout: float) -> None:
        queue = self._queues.get(timeout)
        if queue is not None:
            queue.pop(call, None)

    def _arm(self, when: float) -> None:
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expire)  # type: ignore[union-attr]

    def _expire(self) -> None:
        self._timer = None
        # A timer may fire a hair early by the clock it is read with (libuv counts in ms).
        now = self._loop.time() + 0.001  # type: ignore[union-attr]
        earliest: float | None = None
        for timeout in list(self._queues):
            queue = self._queues[timeout]
            while queue:
                call = next(iter(queue))
                when, task = queue[call]
                if when > now:
                    if earliest is None or when < earliest:
                        earliest = when
                    break
                del queue[call]
                call.extra["deadline"] = True
                task.cancel()
            if not queue:
                del self._queues[timeout]
        if earliest is not None:
            self._arm(earliest)


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
        tls = True  # https: the system's CAs, the URL's host name
        if self.tool.tls is not None:
            from .identity.tls import client_context

            # The tool's CA, client certificate (upstreams that require mTLS) and name.
            tls = client_context(self.tool.tls, f"tools[{self.tool.name}].tls")
        connector = aiohttp.TCPConnector(
            limit=0,  # no pool cap: concurrency is bounded by limits stages, not by a hidden queue
            keepalive_timeout=30,
            ttl_dns_cache=300,
            enable_cleanup_closed=False,
            ssl=tls,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through as the upstream sent them
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            # Connect, and every read of a response (the head is bounded as a whole
            # by HeadDeadlines, from before the connection to the status line).
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
        # Per tool: the agent's headers it never gets (Regate's own credentials, the API
        # key header, included), and header name -> forwarded or not, learnt as names are
        # seen (bounded).
        self._request_drop = {t.name: dropped_for(t.pass_headers, strip_request_headers) for t in tools}
        self._keep_request: dict[str, dict[str, bool]] = {t.name: {} for t in tools}
        self._keep_response: dict[str, bool] = {}
        # The longest pause between two chunks of a streamed request body.
        self.body_idle_timeout_s = body_idle_timeout_s
        self.deadlines = HeadDeadlines()

    async def start(self) -> None:
        for u in self.upstreams.values():
            await u.start()

    async def close(self) -> None:
        for u in self.upstreams.values():
            await u.close()

    def _request_headers(self, call: Call) -> CIMultiDict[str]:
        request = call.request
        name_of_tool = call.tool.name
        drop = self._request_drop[name_of_tool]
        conn = _connection_tokens(request.headers) if "Connection" in request.headers else ()
        out: CIMultiDict[str] = CIMultiDict()
        keep = self._keep_request[name_of_tool]
        for name, value in request.headers.items():
            # Header names repeat call after call: remember each name's verdict
            # instead of lower-casing and testing it every time.
            ok = keep.get(name)
            if ok is None:
                low = name.lower()
                ok = not (low in drop or is_regate_own(low))
                if len(keep) < 4096:
                    keep[name] = ok
            if ok and not (conn and name.lower() in conn):
                out.add(name, value)
        upstream = self.upstreams[name_of_tool]
        out["Host"] = upstream.host_header
        # The agent is the client: an X-Forwarded-For it sent is a claim nobody checked,
        # so the tool is told only the address Regate saw.
        out["X-Forwarded-For"] = request.remote or ""
        out["X-Forwarded-Proto"] = request.scheme
        if call.extra.get("canonical_json"):
            # forward_body: canonical — the bytes are orjson's, and say so.
            out["Content-Type"] = "application/json"
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
        # The head's deadline holds whatever the request's shape: the socket timeouts
        # alone start only once the body is sent, which a silent tool never lets happen.
        task = asyncio.current_task()
        deadlines = self.deadlines
        deadlines.add(call, deadline, task)  # type: ignore[arg-type]
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
        except asyncio.CancelledError:
            call.upstream_ns = time.perf_counter_ns() - started
            # HeadDeadlines cancelled this task: a 504. Cancelled by anyone else as well
            # (the agent went away), the cancellation goes on.
            if not call.extra.get("deadline") or task.uncancel():  # type: ignore[union-attr]
                raise
            raise UpstreamError(self._timed_out(call, data, timeout_ms)) from None
        except TimeoutError:
            call.upstream_ns = time.perf_counter_ns() - started
            raise UpstreamError(self._timed_out(call, data, timeout_ms)) from None
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

        finally:
            deadlines.discard(call, deadline)

        call.upstream_status = resp.status
        try:
            return await self._respond(call, resp, deadline, started)
        finally:
            call.upstream_ns = time.perf_counter_ns() - started
            resp.release()

    @staticmethod
    def _timed_out(call: Call, data: object, timeout_ms: int) -> Rejection:
        if data is not None and data is not call.body and call.body_size is None:
            # A streamed body was still on its way (a slow agent, or a tool that stopped reading).
            return Rejection(504, "upstream_timeout", f"tool {call.tool.name!r} had not answered within {timeout_ms} ms; "
                             "the request body was still being sent, and the tool was cut off")
        return Rejection(504, "upstream_timeout", f"tool {call.tool.name!r} did not answer within {timeout_ms} ms")

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
            except (TimeoutError, ConnectionError) as exc:
                call.extra["client_gone"] = True
                if isinstance(exc, ConnectionError):
                    # The agent hung up mid-answer: the same outcome as when the hang-up
                    # is seen first by the connection (the handler is cancelled then).
                    call.rejection = client_disconnected()
                if call.request.transport is not None:
                    call.request.transport.close()
                return out
        await out.write_eof()
        return out
