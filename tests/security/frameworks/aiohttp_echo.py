"""A tool written with aiohttp: echoes, as JSON, what aiohttp parsed from the request.

python aiohttp_echo.py PORT. GET /_count (sent straight to it, not through Regate) says
how many other requests it served.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

SEEN = {"n": 0}


async def count(request: web.Request) -> web.Response:
    return web.json_response(SEEN)


async def echo(request: web.Request) -> web.Response:
    SEEN["n"] += 1
    out: dict = {
        "server": "aiohttp",
        "paths": {"request.path": request.path},
        "pairs": {"query": [[k, v] for k, v in request.query.items()]},
        # request.query[k] is the first value.
        "dicts": {"query[k]": {k: request.query[k] for k in request.query}},
        "json": {},
        "form": [],
        "content_type": request.headers.get("Content-Type"),
        "judged": request.headers.get("X-Judged"),
    }
    body = await request.read()
    if body:
        try:  # request.json() parses whatever the Content-Type says
            out["json"]["request.json()"] = await request.json()
        except (ValueError, UnicodeDecodeError, LookupError):
            pass
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            out["form"] = [[k, v if isinstance(v, str) else "<file>"] for k, v in (await request.post()).items()]
        except Exception:  # noqa: BLE001 - a form aiohttp cannot parse carries nothing it acts on
            pass
    return web.Response(text=json.dumps(out), content_type="application/json")


async def main(port: int) -> None:
    app = web.Application(client_max_size=1 << 22)
    app.router.add_get("/_count", count)
    app.router.add_route("*", "/{tail:.*}", echo)
    # The judged view travels in a header; a large query makes it large.
    runner = web.AppRunner(app, access_log=None, max_field_size=1 << 20, max_line_size=1 << 16)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
