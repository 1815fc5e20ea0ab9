"""Read body: buffer the request body when a later stage reads it, bounded by
the tool's `max_body_bytes`; otherwise leave it to be streamed to the upstream.

Only JSON bodies (by content type, or any body on an MCP route) are buffered
and parsed, and only when some stage reads them: a 1 GB upload to a file tool
streams through without touching memory. A declared Content-Length over the
limit is refused before a byte is read.
"""

from __future__ import annotations

import hashlib

import orjson

from ..pipeline import Call, Rejection


def _too_large(limit: int) -> Rejection:
    return Rejection(413, "body_too_large", f"request body exceeds this tool's limit of {limit} bytes")


def is_json(content_type: str) -> bool:
    ct = content_type.split(";", 1)[0].strip().lower()
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


class ReadBody:
    name = "read_body"

    def __init__(self, needs_body: bool) -> None:
        # Whether any stage reads the body (the policy engine, MCP recognition).
        self.needs_body = needs_body

    async def enter(self, call: Call) -> Rejection | None:
        request = call.request
        tool = call.tool
        limit = tool.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            return _too_large(limit)
        call.body_size = declared
        if not request.body_exists:
            call.body_size = 0
            return None
        wants_json = tool.protocol == "mcp" or is_json(request.headers.get("Content-Type", ""))
        if not (self.needs_body and wants_json):
            return None  # streamed by the forwarder, which enforces the limit as it goes

        chunks = []
        size = 0
        stream = request.content
        while True:
            chunk = await stream.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                return _too_large(limit)
            chunks.append(chunk)
        body = b"".join(chunks)
        call.body = body
        call.body_size = size
        call.body_sha256 = hashlib.sha256(body).hexdigest()
        if body:
            try:
                call.body_json = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return Rejection(400, "bad_json", f"request body is not valid JSON: {exc}")
        return None

    def leave(self, call: Call) -> None:
        pass
