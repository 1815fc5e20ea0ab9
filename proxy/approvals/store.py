"""Where pending approvals live, and how a decision reaches the call waiting on it.

Two stores with one interface: `MemoryApprovalStore` (one process) and
`RedisApprovalStore` (redis_store.py: every replica sharing one Redis). Every
state change is one atomic step in the store — a call is approved or denied,
expired or withdrawn, used or not, exactly once, whoever tries at the same
moment — and each step is announced on `ApprovalEvents`: the waiting call and
the inbox's live stream listen there. Time is passed in (`now`), never read
here, so the rules are tables of (time, event) → outcome in the tests.

Outcomes of `settle` and `claim` are short words the stage maps to answers:
ok, missing, conflict, expired_now (this step found the approval past its
expiry and marked it expired: the caller writes that audit record), pending,
denied, expired, withdrawn, used, mismatch, stale.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from .approval import effective_state


class ApprovalStoreError(Exception):
    """The store cannot be reached or answered oddly: nothing was changed."""


class ApprovalStoreFull(Exception):
    """`max_pending` approvals are already waiting."""


class Binding:
    """What a re-sent call must match to use an approval (async mode)."""

    __slots__ = ("agent", "tool", "target_sha256", "body_sha256", "use_within_s")

    def __init__(self, agent: str, tool: str, target_sha256: str, body_sha256: str, use_within_s: float) -> None:
        self.agent = agent
        self.tool = tool
        self.target_sha256 = target_sha256
        self.body_sha256 = body_sha256
        self.use_within_s = use_within_s


class ApprovalEvents:
    """Fan-out of state changes inside one process: to calls waiting on one
    approval id, and to every live inbox stream."""

    def __init__(self, queue_size: int = 256) -> None:
        self._waiters: dict[str, set[asyncio.Future[str]]] = {}
        self._listeners: set[asyncio.Queue[tuple[str, str] | None]] = set()
        self._queue_size = queue_size

    def waiter(self, approval_id: str) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(approval_id, set()).add(fut)
        return fut

    def discard(self, approval_id: str, fut: asyncio.Future[str]) -> None:
        waiters = self._waiters.get(approval_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[approval_id]

    def listen(self) -> asyncio.Queue[tuple[str, str] | None]:
        q: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(self._queue_size)
        self._listeners.add(q)
        return q

    def unlisten(self, q: asyncio.Queue[tuple[str, str] | None]) -> None:
        self._listeners.discard(q)

    def publish(self, approval_id: str, state: str) -> None:
        if state != "pending":  # a waiter waits for the end of pending
            for fut in self._waiters.pop(approval_id, ()):
                if not fut.done():
                    fut.set_result(state)
        for q in self._listeners:
            if q.full():
                # NOTE: lossy on purpose: a stalled inbox must not hold memory;
                # the page refetches the whole list on every event anyway.
                q.get_nowait()
            q.put_nowait((approval_id, state))

    def close_listeners(self) -> None:
        for q in self._listeners:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)


class ApprovalStore(Protocol):
    name: str
    events: ApprovalEvents

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, rec: dict[str, Any], now: float, max_pending: int, keep_s: float) -> None: ...

    async def get(self, approval_id: str) -> dict[str, Any] | None: ...

    async def list(self, state: str | None, now: float, limit: int) -> list[dict[str, Any]]: ...

    async def settle(
        self, approval_id: str, to: str, now: float, approver: str = "", comment: str = ""
    ) -> tuple[str, str | None]: ...

    async def claim(
        self, approval_id: str, used_by: str, now: float, binding: Binding | None = None
    ) -> tuple[str, str]: ...


def settle_record(
    rec: dict[str, Any] | None, to: str, now: float, approver: str, comment: str
) -> tuple[str, str | None]:
    """The rule of `settle`, on a record in hand; the Redis Lua script is the same rule."""
    if rec is None:
        return "missing", None
    if rec["state"] != "pending":
        return "conflict", rec["state"]
    outcome = "ok"
    if to in ("approved", "denied") and now >= rec["expires"]:
        # A decision that arrives after the deadline is too late: the call is
        # (or is about to be) answered 408, so the approval expires instead.
        to, outcome = "expired", "expired_now"
    rec["state"] = to
    rec["decided_at"] = now
    if to in ("approved", "denied"):
        rec["approver"] = approver
        rec["comment"] = comment
    return outcome, to


def claim_record(rec: dict[str, Any] | None, used_by: str, now: float, binding: Binding | None) -> tuple[str, str]:
    """The rule of `claim` (approved → used, once), on a record in hand."""
    if rec is None:
        return "missing", ""
    if binding is not None and (rec["mode"] != "async" or rec["agent"] != binding.agent):
        # Another agent's approval looks exactly like no approval at all.
        return "missing", ""
    state = rec["state"]
    if state == "pending":
        if now >= rec["expires"]:
            rec["state"] = "expired"
            rec["decided_at"] = now
            return "expired_now", ""
        return "pending", ""
    if state != "approved":
        return state, ""
    if binding is not None:
        bad = [name for name, want, got in (
            ("tool", rec["tool"], binding.tool),
            ("method and path", rec["target_sha256"], binding.target_sha256),
            ("body", rec["body_sha256"], binding.body_sha256),
        ) if want != got]
        if bad:
            return "mismatch", ",".join(bad)
        if now > rec["decided_at"] + binding.use_within_s:
            return "stale", ""
    rec["state"] = "used"
    rec["used_by"] = used_by
    rec["used_at"] = now
    return "ok", ""


class MemoryApprovalStore:
    """Approvals of this process only (one replica, one worker)."""

    name = "memory"

    def __init__(self) -> None:
        self.events = ApprovalEvents()
        self._records: dict[str, dict[str, Any]] = {}
        self._gone_at: dict[str, float] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.events.close_listeners()

    def _purge(self, now: float) -> None:
        for approval_id in [i for i, t in self._gone_at.items() if t <= now]:
            self._records.pop(approval_id, None)
            del self._gone_at[approval_id]

    async def create(self, rec: dict[str, Any], now: float, max_pending: int, keep_s: float) -> None:
        self._purge(now)
        waiting = sum(1 for r in self._records.values() if effective_state(r, now) == "pending")
        if waiting >= max_pending:
            raise ApprovalStoreFull(f"{waiting} approvals are pending")
        self._records[rec["id"]] = dict(rec)
        self._gone_at[rec["id"]] = now + keep_s
        self.events.publish(rec["id"], "pending")

    async def get(self, approval_id: str) -> dict[str, Any] | None:
        rec = self._records.get(approval_id)
        return dict(rec) if rec is not None else None

    async def list(self, state: str | None, now: float, limit: int) -> list[dict[str, Any]]:
        self._purge(now)
        out = [dict(r) for r in self._records.values() if state is None or r["state"] == state]
        out.sort(key=lambda r: r["created"], reverse=True)
        return out[:limit]

    async def settle(
        self, approval_id: str, to: str, now: float, approver: str = "", comment: str = ""
    ) -> tuple[str, str | None]:
        outcome, state = settle_record(self._records.get(approval_id), to, now, approver, comment)
        if outcome in ("ok", "expired_now"):
            self.events.publish(approval_id, state or to)
        return outcome, state

    async def claim(
        self, approval_id: str, used_by: str, now: float, binding: Binding | None = None
    ) -> tuple[str, str]:
        outcome, detail = claim_record(self._records.get(approval_id), used_by, now, binding)
        if outcome == "ok":
            self.events.publish(approval_id, "used")
        elif outcome == "expired_now":
            self.events.publish(approval_id, "expired")
        return outcome, detail
