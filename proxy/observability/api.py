"""The explain API and the overview page, on the admin port.

    GET /admin/decisions/<id>                       one call's trace (ring, else the audit log)
    GET /admin/decisions?agent=&tool=&outcome=&limit=   recent calls, newest first
    GET /admin/overview                             the overview page's numbers (JSON)
    GET /ui/overview, /admin/ui/overview            the overview page itself

Everything under /admin/ is behind the admin middleware's bearer token. The
page is a static shell with no data in it (a browser's navigation cannot carry
a bearer token): it asks for the token once, keeps it in sessionStorage (the
approval inbox's key, so one sign-in serves both pages) and sends it on every
request. Only operators see traces: an agent's answer never carries more
than code, message, reasons and decision id.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..ui import load_page

from .traces import DECISION_ID, find_in_audit, matches, summary, trace_json

if TYPE_CHECKING:
    from ..app import Regate

_PAGE, PAGE_HEADERS = load_page(Path(__file__).parent / "overview.html")
MAX_LIST = 1000


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message, "decision_id": None, "reasons": []}}, status)


def add_routes(app: web.Application, regate: "Regate") -> None:
    obs = regate.observability

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=_PAGE, content_type="text/html", headers=PAGE_HEADERS)

    async def get_decision(request: web.Request) -> web.Response:
        decision_id = request.match_info["id"]
        if not DECISION_ID.match(decision_id):
            return _error(400, "bad_decision_id", "a decision id is the X-Regate-Decision-Id a response carried")
        ring = obs.ring
        entry = ring.get(decision_id) if ring is not None else None
        if entry is not None:
            return _json(trace_json(entry))
        audit = regate.audit
        if audit is not None:
            found = await asyncio.to_thread(find_in_audit, audit.dir, decision_id)
            if found is not None:
                return _json(found)
        where = "this worker's trace ring" if ring is not None else "the audit log (traces are off)"
        return _error(404, "unknown_decision", f"no decision {decision_id} in {where} or the audit log")

    async def list_decisions(request: web.Request) -> web.Response:
        q = request.query
        try:
            limit = min(max(int(q.get("limit", "50")), 1), MAX_LIST)
        except ValueError:
            return _error(400, "bad_limit", "limit must be a whole number")
        ring = obs.ring
        if ring is None:
            return _error(404, "traces_off", "decision traces are off (observability.traces: 0)")
        agent, tool, outcome = q.get("agent") or None, q.get("tool") or None, q.get("outcome") or None
        out = []
        for entry in ring.newest_first():
            if matches(entry, agent, tool, outcome):
                out.append(summary(entry))
                if len(out) >= limit:
                    break
        return _json({"decisions": out, "stored": len(ring), "size": ring.size})

    async def overview(request: web.Request) -> web.Response:
        doc = snapshot(regate)
        doc["approvals_pending"] = await _approvals_pending(regate)
        return _json(doc)

    app.router.add_get("/ui/overview", page)
    app.router.add_get("/admin/ui/overview", page)
    app.router.add_get("/admin/overview", overview)
    app.router.add_get("/admin/decisions", list_decisions)
    app.router.add_get("/admin/decisions/{id}", get_decision)


async def _approvals_pending(regate: "Regate") -> int | None:
    """Approvals waiting for a human, async ones included (not only the calls held open);
    None when approvals are off or the store cannot say."""
    stage = regate.approvals
    if stage is None:
        return None
    try:
        return len(await stage.store.list("pending", time.time(), stage.max_pending))
    except Exception:  # noqa: BLE001 - the overview shows "?" rather than failing
        return None


# Outcomes that are not refusals: waiting for a human, or throttled (their own tile).
WAITING = frozenset({"approval_pending"})
THROTTLED = frozenset({"rate_limited", "budget_exhausted", "too_many_concurrent"})


def _samples(regate: "Regate") -> dict[str, list[tuple[dict[str, str], float]]]:
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    if regate.metrics is None:
        return by_name
    for family in regate.metrics.registry.collect():
        for s in family.samples:
            by_name.setdefault(s.name, []).append((s.labels, s.value))
    return by_name


def snapshot(regate: "Regate") -> dict[str, Any]:
    """The key numbers, from the metrics registry and the trace ring (one scrape's work)."""
    s = _samples(regate)

    def total(name: str, **match: str) -> float:
        return sum(v for labels, v in s.get(name, ()) if all(labels.get(k) == val for k, val in match.items()))

    def by(name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, v in s.get(name, ()):
            out[labels.get(label, "")] = out.get(labels.get(label, ""), 0) + v
        return out

    def buckets(name: str) -> list[list[float]]:
        agg: dict[float, float] = {}
        for labels, v in s.get(name + "_bucket", ()):
            le = float(labels["le"])
            agg[le] = agg.get(le, 0) + v
        return [[le if le != float("inf") else None, n] for le, n in sorted(agg.items())]

    obs = regate.observability
    ring = obs.ring
    recent = []
    if ring is not None:
        for entry in ring.newest_first():
            recent.append(summary(entry))
            if len(recent) >= 12:
                break
    breakers = {labels.get("tool"): int(v) for labels, v in s.get("regate_breaker_state", ())}
    gpu_queue = s.get("regate_gpu_queue_depth")
    audit_pending = s.get("regate_audit_pending_records")
    held = s.get("regate_approvals_held")
    outcomes = by("regate_calls_total", "outcome")
    waiting = sum(v for k, v in outcomes.items() if k in WAITING)
    throttled = sum(v for k, v in outcomes.items() if k in THROTTLED)
    calls_total = total("regate_calls_total")
    return {
        "now": time.time(),
        "started": obs.started,
        "worker": regate.worker_index,
        "metrics": regate.metrics is not None,
        "policy": {"engine": regate.engine.name, "revision": regate.engine.revision},
        "calls": {"total": calls_total, "by_outcome": outcomes, "waiting": waiting, "throttled": throttled,
                  "refused": calls_total - outcomes.get("forwarded", 0) - waiting - throttled},
        "rejections": {f"{labels.get('stage')}/{labels.get('code')}": v
                       for labels, v in s.get("regate_rejections_total", ())},
        "limits": by("regate_limit_rejections_total", "kind"),
        "added_seconds": buckets("regate_added_seconds"),
        "upstream_seconds": buckets("regate_upstream_seconds"),
        "breakers": breakers,
        "gpu_queue": sum(v for _, v in gpu_queue) if gpu_queue is not None else None,
        "audit_pending": sum(v for _, v in audit_pending) if audit_pending is not None else None,
        "audit_lost": total("regate_audit_lost_total"),
        "approvals_held": sum(v for _, v in held) if held is not None else None,
        "folded_labels": total("regate_label_values_folded_total"),
        "traces": {"stored": len(ring), "size": ring.size} if ring is not None else None,
        "recent": recent,
    }
