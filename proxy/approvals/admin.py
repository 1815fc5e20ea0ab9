"""The approvals' admin API, their live event stream and the inbox page.

Everything under /admin/ is behind the admin middleware's bearer token
(proxy/admin.py); deciding needs the approver role. The approver recorded is the
operator the token names (admin.tokens); only the shared admin.token, which names
nobody, takes the name from the request body, and the audit marks it unverified. The inbox page itself is a static shell with no data in it,
served at /ui/approvals because a browser's navigation cannot carry a bearer
token; the page asks for the token once, keeps it in sessionStorage and sends
it on every /admin/approvals* request it makes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..ui import load_page

from ..audit import AuditUnavailable
from ..identity.operators import OPERATOR_KEY
from .approval import ID_PATTERN, STATES
from .store import ApprovalStoreError

if TYPE_CHECKING:
    from .stage import ApprovalStage

MAX_APPROVER = 200
MAX_COMMENT = 2000
KEEPALIVE_S = 15.0

_PAGE, PAGE_HEADERS = load_page(Path(__file__).parent / "inbox.html")


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message, "decision_id": None, "reasons": []}}, status)


def _store_down(exc: Exception) -> web.Response:
    return _error(503, "approval_unavailable", f"the approval store is unreachable: {exc}")


def add_routes(app: web.Application, regate: Any) -> None:
    stage: ApprovalStage | None = regate.approvals
    closing = asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=_PAGE, content_type="text/html", headers=PAGE_HEADERS)

    app.router.add_get("/ui/approvals", page)
    app.router.add_get("/admin/ui/approvals", page)

    if stage is None:
        async def off(request: web.Request) -> web.Response:
            return _error(404, "approvals_off", "approvals are off (approvals.enabled: false, or policy.engine: off)")

        app.router.add_route("*", "/admin/approvals", off)
        app.router.add_route("*", "/admin/approvals/{tail:.*}", off)
        return

    async def fresh(rec: dict[str, Any]) -> dict[str, Any]:
        now = stage.clock()
        if rec["state"] == "pending" and now >= rec["expires"]:
            await stage.expire_lazily(rec, now)
        return stage.admin_view(rec)

    async def list_approvals(request: web.Request) -> web.Response:
        state = request.query.get("state", "all")
        if state not in STATES and state != "all":
            return _error(400, "bad_state", f"state must be one of {', '.join(STATES)} or all, got {state!r}")
        try:
            limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
        except ValueError:
            return _error(400, "bad_limit", "limit must be a whole number")
        await stage.start()
        try:
            recs = await stage.store.list(None if state == "all" else state, stage.clock(), limit)
            views = [await fresh(r) for r in recs]
        except ApprovalStoreError as exc:
            return _store_down(exc)
        if state != "all":
            views = [v for v in views if v["state"] == state]
        return _json({"now": stage.clock(), "approvals": views})

    async def get_approval(request: web.Request) -> web.Response:
        await stage.start()
        try:
            rec = await stage.store.get(request.match_info["id"])
            if rec is None:
                return _error(404, "unknown_approval", f"no approval {request.match_info['id']}")
            return _json({"now": stage.clock(), "approval": await fresh(rec)})
        except ApprovalStoreError as exc:
            return _store_down(exc)

    async def decide(request: web.Request) -> web.Response:
        approval_id = request.match_info["id"]
        to = "approved" if request.match_info["verb"] == "approve" else "denied"
        try:
            body = orjson.loads(await request.read()) if request.can_read_body else {}
        except orjson.JSONDecodeError:
            return _error(400, "bad_json", "send a JSON object: {\"approver\": \"your name\", \"comment\": \"why\"}")
        if not isinstance(body, dict):
            return _error(400, "bad_json", "send a JSON object: {\"approver\": \"your name\", \"comment\": \"why\"}")
        approver, comment = body.get("approver"), body.get("comment") or ""
        operator = request.get(OPERATOR_KEY)
        verified = operator is not None and operator.verified
        if verified:
            approver = operator.name  # the token's name, whatever the body says
        elif not isinstance(approver, str) or not approver.strip() or len(approver) > MAX_APPROVER:
            return _error(400, "approver_required",
                          f"approver: the name of the person deciding is required (at most {MAX_APPROVER} characters)")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            return _error(400, "bad_comment", f"comment: text of at most {MAX_COMMENT} characters")
        approver = approver.strip()
        await stage.start()
        try:
            outcome, state = await stage.store.settle(approval_id, to, stage.clock(), approver, comment)
            rec = await stage.store.get(approval_id)
        except ApprovalStoreError as exc:
            return _store_down(exc)
        if outcome == "missing" or rec is None:
            return _error(404, "unknown_approval", f"no approval {approval_id}")
        if outcome == "expired_now":
            stage.record_nowait("expired", rec, timeout_s=stage.timeout_s, late_decision_by=approver)
            return _error(409, "approval_expired", f"approval {approval_id} expired before this decision")
        if outcome == "conflict":
            return _error(409, "approval_decided", f"approval {approval_id} is already {state}")
        try:
            await stage.record(to, rec, approver=approver, approver_verified=verified, comment=comment,
                               revision=rec.get("revision"), remote=request.remote)
        except AuditUnavailable:
            # NOTE: the decision stands (the held call may already be running
            # and gets its own decision record); the lost step is counted.
            if stage.audit_lost is not None:
                stage.audit_lost.labels("approval").inc()
        return _json({"now": stage.clock(), "approval": stage.admin_view(rec)})

    async def events(request: web.Request) -> web.StreamResponse:
        """Server-sent events: one `approval` event per state change, anywhere."""
        await stage.start()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q = stage.store.events.listen()
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            await resp.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
            while not closing.is_set():
                try:
                    item = await asyncio.wait_for(q.get(), 1.0)
                except TimeoutError:
                    item = False
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                if item is None:
                    break
                if item is False:
                    if loop.time() - last >= KEEPALIVE_S:
                        await resp.write(b": keep-alive\n\n")
                        last = loop.time()
                    continue
                approval_id, state = item
                data = orjson.dumps({"id": approval_id, "state": state})
                await resp.write(b"event: approval\ndata: " + data + b"\n\n")
                last = loop.time()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            stage.store.events.unlisten(q)
        return resp

    async def on_startup(app: web.Application) -> None:
        await stage.start()

    async def on_shutdown(app: web.Application) -> None:
        closing.set()
        stage.store.events.close_listeners()

    async def on_cleanup(app: web.Application) -> None:
        # The data plane has drained by now (app.py cleans its runner first).
        await stage.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/admin/approvals", list_approvals)
    app.router.add_get("/admin/approvals/events", events)
    app.router.add_get(f"/admin/approvals/{{id:{ID_PATTERN}}}", get_approval)
    app.router.add_post(f"/admin/approvals/{{id:{ID_PATTERN}}}/{{verb:approve|deny}}", decide)
