"""JSON-RPC / MCP recognition and error shapes: what one message is, the error
object Regate answers an MCP client with, the SSE framing of Streamable HTTP,
and the two bounded tables an MCP route keeps (session id → agent, tool names).

Nothing here touches the network or the pipeline; `stages/mcp.py` uses it to
judge messages and `pipeline.py` to shape rejections on MCP routes.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from .pipeline import Call, Rejection

# JSON-RPC 2.0's own codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Regate's, in the range JSON-RPC leaves to implementations (-32000..-32099):
# one stable number per kind of refusal, so a client can branch on it.
REGATE_ERROR = -32000
JSONRPC_CODES: dict[str, int] = {
    "bad_json": PARSE_ERROR,
    "mcp_invalid_request": INVALID_REQUEST,
    "mcp_batch_too_large": INVALID_REQUEST,
    "mcp_invalid_params": INVALID_PARAMS,
    "internal_error": INTERNAL_ERROR,
    "policy_denied": -32001,
    "policy_error": -32002,
    # -32003: every approval_* code (needs a human, pending, refused, timed out)
    "rate_limited": -32004,
    "budget_exhausted": -32005,
    "limits_unavailable": -32006,
    "tool_unavailable": -32007,
    "agent_backoff": -32008,
    "retry_loop": -32009,
    # -32010: every gpu_* code
    "upstream_timeout": -32011,
    "upstream_unreachable": -32012,
    "upstream_error": -32012,
    "mcp_no_reply": -32012,
    "body_too_large": -32013,
    "mcp_session_unknown": -32014,
    "audit_unavailable": -32015,
    # Not -32004 (rate_limited): waiting for this agent's own calls to end, not for time to pass.
    "too_many_concurrent": -32016,
    "unauthenticated": -32017,
}
_PREFIX_CODES = (("approval", -32003), ("gpu_", -32010))
# Refusals of the HTTP request around the message (its body, headers, path, method),
# before any message was read: invalid requests, one number for all of them, as
# approval_* and gpu_* share one.
_HTTP_REFUSALS = frozenset({"bad_body", "bad_header", "bad_path", "body_timeout", "unsupported_content_encoding",
                            "method_not_allowed", "unknown_tool"})

# Spec'd HTTP status per rejection on an MCP route, where it is not the rejection's own.
_SESSION_STATUS = 404  # Streamable HTTP: an unknown session id is answered 404 (the client starts anew)

MCP_SESSION_HEADER = "Mcp-Session-Id"
MCP_METHOD_HEADER = "Mcp-Method"
MCP_NAME_HEADER = "Mcp-Name"


def jsonrpc_code(code: str) -> int:
    found = JSONRPC_CODES.get(code)
    if found is not None:
        return found
    if code in _HTTP_REFUSALS:
        return INVALID_REQUEST
    for prefix, number in _PREFIX_CODES:
        if code.startswith(prefix):
            return number
    return REGATE_ERROR


# --- one message -----------------------------------------------------------

REQUEST, NOTIFICATION, RESPONSE, INVALID = "request", "notification", "response", "invalid"

# C0, DEL, C1 controls; checked first because it is the common refusal and a regex is fast.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_METHOD = 256


def name_problem(name: object, max_length: int) -> str | None:
    """Why `name` cannot be an MCP tool name, or None. Control characters and
    invisible format characters (bidi overrides, zero-width) are refused: a name
    goes into limit keys, the audit log and operators' screens verbatim."""
    if not isinstance(name, str) or not name:
        return "params.name must be a non-empty string"
    if len(name) > max_length:
        return f"params.name is {len(name)} characters long; at most {max_length} are accepted"
    if _CONTROL.search(name):
        return "params.name contains control characters"
    if not name.isascii() and any(unicodedata.category(c) in ("Cf", "Co", "Cs", "Cn") for c in name):
        return "params.name contains invisible or unassigned characters"
    return None


class Message:
    """One JSON-RPC message as Regate reads it. `kind` is request, notification,
    response (a client answering a server's request) or invalid; an invalid one
    carries `problem` = (Regate code, JSON-RPC text) and, when it had a usable id, that id."""

    __slots__ = ("kind", "raw", "id", "has_id", "method", "tool", "arguments", "problem")

    def __init__(self, kind: str, raw: Any, *, id: Any = None, has_id: bool = False, method: str | None = None,
                 tool: str | None = None, arguments: Any = None, problem: tuple[str, str] | None = None) -> None:
        self.kind = kind
        self.raw = raw
        self.id = id
        self.has_id = has_id
        self.method = method
        self.tool = tool
        self.arguments = arguments
        self.problem = problem

    @property
    def answers(self) -> bool:
        """Whether JSON-RPC owes this message a reply (requests, and anything invalid)."""
        return self.kind is REQUEST or self.kind is INVALID

    def policy_view(self) -> dict[str, Any]:
        """The policy input's `mcp` field (README.md, "The input document"); `purpose` is "tools/list" only
        when Regate asks whether a listed tool may be shown."""
        return {"method": self.method, "id": self.id, "tool": self.tool, "arguments": self.arguments,
                "purpose": None}


def _invalid(raw: Any, code: str, text: str, id: Any = None, has_id: bool = False) -> Message:
    return Message(INVALID, raw, id=id, has_id=has_id, problem=(code, text))


def parse_message(obj: Any, max_name: int) -> Message:
    """Classify one decoded JSON-RPC message; never raises."""
    if obj.__class__ is not dict:
        return _invalid(obj, "mcp_invalid_request", "a JSON-RPC message must be a JSON object")
    has_id = "id" in obj
    mid = obj.get("id")
    id_ok = has_id and (mid.__class__ is str or mid.__class__ is int)
    if has_id and not id_ok:
        return _invalid(obj, "mcp_invalid_request", "id must be a string or an integer (MCP forbids null ids)")
    if obj.get("jsonrpc") != "2.0":
        return _invalid(obj, "mcp_invalid_request", 'not JSON-RPC 2.0: the message must carry "jsonrpc": "2.0"',
                        mid, has_id)
    method = obj.get("method")
    if method is None:
        if has_id and ("result" in obj or "error" in obj):
            return Message(RESPONSE, obj, id=mid, has_id=True)
        return _invalid(obj, "mcp_invalid_request",
                        "a message needs a method (request, notification) or a result or error (response)",
                        mid, has_id)
    if method.__class__ is not str or not method or len(method) > _MAX_METHOD or _CONTROL.search(method):
        return _invalid(obj, "mcp_invalid_request", "method must be a short string without control characters",
                        mid, has_id)
    kind = REQUEST if has_id else NOTIFICATION
    params = obj.get("params")
    if params is not None and params.__class__ is not dict and params.__class__ is not list:
        return _invalid(obj, "mcp_invalid_params", "params must be an object or an array", mid, has_id)
    if method == "tools/call":
        if params.__class__ is not dict:
            return _invalid(obj, "mcp_invalid_params", "tools/call needs params with the tool's name", mid, has_id)
        name = params.get("name")
        problem = name_problem(name, max_name)
        if problem is not None:
            return _invalid(obj, "mcp_invalid_params", f"tools/call: {problem}", mid, has_id)
        arguments = params.get("arguments")
        if arguments is not None and arguments.__class__ is not dict:
            return _invalid(obj, "mcp_invalid_params", "tools/call: params.arguments must be an object", mid, has_id)
        return Message(kind, obj, id=mid, has_id=has_id, method=method, tool=name, arguments=arguments)
    return Message(kind, obj, id=mid, has_id=has_id, method=method)


def id_key(mid: Any) -> tuple[type, Any]:
    """Ids 1 and "1" are different ids."""
    return (mid.__class__, mid)


def decode_header_value(value: str) -> str | None:
    """The MCP SDKs' `=?base64?…?=` wrapping of header values that are not plain ASCII."""
    if value.startswith("=?base64?") and value.endswith("?=") and len(value) >= 11:
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value


# --- errors ----------------------------------------------------------------

def error_object(mid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": mid, "error": err}


def rejection_error(decision_id: str, rejection: "Rejection", mid: Any) -> dict[str, Any]:
    """A Regate rejection as the JSON-RPC error an MCP client shows the model.
    The reasons are in `error.data` and, because many clients show only the
    message, in the message too."""
    message = rejection.message
    if rejection.reasons:
        message = f"{message}: {' '.join(rejection.reasons)}"
    data: dict[str, Any] = {"code": rejection.code, "decision_id": decision_id, "reasons": rejection.reasons}
    retry = rejection.retry_after
    if retry is None and rejection.headers and "Retry-After" in rejection.headers:
        try:
            retry = float(rejection.headers["Retry-After"])
        except ValueError:
            pass
    if retry is not None:
        data["retry_after"] = retry
    return error_object(mid, jsonrpc_code(rejection.code), message, data)


def rejection_response(call: "Call", rejection: "Rejection", headers: dict[str, str]) -> web.Response:
    """The answer to a refused call on an MCP route (Streamable HTTP):

    - a request with a usable id: HTTP 200 and a JSON-RPC error with that id, so
      the client hands it to the model as a failed call, not a transport failure;
    - a notification or a client's response: 202 and no body (nothing may reply to them);
    - anything without a usable id (invalid JSON, a bad batch, GET/DELETE): the
      rejection's own status and a JSON-RPC error with id null;
    - an unknown or foreign session id: 404, as the spec says for unknown sessions.
    """
    msg: Message | None = call.extra.get("mcp_msg")
    status = rejection.status
    mid = None
    if rejection.code == "mcp_session_unknown":
        status = _SESSION_STATUS
        mid = msg.id if msg is not None and msg.has_id else None
    elif msg is not None:
        if msg.kind is NOTIFICATION or msg.kind is RESPONSE:
            return web.Response(status=202, headers=headers)
        if msg.has_id:
            status = 200
            mid = msg.id
    return web.Response(status=status, body=orjson.dumps(rejection_error(call.id, rejection, mid)),
                        content_type="application/json", headers=headers)


def unauthorized_challenges(tools: Any, match: Any) -> Any:
    """A wrapper for the data handler that gives a 401 on an MCP route the shape the MCP
    authorization spec asks for: `WWW-Authenticate: Bearer` (RFC 6750), with the route's
    `resource_metadata` (RFC 9728) when configured, so a client can tell "authenticate"
    from a server fault. None when no route speaks MCP. Identify runs before routing,
    so the route is matched here, on 401s only."""
    mcp_tools = {t.name: t for t in tools if t.protocol == "mcp"}
    if not mcp_tools:
        return None

    def wrap(handler: Any) -> Any:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            response = await handler(request)
            if response.status == 401 and "WWW-Authenticate" not in response.headers:
                found = match(request.raw_path.split("?", 1)[0], request.headers.get("Host"))
                tool = mcp_tools.get(found[0].name) if found is not None else None
                if tool is not None:
                    challenge = 'Bearer realm="regate"'
                    if tool.mcp is not None and tool.mcp.resource_metadata:
                        challenge += f', resource_metadata="{tool.mcp.resource_metadata}"'
                    response.headers["WWW-Authenticate"] = challenge
            return response

        return handle

    return wrap


# --- Server-Sent Events -----------------------------------------------------

class SseEvent:
    """One SSE event: its raw bytes (terminator included) and its data lines joined."""

    __slots__ = ("raw", "lines", "data")

    def __init__(self, raw: bytes, lines: list[bytes]) -> None:
        self.raw = raw
        self.lines = lines
        data = [ln[5:] for ln in lines if ln.startswith(b"data:")]
        self.data = b"\n".join(d[1:] if d.startswith(b" ") else d for d in data) if data else None

    def with_data(self, payload: bytes) -> bytes:
        """The same event (event, id, retry fields kept) carrying `payload` instead."""
        out: list[bytes] = []
        placed = False
        for ln in self.lines:
            if ln.startswith(b"data:"):
                if not placed:
                    out.append(b"data: " + payload)
                    placed = True
                continue
            out.append(ln)
        return b"\n".join(out) + b"\n\n"


_LINE_END = re.compile(rb"\r\n|\r|\n")


class SseReader:
    """Cuts a byte stream into SSE events as they complete (bounded: `pending`
    says how many bytes wait for the end of an event).

    Each byte is scanned once: the buffer grows in place and the scan resumes
    where the last chunk left off, so an event sent in many small pieces costs
    linear, not quadratic, time before `max_message_bytes` cuts in."""

    __slots__ = ("_buf", "_pos", "_scan", "_lines")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the line being read (just after the last complete line)
        self._scan = 0  # where the search for the next line end resumes
        self._lines: list[bytes] = []  # complete lines of the event being read

    @property
    def pending(self) -> int:
        return len(self._buf)

    def take_pending(self) -> bytes:
        buf = bytes(self._buf)
        self._buf = bytearray()
        self._pos = self._scan = 0
        self._lines = []
        return buf

    def feed(self, chunk: bytes, final: bool = False) -> list[SseEvent]:
        """The events `chunk` completes; `final`: the stream ends here."""
        buf = self._buf
        buf += chunk
        events: list[SseEvent] = []
        start = 0
        lines = self._lines
        pos = self._pos
        # A trailing lone \r may be the first half of \r\n: wait for the next chunk.
        end = len(buf) - 1 if buf.endswith(b"\r") and not final else len(buf)
        for m in _LINE_END.finditer(buf, max(pos, self._scan), end):
            line = bytes(buf[pos:m.start()])
            pos = m.end()
            if line:
                lines.append(line)
            elif lines:
                events.append(SseEvent(bytes(buf[start:pos]), lines))
                lines = []
                start = pos
            else:
                start = pos  # blank lines between events
        if start:
            del buf[:start]
        self._pos = pos - start
        self._scan = end - start
        self._lines = lines
        return events


# --- bounded tables ---------------------------------------------------------

class Sessions:
    """Which agent opened which MCP session on one route: bounded, least recently
    used forgotten first (a forgotten session is then unknown: refused or re-bound)."""

    __slots__ = ("_owner", "_max", "evicted")

    def __init__(self, max_sessions: int) -> None:
        self._owner: OrderedDict[str, str] = OrderedDict()
        self._max = max_sessions
        self.evicted = 0

    def owner(self, session: str) -> str | None:
        agent = self._owner.get(session)
        if agent is not None:
            self._owner.move_to_end(session)
        return agent

    def bind(self, session: str, agent: str) -> None:
        self._owner[session] = agent
        self._owner.move_to_end(session)
        while len(self._owner) > self._max:
            # NOTE: lossy by design: the least recently used binding is forgotten
            # rather than letting memory grow; its session is then unknown.
            self._owner.popitem(last=False)
            self.evicted += 1

    def forget(self, session: str) -> None:
        self._owner.pop(session, None)

    def __len__(self) -> int:
        return len(self._owner)


class ToolNames:
    """The limit/breaker/audit key of each MCP tool name on one route.

    The key is made before the policy has judged the call, so the names an agent
    may invent must not grow the tables keyed by it: the first `max_names` names
    (those the server lists come first, as clients list before they call) get
    `<route>/<name>`; past that, an unseen name shares `<route>/*`. Names are
    never evicted, so a flood of invented names cannot reset a real tool's state.
    """

    __slots__ = ("route", "overflow", "_keys", "_max", "overflowed")

    def __init__(self, route: str, max_names: int) -> None:
        self.route = route
        self.overflow = f"{route}/*"
        self._keys: dict[str, str] = {}
        self._max = max_names
        self.overflowed = 0

    def key(self, name: str) -> str:
        k = self._keys.get(name)
        if k is not None:
            return k
        if len(self._keys) >= self._max:
            self.overflowed += 1
            return self.overflow
        k = self._keys[name] = f"{self.route}/{name}"
        return k

    def learn(self, name: str) -> None:
        if name not in self._keys and len(self._keys) < self._max:
            self._keys[name] = f"{self.route}/{name}"

    def __len__(self) -> int:
        return len(self._keys)
