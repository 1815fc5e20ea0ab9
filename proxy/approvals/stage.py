"""The approval stage: a call whose decision says `approval.required` runs only
once a human has said yes.

`hold` parks the HTTP call until an approver decides, the approval times out
(408 `approval_timeout`) or the client goes away (the approval is withdrawn).
`async` answers 202 `approval_pending` at once with the approval id and a
status URL; the agent re-sends the same call with `X-Regate-Approval: <id>`,
and it runs only if approved, unchanged (method, path, query and body hash)
and not used before. `async` is the default, since few HTTP clients wait minutes;
an agent that can wait sends `Prefer: wait=N` (RFC 7240) and is held up to N
seconds, then answered 202 with the approval still pending. Each step is an audit record linked by approval id and
decision id, so what ran can be shown to be exactly what was approved.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Callable

import orjson
from aiohttp import web

from ..audit import AuditUnavailable
from ..pipeline import Call, Rejection, rejection_response
from ..stages.body import buffer_body
from .approval import admin_view, agent_view, audit_record, new_record, target_hash, valid_id
from .store import ApprovalStore, ApprovalStoreError, ApprovalStoreFull, Binding

log = logging.getLogger("regate.approvals")

HEADER = "X-Regate-Approval"
# The agent-facing status URL lives on the data plane under this reserved prefix.
STATUS_PREFIX = "/_regate/approvals/"
TERMINAL = frozenset({"approved", "denied", "expired", "withdrawn", "used"})


class ApprovalMetrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.events = Counter("regate_approvals", "Approval steps, by event (proposed, approved, denied, "
                              "expired, withdrawn, executed, refused)", ["event"], registry=registry)
        self.held = Gauge("regate_approvals_held", "Calls this process holds open awaiting a human",
                          registry=registry)
        self.store_errors = Counter("regate_approval_store_errors",
                                    "Approval store calls that failed (the call is refused: fail closed)",
                                    registry=registry)


class ApprovalStage:
    name = "approval"

    def __init__(
        self,
        section: Any,
        store: ApprovalStore,
        *,
        audit: Any = None,
        metrics: Any = None,
        regate: Any = None,
        unusable: str | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 0.25,
        reread_s: float = 1.0,
    ) -> None:
        self.mode = section.mode
        self.tool_modes = dict(section.tools)
        self.timeout_s = section.timeout_s
        self.use_within_s = section.use_within_s
        self.max_pending = section.max_pending
        # A record outlives its decision by retain_s, and an async approval its use window.
        self.keep_s = section.timeout_s + section.use_within_s + section.retain_s
        self.store = store
        self.audit = audit
        self.regate = regate
        self.audit_lost = metrics.audit_lost if metrics is not None else None
        self.metrics = ApprovalMetrics(metrics.registry if metrics is not None else None)
        # Set when approvals cannot work in this process (memory store under --workers N).
        self.unusable = unusable
        self.clock = clock
        self.poll_s = poll_s
        self.reread_s = reread_s
        # A body read here has the deadline of one the policy reads (http.body_timeout_s).
        cfg = getattr(regate, "cfg", None)
        self.body_timeout_s: float = cfg.http.body_timeout_s if cfg is not None else 30.0
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._closing = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self.store.start()
                self._started = True

    def shutdown(self) -> None:
        """End every held call now (503, withdrawn) instead of holding shutdown up."""
        self._closing = True

    async def close(self) -> None:
        if self._closed:
            return  # the admin plane's cleanup and Regate.close may both call this
        self._closed = self._closing = True
        await self.store.close()

    # -- audit ---------------------------------------------------------------

    async def record(self, event: str, rec: dict[str, Any], **extra: Any) -> None:
        """Write a step and wait until it reached the OS; raises AuditUnavailable."""
        self.metrics.events.labels(event).inc()
        if self.audit is not None:
            await self.audit.append(audit_record(event, rec, **extra))

    def record_nowait(self, event: str, rec: dict[str, Any], **extra: Any) -> None:
        self.metrics.events.labels(event).inc()
        if self.audit is None:
            return
        try:
            self.audit.append_nowait(audit_record(event, rec, **extra))
        except AuditUnavailable:
            # NOTE: lossy: the step already happened (a timeout, a withdrawal,
            # an execution); losing its record is counted, not hidden.
            if self.audit_lost is not None:
                self.audit_lost.labels("approval").inc()

    # -- the stage -----------------------------------------------------------

    async def enter(self, call: Call) -> Rejection | None:
        d = call.decision
        if d is None or not d.approval_required:
            return None
        reasons = [d.approval_reason] if d.approval_reason else []
        if self.unusable is not None:
            return Rejection(503, "approval_unavailable", self.unusable, reasons=reasons)
        await self.start()
        rejection = await self._buffer_body(call)
        if rejection is not None:
            return rejection
        given = call.request.headers.get(HEADER)
        if given is not None:
            return await self._redeem(call, given.strip(), reasons)
        mode = d.approval_mode or self.tool_modes.get(call.tool.name) or self.mode
        # async, and the agent sent `Prefer: wait=N` (RFC 7240): hold up to N seconds, then 202.
        wait_s = prefer_wait(call.request.headers.get("Prefer")) if mode == "async" else None
        if wait_s is not None:
            wait_s = min(wait_s, self.timeout_s)
        now = self.clock()
        rec = new_record(call=call, mode=mode, reason=d.approval_reason, mask_names=d.approval_mask,
                         now=now, timeout_s=self.timeout_s)
        # Listen before the approval exists, so not even an instant decision is missed.
        fut = self.store.events.waiter(rec["id"]) if mode == "hold" or wait_s else None
        try:
            await self.store.create(rec, now, self.max_pending, self.keep_s)
        except (ApprovalStoreFull, ApprovalStoreError) as exc:
            if fut is not None:
                self.store.events.discard(rec["id"], fut)
            return self._not_parked(call, exc, reasons)
        try:
            await self.record("proposed", rec, reason=rec["reason"], revision=rec["revision"],
                              expires=rec["expires"], approval_mask=list(d.approval_mask))
        except AuditUnavailable as exc:
            if fut is not None:
                self.store.events.discard(rec["id"], fut)
            await self._settle_quietly(rec["id"], "withdrawn")
            return Rejection(503, "audit_unavailable", "Regate cannot record the approval request right now, "
                             "so no human is asked; retry shortly", reasons=[str(exc)], retry_after=1)
        call.extra["approval_id"] = rec["id"]
        call.response_headers[HEADER] = rec["id"]
        if fut is None:
            return self._pending(rec["id"], reasons)
        if wait_s:
            call.response_headers["Preference-Applied"] = f"wait={wait_s:g}"
        return await self._hold(call, rec, fut, reasons, wait_s=wait_s)

    def _not_parked(self, call: Call, exc: Exception, reasons: list[str]) -> Rejection:
        if isinstance(exc, ApprovalStoreFull):
            return Rejection(503, "approval_unavailable",
                             f"{self.max_pending} calls are already waiting for a human (approvals.max_pending); "
                             "retry later", reasons=reasons, retry_after=10)
        self.metrics.store_errors.inc()
        log.warning("approvals: cannot park call %s: %s", call.id, exc)
        return Rejection(503, "approval_unavailable", "the approval store is unreachable, so this call "
                         "cannot wait for a human; retry shortly", reasons=reasons, retry_after=1)

    def leave(self, call: Call) -> None:
        rec = call.extra.get("approval")
        if rec is None:
            return
        extra: dict[str, Any] = {"decision_id": call.id, "proposed_decision_id": rec["decision_id"]}
        if call.forwarded and call.upstream_status is not None:
            self.record_nowait("executed", rec, upstream_status=call.upstream_status, **extra)
        else:
            rejection = call.rejection
            self.record_nowait("not_executed", rec, code=rejection.code if rejection is not None else None, **extra)

    # -- hold ----------------------------------------------------------------

    async def _hold(
        self, call: Call, rec: dict[str, Any], fut: asyncio.Future[str], reasons: list[str],
        wait_s: float | None = None,
    ) -> Rejection | None:
        """Park the call until the approval is decided. With ``wait_s`` (an async approval
        and `Prefer: wait=N`), the wait ends after that long with 202 and the approval pending."""
        approval_id = rec["id"]
        request = call.request
        events = self.store.events
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (rec["expires"] - self.clock())
        waited_out = loop.time() + wait_s if wait_s else None
        next_read = loop.time() + self.reread_s
        self.metrics.held.inc()
        state: str | None = None
        try:
            while True:
                if fut.done():
                    got = fut.result()
                    if got in TERMINAL:
                        state = got
                        break
                    fut = events.waiter(approval_id)
                now = loop.time()
                if waited_out is not None and (now >= waited_out or _gone(request) or self._closing):
                    # NOTE: an async approval outlives the wait: the agent re-sends with its id.
                    return self._pending(approval_id, reasons)
                if _gone(request) or self._closing:
                    return await self._withdraw(call, rec, reasons)
                if now >= deadline:
                    return await self._expire(call, rec, reasons)
                if now >= next_read:
                    # Pub/sub can miss a message across a reconnect: read the truth.
                    next_read = now + self.reread_s
                    try:
                        current = await self.store.get(approval_id)
                    except ApprovalStoreError:
                        current = {"state": "pending"}
                    if current is None or current["state"] in TERMINAL:
                        state = current["state"] if current is not None else "expired"
                        break
                until = deadline if waited_out is None else min(deadline, waited_out)
                await asyncio.wait((fut,), timeout=min(self.poll_s, max(0.0, until - now)))
        except asyncio.CancelledError:
            # The handler is being torn down: nobody can run this call any more.
            asyncio.ensure_future(self._settle_quietly(approval_id, "withdrawn"))
            raise
        finally:
            events.discard(approval_id, fut)
            self.metrics.held.dec()
        return await self._decided(call, rec, state, reasons)

    async def _decided(self, call: Call, rec: dict[str, Any], state: str, reasons: list[str]) -> Rejection | None:
        approval_id = rec["id"]
        if state == "approved":
            if _gone(call.request):
                self.record_nowait("withdrawn", rec, after="approved", note="the client left before the call ran")
                return _withdrawn()
            try:
                outcome, _ = await self.store.claim(approval_id, call.id, self.clock())
            except ApprovalStoreError as exc:
                self.metrics.store_errors.inc()
                log.warning("approvals: cannot mark %s used: %s", approval_id, exc)
                return Rejection(503, "approval_unavailable", "the approval store failed as the approved call "
                                 "was about to run; it did not run", reasons=reasons, retry_after=1)
            if outcome != "ok":
                return Rejection(409, "approval_used", f"approval {approval_id} was already used",
                                 reasons=reasons)
            call.extra["approval"] = rec
            return None
        if state == "denied":
            return await self._denied(approval_id, reasons)
        if state == "expired":
            return _timeout(self.timeout_s, reasons)
        return _withdrawn()

    async def _expire(self, call: Call, rec: dict[str, Any], reasons: list[str]) -> Rejection | None:
        try:
            outcome, state = await self.store.settle(rec["id"], "expired", self.clock())
        except ApprovalStoreError:
            # NOTE: the store could not be told; its record reads as expired
            # anyway once past `expires`, and no decision is accepted after it.
            outcome, state = "ok", "expired"
        if outcome == "conflict" and state in TERMINAL:
            # A decision landed in the last moment: it wins.
            return await self._decided(call, rec, state, reasons)
        self.record_nowait("expired", rec, timeout_s=self.timeout_s)
        return _timeout(self.timeout_s, reasons)

    async def _withdraw(self, call: Call, rec: dict[str, Any], reasons: list[str]) -> Rejection:
        try:
            outcome, state = await self.store.settle(rec["id"], "withdrawn", self.clock())
        except ApprovalStoreError:
            outcome, state = "ok", "withdrawn"
        why = "Regate is shutting down" if self._closing else "the client disconnected"
        if outcome == "conflict" and state == "approved":
            self.record_nowait("withdrawn", rec, after="approved", note=f"{why} before the call ran")
        elif outcome == "ok":
            self.record_nowait("withdrawn", rec, note=why)
        if self._closing:
            return Rejection(503, "approval_unavailable", "Regate is shutting down; the call did not run and its "
                             "approval was withdrawn: send it again", reasons=reasons, retry_after=1)
        return _withdrawn()

    async def _settle_quietly(self, approval_id: str, to: str) -> None:
        try:
            await self.store.settle(approval_id, to, self.clock())
        except Exception as exc:  # best effort: the record reads as expired after its deadline anyway
            log.warning("approvals: could not mark %s %s: %s", approval_id, to, exc)

    async def _denied(self, approval_id: str, reasons: list[str]) -> Rejection:
        try:
            rec = await self.store.get(approval_id)
        except ApprovalStoreError:
            rec = None
        comment = (rec or {}).get("comment") or ""
        message = "a human approver denied this call" + (f": {comment}" if comment else "")
        return Rejection(403, "approval_denied", message, reasons=[comment] if comment else reasons)

    # -- async ---------------------------------------------------------------

    def _pending(self, approval_id: str, reasons: list[str]) -> Rejection:
        location = STATUS_PREFIX + approval_id
        return Rejection(
            202, "approval_pending",
            f"this call needs a human approval; approval id {approval_id}. Poll {location}, then send the same "
            f"call again with the header {HEADER}: {approval_id}",
            reasons=reasons, retry_after=2, headers={"Location": location, HEADER: approval_id},
        )

    async def _redeem(self, call: Call, approval_id: str, reasons: list[str]) -> Rejection | None:
        if not valid_id(approval_id):
            return Rejection(400, "approval_invalid", f"{HEADER} must be an approval id (apr_ and 24 hex digits)")
        request = call.request
        binding = Binding(call.agent or "", call.tool.name, target_hash(request.method, request.raw_path),
                          call.body_sha256 or "", self.use_within_s)
        try:
            outcome, detail = await self.store.claim(approval_id, call.id, self.clock(), binding)
            rec = await self.store.get(approval_id) if outcome != "missing" else None
        except ApprovalStoreError as exc:
            self.metrics.store_errors.inc()
            log.warning("approvals: cannot check %s: %s", approval_id, exc)
            return Rejection(503, "approval_unavailable", "the approval store is unreachable; retry shortly",
                             reasons=reasons, retry_after=1)
        call.extra["approval_id"] = approval_id
        if outcome == "ok" and rec is not None:
            call.extra["approval"] = rec
            return None
        if outcome == "missing" or rec is None:
            return Rejection(403, "approval_invalid", f"no approval {approval_id} for this agent: unknown, "
                             "already forgotten, or not an async approval", reasons=reasons)
        refused = {"decision_id": call.id, "proposed_decision_id": rec["decision_id"]}
        if outcome == "pending":
            return self._pending(approval_id, reasons)
        if outcome == "expired_now":
            self.record_nowait("expired", rec, timeout_s=self.timeout_s)
            return _timeout(self.timeout_s, reasons)
        if outcome == "expired":
            return _timeout(self.timeout_s, reasons)
        if outcome == "denied":
            return await self._denied(approval_id, reasons)
        if outcome == "used":
            self.record_nowait("refused", rec, code="approval_used", **refused)
            return Rejection(409, "approval_used", f"approval {approval_id} was already used (by decision "
                             f"{rec.get('used_by') or '?'}); one approval runs one call", reasons=reasons)
        if outcome == "mismatch":
            self.record_nowait("refused", rec, code="approval_mismatch", differs=detail,
                               got_body_sha256=call.body_sha256, **refused)
            return Rejection(403, "approval_mismatch", f"this call differs from the one approved ({detail}); "
                             "only the exact approved call may use the approval", reasons=reasons)
        if outcome == "stale":
            self.record_nowait("refused", rec, code="approval_expired", **refused)
            return Rejection(410, "approval_expired", f"approval {approval_id} was not used within "
                             f"{self.use_within_s:g}s of being granted; send the call again to ask anew",
                             reasons=reasons)
        return Rejection(403, "approval_invalid", f"approval {approval_id} is {outcome}", reasons=reasons)

    async def _buffer_body(self, call: Call) -> Rejection | None:
        """The approval covers the body's hash, so the body must be in hand:
        read it here when no earlier stage did (a non-JSON body)."""
        if call.body_sha256 is not None:
            return None
        request = call.request
        if call.body is None and request.body_exists:
            # As read_body reads a body: whole within http.body_timeout_s (a client that
            # trickles it cannot hold the call, nor its place in max_concurrent_per_agent).
            return await buffer_body(call, self.body_timeout_s)
        call.body_sha256 = hashlib.sha256(call.body or b"").hexdigest()
        return None

    # -- the agent's status URL (data plane) -----------------------------------

    def data_handler(self, handler: Callable[[web.BaseRequest], Any]) -> Callable[[web.BaseRequest], Any]:
        """Wrap the data plane's handler so `GET /_regate/approvals/<id>` answers
        the calling agent, and everything else goes on to the pipeline."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            if request.path.startswith(STATUS_PREFIX):
                return await self.status(request)
            return await handler(request)

        return handle

    async def status(self, request: web.BaseRequest) -> web.StreamResponse:
        call = Call(request)  # type: ignore[arg-type]
        identify = next((s for s in self.regate.pipeline.stages if s.name == "identify"), None)
        rejection = await identify.enter(call) if identify is not None else None
        if rejection is None and request.method not in ("GET", "HEAD"):
            rejection = Rejection(405, "method_not_allowed", "the approval status URL answers GET only")
        approval_id = request.path[len(STATUS_PREFIX):]
        rec = None
        if rejection is None:
            if valid_id(approval_id):
                await self.start()
                try:
                    rec = await self.store.get(approval_id)
                except ApprovalStoreError:
                    rejection = Rejection(503, "approval_unavailable", "the approval store is unreachable",
                                          retry_after=1)
            if rejection is None and (rec is None or rec["agent"] != call.agent):
                # Another agent's approval looks exactly like none at all.
                rejection = Rejection(404, "approval_invalid", f"no approval {approval_id} for this agent")
        if rejection is not None:
            return rejection_response(call, rejection)
        now = self.clock()
        if rec["state"] == "pending" and now >= rec["expires"]:
            await self.expire_lazily(rec, now)
        body = {"approval": agent_view(rec, now, STATUS_PREFIX + approval_id)}
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers={"Cache-Control": "no-store", "X-Regate-Decision-Id": call.id})

    async def expire_lazily(self, rec: dict[str, Any], now: float) -> None:
        """Mark an async approval nobody waits on as expired; the one who wins writes the record."""
        try:
            outcome, _ = await self.store.settle(rec["id"], "expired", now)
        except ApprovalStoreError:
            return
        if outcome == "ok":
            self.record_nowait("expired", rec, timeout_s=self.timeout_s)
        rec["state"] = "expired"
        rec["decided_at"] = rec["decided_at"] or now

    def admin_view(self, rec: dict[str, Any]) -> dict[str, Any]:
        return admin_view(rec, self.clock())


def _gone(request: web.BaseRequest) -> bool:
    # aiohttp does not cancel a handler when its client leaves (handler_cancellation
    # is off), but the protocol drops its transport: poll that.
    transport = request.transport
    return transport is None or transport.is_closing()


def _timeout(timeout_s: float, reasons: list[str]) -> Rejection:
    return Rejection(408, "approval_timeout", f"no human approved this call within {timeout_s:g}s; it did not run",
                     reasons=reasons)


def prefer_wait(header: str | None) -> float | None:
    """Seconds of `Prefer: wait=N` (RFC 7240 section 4.3), or None when absent or not a number."""
    if not header:
        return None
    for pref in header.split(","):
        name, _, value = pref.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return None
            return seconds if seconds > 0 and seconds == seconds else None
    return None


def _withdrawn() -> Rejection:
    # 499 (client closed request): nobody reads it, but the audit and metrics do.
    return Rejection(499, "approval_withdrawn", "the client went away while the call awaited approval")
