"""An upstream tool that writes down exactly what reached it, for the hostile-input suite.

Run as `python tests/security/witness_upstream.py PORT`. Every request is recorded
the moment its handler starts: decision id, method, raw path and query, headers,
and (once read) the body's length, SHA-256 and, up to 1 MiB, its bytes (base64). Tools are mounted under `/t/<tool>/…`
(`upstream: http://127.0.0.1:PORT/t/<tool>`), so the record says which route's
upstream a call reached.

    GET  /_seen            {"calls": N, "records": [...]}
    GET  /_seen/<id>       the records carrying that decision id (normally 0 or 1)
    POST /_reset           forget everything
    *    /t/<tool>/slow?s=S         answer after S seconds
    *    /t/<tool>/download?size=N  N bytes, streamed in 64 KiB writes
    *    /t/<tool>/forge            answers with X-Regate-* headers of its own
    *    anything else               200 {"decision_id", "n"}
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys

import orjson
from aiohttp import web

RECORDS: list[dict] = []


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def tool(request: web.Request) -> web.StreamResponse:
    rec = {
        "decision_id": request.headers.get("X-Regate-Decision-Id"),
        "method": request.method,
        "raw_path": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_size": None,
        "body_sha256": None,
        "complete": False,
    }
    RECORDS.append(rec)
    body = await request.read()
    rec["body_size"] = len(body)
    rec["body_sha256"] = hashlib.sha256(body).hexdigest()
    # The bytes themselves (small bodies): tests parse them as a tool would.
    rec["body_b64"] = base64.b64encode(body).decode() if len(body) <= 1 << 20 else None
    rec["complete"] = True
    tail = request.match_info["tail"]
    if tail == "slow":
        await asyncio.sleep(float(request.query.get("s", "1")))
    elif tail == "download":
        size = int(request.query.get("size", str(64 << 20)))
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
    resp = _json({"decision_id": rec["decision_id"], "n": len(RECORDS)})
    if tail == "forge":  # a tool that tries to speak for Regate
        resp.headers.update({"X-Regate-Decision-Id": "forged", "X-Regate-Approval": "apr_" + "f" * 24,
                             "X-Regate-Policy-Revision": "forged"})
    return resp


async def seen(request: web.Request) -> web.Response:
    return _json({"calls": len(RECORDS), "records": RECORDS})


async def seen_one(request: web.Request) -> web.Response:
    did = request.match_info["id"]
    return _json([r for r in RECORDS if r["decision_id"] == did])


async def reset(request: web.Request) -> web.Response:
    RECORDS.clear()
    return _json({"calls": 0})


def make_app() -> web.Application:
    # Bodies as they arrived (not decompressed): the hash is of the bytes Regate sent.
    app = web.Application(client_max_size=64 << 20, handler_args={"auto_decompress": False})
    app.router.add_get("/_seen", seen)
    app.router.add_get("/_seen/{id}", seen_one)
    app.router.add_post("/_reset", reset)
    app.router.add_route("*", "/t/{tool}", tool)
    app.router.add_route("*", r"/t/{tool}/{tail:[\s\S]*}", tool)
    return app


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
