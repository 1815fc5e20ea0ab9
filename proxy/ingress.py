"""The data port's connections: what happens before a request becomes a call.

aiohttp's parser (llhttp, strict) frames each request; this module adds what
its low-level server lacks on a port that untrusted clients reach:

- a cap on open connections (`http.max_connections`): past it a new connection
  is answered 503 `too_many_connections` and closed;
- a deadline for each request head, from its first byte to its last
  (`http.header_timeout_s`): a client trickling headers (slowloris) gets 408
  `header_timeout` and is cut. Idle keep-alive connections are the keep-alive
  timeout's business;
- the parser's refusals (bad framing, oversized request line or header, too
  many headers) answered in Regate's JSON error shape, counted, and logged at
  DEBUG only, so a hostile client cannot fill the log;
- a client that hangs up while its call is at the tool cancels that call (its
  upstream request, its slot; the audit says `client_disconnected`). aiohttp's
  own `handler_cancellation` would cancel every stage mid-await, Redis and
  approval stores included; the pipeline marks the request `HANGUP_CANCELS`
  when forwarding starts, and only then does a hang-up cancel.

None of these is a call: no agent is known yet, so no stage runs and nothing is
audited; each refusal is counted in `regate_rejections{stage="http"}`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from .pipeline import HANGUP_CANCELS, new_decision_id

log = logging.getLogger("regate.http")

_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def _error_json(code: str, message: str, decision_id: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "decision_id": decision_id, "reasons": []}})


def canned_response(status: int, code: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response, for answering where no request object exists."""
    did = new_decision_id()
    body = _error_json(code, message, did)
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\nX-Regate-Decision-Id: {did}\r\n")
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n"
    return head.encode() + b"\r\n" + body


def classify(status: int, exc: BaseException | None) -> tuple[int, str, str]:
    """(status, code, message) for a request the parser refused."""
    if isinstance(exc, LineTooLong):
        return 431, "request_head_too_large", ("the request line or a header is longer than this Regate accepts "
                                               "(http.max_line_size / http.max_field_size)")
    if isinstance(exc, InvalidURLError):
        return 400, "bad_request", "malformed HTTP request: invalid request target"
    if isinstance(exc, BadHttpMessage):
        text = str(exc.message if isinstance(exc.message, str) else exc)
        if text.startswith("Too many headers"):
            return 431, "request_head_too_large", ("the request has more headers than this Regate accepts "
                                                   "(http.max_headers)")
        # The parser's first line names the problem; the raw bytes it quotes after are left out.
        first = text.split(":\n", 1)[0].split("\n", 1)[0].strip()[:200]
        return 400, "bad_request", f"malformed HTTP request: {first or 'rejected by the parser'}"
    if status == 500:
        return 500, "internal_error", "Regate failed on this request; see its log"
    return status, "bad_request", "malformed HTTP request"


class IngressHandler(RequestHandler):
    """aiohttp's per-connection protocol with the head deadline, the connection
    cap and JSON refusals. Touches aiohttp's RequestHandler internals that the
    keep-alive logic itself uses (`_waiter`, `_messages`, `_request_count`);
    tests/security pins the behaviour, so an aiohttp upgrade that moves them fails there."""

    __slots__ = ("_head_timer", "_last_payload", "_counted")

    def __init__(self, manager: "IngressServer", **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._last_payload: Any = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server: IngressServer = self._manager  # type: ignore[assignment]
        cap = server.max_connections
        if cap and server.open_connections > cap:
            server.refused("too_many_connections")
            transport.write(canned_response(  # type: ignore[attr-defined]
                503, "too_many_connections",
                f"Regate holds its limit of {cap} open connections (http.max_connections); retry shortly",
                retry_after=1))
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        request = self._current_request
        task = self._task_handler
        super().connection_lost(exc)
        if task is not None and request is not None and request.get(HANGUP_CANCELS):
            task.cancel()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        server: IngressServer = self._manager  # type: ignore[assignment]
        if (data and self._head_timer is None and server is not None and server.header_timeout
                and (self._last_payload is None or self._last_payload.is_eof())):
            # The first bytes of a new request head: its deadline starts now.
            self._head_timer = self._loop.call_later(server.header_timeout, self._head_timed_out)
        before = self._request_count
        in_flight = self._last_payload
        super().data_received(data)
        if self._request_count != before:
            self._cancel_head_timer()
            messages = self._messages
            self._last_payload = messages[-1][1] if messages else None
            if in_flight is not None and not in_flight.is_eof() and messages \
                    and messages[-1][0].__class__ is _ErrInfo:
                # The parser gave up inside this request's body (a chunk size that is not
                # hex, say). aiohttp queues the error as if it were a next request and
                # leaves this body's reader waiting; end the body now, so the call answers
                # 400 bad_body at once rather than when a body timeout fires.
                in_flight.set_exception(RequestPayloadError(f"malformed request body: {messages[-1][0].message}"))

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        server: IngressServer | None = self._manager  # type: ignore[assignment]
        if server is not None:
            server.refused("header_timeout")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # Idle between requests: nothing else is being written on this connection.
            transport.write(canned_response(
                408, "header_timeout",
                f"the request head did not arrive within {server.header_timeout if server else '?'} s "
                "(http.header_timeout_s)"))
            self.force_close()
        else:
            # A response is still being written here: end the connection after it.
            self.close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        status, code, text = classify(status, exc)
        server: IngressServer | None = self._manager  # type: ignore[assignment]
        if server is not None:
            server.refused(code)
        did = new_decision_id()
        if status == 500:
            log.error("error handling a request on the data port (%s)", did, exc_info=exc)
        else:
            log.debug("refused a malformed request (%s): %s", did, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer the error")
        resp = web.Response(status=status, body=_error_json(code, text, did), content_type="application/json",
                            headers={"X-Regate-Decision-Id": did})
        resp.force_close()
        return resp


class IngressServer(web.Server):
    """web.Server whose connections are IngressHandlers, with their shared limits."""

    def __init__(self, handler: Any, *, max_connections: int = 0, header_timeout: float = 0,
                 metrics: Any = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.metrics = metrics
        self.open_connections = 0

    def __call__(self) -> RequestHandler:
        return IngressHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self.open_connections += 1
        handler._counted = True  # type: ignore[attr-defined]
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        if getattr(handler, "_counted", False):
            handler._counted = False  # type: ignore[attr-defined]
            self.open_connections -= 1
        super().connection_lost(handler, exc)

    def refused(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.count_rejection("http", code)
