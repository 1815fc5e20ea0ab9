"""The demo tool server Regate fronts in `make demo`: four small tools.

Nothing here does anything real: `shell` reports the argv it would run,
`payments` the transfer it would make. Run: `python examples/demo_tool.py PORT`.
"""

from __future__ import annotations

import shlex
import sys

from aiohttp import web


async def _args(request: web.Request) -> dict:
    if request.can_read_body and request.content_type == "application/json":
        return await request.json()
    return dict(request.query)


async def search(request: web.Request) -> web.Response:
    args = await _args(request)
    q = args.get("q", "")
    return web.json_response({"tool": "search", "query": q, "results": [f"{q} — result {i}" for i in (1, 2)]})


async def shell(request: web.Request) -> web.Response:
    # A shell tool should run the argv, never hand the string to a shell: the
    # shipped policy (rego/tools/shell.rego) judges exactly these words.
    args = await _args(request)
    command = args.get("command")
    if not isinstance(command, str):
        return web.json_response({"tool": "shell", "error": "'command' must be a string"}, status=400)
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return web.json_response({"tool": "shell", "error": f"cannot split the command: {exc}"}, status=400)
    # Here it would be: subprocess.run(argv, shell=False, cwd="/workspace", timeout=...)
    return web.json_response({"tool": "shell", "would_run": argv, "exit_code": 0})


async def files(request: web.Request) -> web.Response:
    args = await _args(request)
    return web.json_response({"tool": "files", "method": request.method, "path": "/" + request.match_info["tail"]})


async def payments(request: web.Request) -> web.Response:
    args = await _args(request)
    return web.json_response({"tool": "payments", "would_pay": args.get("amount"), "to": args.get("to")})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/search/{tail:.*}", search)
    app.router.add_route("*", "/shell/{tail:.*}", shell)
    app.router.add_route("*", "/files/{tail:.*}", files)
    app.router.add_route("*", "/payments/{tail:.*}", payments)
    app.router.add_get("/health", lambda r: web.json_response({"ok": True}))
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
