"""A real upstream tool for the end-to-end tests: echo, slow, SSE, big bodies.

Run as `python tests/support/upstream_app.py PORT`. It answers what it saw, so
tests can assert exactly what crossed Regate.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

import orjson
from aiohttp import web

COUNTS: dict[str, int] = {"calls": 0}


async def echo(request: web.Request) -> web.Response:
    COUNTS["calls"] += 1
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": request.query_string,
        "headers": {str(k): v for k, v in request.headers.items()},
        "body": body.decode("utf-8", "replace"),
        "host": request.host,
    }, dumps=lambda o: orjson.dumps(o).decode(), headers={
        # Hop-by-hop headers an upstream might send; Regate must not pass them on.
        "Connection": "keep-alive, X-Upstream-Hop",
        "X-Upstream-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "X-Upstream-End": "kept",
    })


async def slow(request: web.Request) -> web.Response:
    COUNTS["calls"] += 1
    await asyncio.sleep(float(request.query.get("s", "2")))
    return web.json_response({"slow": True})


async def status(request: web.Request) -> web.Response:
    COUNTS["calls"] += 1
    return web.json_response({"status": int(request.match_info["code"])}, status=int(request.match_info["code"]))


async def sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    n = int(request.query.get("n", "5"))
    gap = float(request.query.get("gap", "0.3"))
    for i in range(n):
        await resp.write(f"id: {i}\ndata: event {i}\n\n".encode())
        await asyncio.sleep(gap)
    await resp.write_eof()
    return resp


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        digest.update(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", str(100 * 1024 * 1024)))
    resp = web.StreamResponse()
    resp.content_length = size
    await resp.prepare(request)
    block = b"x" * 65536
    sent = 0
    while sent < size:
        n = min(len(block), size - sent)
        await resp.write(block[:n])
        sent += n
    await resp.write_eof()
    return resp


async def count(request: web.Request) -> web.Response:
    return web.json_response(COUNTS)


def make_app() -> web.Application:
    app = web.Application(client_max_size=1024 ** 3)
    app.router.add_get("/_count", count)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/sse", sse)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
