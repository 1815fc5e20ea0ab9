"""What a forwarded call came back as, and the refusal a breaker answers with.

``Outcome`` is the one classification every breaker reads: the tool breaker counts
only what says the upstream is sick (5xx, timeouts, connect errors), the agent
breaker and the loop guard also count what says the *call* was wrong (4xx).
``Refusal`` is what a breaker returns instead of letting a call through; the
breaker stage turns it into the pipeline's rejection (status, code, message,
``Retry-After``).
"""

from __future__ import annotations

import enum
import math

import orjson


class Outcome(enum.IntEnum):
    SUCCESS = 0         # 1xx-3xx: the tool answered and the call was fine
    CLIENT_ERROR = 1    # 4xx: the tool is healthy, the call was wrong
    SERVER_ERROR = 2    # 5xx: the tool is sick
    TIMEOUT = 3         # no answer within the deadline
    CONNECT_ERROR = 4   # could not reach the upstream at all

    @staticmethod
    def of(status: int) -> "Outcome":
        """The outcome of an upstream HTTP response with this status."""
        return outcome_of(status)


# Plain tuple lookups are cheaper than enum attribute access on the hot path.
SUCCESS, CLIENT_ERROR, SERVER_ERROR, TIMEOUT, CONNECT_ERROR = tuple(Outcome)
TOOL_FAILURES = frozenset((SERVER_ERROR, TIMEOUT, CONNECT_ERROR))


def outcome_of(status: int) -> Outcome:
    """The outcome of an upstream HTTP response with this status."""
    # Module constants: enum attribute access through the class costs ~0.1 us each.
    if status < 400:
        return SUCCESS
    if status < 500:
        return CLIENT_ERROR
    return SERVER_ERROR


OUTCOME_WORDS = {
    SUCCESS: "success",
    CLIENT_ERROR: "client error",
    SERVER_ERROR: "server error",
    TIMEOUT: "timeout",
    CONNECT_ERROR: "connect error",
}


def describe(outcome: Outcome, status: int | None, error: str) -> str:
    """A short quotable description of a failure: ``502 bad gateway`` / ``timeout``."""
    head = str(status) if status is not None and outcome in (CLIENT_ERROR, SERVER_ERROR) else OUTCOME_WORDS[outcome]
    if not error:
        return head
    if len(error) > 200:  # the caller should have used error_summary; keep messages short anyway
        error = error[:199] + "…"
    return f"{head} {error}"


class Refusal:
    """A breaker's no: the call is not forwarded.

    ``code`` is the machine-readable reason (``tool_unavailable``, ``agent_backoff``,
    ``retry_loop``), ``status`` the HTTP status to answer with, ``message`` words a
    model can act on, ``retry_after_s`` the exact seconds until the refusal would
    lift (``retry_after`` is the same rounded up for the header).
    ``kind`` refines the code for metrics (``open``, ``half_open_full``, ...).
    """

    __slots__ = ("status", "code", "kind", "message", "retry_after_s")

    def __init__(self, status: int, code: str, kind: str, message: str, retry_after_s: float) -> None:
        self.status = status
        self.code = code
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> int:
        """Whole seconds for the ``Retry-After`` header (never 0: 0 invites a busy loop)."""
        return max(1, math.ceil(self.retry_after_s - 1e-9))

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code!r}, {self.kind!r}, retry_after_s={self.retry_after_s:.3f})"


def seconds(value: float) -> str:
    """Seconds as a model reads them: ``5s``, ``1.5s``, ``2m 5s``."""
    if value < 10:
        r = math.ceil(value * 10 - 1e-9) / 10
        return f"{r:g}s"
    s = math.ceil(value - 1e-9)
    return f"{s // 60}m {s % 60}s" if s >= 120 else f"{s}s"


_ERROR_KEYS = ("message", "detail", "error_description", "title", "reason", "msg")


def error_summary(body: object, limit: int = 200) -> str:
    """A one-line quote of an upstream's error response, for the messages above.

    ``body`` is the parsed JSON or the raw bytes/text of the (start of the) error
    response. JSON errors are searched for the usual message fields (``error.message``,
    ``message``, ``detail``, JSON-RPC ``error.message``, ``errors[0].message`` ...).
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body[:8192])
        if raw.lstrip()[:1] in (b"{", b"["):
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode("utf-8", "replace")
        else:
            body = raw.decode("utf-8", "replace")
    text = _error_text(body, 0)
    if text is None:
        text = "" if body is None else str(body)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_text(node: object, depth: int) -> str | None:
    if depth > 3:
        return None
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return _error_text(node[0], depth + 1) if node else None
    if isinstance(node, dict):
        if "error" in node:
            found = _error_text(node["error"], depth + 1)
            if found:
                return found
        if "errors" in node:
            found = _error_text(node["errors"], depth + 1)
            if found:
                return found
        for k in _ERROR_KEYS:
            v = node.get(k)
            if isinstance(v, str) and v:
                return v
            if isinstance(v, (dict, list)):
                found = _error_text(v, depth + 1)
                if found:
                    return found
    return None


def forget(pairs: dict, agent: str | None, tool: str | None) -> int:
    """Drop the (agent, tool) entries that match (None matches all); how many went.
    The reset behind ``POST /admin/breakers/<tool>/reset`` for the per-pair guards."""
    keys = [k for k in pairs if (agent is None or k[0] == agent) and (tool is None or k[1] == tool)]
    for k in keys:
        del pairs[k]
    return len(keys)
