"""Policy: build the input document, ask the engine, apply the decision.

The input document is the stable, versioned contract of README.md ("The input document"). Credentials
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
from ..engines import Engine, EngineTimeout, PolicyInputTooLarge
from ..engines.decision import DecisionError, EngineError
from ..forwarded_headers import CREDENTIAL_HEADERS, IDENTITY_HEADERS, is_regate_own
from ..metrics import Metrics
from ..pipeline import Call, Rejection

log = logging.getLogger("regate.policy")

INPUT_VERSION = 1


class PolicyStage:
    name = "policy"

    def __init__(self, cfg: Config, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.mode = cfg.policy.mode
        # Per tool: the headers the policy is not shown — identity headers the tool never
        # gets (forwarded_headers), and credentials, which are secrets: policies (and their
        # logs, traces, explain output) are not the place for secrets.
        own = CREDENTIAL_HEADERS | {cfg.auth.header.lower()}
        self.hidden_headers = {t.name: own | (IDENTITY_HEADERS - set(t.pass_headers)) for t in cfg.tools}
        # Set by the app when an approval stage follows this one.
        self.approvals_enabled = False
        # Set by the app: the gpu stage (state.gpu comes from its controller) and the
        # ratelimit stage (which enforces the decision's `limits`); None when not configured.
        self.gpu: Any = None
        self.limits: Any = None
        # Set by the app when decision_logs.url is configured (proxy/decisionlogs).
        self.decision_log: Any = None

    def input_document(self, call: Call) -> dict[str, Any]:
        request = call.request
        tool = call.tool
        hidden = self.hidden_headers[tool.name]
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            low = name.lower()
            if low in hidden or is_regate_own(low):
                continue
            if not value.isascii():
                # Not UTF-8 on the wire (aiohttp kept the bytes as surrogates): the
                # policy sees replacement characters, not an encoding error.
                value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            headers[low] = f"{headers[low]}, {value}" if low in headers else value
        extra = call.extra
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
                # Decoded once from the raw query (read_body), as the tool decodes it.
                "query": extra.get("query", {}),
                "query_pairs": extra.get("query_pairs", []),
                "headers": headers,
                "body": call.body_json,
                # What the tool takes as its arguments (tool.arguments: body, query or
                # both, merged once read_body has refused any key given twice).
                "arguments": extra.get("arguments"),
                "body_sha256": call.body_sha256,
                "size": call.body_size,
            },
            "mcp": extra.get("mcp"),
            "state": extra.get("state", {}),
            "time_ns": time.time_ns(),
        }

    def _cannot_decide(self, call: Call, kind: str, detail: str, doc: Any = None, t: tuple = ()) -> Rejection | None:
        tool = call.tool
        if self.decision_log is not None and t:
            self.decision_log.log(call, doc, None, *t, error={"code": kind, "message": detail})
        self.metrics.policy_errors.labels(tool.name, kind).inc()
        if tool.fail_open:
            # NOTE: deliberately lossy. The operator marked this tool fail_open:
            # an engine failure lets the call through, loudly and counted.
            log.warning("policy %s for tool %s (decision %s): FAILING OPEN as configured: %s",
                        kind, tool.name, call.id, detail)
            self.metrics.fail_open.labels(tool.name, self.name).inc()
            call.extra["fail_open"] = f"policy {kind}: {detail}"
            return None
        # The detail (a rule's file:line, an engine's message) is for the operator: it goes to
        # the log, the audit record and `regate explain`; the agent gets a stable message
        # and the decision id to quote.
        log.warning("policy %s for tool %s (decision %s): %s", kind, tool.name, call.id, detail)
        call.extra["operator_reasons"] = [f"policy {kind}: {detail}"]
        return Rejection(403, "policy_error",
                         f"the policy could not decide on this call ({kind}), so it is refused; "
                         f"an operator can see why with: regate explain {call.id}")

    async def enter(self, call: Call) -> Rejection | None:
        started = time.perf_counter_ns() if self.decision_log is not None else 0
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
        doc = self.input_document(call)
        t = (started, time.perf_counter_ns()) if started else ()
        try:
            decision = await engine.evaluate(doc)
        except PolicyInputTooLarge as exc:
            # Not an engine failure, so never failed open: a fail_open tool would
            # otherwise let any call through unjudged by making it big enough.
            self.metrics.policy_errors.labels(call.tool.name, "input_too_large").inc()
            return Rejection(413, "policy_input_too_large", str(exc))
        except EngineTimeout as exc:
            return self._cannot_decide(call, "timeout", str(exc), doc, t)
        except EngineError as exc:
            return self._cannot_decide(call, "engine_error", str(exc), doc, t)
        except DecisionError as exc:
            return self._cannot_decide(call, "bad_decision", str(exc), doc, t)
        except Exception as exc:  # an engine bug must still end in a decision, never a 500
            log.exception("policy engine raised unexpectedly")
            return self._cannot_decide(call, "engine_error", f"{exc.__class__.__name__}: {exc}", doc, t)
        call.decision = decision
        if self.decision_log is not None:  # the exact document the engine was given, by reference
            self.decision_log.log(call, doc, decision.raw, *t)

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
