"""The upstream tool when nginx cannot be had: aiohttp+uvloop answering every
request with the same small JSON body as the nginx upstream.

Results measured against it are labelled `aiohttp-fallback`: it is several
times slower than nginx, so `direct` and every ratio against it shift.

Run: python benchmarks/fallback_upstream.py --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.servers import UPSTREAM_BODY  # noqa: E402

BODY = UPSTREAM_BODY.encode()


async def serve(port: int) -> None:
    async def handle(request: web.BaseRequest) -> web.Response:
        if request.body_exists:
            await request.read()
        return web.Response(body=BODY, content_type="application/json")

    runner = web.ServerRunner(web.Server(handle), handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvloop.install()
    try:
        asyncio.run(serve(args.port))
    except (KeyboardInterrupt, web.GracefulExit):
        pass


if __name__ == "__main__":
    main()
