"""The flow of one call: the `Call` that carries its state, the `Rejection` that
ends it, and the ordered chain of stages that decides whether it runs.

Reading `Pipeline.STAGE_ORDER` and `Pipeline.handle` tells you the whole flow.
A stage's `enter(call)` either returns None (continue) or a `Rejection` (the
call ends here, with that status and code). Every stage whose `enter` ran gets
`leave(call)` afterwards, in reverse order, whatever happened — that is where
outcomes feed breakers, budgets and reservations. Exactly one audit record is
written per call, whichever stage ended it.
"""

from __future__ import annotations

import logging
import os
import time
from itertools import count
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from .config import Tool
    from .engines.decision import Decision


log = logging.getLogger("regate")


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


# Decision ids: a random per-process prefix and a counter. Unique across
# processes and restarts, and far cheaper per call than uuid4.
_ID_PREFIX = os.urandom(5).hex()
_ID_COUNTER = count(1)


def new_decision_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


class Call:
    """Everything known about one agent→tool call, filled in stage by stage."""

    __slots__ = (
        "id", "request", "started_ns", "agent", "claims", "tool", "upstream_path",
        "body", "body_json", "body_sha256", "body_size", "decision", "revision",
        "shadow_denied", "ended_by", "rejection", "timeout_ms", "set_headers",
        "remove_headers", "upstream_status", "upstream_ns", "response_headers",
        "cost", "extra", "forwarded", "tool_key",
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

    @property
    def is_jsonrpc(self) -> bool:
        return self.tool is not None and self.tool.protocol == "mcp"


class Stage(Protocol):
    name: str

    async def enter(self, call: Call) -> Rejection | None: ...

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
    return web.Response(
        status=rejection.status,
        body=error_body(call, rejection),
        content_type="application/json",
        headers=headers,
    )


class Pipeline:
    """The ordered stages, the forwarder at the end, and the accounting after.

    STAGE_ORDER is the flow of DESIGN.md. A stage that is switched off by
    config is simply absent from the chain.
    """

    STAGE_ORDER = ("identify", "route", "read_body", "ratelimit", "breaker", "policy", "approval", "gpu")

    def __init__(self, stages: list[Stage], forwarder: Any, metrics: Any, recorder: Any = None) -> None:
        order = {name: i for i, name in enumerate(self.STAGE_ORDER)}
        self.stages = sorted(stages, key=lambda s: order[s.name])
        self.forwarder = forwarder
        self.metrics = metrics
        # The audit log (issue 4) plugs in here: write-ahead before forwarding,
        # one record for every call.
        self.recorder = recorder

    async def handle(self, request: web.Request) -> web.StreamResponse:
        from .upstream import UpstreamError  # local: upstream imports this module

        call = Call(request)
        entered: list[Stage] = []
        rejection: Rejection | None = None
        response: web.StreamResponse | None = None
        try:
            for stage in self.stages:
                rejection = await stage.enter(call)
                if rejection is not None:
                    call.ended_by = stage.name
                    break
                entered.append(stage)
            if rejection is None:
                call.ended_by = "forward"
                if self.recorder is not None:
                    rejection = await self.recorder.before_forward(call)
                if rejection is None:
                    try:
                        response = await self.forwarder.forward(call)
                    except UpstreamError as exc:
                        rejection = exc.rejection
            if rejection is not None:
                call.rejection = rejection
                response = rejection_response(call, rejection)
                if self.recorder is not None:
                    await self.recorder.record_rejection(call)
            return response
        except Exception:
            # A bug in Regate must still answer in the JSON shape, with an id
            # that finds this call in the logs and the audit.
            log.exception("internal error on call %s", call.id)
            rejection = call.rejection = Rejection(500, "internal_error", "Regate failed on this call; see its log")
            if response is not None and response.prepared:
                raise
            response = rejection_response(call, rejection)
            return response
        finally:
            for stage in reversed(entered):
                try:
                    stage.leave(call)
                except Exception:
                    log.exception("stage %s failed in leave()", stage.name)
            self._account(call, response)

    def _account(self, call: Call, response: web.StreamResponse | None) -> None:
        total_ns = time.perf_counter_ns() - call.started_ns
        upstream_ns = call.upstream_ns
        added_ns = total_ns - (upstream_ns or 0)
        rejection = call.rejection
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
