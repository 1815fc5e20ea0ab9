"""The flow of one call: the `Call` that carries its state, the `Rejection` that
ends it, and the ordered chain of stages that decides whether it runs.

Reading `Pipeline.STAGE_ORDER` and `Pipeline.handle` tells you the whole flow.
A stage's `enter(call)` either returns None (continue) or a `Rejection` (the
call ends here, with that status and code). Every stage whose `enter` ran gets
`leave(call)` afterwards, in reverse order, whatever happened — that is where
outcomes feed breakers, budgets and reservations. Exactly one audit record is
written per call, whichever stage ended it.

A stage may also answer `Handoff`: the request holds several calls (a JSON-RPC
batch on an MCP route). Each part then runs the remaining stages as a call of
its own — its own decision id, limits, breaker, policy, audit record — and the
handoff's `finish` forwards the admitted parts and builds the one answer.
Single calls never take that path.

An agent that hangs up while its call is at the tool ends the call at once: the
data server (proxy/ingress.py) cancels the handler once `HANGUP_CANCELS` is set
on the request, which happens only when forwarding starts. Stages before that
notice a hang-up themselves (the body read fails, a held approval is withdrawn)
or are bounded, and a call whose agent has left is never forwarded. Either way
every entered stage gets `leave` and the call gets its one audit record with
code `client_disconnected`: the outcome record when it was allowed, else its
decision record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from itertools import count
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import orjson
from aiohttp import web

from . import mcp

if TYPE_CHECKING:
    from .config import Tool
    from .engines.decision import Decision


log = logging.getLogger("regate")
_now_ns = time.perf_counter_ns


class Rejection:
    """How a stage ends a call: HTTP status, a stable machine-readable code, a
    message written for the agent (and the model behind it), and optionally
    reasons and a Retry-After in seconds."""

    __slots__ = ("status", "code", "message", "reasons", "retry_after", "headers")

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        reasons: list[str] | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.reasons = reasons or []
        self.retry_after = retry_after
        self.headers = headers

    def __repr__(self) -> str:
        return f"Rejection({self.status}, {self.code!r}, {self.message!r})"


class UpstreamError(Exception):
    """The forwarder could not complete a call; carries the rejection to answer with."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


# Decision ids: a random per-process prefix and a counter. Unique across
# processes and restarts, and far cheaper per call than uuid4.
_ID_PREFIX = os.urandom(5).hex()
_ID_COUNTER = count(1)


def new_decision_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


# Set on a request (aiohttp's per-request mapping) when its call is being forwarded:
# from then on a hang-up cancels the handler (proxy/ingress.py).
try:
    HANGUP_CANCELS: Any = web.RequestKey("regate.hangup_cancels", bool)
except AttributeError:  # aiohttp before 3.13: plain keys, which it did not warn about yet
    HANGUP_CANCELS = "regate.hangup_cancels"


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def client_disconnected() -> "Rejection":
    # 499, nginx's "client closed request": nobody reads it, the audit and metrics do.
    return Rejection(499, "client_disconnected", "the agent closed its connection before the call finished")


def abandoned(call: "Call") -> "Rejection":
    """What ended a call whose handler was cancelled: the agent hung up, or (its
    connection still open) Regate is stopping and its grace ran out."""
    if _gone(call.request):
        return client_disconnected()
    return Rejection(503, "shutting_down", "Regate stopped before this call finished; retry", retry_after=1)


class Call:
    """Everything known about one agent→tool call, filled in stage by stage."""

    __slots__ = (
        "id", "request", "started_ns", "agent", "claims", "tool", "upstream_path",
        "body", "body_json", "body_sha256", "body_size", "decision", "revision",
        "shadow_denied", "ended_by", "rejection", "timeout_ms", "set_headers",
        "remove_headers", "upstream_status", "upstream_ns", "response_headers",
        "cost", "extra", "forwarded", "tool_key", "response_filter", "marks", "span",
    )

    def __init__(self, request: web.Request) -> None:
        self.id = new_decision_id()
        self.request = request
        self.started_ns = time.perf_counter_ns()
        self.agent: str | None = None
        self.claims: dict[str, Any] = {}
        self.tool: Tool | None = None
        # What limits, breakers and the audit key on: the route's tool name, or
        # "<route>/<mcp tool>" for an MCP tools/call.
        self.tool_key: str | None = None
        # The part of the path after the tool's prefix, still percent-encoded.
        self.upstream_path = ""
        # Buffered body when a stage needs to read it; None means "stream it".
        self.body: bytes | None = None
        self.body_json: Any = None
        self.body_sha256: str | None = None
        self.body_size: int | None = None
        self.decision: Decision | None = None
        self.revision: str | None = None
        self.shadow_denied = False
        self.ended_by: str | None = None
        self.rejection: Rejection | None = None
        self.timeout_ms: int | None = None
        self.set_headers: dict[str, str] | None = None
        self.remove_headers: list[str] | None = None
        self.upstream_status: int | None = None
        self.upstream_ns: int | None = None
        # Headers Regate adds to its response (RateLimit, revision, …).
        self.response_headers: dict[str, str] = {}
        self.cost: float | None = None
        self.extra: dict[str, Any] = {}
        self.forwarded = False
        # Set by a stage that must see the upstream's answer before the agent does
        # (MCP: filter tools/list, bind sessions); the forwarder hands it the response.
        self.response_filter: Any = None
        # Decision trace (proxy/observability): [step names, perf_counter_ns at the end
        # of each step passed...]; None when traces are off. `span`: the OpenTelemetry span.
        self.marks: list[Any] | None = None
        self.span: Any = None

    def part(self, body: bytes, body_json: Any) -> "Call":
        """A call for one part of this request (one message of a batch): same agent,
        tool and request, its own decision id, body and state."""
        p = Call(self.request)
        p.agent = self.agent
        p.claims = self.claims
        p.tool = self.tool
        p.tool_key = self.tool_key
        p.upstream_path = self.upstream_path
        p.body = body
        p.body_json = body_json
        p.body_size = len(body)
        return p

    @property
    def is_jsonrpc(self) -> bool:
        return self.tool is not None and self.tool.protocol == "mcp"


class Handoff:
    """A stage's answer when one request holds several calls (a JSON-RPC batch).

    `parts` are calls made with `Call.part`; one that already has `rejection` set
    (an invalid message) skips the remaining stages. `finish(call, parts,
    forwarder)` forwards the parts no stage refused and returns the response.
    """

    __slots__ = ("parts", "finish")

    def __init__(self, parts: list[Call],
                 finish: Callable[[Call, list[Call], Any], Awaitable[web.StreamResponse]]) -> None:
        self.parts = parts
        self.finish = finish


class Stage(Protocol):
    name: str

    async def enter(self, call: Call) -> Rejection | Handoff | None: ...

    def leave(self, call: Call) -> None: ...


def error_body(call: Call, rejection: Rejection) -> bytes:
    return orjson.dumps({
        "error": {
            "code": rejection.code,
            "message": rejection.message,
            "decision_id": call.id,
            "reasons": rejection.reasons,
        }
    })


def rejection_response(call: Call, rejection: Rejection) -> web.Response:
    headers = {"X-Regate-Decision-Id": call.id}
    headers.update(call.response_headers)
    if rejection.retry_after is not None:
        # Retry-After is whole seconds; round up so an agent that obeys it is not early.
        secs = int(rejection.retry_after)
        headers["Retry-After"] = str(secs if secs >= rejection.retry_after else secs + 1)
    if rejection.headers:
        headers.update(rejection.headers)
    if call.tool is not None and call.tool.protocol == "mcp":
        # MCP clients read JSON-RPC: the error object, at the status the transport expects.
        return mcp.rejection_response(call, rejection, headers)
    return web.Response(
        status=rejection.status,
        body=error_body(call, rejection),
        content_type="application/json",
        headers=headers,
    )


class Pipeline:
    """The ordered stages, the forwarder at the end, and the accounting after.

    STAGE_ORDER is the flow of docs/architecture.md. A stage that is switched off by
    config is simply absent from the chain.
    """

    STAGE_ORDER = ("identify", "concurrency", "route", "read_body", "mcp", "ratelimit", "breaker", "policy", "approval", "gpu")

    def __init__(self, stages: list[Stage], forwarder: Any, metrics: Any, recorder: Any = None) -> None:
        order = {name: i for i, name in enumerate(self.STAGE_ORDER)}
        self.stages = sorted(stages, key=lambda s: order[s.name])
        self.forwarder = forwarder
        self.metrics = metrics
        # The audit log (issue 4) plugs in here: write-ahead before forwarding,
        # one record for every call.
        self.recorder = recorder
        # Traces, spans and decision logs (proxy/observability): begin(call, steps) and
        # finish(call, ...) around every call; None costs nothing. A call's marks are
        # taken in the order of `steps`, so a mark is one int, not a (name, time) pair.
        self.observer: Any = None
        self.steps = tuple(s.name for s in self.stages) + (("audit",) if recorder is not None else ()) + ("forward",)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        call = Call(request)
        entered: list[Stage] = []
        rejection: Rejection | None = None
        response: web.StreamResponse | None = None
        handed_off = False
        if self.observer is not None:
            self.observer.begin(call, self.steps)
        marks = call.marks
        try:
            for stage in self.stages:
                rejection = await stage.enter(call)
                if marks is not None:
                    marks.append(_now_ns())
                if rejection is not None:
                    if rejection.__class__ is Handoff:
                        entered.append(stage)
                        handed_off = True
                        response = await self._handle_parts(call, rejection, self.stages.index(stage) + 1)
                        return response
                    call.ended_by = stage.name
                    break
                entered.append(stage)
            if rejection is None:
                call.ended_by = "forward"
                if self.recorder is not None:
                    rejection = await self.recorder.before_forward(call)
                    if marks is not None:
                        marks.append(_now_ns())
                if rejection is None:
                    request[HANGUP_CANCELS] = True
                    if _gone(request):  # the agent left while the stages ran: nothing runs for nobody
                        rejection = abandoned(call)
                    else:
                        try:
                            response = await self.forwarder.forward(call)
                        except UpstreamError as exc:
                            rejection = exc.rejection
                    if marks is not None:
                        marks.append(_now_ns())
            if rejection is not None:
                call.rejection = rejection
                response = rejection_response(call, rejection)
                if self.recorder is not None:
                    await self.recorder.record_rejection(call)
            return response
        except asyncio.CancelledError:
            # Cancelled mid-call (the agent hung up): end it here, say so, and let the
            # cancellation go on. The finally below still runs every leave().
            call.rejection = abandoned(call)
            if call.ended_by is None:
                n = len(entered)
                call.ended_by = self.stages[n].name if n < len(self.stages) else "forward"
            if self.recorder is not None and not handed_off:  # parts are recorded one by one
                self.recorder.record_abandoned(call)
            raise
        except Exception:
            # A bug in Regate must still answer in the JSON shape, with an id
            # that finds this call in the logs and the audit.
            log.exception("internal error on call %s", call.id)
            rejection = call.rejection = Rejection(500, "internal_error", "Regate failed on this call; see its log")
            call.ended_by = call.ended_by or "internal"
            if response is not None and response.prepared:
                raise
            response = rejection_response(call, rejection)
            if self.recorder is not None:
                try:  # one record per call, a failed one included
                    await self.recorder.record_rejection(call)
                except Exception:
                    log.exception("could not audit the internal error on call %s", call.id)
            return response
        finally:
            for stage in reversed(entered):
                try:
                    stage.leave(call)
                except Exception:
                    log.exception("stage %s failed in leave()", stage.name)
            if not handed_off:  # a handed-off request is accounted part by part
                self._account(call, response)

    async def _handle_parts(self, call: Call, handoff: Handoff, start: int) -> web.StreamResponse:
        """The batch path: each part runs the stages after `start` as a call of its own.

        Parts run one after another, so limits and the loop guard see them in the
        order the agent sent them. Every part gets its audit record (write-ahead
        for those forwarded) and its metrics, and every stage it entered gets
        `leave`, whatever happens.
        """
        rest = self.stages[start:]
        parts = handoff.parts
        entered_by: list[list[Stage]] = []
        observer = self.observer
        try:
            for part in parts:
                entered: list[Stage] = []
                entered_by.append(entered)
                if observer is not None:
                    observer.begin(part, self.steps[start:len(self.stages)])
                if part.rejection is not None:
                    continue
                marks = part.marks
                for stage in rest:
                    rejection = await stage.enter(part)
                    if marks is not None:
                        marks.append(_now_ns())
                    if rejection is not None:
                        if rejection.__class__ is Handoff:  # a batch inside a batch: no stage does that
                            rejection = Rejection(500, "internal_error", "nested handoff")
                        part.ended_by = stage.name
                        part.rejection = rejection
                        break
                    entered.append(stage)
            recorder = self.recorder
            for part in parts:
                if part.rejection is None:
                    part.ended_by = "forward"
                    if recorder is not None:
                        part.rejection = await recorder.before_forward(part)
            call.request[HANGUP_CANCELS] = True
            response = await handoff.finish(call, parts, self.forwarder)
            if recorder is not None:
                for part in parts:
                    if part.rejection is not None:
                        await recorder.record_rejection(part)
            return response
        except asyncio.CancelledError:
            gone = abandoned(call)
            for part in parts:
                # A part a stage or the tool refused keeps its own code; every other part
                # ends with the request (its answer was never sent).
                if part.rejection is None:
                    part.rejection = gone
                    part.ended_by = part.ended_by or "forward"
                if self.recorder is not None:
                    self.recorder.record_abandoned(part)
            raise
        finally:
            for part, entered in zip(parts, entered_by):
                for stage in reversed(entered):
                    try:
                        stage.leave(part)
                    except Exception:
                        log.exception("stage %s failed in leave()", stage.name)
            for part in parts:
                self._account(part, None, part.upstream_status if part.upstream_status is not None else 200)

    def _account(self, call: Call, response: web.StreamResponse | None, status: int | None = None) -> None:
        total_ns = time.perf_counter_ns() - call.started_ns
        upstream_ns = call.upstream_ns
        added_ns = total_ns - (upstream_ns or 0)
        rejection = call.rejection
        if status is None or rejection is not None:
            status = rejection.status if rejection is not None else (response.status if response is not None else 499)
        outcome = rejection.code if rejection is not None else "forwarded"
        tool = call.tool.name if call.tool is not None else "-"
        metrics = self.metrics
        if metrics is not None:  # None when `metrics: false`
            if rejection is not None:
                metrics.count_rejection(call.ended_by or "-", rejection.code)
            metrics.count_call(tool, outcome, status, added_ns / 1e9,
                               upstream_ns / 1e9 if upstream_ns is not None else None)
        if self.recorder is not None:
            self.recorder.after_call(call, status, added_ns)
        if self.observer is not None:
            self.observer.finish(call, status, outcome, total_ns, added_ns)
