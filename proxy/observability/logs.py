"""Structured logs: JSON lines when `observability.log_format: json`, and the
per-call decision log (`regate.decisions`): one line per rejection or error at
INFO, one per decision at DEBUG, each with the decision id that the audit
record, the trace, the span and the `X-Regate-Decision-Id` header also carry.

Whether a line would be written is checked once, at startup
(`logger.isEnabledFor`), so a call pays for its log line only when it is written.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

DECISIONS = logging.getLogger("regate.decisions")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and a record's `regate` fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = record.created
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "regate", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def use_json_logs() -> None:
    """Switch every handler of the root logger to JSON lines."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    formatter = JsonFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)


class DecisionLog:
    __slots__ = ("rejections", "decisions")

    def __init__(self) -> None:
        self.rejections = DECISIONS.isEnabledFor(logging.INFO)
        self.decisions = DECISIONS.isEnabledFor(logging.DEBUG)

    @property
    def on(self) -> bool:
        return self.rejections or self.decisions

    def write(self, call: Any, status: int, outcome: str, added_ns: int, decision: str | None,
              revision: str | None, trace_id: str | None) -> None:
        rejection = call.rejection
        if rejection is None:
            if not self.decisions:
                return
            level, what = logging.DEBUG, "call forwarded"
        else:
            if not self.rejections:
                return
            level, what = logging.INFO, ("call failed" if status >= 500 else "call refused")
        # The operator's log: a policy_error's detail (rule location) that the agent is not shown.
        reasons = (call.extra.get("operator_reasons") or rejection.reasons) if rejection is not None else (
            call.decision.reasons if call.decision is not None else [])
        fields = {
            "decision_id": call.id,
            "agent": call.agent,
            "tool": call.tool_key,
            "method": call.request.method,
            "path": call.request.path,
            "status": status,
            "outcome": outcome,
            "stage": call.ended_by,
            "decision": decision,
            "reasons": list(reasons),
            "revision": revision,
            "added_us": added_ns // 1000,
            "upstream_us": call.upstream_ns // 1000 if call.upstream_ns is not None else None,
            "trace_id": trace_id,
        }
        DECISIONS.log(level, "%s: %s %s by %s (%s) agent=%s tool=%s%s", what, call.id, outcome, call.ended_by,
                      status, call.agent or "(unauthenticated)", call.tool_key or "(no tool)",
                      f" reasons={list(reasons)}" if reasons else "",
                      extra={"regate": fields})
