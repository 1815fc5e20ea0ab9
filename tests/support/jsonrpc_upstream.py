"""A minimal MCP server of the 2025-03-26 kind (JSON answers, JSON-RPC batches
accepted) that remembers every message it received, for the MCP tests.

Run as `python tests/support/jsonrpc_upstream.py PORT`. `POST /mcp` takes one
message or a batch; `POST /gz/mcp` answers the same, gzip-compressed. Tools:
`ok` and `limited` answer, `secret` answers (the policy hides it), `fail`
fails: alone with HTTP 400 and a JSON-RPC error (as spec-conformant servers may),
inside a batch with that error in its slot. `initialize` opens a session
(`Mcp-Session-Id`); a request naming an unknown session gets 404.
`GET /_seen` returns {"posts": N, "bodies": [...], "sessions": [...]}; `POST /_reset` forgets.
"""

from __future__ import annotations

import gzip
import sys
import uuid

import orjson
from aiohttp import web

BODIES: list[object] = []
SESSIONS: list[str | None] = []
OPEN: set[str] = set()
TOOLS = [{"name": n, "description": f"the {n} tool", "inputSchema": {"type": "object"}}
         for n in ("ok", "fail", "limited", "secret")]


def _answer(msg: dict, batch: bool) -> tuple[dict | None, int]:
    if "method" not in msg or "id" not in msg:
        return None, 200  # notifications and responses: nothing to say
    mid, method = msg["id"], msg["method"]
    if method == "initialize":
        return {"jsonrpc": "2.0", "id": mid, "result": {
            "protocolVersion": "2025-03-26", "capabilities": {"tools": {}},
            "serverInfo": {"name": "jsonrpc-upstream", "version": "1"}}}, 200
    if method == "ping":
        return {"jsonrpc": "2.0", "id": mid, "result": {}}, 200
    if method == "tools/list":
        return {"jsonrpc": "2.0", "id": mid, "result": {"tools": TOOLS}}, 200
    if method == "tools/call":
        name = msg["params"]["name"]
        if name == "fail":
            err = {"jsonrpc": "2.0", "id": mid, "error": {"code": -32602, "message": "ticket 999 does not exist"}}
            return err, 200 if batch else 400
        args = msg["params"].get("arguments") or {}
        return {"jsonrpc": "2.0", "id": mid, "result": {
            "content": [{"type": "text", "text": f"{name} ran with {orjson.dumps(args).decode()}"}]}}, 200
    return {"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "Method not found"}}, 200


async def mcp(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = orjson.loads(raw)
    BODIES.append(body)
    session = request.headers.get("Mcp-Session-Id")
    SESSIONS.append(session)
    if session is not None and session not in OPEN:
        return web.Response(status=404)
    batch = isinstance(body, list)
    replies, status = [], 200
    for msg in body if batch else [body]:
        reply, st = _answer(msg, batch)
        status = max(status, st)
        if reply is not None:
            replies.append(reply)
    headers = {}
    if not batch and body.get("method") == "initialize":
        sid = uuid.uuid4().hex
        OPEN.add(sid)
        headers["Mcp-Session-Id"] = sid
    if not replies:
        return web.Response(status=202, headers=headers)
    out = orjson.dumps(replies if batch else replies[0])
    if request.path.startswith("/gz/"):
        headers["Content-Encoding"] = "gzip"
        out = gzip.compress(out)
    return web.Response(status=status, body=out, content_type="application/json", headers=headers)


async def end_session(request: web.Request) -> web.Response:
    OPEN.discard(request.headers.get("Mcp-Session-Id", ""))
    return web.Response(status=200)


async def seen(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps({"posts": len(BODIES), "bodies": BODIES, "sessions": SESSIONS}),
                        content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    BODIES.clear()
    SESSIONS.clear()
    return web.Response(status=204)


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/_seen", seen)
    app.router.add_post("/_reset", reset)
    for base in ("/mcp", "/gz/mcp"):
        app.router.add_post(base, mcp)
        app.router.add_delete(base, end_session)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
