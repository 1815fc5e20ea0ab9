"""The floor for any Python proxy: a minimal aiohttp+uvloop pass-through.

It does only what a correct HTTP proxy cannot skip — copy the method, path,
headers (minus hop-by-hop and Host) and body to the upstream over one pooled
keep-alive `ClientSession`, and copy the answer back — and nothing Regate
adds (identity, routing, policy, limits, audit, metrics). Whatever Regate
costs on top of this is what its features cost.

Run: python benchmarks/bare_proxy.py --port 8090 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


async def serve(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=30),
    )
    base = upstream.rstrip("/")

    async def handle(request: web.BaseRequest) -> web.Response:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_DROP)
        body = await request.read() if request.body_exists else None
        async with session.request(request.method, URL(base + request.raw_path, encoded=True),
                                   headers=headers, data=body, allow_redirects=False) as r:
            payload = await r.read()
            out = CIMultiDict((k, v) for k, v in r.headers.items() if k.lower() not in RESPONSE_DROP)
            return web.Response(status=r.status, headers=out, body=payload)

    runner = web.ServerRunner(web.Server(handle), handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    uvloop.install()
    try:
        asyncio.run(serve(args.port, args.upstream))
    except (KeyboardInterrupt, web.GracefulExit):
        pass


if __name__ == "__main__":
    main()
