"""An upstream tool that remembers every call it received, by Regate decision id.

Run as `python tests/support/recording_upstream.py PORT`. Each request's
`X-Regate-Decision-Id` is recorded the moment the handler starts, before any
await, so a call counts as received even when Regate dies before the answer
goes back. `?sleep=S` holds the answer S seconds (calls in flight at a kill).
`GET /_seen` returns {"calls": N, "ids": [...], "tags": [...]} (the `?tag=` of
each call, in the same order); `POST /_reset` forgets them.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from tests.support.procs import Process

SEEN: list[str | None] = []
TAGS: list[str | None] = []


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def tool(request: web.Request) -> web.Response:
    did = request.headers.get("X-Regate-Decision-Id")
    SEEN.append(did)
    TAGS.append(request.query.get("tag"))
    sleep = float(request.query.get("sleep", "0") or 0)
    if sleep:
        await asyncio.sleep(sleep)
    await request.read()
    return _json({"decision_id": did, "tag": request.query.get("tag")})


async def seen(request: web.Request) -> web.Response:
    return _json({"calls": len(SEEN), "ids": SEEN, "tags": TAGS})


async def reset(request: web.Request) -> web.Response:
    SEEN.clear()
    TAGS.clear()
    return _json({"calls": 0})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/_seen", seen)
    app.router.add_post("/_reset", reset)
    app.router.add_route("*", "/{tail:.*}", tool)
    return app


def start() -> "tuple[Process, str]":
    """Start it as a real process on a free port: (Process, base URL)."""
    from tests.support.procs import ROOT, Process, free_port

    port = free_port()
    p = Process([sys.executable, str(ROOT / "tests/support/recording_upstream.py"), str(port)],
                f"http://127.0.0.1:{port}/_seen")
    return p, f"http://127.0.0.1:{port}"


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
