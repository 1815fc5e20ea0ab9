"""What the audit log is told about each call, and when.

A call that will be forwarded gets its decision record written (reached the
OS) *before* it is forwarded — write-ahead, so a Regate killed mid-call still
has the record that the call was allowed — and an outcome record after,
linked by decision id. A call a stage ended gets one decision record, written
before the agent sees the answer. If the log cannot be written, a call that
would run is refused with 503 `audit_unavailable`: nothing runs unrecorded
(unless the tool is `fail_open`, which is counted). A call cancelled midway
(the agent hung up) still gets exactly its one record, or its outcome record
when the decision record was written: `record_abandoned`, without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .audit import AuditLog, AuditUnavailable
from .pipeline import Call, Rejection

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("regate.audit")


def _decision_label(call: Call) -> str:
    if call.shadow_denied:
        return "shadow_deny"
    if "would_refuse" in call.extra:
        return "would_refuse"  # a limit or breaker in warn mode would have refused it
    if "fail_open" in call.extra:
        return "allow_fail_open"
    return "allow"


class AuditRecorder:
    def __init__(self, audit: AuditLog, metrics: "Metrics", engine: Any = None) -> None:
        self.audit = audit
        # Calls refused before the policy stage still name the bundle in force.
        self.engine = engine
        self.metrics = metrics
        self.lost = metrics.audit_lost

    @property
    def healthy(self) -> bool:
        return self.audit.healthy

    @property
    def problem(self) -> str:
        return self.audit.reason or ""

    def _record(self, call: Call, kind: str, decision: str) -> dict:
        request = call.request
        tool = call.tool
        d = call.decision
        rejection = call.rejection
        if rejection is not None:
            # What the operator is told may say more than the agent was (a policy_error's detail).
            reasons = call.extra.get("operator_reasons") or rejection.reasons
        else:
            reasons = d.reasons if d is not None else []
        rec = {
            "kind": kind,
            "ts": time.time(),
            "decision_id": call.id,
            "agent": call.agent,
            "tool": call.tool_key if tool is not None else None,
            "method": request.method,
            "path": request.path,
            "body_sha256": call.body_sha256,
            "stage": call.ended_by,
            "decision": decision,
            "code": rejection.code if rejection is not None else None,
            "reasons": list(reasons),
            "revision": call.revision or (self.engine.revision if self.engine is not None else None),
            "added_us": (time.perf_counter_ns() - call.started_ns - (call.upstream_ns or 0)) // 1000,
        }
        warned = call.extra.get("would_refuse")
        if warned:
            # Warn mode: what enforcing would have answered. A call that ran carries the
            # first code it would have got; every would-be refusal is listed.
            if rejection is None:
                rec["code"] = warned[0]["code"]
            rec["would_refuse"] = [dict(w) for w in warned]
        return rec

    async def before_forward(self, call: Call) -> Rejection | None:
        audit = self.audit
        # append() chains the record before its first await unless the queue is full.
        chains_at_once = audit.pending < audit.max_pending
        try:
            await audit.append(self._record(call, "decision", _decision_label(call)))
        except asyncio.CancelledError:
            # NOTE: a call cancelled while the queue was full may or may not have its
            # record chained; it is taken as not, so at worst an allow record written
            # during an audit backlog has no outcome (the backlog is on /readyz).
            if chains_at_once:
                call.extra["audited"] = True  # its record is in: after_call writes the outcome
            raise
        except AuditUnavailable as exc:
            if call.tool.fail_open:
                # NOTE: deliberately lossy: this tool is configured fail_open, so it
                # runs although its decision could not be recorded. Counted.
                log.warning("audit unavailable (%s): call %s to fail_open tool %s runs UNRECORDED",
                            exc, call.id, call.tool.name)
                self.metrics.fail_open.labels(call.tool.name, "audit").inc()
                return None
            # The reason, without the segment's path: where the files live is for
            # /readyz and operators, not for agents.
            return Rejection(503, "audit_unavailable",
                             "Regate cannot record decisions right now, so it runs no calls; retry shortly",
                             reasons=[str(exc).rsplit(" on ", 1)[0]], retry_after=1)
        call.extra["audited"] = True
        return None

    async def record_rejection(self, call: Call) -> None:
        """The one record of a call a stage ended (or the outcome of a forward that failed)."""
        if call.extra.get("audited"):
            return  # its allow record exists; after_call writes the outcome
        if call.rejection is not None and call.rejection.code == "audit_unavailable":
            self.lost.labels("decision").inc()  # the log is known to be down: don't count the refusal twice
            return
        call.extra["recorded"] = True  # chained before append's first await (see before_forward)
        try:
            await self.audit.append(self._record(call, "decision", "deny"))
        except AuditUnavailable:
            # NOTE: the call is refused anyway; what is lost is the record of a
            # refusal, which is counted so an operator can see it.
            self.lost.labels("decision").inc()

    def record_abandoned(self, call: Call) -> None:
        """The record of a call cancelled before it was recorded (the agent hung up
        before its decision was written): a deny with the call's code. A call already
        allowed gets its outcome from after_call instead."""
        extra = call.extra
        if extra.get("audited") or extra.get("recorded"):
            return
        extra["recorded"] = True
        try:
            self.audit.append_nowait(self._record(call, "decision", "deny"))
        except AuditUnavailable:
            self.lost.labels("decision").inc()

    def after_call(self, call: Call, status: int, added_ns: int) -> None:
        if not call.extra.get("audited"):
            return
        # The outcome names its decision record by id and carries only what is
        # new: half the bytes to encode and hash on every forwarded call.
        rejection = call.rejection
        rec = {
            "kind": "outcome",
            "ts": time.time(),
            "decision_id": call.id,
            "status": status,
            "code": rejection.code if rejection is not None else None,
            "upstream_status": call.upstream_status,
            "upstream_us": call.upstream_ns // 1000 if call.upstream_ns is not None else None,
            "added_us": added_ns // 1000,
        }
        if call.body_sha256 is not None:
            rec["body_sha256"] = call.body_sha256  # a streamed body is hashed only as it goes
        try:
            self.audit.append_nowait(rec)
        except AuditUnavailable:
            self.lost.labels("outcome").inc()
