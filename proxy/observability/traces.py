"""Decision traces: a bounded ring of what happened to each recent call, and
the JSON the explain API makes of one.

A call's trace is stored as one flat tuple of references Regate already holds
(the request line and headers as parsed, the decision, the rejection, the
call's extras, the stage marks): nothing is formatted, copied or even looked
up on the request path. `trace_json` builds the readable document only when
someone asks for it; finding one by id scans the ring, which is an operator's
cost, not a call's. The ring holds the last `size` calls of this process; an
older decision is found in the audit log by its id (`find_in_audit`), with
the stage, reasons and revision but without per-stage timings.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import orjson

from ..audit import SEGMENT_RE
from .propagation import parse_traceparent

# The stored tuple, field by field.
(ID, STARTED_NS, AGENT, TOOL, METHOD, PATH, PARENT, STATUS, OUTCOME, ENDED_BY, MARKS, TOTAL_NS, UPSTREAM_NS,
 UPSTREAM_STATUS, REVISION, DECISION, REJECTION, NOTES, SHADOW, TRACE_ID, EXPLAIN) = range(21)

DECISION_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
# How much of the audit log a lookup of an old decision reads, newest segments first.
AUDIT_SCAN_BYTES = 256 << 20


class TraceRing:
    """The last `size` call traces of this process, by decision id."""

    __slots__ = ("size", "_slots", "_pos", "_count")

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: list[tuple | None] = [None] * size
        self._pos = 0
        self._count = 0

    def add(self, entry: tuple) -> None:
        pos = self._pos
        self._slots[pos] = entry
        pos += 1
        if pos == self.size:
            pos = 0
            self._count = self.size
        self._pos = pos

    def get(self, decision_id: str) -> tuple | None:
        for entry in self.newest_first():
            if entry[ID] == decision_id:
                return entry
        return None

    def __len__(self) -> int:
        return self._count or self._pos

    def newest_first(self) -> Iterator[tuple]:
        slots, size, pos = self._slots, self.size, self._pos
        for i in range(1, size + 1):
            entry = slots[(pos - i) % size]
            if entry is None:
                return
            yield entry


def matches(entry: tuple, agent: str | None, tool: str | None, outcome: str | None) -> bool:
    if agent is not None and entry[AGENT] != agent:
        return False
    if tool is not None:
        t = entry[TOOL] or ""
        if t != tool and not t.startswith(tool + "/"):
            return False
    if outcome is not None:
        o = entry[OUTCOME]
        if outcome == "rejected":
            return o != "forwarded"
        if outcome == "denied":
            return o in ("policy_denied", "approval_denied") or entry[SHADOW]
        return o == outcome
    return True


def wall_time(entry: tuple) -> float:
    """When the call arrived (Unix time), from its monotonic start."""
    return time.time() - (time.perf_counter_ns() - entry[STARTED_NS]) / 1e9


def summary(entry: tuple) -> dict[str, Any]:
    return {
        "decision_id": entry[ID],
        "ts": round(wall_time(entry), 6),
        "agent": entry[AGENT],
        "tool": entry[TOOL],
        "method": entry[METHOD],
        "path": entry[PATH],
        "status": entry[STATUS],
        "outcome": entry[OUTCOME],
        "stage": entry[ENDED_BY],
        "total_us": entry[TOTAL_NS] // 1000,
        "added_us": (entry[TOTAL_NS] - (entry[UPSTREAM_NS] or 0)) // 1000,
    }


def _decision_label(entry: tuple) -> str | None:
    d = entry[DECISION]
    if entry[SHADOW]:
        return "shadow_deny"
    notes = entry[NOTES]
    if notes is not None and "fail_open" in notes:
        return "allow_fail_open"
    if d is None:
        return None
    return "allow" if d.allow else "deny"


def stages(entry: tuple) -> list[dict[str, Any]]:
    """Each step the call passed, its verdict and its time; the last one ended the call."""
    marks = entry[MARKS] or [()]
    rejection = entry[REJECTION]
    ended_by = entry[ENDED_BY]
    out: list[dict[str, Any]] = []
    prev = entry[STARTED_NS]
    times = marks[1:]
    last = len(times) - 1
    ended_here = False
    for i, (name, t) in enumerate(zip(marks[0], times)):
        verdict = "continue"
        if i == last and (name == ended_by or (ended_by == "forward" and name in ("audit", "forward"))):
            ended_here = True
            if rejection is not None:
                verdict = rejection.code
            elif name == "forward":
                status = entry[UPSTREAM_STATUS]
                verdict = f"upstream {status}" if status is not None else "forwarded"
        elif name == "audit":
            verdict = "recorded"
        out.append({"stage": name, "verdict": verdict, "us": round((t - prev) / 1000, 1)})
        prev = t
    if not ended_here and ended_by is not None and rejection is not None:
        # Ended where no mark was taken (an internal error inside a stage).
        out.append({"stage": ended_by, "verdict": rejection.code,
                    "us": round((entry[STARTED_NS] + entry[TOTAL_NS] - prev) / 1000, 1)})
    return out


def notes_of(extra: dict[str, Any]) -> dict[str, Any] | None:
    """What a trace keeps of a call's extras (None: nothing). Not the extras themselves:
    they can hold an MCP message's arguments and replies, megabytes that a ring of the
    last 1000 calls must not keep alive."""
    if not extra:
        return None
    notes: dict[str, Any] = {}
    if "fail_open" in extra:
        notes["fail_open"] = extra["fail_open"]
    if "approval_id" in extra:
        notes["approval_id"] = extra["approval_id"]
        rec = extra.get("approval")
        if isinstance(rec, dict) and rec.get("approver"):
            notes["approver"] = rec["approver"]
    if "retries" in extra:
        notes["upstream_retries"] = extra["retries"]
    if "would_refuse" in extra:
        notes["would_refuse"] = extra["would_refuse"]  # warn-mode limits and breakers
    if "operator_reasons" in extra:
        notes["operator_reasons"] = extra["operator_reasons"]  # a policy_error's detail, for the operator
    mcp = extra.get("mcp")
    if isinstance(mcp, dict):
        notes["mcp"] = {k: mcp[k] for k in ("method", "tool") if k in mcp}
    return notes or None


def _notes(entry: tuple) -> dict[str, Any]:
    notes = dict(entry[NOTES] or ())
    if entry[SHADOW]:
        notes = {"shadow_denied": True, **notes}
    return notes


def trace_json(entry: tuple) -> dict[str, Any]:
    """The full trace of one call, for the explain API (built only when asked)."""
    d = entry[DECISION]
    rej = entry[REJECTION]
    upstream_ns = entry[UPSTREAM_NS]
    doc = summary(entry)
    trace_id = entry[TRACE_ID]
    if trace_id is None:  # tracing off: name the agent's own trace, if it sent one
        parsed = parse_traceparent(entry[PARENT])
        trace_id = parsed[0] if parsed else None
    doc.update({
        "source": "trace",
        "time": _iso(doc["ts"]),
        "decision": _decision_label(entry),
        "revision": entry[REVISION],
        "reasons": (list((entry[NOTES] or {}).get("operator_reasons") or rej.reasons) if rej is not None
                    else (list(d.reasons) if d is not None else [])),
        "message": rej.message if rej is not None else None,
        "stages": stages(entry),
        "policy": d.to_dict() if d is not None else None,
        "upstream": ({"status": entry[UPSTREAM_STATUS],
                      "us": upstream_ns // 1000 if upstream_ns is not None else None}
                     if upstream_ns is not None or entry[UPSTREAM_STATUS] is not None else None),
        "upstream_us": upstream_ns // 1000 if upstream_ns is not None else None,
        "trace_id": trace_id,
        "notes": _notes(entry),
        "explain": entry[EXPLAIN],
    })
    return doc


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


# --- Older decisions: the audit log -------------------------------------------------


def find_in_audit(directory: str | os.PathLike, decision_id: str, max_bytes: int = AUDIT_SCAN_BYTES
                  ) -> dict[str, Any] | None:
    """The decision and outcome records of `decision_id`, from the newest segments
    (of every worker) back, reading at most `max_bytes`. Blocking: run it in a thread."""
    d = Path(directory)
    try:
        names = [p for p in d.iterdir() if SEGMENT_RE.match(p.name)]
    except OSError:
        return None
    names.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    needle = f'"decision_id":"{decision_id}"'.encode()
    budget = max_bytes
    records: list[dict] = []
    for path in names:
        if budget <= 0:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        budget -= len(data)
        start = 0
        while True:
            i = data.find(needle, start)
            if i < 0:
                break
            ls = data.rfind(b"\n", 0, i) + 1
            le = data.find(b"\n", i)
            le = len(data) if le < 0 else le
            try:
                rec = orjson.loads(data[ls:le])
                if rec.get("decision_id") == decision_id:
                    records.append(rec)
            except orjson.JSONDecodeError:
                pass
            start = le
        if records:
            break  # one call's records live in one worker's chain, close together
    if not records:
        return None
    return audit_json(decision_id, records)


def audit_json(decision_id: str, records: list[dict]) -> dict[str, Any]:
    decision = next((r for r in records if r.get("kind") == "decision"), {})
    outcome = next((r for r in records if r.get("kind") == "outcome"), {})
    code = outcome.get("code") or decision.get("code")
    status = outcome.get("status")
    return {
        "decision_id": decision_id,
        "source": "audit",
        "ts": decision.get("ts"),
        "time": _iso(decision["ts"]) if isinstance(decision.get("ts"), (int, float)) else None,
        "agent": decision.get("agent"),
        "tool": decision.get("tool"),
        "method": decision.get("method"),
        "path": decision.get("path"),
        "status": status,
        "outcome": code or ("forwarded" if decision.get("stage") == "forward" else None),
        "stage": decision.get("stage"),
        "decision": decision.get("decision"),
        "revision": decision.get("revision"),
        "reasons": decision.get("reasons") or [],
        "added_us": outcome.get("added_us", decision.get("added_us")),
        "upstream": ({"status": outcome.get("upstream_status"), "us": outcome.get("upstream_us")}
                     if outcome else None),
        "stages": [],
        "note": "older than this process's trace ring: rebuilt from the audit log (no per-stage timings)",
        "records": records,
    }
