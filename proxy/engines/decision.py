"""The decision document: strict parsing of whatever an engine returned.

Every engine's raw answer goes through ``parse_decision``. Only ``allow`` is
required and it must be a real boolean; anything absent, undefined or odd is a
``DecisionError``, which the policy stage turns into a deny (fail closed).
Sets (regorus returns Python sets) become sorted lists so the same policy gives
the same decision whichever engine ran it.
"""

from __future__ import annotations

from typing import Any


class DecisionError(Exception):
    """The engine answered, but not with a usable decision."""


class EngineError(Exception):
    """The engine could not answer (down, timed out, evaluation error)."""


class Decision:
    __slots__ = (
        "allow", "reasons", "approval_required", "approval_reason", "approval_mode",
        "approval_mask", "timeout_ms", "gpu_memory_mb", "gpu_priority", "headers_set",
        "headers_remove", "cost", "limits", "limit_checks", "raw",
    )

    def __init__(self, allow: bool, reasons: list[str] | None = None, *, raw: dict | None = None) -> None:
        self.allow = allow
        self.reasons = reasons or []
        self.approval_required = False
        self.approval_reason = ""
        self.approval_mode: str | None = None
        self.approval_mask: list[str] = []
        self.timeout_ms: int | None = None
        self.gpu_memory_mb = 0
        self.gpu_priority = 0
        self.headers_set: dict[str, str] = {}
        self.headers_remove: list[str] = []
        self.cost: float | None = None
        self.limits: dict[str, Any] | None = None
        # ``limits`` compiled once: (agent Rate, agent×tool Rate, Budget), each None for "no
        # extra limit"; None when the decision adds none. Applied by the ratelimit stage.
        self.limit_checks: tuple[Any, Any, Any] | None = None
        self.raw = raw if raw is not None else {"allow": allow, "reasons": self.reasons}

    def to_dict(self) -> dict[str, Any]:
        """The normalised decision, every optional field filled with its default."""
        return {
            "allow": self.allow,
            "reasons": self.reasons,
            "approval": {"required": self.approval_required, "reason": self.approval_reason,
                         "mode": self.approval_mode, "mask": self.approval_mask},
            "timeout_ms": self.timeout_ms,
            "gpu": {"memory_mb": self.gpu_memory_mb, "priority": self.gpu_priority},
            "headers": {"set": self.headers_set, "remove": self.headers_remove},
            "cost": self.cost,
            "limits": self.limits,
        }


def normalise(value: Any) -> Any:
    """Sets → sorted lists, recursively; everything else as JSON would carry it."""
    if isinstance(value, (set, frozenset)):
        items = [normalise(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


def _num(doc: dict, key: str, where: str, *, integer: bool = False) -> float | int | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise DecisionError(f"{where}{key} must be a non-negative number, got {v!r}")
    return int(v) if integer else v


def parse_decision(raw: Any, *, from_json: bool = False) -> Decision:
    """``from_json``: the value was decoded from JSON, so it holds no sets to normalise."""
    if raw is None:
        raise DecisionError("decision is undefined (no rule produced a value)")
    if not from_json:
        raw = normalise(raw)
    if not isinstance(raw, dict):
        raise DecisionError(f"decision must be an object, got {type(raw).__name__}")
    allow = raw.get("allow")
    if not isinstance(allow, bool):
        raise DecisionError(f"decision.allow must be a boolean, got {allow!r}")
    reasons = raw.get("reasons", [])
    if isinstance(reasons, str):
        reasons = [reasons]
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise DecisionError("decision.reasons must be a list of strings")
    d = Decision(allow, list(reasons), raw=raw)

    approval = raw.get("approval")
    if approval is not None:
        if not isinstance(approval, dict) or not isinstance(approval.get("required", False), bool):
            raise DecisionError("decision.approval must be an object with a boolean 'required'")
        d.approval_required = approval.get("required", False)
        d.approval_reason = str(approval.get("reason", ""))
        mode = approval.get("mode")
        if mode not in (None, "hold", "async"):
            raise DecisionError(f"decision.approval.mode must be hold or async, got {mode!r}")
        d.approval_mode = mode
        mask = approval.get("mask", [])
        if not isinstance(mask, list) or not all(isinstance(m, str) for m in mask):
            raise DecisionError("decision.approval.mask must be a list of field names")
        d.approval_mask = mask

    d.timeout_ms = _num(raw, "timeout_ms", "decision.", integer=True)
    gpu = raw.get("gpu")
    if gpu is not None:
        if not isinstance(gpu, dict):
            raise DecisionError("decision.gpu must be an object")
        d.gpu_memory_mb = _num(gpu, "memory_mb", "decision.gpu.", integer=True) or 0
        prio = gpu.get("priority", 0)
        if isinstance(prio, bool) or not isinstance(prio, int):
            raise DecisionError("decision.gpu.priority must be an integer")
        d.gpu_priority = prio

    headers = raw.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise DecisionError("decision.headers must be an object with 'set' and 'remove'")
        hset = headers.get("set", {})
        if not isinstance(hset, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hset.items()):
            raise DecisionError("decision.headers.set must map header names to strings")
        for k, v in hset.items():
            if any(c in k + v for c in "\r\n\0"):
                raise DecisionError(f"decision.headers.set[{k!r}] contains a control character")
        hremove = headers.get("remove", [])
        if not isinstance(hremove, list) or not all(isinstance(h, str) for h in hremove):
            raise DecisionError("decision.headers.remove must be a list of header names")
        d.headers_set = hset
        d.headers_remove = hremove

    d.cost = _num(raw, "cost", "decision.")
    limits = raw.get("limits")
    if limits is not None:
        if not isinstance(limits, dict):
            raise DecisionError("decision.limits must be an object")
        d.limits = limits
        d.limit_checks = _limit_checks(limits)
    return d


def _limit_checks(limits: dict) -> tuple[Any, Any, Any] | None:
    """``decision.limits`` → (agent Rate, tool Rate, Budget) or None; DecisionError names the field.

    Same spellings as policies/limits.yaml. ``null``/``unlimited``/absent add no limit: a
    decision can only add limits to a call, never lift the data's (checked before the policy).
    """
    from ..limits.table import LimitsError, decision_limits

    try:
        return decision_limits(limits)
    except LimitsError as exc:
        raise DecisionError(str(exc)) from None
