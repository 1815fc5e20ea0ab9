"""An upstream tool that fails on command, for the breaker tests and the retry-storm benchmark.

Run as ``python tests/support/flaky_upstream.py PORT [--tls CERT KEY]`` (or use
``FlakyUpstream.start()``). It serves independent *lanes*: a call to
``/t/<lane>/...`` is answered by that lane's mode and counted in that lane, so
one process can stand behind many tools (``upstream: http://127.0.0.1:PORT/t/<lane>``).

Modes, set with ``POST /_flaky/mode/<lane>`` and a JSON body (absent keys take defaults):

- ``{"mode": "healthy"}``: 200 with what the call carried (method, path, headers, body).
- ``{"mode": "fail", "status": 500, "message": "..."}``: every call gets ``status``
  with ``{"error": {"message": ...}}``.
- ``{"mode": "ratio", "ratio": 0.3, "status": 500}``: a ``ratio`` share of calls fails,
  spread evenly by arrival (deterministic: calls 4, 7, 10 ... at 0.3).
- ``{"mode": "invalid", "match": "usr_nme", "status": 400, "message": "..."}``: a call
  whose raw body contains ``match`` fails (a validation error); the rest succeed.
- ``{"mode": "hash", "field": "table", "ratio": 0.3, "status": 400, "message": "... {value} ..."}``:
  a call fails when the SHA-256 of its JSON body's ``field`` falls in the lowest ``ratio``
  of hashes: a given argument always fails or always succeeds, whatever else changes.
- ``{"mode": "slow", "delay_s": 1.0}``: answers 200 after ``delay_s``.
- any mode may add ``"close": true``: the answer carries ``Connection: close`` (no keep-alive).

``GET /_flaky/stats/<lane>`` -> ``{"calls", "ok", "failed", "statuses"}`` (a call is counted
the moment its handler starts); ``GET /_flaky/stats`` has every lane and gate;
``POST /_flaky/reset`` zeroes all counters and makes every lane healthy.

Gates: two raw TCP listeners that relay to the plain port (``plain``) and, with
``--tls``, to a TLS copy of the app (``tls``). ``POST /_flaky/gate/<name>`` with
``{"hangup": N, "after_head": bool}`` makes the next N connections be accepted and
closed at once (``after_head``: after reading the request head, as a tool crashing
mid-call). A TLS gate that hangs up makes the client's TLS handshake fail, which an
HTTP client sees as a *connect* error: the request never left it. Each gate counts
``connections``, ``hangups``, ``heads`` (request heads read before hanging up).
``GET /_flaky/info`` has the ports.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import ssl
import sys
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

DEFAULTS: dict[str, Any] = {
    "mode": "healthy", "status": None, "message": None, "ratio": 0.3, "match": "",
    "field": "", "delay_s": 1.0, "close": False,
}
DEFAULT_STATUS = {"fail": 500, "ratio": 500, "invalid": 400, "hash": 400, "slow": 200, "healthy": 200}
DEFAULT_MESSAGE = {
    "fail": "internal error: the tool is down",
    "ratio": "internal error: the tool is down",
    "invalid": "validation failed",
    "hash": "validation failed: {field} {value!r} does not exist",
}


class Lane:
    def __init__(self) -> None:
        self.settings = dict(DEFAULTS)
        self.reset_counts()

    def reset_counts(self) -> None:
        self.calls = 0
        self.ok = 0
        self.failed = 0
        self.statuses: dict[str, int] = {}

    def stats(self) -> dict:
        return {"calls": self.calls, "ok": self.ok, "failed": self.failed, "statuses": dict(self.statuses),
                "mode": self.settings["mode"]}


class Gate:
    def __init__(self, name: str, backend_port: int) -> None:
        self.name = name
        self.backend_port = backend_port
        self.port = 0
        self.hangup = 0
        self.after_head = False
        self.connections = 0
        self.hangups = 0
        self.heads = 0

    def stats(self) -> dict:
        return {"port": self.port, "connections": self.connections, "hangups": self.hangups,
                "heads": self.heads, "hangup_pending": self.hangup}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.hangup > 0:
            self.hangup -= 1
            self.hangups += 1
            if self.after_head:
                try:
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    self.heads += 1
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
                    pass
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


LANES: dict[str, Lane] = {}
GATES: dict[str, Gate] = {}
INFO: dict[str, Any] = {}


def _lane(name: str) -> Lane:
    lane = LANES.get(name)
    if lane is None:
        lane = LANES[name] = Lane()
    return lane


def _json(data: object, status: int = 200, close: bool = False) -> web.Response:
    resp = web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")
    if close:
        resp.force_close()
    return resp


def _hash_fails(value: object, ratio: float) -> bool:
    digest = hashlib.sha256(str(value).encode()).digest()
    return int.from_bytes(digest[:8], "big") < ratio * 2 ** 64


async def tool(request: web.Request) -> web.Response:
    lane = _lane(request.match_info["lane"])
    lane.calls += 1  # before any await: a call counts as received even if the client gives up
    n = lane.calls
    s = lane.settings
    mode = s["mode"]
    body = await request.read()
    fail = False
    message_args: dict[str, Any] = {}
    if mode == "fail":
        fail = True
    elif mode == "ratio":
        fail = int(n * s["ratio"]) > int((n - 1) * s["ratio"])
    elif mode == "invalid":
        fail = bool(s["match"]) and s["match"].encode() in body
    elif mode == "hash":
        try:
            value = json.loads(body).get(s["field"])
        except (ValueError, AttributeError):
            value = None
        message_args = {"field": s["field"], "value": value}
        fail = value is None or _hash_fails(value, s["ratio"])
    elif mode == "slow":
        await asyncio.sleep(s["delay_s"])
    status = s["status"] or DEFAULT_STATUS[mode]
    if fail:
        lane.failed += 1
        lane.statuses[str(status)] = lane.statuses.get(str(status), 0) + 1
        message = (s["message"] or DEFAULT_MESSAGE[mode]).format(**message_args)
        return _json({"error": {"code": "tool_error", "message": message}}, status, s["close"])
    status = s["status"] if mode in ("healthy", "slow") and s["status"] else 200
    lane.ok += 1
    lane.statuses[str(status)] = lane.statuses.get(str(status), 0) + 1
    return _json({
        "ok": True, "lane": request.match_info["lane"], "n": n, "method": request.method,
        "path": request.path_qs, "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body.decode("utf-8", "replace"),
    }, status, s["close"])


async def set_mode(request: web.Request) -> web.Response:
    lane = _lane(request.match_info["lane"])
    raw = await request.json() if request.body_exists else {}
    unknown = set(raw) - set(DEFAULTS)
    if unknown or raw.get("mode", "healthy") not in DEFAULT_STATUS:
        return _json({"error": f"unknown settings {sorted(unknown)} or mode {raw.get('mode')!r}"}, 400)
    lane.settings = {**DEFAULTS, **raw}
    return _json({"lane": request.match_info["lane"], "settings": lane.settings})


async def lane_stats(request: web.Request) -> web.Response:
    return _json(_lane(request.match_info["lane"]).stats())


async def all_stats(request: web.Request) -> web.Response:
    return _json({"lanes": {k: v.stats() for k, v in LANES.items()},
                  "gates": {k: g.stats() for k, g in GATES.items()}})


async def reset(request: web.Request) -> web.Response:
    for lane in LANES.values():
        lane.settings = dict(DEFAULTS)
        lane.reset_counts()
    for g in GATES.values():
        g.hangup = g.connections = g.hangups = g.heads = 0
    return _json({"reset": True})


async def set_gate(request: web.Request) -> web.Response:
    g = GATES.get(request.match_info["name"])
    if g is None:
        return _json({"error": f"no gate {request.match_info['name']!r}"}, 404)
    raw = await request.json() if request.body_exists else {}
    g.hangup = int(raw.get("hangup", 0))
    g.after_head = bool(raw.get("after_head", False))
    return _json(g.stats())


async def info(request: web.Request) -> web.Response:
    return _json({**INFO, "gates": {k: g.port for k, g in GATES.items()}})


def make_app() -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/_flaky/info", info)
    app.router.add_get("/_flaky/stats", all_stats)
    app.router.add_get("/_flaky/stats/{lane}", lane_stats)
    app.router.add_post("/_flaky/mode/{lane}", set_mode)
    app.router.add_post("/_flaky/reset", reset)
    app.router.add_post("/_flaky/gate/{name}", set_gate)
    app.router.add_route("*", "/t/{lane}", tool)
    app.router.add_route("*", "/t/{lane}/{tail:.*}", tool)
    return app


async def serve(port: int, tls: tuple[str, str] | None) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    INFO["port"] = port
    backends = {"plain": port}
    if tls is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*tls)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx, backlog=1024)
        await site.start()
        backends["tls"] = INFO["tls_port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    for name, backend in backends.items():
        gate = GATES[name] = Gate(name, backend)
        server = await asyncio.start_server(gate.handle, "127.0.0.1", 0, backlog=1024)
        gate.port = server.sockets[0].getsockname()[1]
    await asyncio.Event().wait()


# --- the test side -----------------------------------------------------------


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA): (cert.pem, key.pem).
    A client trusts it with ``SSL_CERT_FILE=cert.pem`` in its environment."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "flaky-cert.pem", directory / "flaky-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class FlakyUpstream:
    """The flaky upstream as a real process on a free port, and a small sync client for it."""

    def __init__(self, tls_dir: Path | None = None) -> None:
        from tests.support.procs import ROOT, Process, free_port

        self.port = free_port()
        cmd = [sys.executable, str(ROOT / "tests/support/flaky_upstream.py"), str(self.port)]
        self.cert: Path | None = None
        if tls_dir is not None:
            self.cert, key = make_cert(tls_dir)
            cmd += ["--tls", str(self.cert), str(key)]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Process(cmd, f"{self.url}/_flaky/info")
        self.info = self._call("GET", "/_flaky/info")

    def lane_url(self, lane: str, gate: str | None = None) -> str:
        """The upstream URL of a tool answered by ``lane`` (through a gate: its scheme and port)."""
        if gate is None:
            return f"{self.url}/t/{lane}"
        scheme = "https" if gate == "tls" else "http"
        return f"{scheme}://127.0.0.1:{self.info['gates'][gate]}/t/{lane}"

    def mode(self, lane: str, mode: str = "healthy", **settings: Any) -> dict:
        return self._call("POST", f"/_flaky/mode/{lane}", {"mode": mode, **settings})

    def stats(self, lane: str) -> dict:
        return self._call("GET", f"/_flaky/stats/{lane}")

    def calls(self, lane: str) -> int:
        return self.stats(lane)["calls"]

    def gate(self, name: str, hangup: int = 0, after_head: bool = False) -> dict:
        return self._call("POST", f"/_flaky/gate/{name}", {"hangup": hangup, "after_head": after_head})

    def gate_stats(self, name: str) -> dict:
        return self._call("GET", "/_flaky/stats")["gates"][name]

    def reset(self) -> None:
        self._call("POST", "/_flaky/reset")

    def stop(self) -> None:
        self.proc.stop()

    def _call(self, method: str, path: str, body: object = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(serve(args.port, tuple(args.tls) if args.tls else None))


if __name__ == "__main__":
    main()
