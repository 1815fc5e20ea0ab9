"""A small OPA-REST-compatible server whose evaluation is the real OPA engine.

The OPA server binary cannot be installed here; OPA itself can, as a Go
library behind ctypes (opa-golib-python-bindings, OPA v1.20.2). This server
puts the REST Data API in front of it, so Regate's ``opa`` engine is tested
over real HTTP against real OPA semantics:

    POST /v1/data/<path>   {"input": ...} -> {"result": ...}; no "result" key
                           when the document is undefined, as OPA answers
    GET  /v1/data/<path>   the same without input
    GET  /health           {} with 200

Knobs for failure tests (in-process: attributes; over HTTP: the admin route
``POST /_test/faults {"status": 500, "delay_ms": 200}``; as a script: flags):
``status`` makes every data request answer that HTTP status, ``delay_ms``
makes it wait first. An optional bearer token is checked like OPA's
``--authentication=token`` (401 without it).

In pytest:  ``server = OpaRestServer(rego_dir, data_dir); url = await server.start()``.
As a script: ``python tests/support/opa_rest_server.py --port P --rego DIR --data DIR``
(prints ``listening on http://HOST:PORT`` once it accepts connections).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from opa_bindings import OpaEngine, OpaError, OpaUndefinedError  # noqa: E402

from proxy.engines.bundle import Bundle, load_bundle  # noqa: E402


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class OpaRestServer:
    def __init__(self, rego_dir: str | Path | None = None, data_dir: str | Path | None = None, *,
                 bundle: Bundle | None = None, token: str | None = None,
                 status: int | None = None, delay_ms: int = 0) -> None:
        if bundle is None:
            if rego_dir is None:
                raise ValueError("give rego_dir (and data_dir) or a bundle")
            bundle = load_bundle(rego_dir, data_dir)
        self.bundle = bundle
        self.token = token
        #: Answer every data request with this HTTP status (a sick OPA).
        self.status: int | None = status
        #: Wait this long before answering a data request (a slow OPA).
        self.delay_ms = delay_ms
        #: Data requests seen, for tests that count retries.
        self.requests = 0
        #: Client (host, port) pairs seen: one per connection a client opened.
        self.peers: set[tuple] = set()
        self.engine = OpaEngine()
        for module in bundle.modules:
            if not module.is_test:
                self.engine.add_policy(module.name, module.source)
        if bundle.data:
            self.engine.add_data(bundle.data)
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    # --- HTTP -----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/data", self._data)
        app.router.add_get("/v1/data", self._data)
        app.router.add_post("/v1/data/{path:.*}", self._data)
        app.router.add_get("/v1/data/{path:.*}", self._data)
        app.router.add_get("/health", self._health)
        app.router.add_post("/_test/faults", self._faults)
        app.router.add_get("/_test/faults", self._faults)
        return app

    def _authorised(self, request: web.Request) -> bool:
        return self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _health(self, request: web.Request) -> web.Response:
        return _json({})

    async def _faults(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            body = orjson.loads(await request.read() or b"{}")
            self.status = body.get("status")
            self.delay_ms = int(body.get("delay_ms", 0))
        return _json({"status": self.status, "delay_ms": self.delay_ms, "requests": self.requests})

    async def _data(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        if not self._authorised(request):
            return _json({"code": "unauthorized", "message": "the server requires a bearer token"}, 401)
        if self.delay_ms:
            await asyncio.sleep(self.delay_ms / 1000)
        if self.status is not None and self.status != 200:
            return _json({"code": "internal_error", "message": f"fault injected: status {self.status}"}, self.status)
        input_doc = None
        if request.method == "POST":
            raw = await request.read()
            if raw:
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    return _json({"code": "invalid_parameter", "message": f"body is not JSON: {exc}"}, 400)
                if isinstance(body, dict):
                    input_doc = body.get("input")
        path = request.match_info.get("path", "").strip("/").replace("/", ".")
        try:
            value = self.evaluate(path, input_doc)
        except OpaUndefinedError:
            return _json({})
        except OpaError as exc:
            return _json({"code": "internal_error", "message": exc.message}, 500)
        return _json({"result": value})

    def evaluate(self, path: str, input_doc: Any) -> Any:
        """The document at data.<path> (dotted), as OPA computes it; OpaUndefinedError when undefined."""
        return self.engine.eval_document(path, input_doc)

    # --- lifecycle --------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.engine.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8181)
    p.add_argument("--rego", required=True, help="directory of .rego modules")
    p.add_argument("--data", help="directory of YAML/JSON data, mounted by file name")
    p.add_argument("--token", help="require Authorization: Bearer TOKEN")
    p.add_argument("--status", type=int, help="answer every data request with this HTTP status")
    p.add_argument("--delay-ms", type=int, default=0, help="wait this long before every data answer")
    args = p.parse_args(argv)
    server = OpaRestServer(args.rego, args.data, token=args.token, status=args.status, delay_ms=args.delay_ms)

    async def serve() -> None:
        url = await server.start(args.host, args.port)
        print(f"listening on {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
