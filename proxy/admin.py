"""The admin plane: health, readiness, metrics and operator actions, on its own port.

`/admin/*` requires `Authorization: Bearer <token>`: `admin.token` (every role) or
one of `admin.tokens`, whose role must allow the request (proxy/identity/operators:
viewer reads, approver decides approvals, operator reloads and resets). Health and
metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from .approvals import add_admin_routes
from .identity.operators import OPERATOR_KEY, OperatorTokens, required_role
from .observability.api import add_routes as add_observability_routes
from .version import __version__

if TYPE_CHECKING:
    from .app import Regate


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message, "decision_id": None, "reasons": []}}, status)


def admin_app(regate: "Regate") -> web.Application:
    app = web.Application()
    operators = OperatorTokens(regate.cfg.admin)

    @web.middleware
    async def require_token(request: web.Request, handler):  # type: ignore[no-untyped-def]
        # Health and metrics stay open for probes and scrapers; every operator
        # action needs a token, and without a configured token there is none.
        # The inbox page itself holds no data (everything it shows comes from
        # /admin/approvals* with the token), so a browser may open it directly.
        if request.path.startswith("/admin/") and not (
                request.method == "GET" and request.path == "/admin/ui/approvals"):
            if not operators.enabled:
                return _error(401, "unauthenticated",
                              "the admin API is disabled: set admin.token or admin.tokens in regate.yaml")
            operator = operators.lookup(request.headers.get("Authorization"))
            if operator is None:
                return _error(401, "unauthenticated", "admin API needs Authorization: Bearer <admin token>")
            role = required_role(request.method, request.path)
            if not operator.may(role):
                return _error(403, "forbidden", f"operator {operator.name} has roles "
                              f"{', '.join(sorted(operator.roles))}; this needs {role}")
            request[OPERATOR_KEY] = operator
        return await handler(request)

    app.middlewares.append(require_token)

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok", "version": __version__})

    async def readyz(request: web.Request) -> web.Response:
        problems = list(regate.ready_problems)
        identity = getattr(regate, "authenticator", None)
        if identity is not None:
            problems += identity.problems()  # an issuer whose keys went stale: its tokens are refused
        recorder = regate.recorder
        if recorder is not None and not getattr(recorder, "healthy", True):
            problems.append(f"audit: {getattr(recorder, 'problem', 'unwritable')}")
        warnings = identity.warnings() if identity is not None else []
        bundles = getattr(regate, "bundle_service", None)
        if bundles is not None:
            problems += bundles.problems()  # no bundle yet: every call is refused
            warnings += bundles.warnings()  # the server failed: the last good bundle serves
        stores = regate.limit_stores
        # probe(): a replica taken out of rotation gets no calls to test Redis with.
        if stores is not None and not await stores.probe():
            mode = regate.cfg.limits.on_store_error
            line = f"limits: shared store unreachable, answering with on_store_error={mode}"
            # With deny every limited call fails, so the replica is not ready;
            # with local/allow calls still flow and readiness only says so.
            (problems if mode == "deny" else warnings).append(line)
        gpu = regate.gpu.controller if regate.gpu is not None else None
        body = {
            "gpu": gpu.view.status if gpu is not None else "off",
            "ready": not problems,
            "warnings": warnings,
            "problems": problems,
            "policy": {"engine": regate.engine.name, "revision": regate.engine.revision},
            "bundle": bundles.status() if bundles is not None else {"service": False},
            "tools": {t.name: t.upstream for t in regate.cfg.tools},
            "worker": regate.worker_index,
        }
        return _json(body, 200 if not problems else 503)

    async def metrics(request: web.Request) -> web.Response:
        if regate.metrics is None:
            return _error(404, "metrics_off", "metrics are switched off in config (metrics: false)")
        return web.Response(body=regate.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def reload(request: web.Request) -> web.Response:
        report = await regate.reload()
        if report["reloaded"] and os.environ.get("REGATE_SUPERVISOR_PID"):
            # Under --workers N the other workers reload on the supervisor's SIGHUP.
            os.kill(int(os.environ["REGATE_SUPERVISOR_PID"]), signal.SIGHUP)
        if report["reloaded"]:
            return _json(report)
        errors = [e for e in (report["policy"].get("error"), report["credentials"].get("error")) if e]
        return _json({**report, "error": {"code": "reload_failed", "message": "\n".join(errors)}}, 422)

    async def whoami(request: web.Request) -> web.Response:
        op = request[OPERATOR_KEY]
        return _json({"name": op.name, "roles": sorted(op.roles), "verified": op.verified})

    async def status(request: web.Request) -> web.Response:
        dl = regate.decision_logs
        bundles = getattr(regate, "bundle_service", None)
        return _json({
            "worker": regate.worker_index,
            "policy": {"engine": regate.engine.name, "revision": regate.engine.revision},
            "bundle": bundles.status() if bundles is not None else {"service": False},
            "decision_logs": dl.status() if dl is not None else {"enabled": False},
        })

    async def gpu(request: web.Request) -> web.Response:
        controller = regate.gpu.controller if regate.gpu is not None else None
        if controller is None:
            return _error(404, "gpu_off", "GPU admission is off: no tool declares gpu.memory_mb")
        return _json(controller.snapshot())

    async def breakers(request: web.Request) -> web.Response:
        if regate.breakers is None:
            return _error(404, "breakers_off", "every breaker is switched off in config (breakers:)")
        return _json(regate.breakers.snapshot(time.monotonic()))

    async def breaker_reset(request: web.Request) -> web.Response:
        tool = request.match_info["tool"]
        if regate.breakers is None:
            return _error(404, "breakers_off", "every breaker is switched off in config (breakers:)")
        if tool not in {t.name for t in regate.cfg.tools}:
            return _error(404, "unknown_tool", f"no tool named {tool!r}")
        regate.breakers.reset(tool, time.monotonic())
        return _json({"reset": tool, "state": regate.breakers.state(tool, time.monotonic())})

    add_admin_routes(app, regate)
    add_observability_routes(app, regate)
    app.router.add_get("/admin/breakers", breakers)
    app.router.add_post("/admin/breakers/{tool}/reset", breaker_reset)
    app.router.add_get("/admin/gpu", gpu)
    app.router.add_get("/admin/status", status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/whoami", whoami)
    return app
