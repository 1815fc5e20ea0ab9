"""One pending approval as data: how a call becomes a record a human can read
(masked), what the agent may see of it, and the audit records of its steps.

A record is a flat dict of JSON values; both stores keep exactly this shape.
The request is bound to the approval by hashes (body, method + raw target),
so what runs after an approval is provably what the human saw; the raw
target and body never enter the record, only their masked forms do.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Any

import orjson

# pending → approved → used (executed); pending → denied | expired | withdrawn.
STATES = ("pending", "approved", "denied", "expired", "withdrawn", "used")
ID_PATTERN = r"apr_[0-9a-f]{24}"
_ID_RE = re.compile(f"^{ID_PATTERN}$")

MASK = "[masked]"
# What the inbox shows of a body at most; the hash still covers all of it.
MAX_SHOWN_BYTES = 64 * 1024

# Fields whose values are JSON documents (stored as JSON text in Redis),
# numbers, and text; everything in a record is one of these.
JSON_FIELDS = ("query", "args")
FLOAT_FIELDS = ("created", "expires", "decided_at", "used_at")
INT_FIELDS = ("body_size",)


def new_id() -> str:
    # Unguessable: the id is what an agent re-sends, and what the status URL names.
    return "apr_" + secrets.token_hex(12)


def valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


def target_hash(method: str, raw_target: str) -> str:
    return hashlib.sha256(f"{method} {raw_target}".encode("utf-8", "surrogateescape")).hexdigest()


def mask(value: Any, names: frozenset[str]) -> Any:
    """`value` with every object field whose name is in `names` (case-insensitive)
    replaced by a marker, at any depth."""
    if not names:
        return value
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and k.lower() in names else mask(v, names)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, names) for v in value]
    return value


def shown_body(body: bytes | None, body_json: Any, content_type: str, names: frozenset[str]) -> tuple[Any, str]:
    """(args, note): the body as the human sees it, and a line when it cannot be shown."""
    if not body:
        return None, ""
    if body_json is not None:
        args = mask(body_json, names)
        if len(orjson.dumps(args)) <= MAX_SHOWN_BYTES:
            return args, ""
        return None, f"JSON body of {len(body)} bytes, too large to show (the approval covers its SHA-256)"
    # Not JSON: the policy's masks cannot reach inside, so nothing of it is shown.
    return None, f"{len(body)} bytes of {content_type or 'unknown type'}, not shown (not JSON)"


def new_record(
    *, call: Any, mode: str, reason: str, mask_names: list[str], now: float, timeout_s: float
) -> dict[str, Any]:
    request = call.request
    names = frozenset(n.lower() for n in mask_names)
    query: dict[str, list[str]] = {}
    for k, v in request.query.items():
        query.setdefault(k, []).append(MASK if k.lower() in names else v)
    args, note = shown_body(call.body, call.body_json, request.headers.get("Content-Type", ""), names)
    return {
        "id": new_id(),
        "state": "pending",
        "mode": mode,
        "agent": call.agent,
        "tool": call.tool.name,
        "method": request.method,
        "path": request.path,
        "query": query,
        "target_sha256": target_hash(request.method, request.raw_path),
        "body_sha256": call.body_sha256,
        "body_size": call.body_size or 0,
        "args": args,
        "args_note": note,
        "reason": reason,
        "decision_id": call.id,
        "revision": call.revision or "",
        "created": now,
        "expires": now + timeout_s,
        "decided_at": None,
        "approver": "",
        "comment": "",
        "used_by": "",
        "used_at": None,
    }


def effective_state(rec: dict[str, Any], now: float) -> str:
    """A pending record past its expiry reads as expired, whoever has not yet said so."""
    if rec["state"] == "pending" and now >= rec["expires"]:
        return "expired"
    return rec["state"]


def admin_view(rec: dict[str, Any], now: float) -> dict[str, Any]:
    out = dict(rec)
    out["state"] = effective_state(rec, now)
    out["time_left_s"] = max(0.0, rec["expires"] - now) if out["state"] == "pending" else 0.0
    return out


def agent_view(rec: dict[str, Any], now: float, data_url: str) -> dict[str, Any]:
    """What the calling agent may learn: the state, its times, and a denial's
    comment (the 403 carries it too). Never the approver, never the arguments."""
    state = effective_state(rec, now)
    out: dict[str, Any] = {
        "id": rec["id"],
        "state": state,
        "tool": rec["tool"],
        "method": rec["method"],
        "path": rec["path"],
        "reason": rec["reason"],
        "created": rec["created"],
        "expires": rec["expires"],
        "decided_at": rec["decided_at"],
    }
    if state == "denied":
        out["comment"] = rec["comment"]
    if state == "pending":
        out["retry_after_s"] = 2
    if state == "approved":
        out["next"] = "re-send the same call with the header X-Regate-Approval: " + rec["id"]
    out["location"] = data_url
    return out


def audit_record(event: str, rec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One step of an approval, for the hash-chained audit log. Every record
    carries the approval id and the id of the decision that proposed it."""
    out = {
        "kind": "approval",
        "event": event,
        "ts": time.time(),
        "approval_id": rec["id"],
        "decision_id": rec["decision_id"],
        "agent": rec["agent"],
        "tool": rec["tool"],
        "method": rec["method"],
        "path": rec["path"],
        "body_sha256": rec["body_sha256"],
        "target_sha256": rec["target_sha256"],
        "mode": rec["mode"],
    }
    out.update(extra)
    return out
