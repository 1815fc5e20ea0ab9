"""Policy: build the input document, ask the engine, apply the decision.

The input document is the stable, versioned contract of DESIGN.md. Credentials
never enter it. The decision is parsed strictly (engines/decision.py); an engine
that errs, times out or answers oddly means Regate cannot decide, and the call
is refused with `policy_error` — unless the tool says `fail_open: true`, which
is logged and counted every time. In shadow mode a deny is counted and audited
but the call goes on, so operators can watch a new policy before enforcing it.

`state` holds what earlier stages learnt (breaker, recent failures, budget left)
and, when GPU admission is configured, `state.gpu`: the admission controller's
summary of the sampled GPU view, taken as the policy stage begins (the gpu stage
itself runs after the policy). The decision's `limits` are handed to the
ratelimit stage's `enforce_decision` right after the decision: the GCRA and the
stores live there, not here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import Config
from ..engines import Engine
from ..engines.decision import DecisionError, EngineError
from ..metrics import Metrics
from ..pipeline import Call, Rejection

log = logging.getLogger("regate.policy")

INPUT_VERSION = 1
# Never shown to policy: they are secrets, and policies (and their logs,
# traces, explain output) are not the place for secrets.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})


def _query(raw: str) -> dict[str, list[str]]:
    from urllib.parse import parse_qsl

    out: dict[str, list[str]] = {}
    for k, v in parse_qsl(raw, keep_blank_values=True):
        out.setdefault(k, []).append(v)
    return out


class PolicyStage:
    name = "policy"

    def __init__(self, cfg: Config, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.mode = cfg.policy.mode
        self.hidden_headers = CREDENTIAL_HEADERS | {cfg.auth.header.lower()}
        # Set by the app when an approval stage follows this one.
        self.approvals_enabled = False
        # Set by the app: the gpu stage (state.gpu comes from its controller) and the
        # ratelimit stage (which enforces the decision's `limits`); None when not configured.
        self.gpu: Any = None
        self.limits: Any = None

    def input_document(self, call: Call) -> dict[str, Any]:
        request = call.request
        tool = call.tool
        hidden = self.hidden_headers
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            low = name.lower()
            if low in hidden:
                continue
            if not value.isascii():
                # Not UTF-8 on the wire (aiohttp kept the bytes as surrogates): the
                # policy sees replacement characters, not an encoding error.
                value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            headers[low] = f"{headers[low]}, {value}" if low in headers else value
        qs = request.query_string
        return {
            "version": INPUT_VERSION,
            "agent": {"id": call.agent, "claims": call.claims},
            "tool": {
                "name": tool.name,
                "route": tool.prefix,
                "gpu": {"memory_mb": tool.gpu.memory_mb} if tool.gpu.memory_mb else None,
            },
            "request": {
                "method": request.method,
                "path": request.path,
                "query": _query(qs) if qs else {},
                "headers": headers,
                "body": call.body_json,
                "body_sha256": call.body_sha256,
                "size": call.body_size,
            },
            "mcp": call.extra.get("mcp"),
            "state": call.extra.get("state", {}),
            "time_ns": time.time_ns(),
        }

    def _cannot_decide(self, call: Call, kind: str, detail: str) -> Rejection | None:
        tool = call.tool
        self.metrics.policy_errors.labels(tool.name, kind).inc()
        if tool.fail_open:
            # NOTE: deliberately lossy. The operator marked this tool fail_open:
            # an engine failure lets the call through, loudly and counted.
            log.warning("policy %s for tool %s (decision %s): FAILING OPEN as configured: %s",
                        kind, tool.name, call.id, detail)
            self.metrics.fail_open.labels(tool.name, self.name).inc()
            call.extra["fail_open"] = f"policy {kind}: {detail}"
            return None
        return Rejection(403, "policy_error", f"the policy could not decide on this call ({kind}), so it is refused",
                         reasons=[detail])

    async def enter(self, call: Call) -> Rejection | None:
        engine = self.engine
        call.revision = engine.revision
        call.response_headers["X-Regate-Policy-Revision"] = engine.revision
        if self.gpu is not None:
            gpu = self.gpu.policy_state()
            if gpu is not None:
                # Kept on the call (not rebuilt by input_document), so `regate explain`
                # later sees the GPU state this decision saw. A cached dict the controller
                # replaces, never mutates: sharing it between calls is safe.
                state = call.extra.get("state")
                if state is None:
                    state = call.extra["state"] = {}
                state["gpu"] = gpu
        try:
            decision = await engine.evaluate(self.input_document(call))
        except EngineError as exc:
            return self._cannot_decide(call, "engine_error", str(exc))
        except DecisionError as exc:
            return self._cannot_decide(call, "bad_decision", str(exc))
        except Exception as exc:  # an engine bug must still end in a decision, never a 500
            log.exception("policy engine raised unexpectedly")
            return self._cannot_decide(call, "engine_error", f"{exc.__class__.__name__}: {exc}")
        call.decision = decision

        mode = call.tool.policy_mode or self.mode
        if not decision.allow:
            if mode == "shadow":
                call.shadow_denied = True
                for reason in decision.reasons or ["(no reason given)"]:
                    self.metrics.would_deny.labels(call.tool.name, reason).inc()
            else:
                return Rejection(403, "policy_denied", "the policy refused this call", reasons=decision.reasons)
        elif decision.approval_required and not self.approvals_enabled:
            # The approval inbox arrives with its own stage; until one is wired,
            # a call that needs a human cannot run (fail closed).
            return Rejection(403, "approval_unavailable",
                             "this call needs human approval and no approval inbox is configured",
                             reasons=[decision.approval_reason] if decision.approval_reason else [])

        if decision.headers_set:
            call.set_headers = decision.headers_set
        if decision.headers_remove:
            call.remove_headers = decision.headers_remove
        if decision.timeout_ms is not None:
            call.timeout_ms = decision.timeout_ms
        if decision.cost is not None:
            call.cost = decision.cost
        if decision.limit_checks is not None and self.limits is not None and not call.shadow_denied:
            # NOTE: with limits switched off (limits.enabled: false) there is no limiter,
            # and a decision's limits are not enforced either. A shadow-denied call would
            # not get this far when enforcing, so it spends nothing; in shadow mode the
            # agent is not sent the decision's RateLimit items (watching changes nothing).
            rejection = await self.limits.enforce_decision(call, decision.limit_checks,
                                                           advertise=mode != "shadow")
            if rejection is not None:
                if mode != "shadow":
                    return rejection
                # Shadow: the policy is being watched, not enforced; count what its
                # limits would have refused (a fixed reason: the label stays bounded).
                call.shadow_denied = True
                self.metrics.would_deny.labels(call.tool.name, f"decision limits: {rejection.code}").inc()
        return None

    def leave(self, call: Call) -> None:
        pass
