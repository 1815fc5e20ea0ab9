"""MCP: judge each JSON-RPC message on a `protocol: mcp` route, not just the route.

Runs right after read_body, before limits, breakers and policy, so that all of
them key on the MCP tool (`call.tool_key` = `<route>/<tool>` for `tools/call`)
and the policy reads `input.mcp` ({method, id, tool, arguments, purpose}).

- Bad input (not JSON-RPC 2.0, a bad tool name, an oversized batch) is refused
  here with a JSON-RPC error; nothing of it reaches the server.
- A batch is handed back to the pipeline as one call per message (`Handoff`);
  `_finish_batch` forwards the admitted ones (as one reduced batch, or one POST
  each) and merges the server's replies with Regate's errors, in order.
- Sessions (Streamable HTTP): the `Mcp-Session-Id` an initialize answer carries
  is bound to the agent that opened it; another agent presenting it is refused
  with 404, as the spec answers unknown sessions. The id itself is never changed.
- `tools/list` answers (JSON or SSE) lose the tools the policy would refuse this
  agent: each listed tool is evaluated as a hypothetical `tools/call` with
  `input.mcp.purpose = "tools/list"` and no arguments.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import zlib
from typing import Any, Awaitable, Callable, Iterable, Iterator

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from ..breakers.outcome import error_summary
from ..config import McpOptions, Tool
from ..engines.decision import DecisionError, EngineError
from ..mcp import (
    INVALID,
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_SESSION_HEADER,
    REQUEST,
    Message,
    Sessions,
    SseReader,
    ToolNames,
    decode_header_value,
    id_key,
    name_problem,
    parse_message,
    rejection_error,
)
from ..pipeline import Call, Handoff, Rejection, UpstreamError
from ..upstream import SMALL_RESPONSE
from .body import buffer_body

log = logging.getLogger("regate.mcp")

Relay = Callable[[Call, aiohttp.ClientResponse, CIMultiDict, float], Awaitable[web.StreamResponse]]
Transform = Callable[[Any], Awaitable[Any]]

# Upstream headers that describe a body Regate rewrites; never copied onto a merged answer.
_BODY_HEADERS = ("Content-Type", "Content-Length", "Content-Encoding", "Transfer-Encoding")
# A compressed answer is inflated at most this many bytes at a time: a few KB of
# gzip can inflate to gigabytes (a bomb), and no step may hold more than this.
_INFLATE_STEP = 64 * 1024


class _Route:
    __slots__ = ("tool", "opts", "names", "sessions")

    def __init__(self, tool: Tool) -> None:
        self.tool = tool
        self.opts: McpOptions = tool.mcp or McpOptions()
        self.names = ToolNames(tool.name, self.opts.max_tool_names)
        self.sessions = Sessions(self.opts.max_sessions)


def _invalid(msg: Message) -> Rejection:
    code, text = msg.problem
    return Rejection(400, code, text)


class McpStage:
    name = "mcp"

    def __init__(self, tools: list[Tool], policy: Any = None, body_timeout_s: float = 30.0) -> None:
        self.routes = {t.name: _Route(t) for t in tools if t.protocol == "mcp"}
        self.body_timeout_s = body_timeout_s  # http.body_timeout_s, for a body read_body left unread
        # The policy stage (input_document, engine, metrics), for tools/list filtering; None: policy off.
        self.policy = policy
        self.hidden_tools = 0  # tools removed from tools/list answers, all routes

    @classmethod
    def for_config(cls, cfg: Any, policy: Any = None) -> list["McpStage"]:
        """[the stage] when some route speaks MCP, else []: HTTP-only configs pay nothing."""
        if not any(t.protocol == "mcp" for t in cfg.tools):
            return []
        return [cls(cfg.tools, policy, cfg.http.body_timeout_s)]

    # -- the request ---------------------------------------------------------

    async def enter(self, call: Call) -> Rejection | Handoff | None:
        route = self.routes.get(call.tool.name)
        if route is None:
            return None  # a plain HTTP route
        request = call.request
        if request.method != "POST":
            # GET (the server's SSE stream) and DELETE (end the session) carry no message.
            call.extra["mcp"] = {"method": None, "id": None, "tool": None, "arguments": None, "purpose": None}
            rejection = self._check_session(route, call)
            if rejection is None:
                call.response_filter = self._respond
            return rejection

        if call.body is None and request.body_exists:
            rejection = await _read_body(call, self.body_timeout_s)  # read_body left it unread (policy off)
            if rejection is not None:
                return rejection
        body = call.body_json
        if body.__class__ is list:
            return self._batch(route, call, body)
        if body is None:
            return Rejection(400, "mcp_invalid_request", "the POST carries no JSON-RPC message")

        msg = parse_message(body, route.opts.max_tool_name_length)
        call.extra["mcp_msg"] = msg
        if msg.kind is INVALID:
            return _invalid(msg)
        headers = request.headers
        said = headers.get(MCP_METHOD_HEADER)
        if said is not None and said != msg.method:
            # An upstream that routes by header must not run something other than what was judged.
            return Rejection(400, "mcp_invalid_request",
                             f"the {MCP_METHOD_HEADER} header ({said!r}) differs from the message's method")
        if msg.tool is not None:
            said = headers.get(MCP_NAME_HEADER)
            if said is not None and decode_header_value(said) != msg.tool:
                return Rejection(400, "mcp_invalid_request",
                                 f"the {MCP_NAME_HEADER} header differs from the tool named in params.name")
        rejection = self._check_session(route, call)
        if rejection is not None:
            return rejection
        call.extra["mcp"] = msg.policy_view()
        if msg.tool is not None:
            call.tool_key = route.names.key(msg.tool)
        call.response_filter = self._respond
        return None

    def leave(self, call: Call) -> None:
        pass

    def _check_session(self, route: _Route, call: Call) -> Rejection | None:
        session = call.request.headers.get(MCP_SESSION_HEADER)
        if session is None:
            return None
        owner = route.sessions.owner(session)
        if owner == call.agent:
            return None
        if owner is None and route.opts.unknown_sessions == "bind":
            # NOTE: trust on first use, by configuration: with several workers and no
            # shared table a session opened on another worker is unknown here.
            route.sessions.bind(session, call.agent)
            return None
        # The same answer whether the session is unknown or another agent's: nothing
        # tells a prober that a session id exists.
        return Rejection(404, "mcp_session_unknown",
                         "this MCP session is not known for this agent; open a new one with initialize")

    def _batch(self, route: _Route, call: Call, batch: list) -> Rejection | Handoff:
        opts = route.opts
        if not batch:
            return Rejection(400, "mcp_invalid_request", "an empty JSON-RPC batch")
        if len(batch) > opts.max_batch:
            return Rejection(400, "mcp_batch_too_large",
                             f"a batch of {len(batch)} messages; this route takes at most {opts.max_batch}")
        rejection = self._check_session(route, call)
        if rejection is not None:
            return rejection
        parts: list[Call] = []
        seen: set = set()
        for raw in batch:
            msg = parse_message(raw, opts.max_tool_name_length)
            if msg.kind is REQUEST:
                if msg.method == "initialize":
                    msg.kind, msg.problem = INVALID, ("mcp_invalid_request",
                                                      "initialize must not be part of a JSON-RPC batch")
                else:
                    key = id_key(msg.id)
                    if key in seen:
                        msg.kind, msg.problem = INVALID, ("mcp_invalid_request",
                                                          "this id is used twice in the batch")
                    seen.add(key)
            body = orjson.dumps(raw)
            part = call.part(body, raw)
            part.body_sha256 = hashlib.sha256(body).hexdigest()
            part.extra["mcp_msg"] = msg
            if msg.kind is INVALID:
                part.rejection = _invalid(msg)
                part.ended_by = self.name
            else:
                part.extra["mcp"] = msg.policy_view()
                if msg.tool is not None:
                    part.tool_key = route.names.key(msg.tool)
            parts.append(part)
        return Handoff(parts, self._finish_batch)

    # -- the answer ----------------------------------------------------------

    def _track_session(self, route: _Route, call: Call, resp: aiohttp.ClientResponse) -> None:
        sent = call.request.headers.get(MCP_SESSION_HEADER)
        if sent is None:
            opened = resp.headers.get(MCP_SESSION_HEADER)
            if opened is not None and resp.status < 300:
                route.sessions.bind(opened, call.agent)
        elif resp.status == 404 or (call.request.method == "DELETE" and resp.status < 300):
            route.sessions.forget(sent)  # ended by the client, or gone at the server

    async def _respond(self, call: Call, resp: aiohttp.ClientResponse, headers: CIMultiDict,
                       deadline: float, relay: Relay) -> web.StreamResponse:
        """The response filter of a single-message call."""
        route = self.routes[call.tool.name]
        self._track_session(route, call, resp)
        msg: Message | None = call.extra.get("mcp_msg")
        if msg is None or msg.kind is not REQUEST or resp.status >= 300:
            return await relay(call, resp, headers, deadline)
        if msg.method == "tools/list":
            async def filter_list(obj: Any) -> Any:
                if obj.__class__ is dict and "id" in obj and id_key(obj["id"]) == id_key(msg.id):
                    return await self._filter_list(route, call, obj)
                return None
            return await self._relay_messages(route, call, resp, headers, deadline, relay, filter_list)
        if msg.method == "tools/call":
            length = resp.content_length
            if resp.headers.get("Content-Type", "").lower().startswith("application/json") and (
                    length is None or length > SMALL_RESPONSE):
                # A big result is streamed on, as the forwarder would, not held to be inspected.
                return await relay(call, resp, headers, deadline)

            async def inspect(obj: Any) -> None:
                _note_tool_error(call, msg, obj)
            return await self._relay_messages(route, call, resp, headers, deadline, relay, inspect)
        return await relay(call, resp, headers, deadline)

    async def _filter_list(self, route: _Route, call: Call, reply: dict) -> dict | None:
        """The tools/list reply without the tools this agent may not call; None: unchanged."""
        result = reply.get("result")
        tools = result.get("tools") if result.__class__ is dict else None
        if tools.__class__ is not list:
            return None
        max_len = route.opts.max_tool_name_length
        for t in tools:
            name = t.get("name") if t.__class__ is dict else None
            if name_problem(name, max_len) is None:
                route.names.learn(name)
        policy = self.policy
        tool = call.tool
        if policy is None or not route.opts.filter_tools_list:
            return None
        if (tool.policy_mode or policy.mode) == "shadow":
            return None  # shadow mode watches, it does not change what the agent sees
        base = policy.input_document(call)
        mid = call.extra["mcp_msg"].id
        kept = []
        for t in tools:
            name = t.get("name") if t.__class__ is dict else None
            if name_problem(name, max_len) is not None:
                continue  # a name no call could use
            doc = dict(base)
            doc["mcp"] = {"method": "tools/call", "id": mid, "tool": name, "arguments": None,
                          "purpose": "tools/list"}
            if await self._may_call(policy, tool, doc):
                kept.append(t)
        if len(kept) == len(tools):
            return None
        self.hidden_tools += len(tools) - len(kept)
        return {**reply, "result": {**result, "tools": kept}}

    @staticmethod
    async def _may_call(policy: Any, tool: Tool, doc: dict) -> bool:
        try:
            return (await policy.engine.evaluate(doc)).allow
        except (EngineError, DecisionError) as exc:
            kind = "engine_error" if isinstance(exc, EngineError) else "bad_decision"
        except Exception:  # an engine bug must still end in a decision
            log.exception("policy engine raised unexpectedly while filtering tools/list")
            kind = "engine_error"
        policy.metrics.policy_errors.labels(tool.name, kind).inc()
        if tool.fail_open:
            # NOTE: fails open, by configuration: the tool stays listed (its calls are still judged).
            policy.metrics.fail_open.labels(tool.name, "mcp_list").inc()
            return True
        return False

    async def _relay_messages(self, route: _Route, call: Call, resp: aiohttp.ClientResponse, headers: CIMultiDict,
                              deadline: float, relay: Relay, transform: Transform) -> web.StreamResponse:
        """Send the answer on, message by message through `transform` (which returns a
        replacement, or None to keep the message's bytes as they came)."""
        ctype = resp.headers.get("Content-Type", "").lower()
        is_json = ctype.startswith("application/json")
        if not is_json and not ctype.startswith("text/event-stream"):
            return await relay(call, resp, headers, deadline)
        decoder = _decoder(resp.headers.get("Content-Encoding", ""))
        if decoder is False:
            # NOTE: lossy: an encoding Regate cannot read (br, zstd) passes unfiltered;
            # the calls themselves are still judged one by one.
            return await relay(call, resp, headers, deadline)
        if decoder is not None:
            headers.popall("Content-Encoding", None)
        limit = route.opts.max_message_bytes
        if is_json:
            return await self._relay_json(call, resp, headers, deadline, decoder, limit, transform)
        return await self._relay_sse(call, resp, headers, deadline, decoder, limit, transform)

    async def _relay_json(self, call: Call, resp: aiohttp.ClientResponse, headers: CIMultiDict, deadline: float,
                          decoder: Any, limit: int, transform: Transform) -> web.StreamResponse:
        chunks: list[bytes] = []
        size = 0  # bytes held: inflated ones when the answer is compressed
        read = 0  # bytes read, as sent
        pieces: Iterator[bytes] = iter(())
        content = resp.content
        try:
            while size <= limit and read <= limit:
                async with asyncio.timeout(deadline):
                    chunk = await content.readany()
                if not chunk:
                    break
                read += len(chunk)
                pieces = _pieces(decoder, chunk)
                for piece in pieces:
                    chunks.append(piece)
                    size += len(piece)
                    if size > limit:
                        break  # the rest of this chunk streams on below
        except (TimeoutError, aiohttp.ClientError, zlib.error) as exc:
            raise UpstreamError(Rejection(
                502, "upstream_error", f"tool {call.tool.name!r} broke off its response: {exc.__class__.__name__}"))
        if 0 < read <= limit and size <= limit and _truncated(decoder):
            raise _cut_short(call)
        body = b"".join(chunks)
        if size > limit or read > limit:
            # NOTE: lossy: an answer past max_message_bytes (inflated, when compressed)
            # is not buffered to be filtered; it streams on unfiltered (inflated).
            out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
            await out.prepare(call.request)
            if not await _send(call, out, body, deadline):
                return out
            return await _pipe(call, resp, out, deadline, decoder, pieces)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        changed = False
        if obj.__class__ is dict:
            new = await transform(obj)
            if new is not None:
                obj, changed = new, True
        elif obj.__class__ is list:
            for i, item in enumerate(obj):
                new = await transform(item)
                if new is not None:
                    obj[i], changed = new, True
        if changed:
            body = orjson.dumps(obj)
        return web.Response(status=resp.status, reason=resp.reason, body=body, headers=headers)

    async def _relay_sse(self, call: Call, resp: aiohttp.ClientResponse, headers: CIMultiDict, deadline: float,
                         decoder: Any, limit: int, transform: Transform) -> web.StreamResponse:
        """Stream an SSE answer event by event: each event is written as soon as it is complete."""
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        await out.prepare(call.request)
        reader = SseReader()
        content = resp.content
        fed = False  # any body at all: an empty one is not a cut-short compressed stream
        while True:
            try:
                async with asyncio.timeout(deadline):
                    chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError):
                return _broken(call, out)
            if not chunk:
                break
            fed = True
            pieces = _pieces(decoder, chunk)
            while True:
                try:
                    piece = next(pieces, None)
                except zlib.error:
                    return _broken(call, out)
                if piece is None:
                    break
                for event in reader.feed(piece):
                    new = None
                    if event.data is not None:
                        try:
                            obj = orjson.loads(event.data)
                        except orjson.JSONDecodeError:
                            obj = None
                        if obj is not None:
                            new = await transform(obj)
                    if not await _send(call, out, event.raw if new is None else event.with_data(orjson.dumps(new)),
                                       deadline):
                        return out
                if reader.pending > limit:
                    # NOTE: lossy: one event past max_message_bytes is not buffered to be
                    # filtered; the rest of the stream passes as it is.
                    if not await _send(call, out, reader.take_pending(), deadline):
                        return out
                    return await _pipe(call, resp, out, deadline, decoder, pieces)
        for event in reader.feed(b"", final=True):
            if not await _send(call, out, event.raw, deadline):
                return out
        # An event the stream never finished is sent as it is.
        if reader.pending and not await _send(call, out, reader.take_pending(), deadline):
            return out
        if fed and _truncated(decoder):
            return _broken(call, out)
        await out.write_eof()
        return out

    # -- batches -------------------------------------------------------------

    async def _collect(self, call: Call, resp: aiohttp.ClientResponse, headers: CIMultiDict,
                       deadline: float, relay: Relay) -> web.StreamResponse:
        """The response filter of a batch's forward: read every message of the answer
        (JSON, or an SSE stream to its end) into call.extra["mcp_replies"]. What it
        returns is never sent: `_finish_batch` builds the answer."""
        route = self.routes[call.tool.name]
        self._track_session(route, call, resp)
        call.extra["mcp_reply_headers"] = headers
        decoder = _decoder(resp.headers.get("Content-Encoding", ""))
        limit = route.opts.max_message_bytes
        chunks: list[bytes] = []
        size = 0  # bytes held: inflated ones when the answer is compressed
        read = 0  # bytes read, as sent
        content = resp.content
        try:
            while True:
                async with asyncio.timeout(deadline):
                    chunk = await content.readany()
                if not chunk:
                    break
                read += len(chunk)
                if read > limit or decoder is False:
                    raise _batch_too_large(call, limit)
                for piece in _pieces(decoder, chunk):
                    size += len(piece)
                    if size > limit:
                        raise _batch_too_large(call, limit)  # inflated past the limit: a bomb is cut here
                    chunks.append(piece)
        except (TimeoutError, aiohttp.ClientError, zlib.error) as exc:
            raise UpstreamError(Rejection(
                502, "upstream_error", f"tool {call.tool.name!r} broke off its response: {exc.__class__.__name__}"))
        if read and _truncated(decoder):
            raise _cut_short(call)
        body = b"".join(chunks)
        if resp.status >= 400:
            call.extra["error_body"] = body[:8192]
        replies: list[Any] = []
        if resp.headers.get("Content-Type", "").lower().startswith("text/event-stream"):
            reader = SseReader()
            for event in reader.feed(body + b"\n\n", final=True):
                if event.data is not None:
                    _extend(replies, event.data)
        elif body:
            _extend(replies, body)
        call.extra["mcp_replies"] = replies
        return web.Response(status=resp.status)

    async def _finish_batch(self, parent: Call, parts: list[Call], forwarder: Any) -> web.StreamResponse:
        route = self.routes[parent.tool.name]
        admitted = [p for p in parts if p.rejection is None]
        upstream_headers: CIMultiDict | None = None
        if admitted:
            if route.opts.batch_upstream == "batch":
                upstream_headers = await self._forward_reduced(parent, admitted, forwarder)
            else:
                upstream_headers = await self._forward_each(admitted, forwarder)
        out: list[Any] = []
        for p in parts:
            msg: Message = p.extra["mcp_msg"]
            if p.rejection is not None:
                if msg.answers:
                    out.append(rejection_error(p.id, p.rejection, msg.id if msg.has_id else None))
                continue
            if msg.kind is not REQUEST:
                continue  # notifications and client responses get no reply
            reply = p.extra.get("mcp_reply")
            if reply is None:
                out.append(rejection_error(p.id, Rejection(
                    502, "mcp_no_reply", f"the MCP server {p.tool.name!r} sent no reply to this request"), msg.id))
                continue
            if msg.method == "tools/list":
                reply = await self._filter_list(route, p, reply) or reply
            elif msg.method == "tools/call":
                _note_tool_error(p, msg, reply)
            out.append(reply)
        headers: CIMultiDict[str] = CIMultiDict()
        if upstream_headers is not None:
            for name, value in upstream_headers.items():
                if name not in _BODY_HEADERS:
                    headers.add(name, value)
        for p in parts:
            headers.update(p.response_headers)
        headers.update(parent.response_headers)
        headers["X-Regate-Decision-Id"] = parent.id
        if not out:
            return web.Response(status=202, headers=headers)
        return web.Response(status=200, body=orjson.dumps(out), content_type="application/json", headers=headers)

    async def _forward_reduced(self, parent: Call, admitted: list[Call], forwarder: Any) -> CIMultiDict | None:
        """The admitted messages as one batch, in their order; each part learns the outcome."""
        body = orjson.dumps([p.extra["mcp_msg"].raw for p in admitted])
        parent.body = body
        parent.body_size = len(body)
        parent.body_sha256 = hashlib.sha256(body).hexdigest()
        # The parts' decisions, together: every header any of them sets or removes,
        # the shortest deadline; the upstream learns every part's decision id.
        set_headers: dict[str, str] = {}
        remove: list[str] = []
        for p in admitted:
            if p.set_headers:
                set_headers.update(p.set_headers)
            if p.remove_headers:
                remove.extend(p.remove_headers)
            if p.timeout_ms is not None and (parent.timeout_ms is None or p.timeout_ms < parent.timeout_ms):
                parent.timeout_ms = p.timeout_ms
        set_headers["X-Regate-Decision-Id"] = ",".join(p.id for p in admitted)
        parent.set_headers = set_headers
        parent.remove_headers = remove or None
        parent.response_filter = self._collect
        try:
            await forwarder.forward(parent)
        except UpstreamError as exc:
            for p in admitted:
                p.rejection = exc.rejection
        finally:
            for p in admitted:
                p.forwarded = parent.forwarded
                p.upstream_status = parent.upstream_status
                p.upstream_ns = parent.upstream_ns
                for flag in ("upstream_broken", "error_body"):
                    if flag in parent.extra:
                        p.extra[flag] = parent.extra[flag]
        _match(admitted, parent.extra.get("mcp_replies") or [])
        return parent.extra.get("mcp_reply_headers")

    async def _forward_each(self, admitted: list[Call], forwarder: Any) -> CIMultiDict | None:
        """One POST per admitted message, concurrently (servers without batches)."""
        async def one(p: Call) -> None:
            p.response_filter = self._collect
            try:
                await forwarder.forward(p)
            except UpstreamError as exc:
                p.rejection = exc.rejection
                return
            _match([p], p.extra.get("mcp_replies") or [])

        await asyncio.gather(*(one(p) for p in admitted))
        for p in admitted:
            if "mcp_reply_headers" in p.extra:
                return p.extra["mcp_reply_headers"]
        return None


# -- helpers ---------------------------------------------------------------

def _note_tool_error(call: Call, msg: Message, obj: Any) -> None:
    """Mark a tools/call the server answered with an error (JSON-RPC error, or a
    result with isError): an MCP server says "this call failed" with HTTP 200,
    and the breakers and loop guard must still hear it."""
    if obj.__class__ is not dict or "id" not in obj or id_key(obj["id"]) != id_key(msg.id):
        return
    if "error" in obj:
        call.extra["mcp_tool_error"] = error_summary(obj)
        return
    result = obj.get("result")
    if result.__class__ is dict and result.get("isError") is True:
        content = result.get("content")
        texts = [c.get("text") for c in content if c.__class__ is dict and isinstance(c.get("text"), str)] \
            if content.__class__ is list else []
        call.extra["mcp_tool_error"] = error_summary(" ".join(texts) or "the tool reported an error")


def _extend(replies: list[Any], data: bytes) -> None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if obj.__class__ is list:
        replies.extend(obj)
    else:
        replies.append(obj)


def _match(parts: list[Call], replies: list[Any]) -> None:
    """Give each request its reply, by id. A single error with a null id (the server
    refused the whole batch) answers every request left without one."""
    by_id: dict = {}
    whole = None
    for r in replies:
        if r.__class__ is not dict or ("result" not in r and "error" not in r):
            continue  # notifications and server requests riding on the stream
        rid = r.get("id")
        if rid is None:
            if "error" in r and whole is None:
                whole = r
        else:
            by_id.setdefault(id_key(rid), r)
    for p in parts:
        msg: Message = p.extra["mcp_msg"]
        if msg.kind is not REQUEST:
            continue
        reply = by_id.get(id_key(msg.id))
        if reply is None and whole is not None:
            reply = {**whole, "id": msg.id}
        if reply is not None:
            p.extra["mcp_reply"] = reply


def _decoder(encoding: str) -> Any:
    """None: identity; a zlib decompressor for gzip/deflate; False: an encoding Regate cannot read."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(47)  # 32 + 15: gzip or zlib header, detected
    return False


def _pieces(decoder: Any, chunk: bytes) -> Iterator[bytes]:
    """`chunk` as Regate reads it: as sent (identity), or inflated at most
    _INFLATE_STEP bytes at a time, so that what a caller holds is bounded by
    what it counts (raises zlib.error on a corrupt stream)."""
    if decoder is None:
        return iter((chunk,))
    return _inflate(decoder, chunk)


def _inflate(decoder: Any, data: bytes) -> Iterator[bytes]:
    while True:
        piece = decoder.decompress(data, _INFLATE_STEP)
        data = decoder.unconsumed_tail
        if not piece:
            return  # all input consumed and nothing left to give (or the stream ended)
        yield piece


def _truncated(decoder: Any) -> bool:
    """The answer ended inside its compressed stream. With Content-Encoding removed the
    agent cannot tell (the gzip trailer and its CRC are gone), so Regate must not end the
    answer as if it were whole."""
    return decoder is not None and decoder is not False and not decoder.eof


def _cut_short(call: Call) -> UpstreamError:
    return UpstreamError(Rejection(
        502, "upstream_error", f"tool {call.tool.name!r} ended its compressed answer before the end of the stream"))


def _batch_too_large(call: Call, limit: int) -> UpstreamError:
    return UpstreamError(Rejection(
        502, "upstream_error",
        f"tool {call.tool.name!r} answered the batch with more than {limit} bytes (mcp.max_message_bytes, "
        "inflated when compressed) or in an encoding Regate cannot read"))


def _broken(call: Call, out: web.StreamResponse) -> web.StreamResponse:
    # Past the status line a broken upstream can only be signalled by cutting the connection.
    call.extra["upstream_broken"] = True
    if call.request.transport is not None:
        call.request.transport.close()
    return out


async def _send(call: Call, out: web.StreamResponse, data: bytes, deadline: float) -> bool:
    """Write to the agent, as the forwarder's relay does: a client that stops reading
    stalls the write (back-pressure); one stalled past the deadline, or gone, is cut
    off (False)."""
    try:
        async with asyncio.timeout(deadline):
            await out.write(data)
        return True
    except (TimeoutError, ConnectionError):
        call.extra["client_gone"] = True
        if call.request.transport is not None:
            call.request.transport.close()
        return False


async def _pipe(call: Call, resp: aiohttp.ClientResponse, out: web.StreamResponse, deadline: float,
                decoder: Any, rest: Iterable[bytes] = ()) -> web.StreamResponse:
    """Send the rest of the answer on (first `rest`: what is left of the chunk being
    read), inflated piece by piece when it is compressed; each write waits for the
    agent's socket (`_send`), so memory stays bounded whatever the answer inflates to."""
    content = resp.content
    pieces = iter(rest)
    while True:
        while True:
            try:
                piece = next(pieces, None)
            except zlib.error:
                return _broken(call, out)
            if piece is None:
                break
            if not await _send(call, out, piece, deadline):
                return out
        try:
            async with asyncio.timeout(deadline):
                chunk = await content.readany()
        except (TimeoutError, aiohttp.ClientError):
            return _broken(call, out)
        if not chunk:
            break
        pieces = _pieces(decoder, chunk)
    if _truncated(decoder):
        return _broken(call, out)
    await out.write_eof()
    return out


async def _read_body(call: Call, timeout_s: float) -> Rejection | None:
    """Buffer and parse the body when read_body did not (no stage asked it to),
    with read_body's bounds: the tool's max_body_bytes, http.body_timeout_s."""
    rejection = await buffer_body(call, timeout_s)
    if rejection is not None:
        return rejection
    body = call.body
    if body:
        try:
            call.body_json = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return Rejection(400, "bad_json", f"request body is not valid JSON: {exc}")
    return None
