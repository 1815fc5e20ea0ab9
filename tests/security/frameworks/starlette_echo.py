"""A tool written with Starlette (run it under uvicorn, h11 or httptools): echoes, as
JSON, what Starlette parsed from the request.

uvicorn tests.security.frameworks.starlette_echo:app --http h11|httptools --port PORT
"""

from __future__ import annotations

import json
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SEEN = {"n": 0}
NAME = "starlette-" + os.environ.get("ECHO_HTTP", "?")


async def count(request: Request) -> Response:
    return Response(json.dumps(SEEN), media_type="application/json")


async def echo(request: Request) -> Response:
    SEEN["n"] += 1
    qp = request.query_params
    out: dict = {
        "server": NAME,
        # Starlette routes by scope["path"]; request.url re-parses the URL built from it.
        "paths": {"scope['path']": request.scope["path"], "request.url.path": request.url.path},
        "pairs": {"query_params.multi_items()": [list(kv) for kv in qp.multi_items()]},
        # dict(query_params) and query_params[k]: the last value.
        "dicts": {"dict(query_params)": dict(qp)},
        "json": {},
        "form": [],
        "content_type": request.headers.get("content-type"),
        "judged": request.headers.get("x-judged"),
    }
    body = await request.body()
    if body:
        try:  # request.json() parses whatever the Content-Type says
            out["json"]["request.json()"] = await request.json()
        except (ValueError, UnicodeDecodeError):
            pass
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            form = await request.form()
            out["form"] = [[k, v if isinstance(v, str) else "<file>"] for k, v in form.multi_items()]
        except Exception:  # noqa: BLE001 - a form Starlette cannot parse carries nothing it acts on
            pass
    return Response(json.dumps(out), media_type="application/json")


app = Starlette(routes=[Route("/_count", count), Route("/{tail:path}", echo, methods=[
    "GET", "POST", "PUT", "PATCH", "DELETE"])])
