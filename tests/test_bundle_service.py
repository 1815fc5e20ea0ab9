"""The bundle service (proxy/bundles/service.py) against a real HTTP bundle server.

The bundle server is aiohttp, in a thread of its own, serving tarballs made by
the real ``opa build`` with an ETag and answering ``304`` to ``If-None-Match``,
as a platform team's bundle server (or nginx in front of a directory) does. It
can be switched to another bundle, made to fail, or taken down. Regate runs as
a real process (``regate serve``) against it.

Revision 1 and revision 2 of the shipped bundle differ in one place: in
revision 2 the `search` tool is no longer public, so analyst-2 (who has no
grant for it) is allowed under rev-1 and refused under rev-2. Every response
names the revision that judged it (``X-Regate-Policy-Revision``), so each can be
checked against that revision's answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.bundles import next_delay
from tests.conftest import OTHER_KEY
from tests.support.opa_server import ROOT, build_bundle, free_port
from tests.support.procs import ADMIN_HEADERS, RegateProcess

POLL_MIN_S, POLL_MAX_S = 0.3, 1.0


# --- the backoff, as a table ---------------------------------------------------------

@pytest.mark.parametrize("ok, errors, rand, expected", [
    # After a success: uniform between poll_min_s (rand 0) and poll_max_s (rand -> 1).
    (True, 0, 0.0, 60.0), (True, 0, 0.5, 90.0), (True, 3, 0.999, 119.94),
    # After the n-th failure in a row: 0.1 s x 1.6^n, at most poll_max_s, then +-20 % (rand 0.5: none).
    (False, 1, 0.5, 0.16), (False, 2, 0.5, 0.256), (False, 5, 0.5, 1.048576), (False, 15, 0.5, 115.29215),
    (False, 16, 0.5, 120.0), (False, 40, 0.5, 120.0),
    (False, 1, 0.0, 0.128), (False, 1, 1.0, 0.192), (False, 40, 0.0, 96.0), (False, 40, 1.0, 144.0),
    (False, 0, 0.5, 0.0),
])
def test_next_delay_is_opas_polling_and_backoff(ok, errors, rand, expected):
    assert next_delay(ok, errors, 60.0, 120.0, rand) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("policy, problem", [
    ({"bundle": {}}, "policy.bundle: set either path (a bundle file) or service (a bundle server)"),
    ({"bundle": {"path": "b.tar.gz", "service": {"url": "http://x/b.tar.gz"}}}, "set either path"),
    ({"bundle": {"service": {"url": "ftp://x/b"}}}, "policy.bundle.service.url: not an http(s) URL"),
    ({"bundle": {"service": {"url": "http://x/b", "poll_min_s": 10, "poll_max_s": 5}}},
     "poll_min_s (10.0) is above poll_max_s (5.0)"),
    ({"bundle": {"path": "b.tar.gz", "signing_key": {"public_key": "k.pub", "algorithm": "none"}}},
     "policy.bundle.signing_key.algorithm"),
    ({"engine": "opa", "bundle": {"path": "b.tar.gz"}}, "the opa engine does not load bundles"),
])
def test_bundle_config_errors_name_the_key(policy, problem):
    from proxy.config import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate({"tools": [{"name": "t", "upstream": "http://127.0.0.1:9"}], "policy": policy})
    assert any(problem in line for line in err.value.problems), err.value.problems


# --- a real bundle server -------------------------------------------------------------

class BundleServer:
    """GET /bundles/regate.tar.gz: the current tarball, its ETag, 304 on If-None-Match."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/bundles/regate.tar.gz"
        self.tarball: bytes | None = None
        self.etag: str | None = None
        self.fail_with: int | None = None
        self.seen: list[tuple[str | None, int]] = []  # (If-None-Match, status) of every request
        self.authorization: set[str | None] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None

    def serve(self, path: Path) -> None:
        self.tarball = path.read_bytes()
        self.etag = '"' + hashlib.sha256(self.tarball).hexdigest()[:16] + '"'

    async def _handle(self, request: web.Request) -> web.Response:
        match = request.headers.get("If-None-Match")
        self.authorization.add(request.headers.get("Authorization"))
        if self.fail_with is not None:
            status = self.fail_with
            resp = web.Response(status=status, text="bundle store unavailable")
        elif self.tarball is None:
            status, resp = 404, web.Response(status=404)
        elif match == self.etag:
            status, resp = 304, web.Response(status=304, headers={"ETag": self.etag})
        else:
            status = 200
            resp = web.Response(body=self.tarball, content_type="application/gzip", headers={"ETag": self.etag})
        self.seen.append((match, status))
        return resp

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def up(self) -> "BundleServer":
        async def start() -> None:
            app = web.Application()
            app.router.add_get("/bundles/regate.tar.gz", self._handle)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self._call(start())
        return self

    def down(self) -> None:
        if self.runner is not None:
            self._call(self.runner.cleanup())
            self.runner = None

    def close(self) -> None:
        self.down()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def revisions(tmp_path_factory) -> dict[str, Path]:
    """rev-1: the shipped bundle; rev-2: the same with `search` no longer public."""
    tmp = tmp_path_factory.mktemp("revisions")
    data = tmp / "policies"
    shutil.copytree(ROOT / "policies", data)
    tools = yaml.safe_load((data / "tools" / "data.yaml").read_text())
    tools["search"]["public"] = False
    (data / "tools" / "data.yaml").write_text(yaml.safe_dump(tools))
    return {"rev-1": build_bundle(["rego", "policies"], tmp / "rev-1.tar.gz", "rev-1"),
            "rev-2": build_bundle(["rego", str(data)], tmp / "rev-2.tar.gz", "rev-2")}


@pytest.fixture
def server():
    srv = BundleServer()
    yield srv
    srv.close()


def regate_config(upstream: str, keys_file: Path, server: BundleServer, persist: Path, **service) -> dict:
    return {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"bundle": {"service": {"url": server.url, "poll_min_s": POLL_MIN_S, "poll_max_s": POLL_MAX_S,
                                          "headers": {"Authorization": "Bearer bundle-token"},
                                          "persist_dir": str(persist), **service}}},
        # Rates are not what this tests; a load of calls must not meet them.
        "limits": {"enabled": False},
        "tools": [{"name": n, "upstream": upstream, "timeout_ms": 5000} for n in ("search", "shell")],
    }


async def admin(proc: RegateProcess, path: str) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(proc.admin_url + path, headers=ADMIN_HEADERS) as r:
            return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def search_call(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None, dict]:
    async with session.get(url + "/tools/search/q?x=1", headers={"X-Api-Key": OTHER_KEY}) as r:
        body = await r.json(content_type=None)
        return r.status, r.headers.get("X-Regate-Policy-Revision"), body


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def judged_by_its_revision(status: int, revision: str | None) -> bool:
    """rev-1 allows analyst-2's search call, rev-2 refuses it: the answer must fit the revision named."""
    return (revision, status) in {("rev-1", 200), ("rev-2", 403)}


async def test_a_new_revision_is_picked_up_under_load_and_a_down_server_leaves_the_last_good(
        revisions, server, upstream, keys_file, tmp_path):
    server.serve(revisions["rev-1"])
    server.up()
    cfg = regate_config(upstream, keys_file, server, tmp_path / "persist")
    (tmp_path / "a").mkdir()
    proc = RegateProcess(cfg, tmp_path / "a")
    try:
        await wait_for(lambda: _ready(proc), 10, "Regate ready with rev-1")
        seen: list[tuple[float, int, str | None]] = []
        stop = asyncio.Event()

        async def load() -> None:
            async with aiohttp.ClientSession() as s:
                while not stop.is_set():
                    status, revision, _ = await search_call(s, proc.url)
                    seen.append((time.monotonic(), status, revision))

        workers = [asyncio.create_task(load()) for _ in range(8)]
        await asyncio.sleep(1.5)  # under load on rev-1, polling (304s) all the while
        switched = time.monotonic()
        server.serve(revisions["rev-2"])
        await wait_for(lambda: _seen_revision(seen, "rev-2"), POLL_MAX_S + 3, "a call judged by rev-2")
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)

        assert len(seen) > 200, len(seen)
        assert all(status < 500 for _, status, _ in seen)
        odd = [(s, r) for _, s, r in seen if not judged_by_its_revision(s, r)]
        assert not odd, odd[:5]  # no call judged by neither revision (nor by one and answered by the other)
        first_new = min(t for t, _, r in seen if r == "rev-2")
        assert first_new - switched <= POLL_MAX_S + 0.5, first_new - switched
        assert all(r == "rev-2" for t, _, r in seen if t > first_new + 0.25)  # one swap, then only rev-2
        # As OPA polls: the bundle in force is asked for with its ETag, and a 304 changes nothing.
        etag1 = '"' + hashlib.sha256(revisions["rev-1"].read_bytes()).hexdigest()[:16] + '"'
        assert (etag1, 304) in server.seen and (etag1, 200) in server.seen

        # The server goes down: rev-2 keeps serving; ready, with a warning saying why.
        server.down()
        status, body = await wait_for(lambda: _bundle_error(proc), POLL_MAX_S + 3, "a failed poll")
        assert status == 200 and body["ready"] is True
        assert any(w.startswith("bundle: GET " + server.url) and "serving revision rev-2" in w
                   for w in body["warnings"]), body["warnings"]
        assert body["bundle"]["revision"] == "rev-2" and body["bundle"]["last_error"].startswith("GET ")
        async with aiohttp.ClientSession() as s:
            assert (await search_call(s, proc.url))[:2] == (403, "rev-2")
        _, metrics = await admin(proc, "/metrics")
        assert 'regate_bundle_polls_total{outcome="error"}' in metrics
        assert 'regate_bundle_polls_total{outcome="activated"} 2.0' in metrics
        assert 'regate_bundle_active 1.0' in metrics
        assert 'regate_bundle_info{revision="rev-2",source="server"' in metrics
        assert 'regate_policy_revision_info{revision="rev-2"} 1.0' in metrics
    finally:
        proc.stop()

    # A restart while the server is still down serves the last good bundle at once, from disk.
    (tmp_path / "b").mkdir()
    again = RegateProcess(cfg, tmp_path / "b")
    try:
        status, body = await admin(again, "/readyz")
        assert status == 200, body
        assert body["bundle"]["revision"] == "rev-2" and body["bundle"]["from"] == "disk"
        async with aiohttp.ClientSession() as s:
            assert (await search_call(s, again.url))[:2] == (403, "rev-2")
        _, st = await admin(again, "/admin/status")
        assert st["bundle"]["active"] is True and st["policy"]["revision"] == "rev-2"
    finally:
        again.stop()


async def _ready(proc: RegateProcess):
    status, body = await admin(proc, "/readyz")
    return status == 200


async def _seen_revision(seen, revision: str):
    return any(r == revision for _, _, r in seen)


async def _bundle_error(proc: RegateProcess):
    status, body = await admin(proc, "/readyz")
    return (status, body) if body["bundle"].get("consecutive_errors") else None


async def test_a_regate_that_never_had_a_bundle_refuses_calls_and_is_not_ready(
        revisions, server, upstream, keys_file, tmp_path):
    # The server is not listening yet, and what is kept on disk is no bundle (a torn copy).
    (tmp_path / "persist").mkdir()
    (tmp_path / "persist" / "bundle.tar.gz").write_bytes(b"\x1f\x8b torn")
    cfg = regate_config(upstream, keys_file, server, tmp_path / "persist")
    proc = RegateProcess(cfg, tmp_path)
    try:
        status, body = await wait_for(lambda: _bundle_error(proc), 5, "a failed first poll")
        assert status == 503 and body["ready"] is False, body
        assert body["problems"][0].startswith(f"bundle: no policy bundle yet: the bundle service {server.url} "
                                              "has not delivered one (last error: GET ")
        async with aiohttp.ClientSession() as s:
            status, revision, answer = await search_call(s, proc.url)
        assert status == 403 and answer["error"]["code"] == "policy_error", answer  # why: in /readyz
        _, metrics = await admin(proc, "/metrics")
        assert "regate_bundle_active 0.0" in metrics

        server.serve(revisions["rev-1"])
        server.up()
        await wait_for(lambda: _ready(proc), POLL_MAX_S + 3, "ready once the server answers")
        async with aiohttp.ClientSession() as s:
            assert (await search_call(s, proc.url))[:2] == (200, "rev-1")
        assert server.authorization == {"Bearer bundle-token"}  # policy.bundle.service.headers
    finally:
        proc.stop()
    assert (tmp_path / "persist" / "bundle.tar.gz").read_bytes() == revisions["rev-1"].read_bytes()


async def test_a_bundle_that_does_not_verify_is_refused_and_reload_polls_at_once(
        revisions, server, upstream, keys_file, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "bundle.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "bundle.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    signed1 = build_bundle(["rego", "policies"], tmp_path / "s1.tar.gz", "rev-1",
                           signing_key=tmp_path / "bundle.pem", signing_alg="ES256")
    unsigned2 = revisions["rev-2"]  # a bundle without .signatures.json: refused
    signed2 = build_bundle(["rego", "policies"], tmp_path / "s2.tar.gz", "rev-2-signed",
                           signing_key=tmp_path / "bundle.pem", signing_alg="ES256")
    server.serve(signed1)
    server.up()
    # Polls far apart: only a reload can pick a new bundle up within the test.
    cfg = regate_config(upstream, keys_file, server, tmp_path / "persist", poll_min_s=60, poll_max_s=120,
                        signing_key={"public_key": str(tmp_path / "bundle.pub"), "algorithm": "ES256"})
    proc = RegateProcess(cfg, tmp_path)
    try:
        await wait_for(lambda: _ready(proc), 10, "ready with the signed rev-1")
        server.serve(unsigned2)
        async with aiohttp.ClientSession() as s:
            async with s.post(proc.admin_url + "/admin/reload", headers=ADMIN_HEADERS) as r:
                report = await r.json()
                assert r.status == 422, report
        assert "the bundle has no .signatures.json" in report["error"]["message"]
        _, st = await admin(proc, "/admin/status")
        assert st["bundle"]["revision"] == "rev-1" and "refused" in st["bundle"]["last_error"]
        async with aiohttp.ClientSession() as s:
            assert (await search_call(s, proc.url))[:2] == (200, "rev-1")

        server.serve(signed2)
        async with aiohttp.ClientSession() as s:
            async with s.post(proc.admin_url + "/admin/reload", headers=ADMIN_HEADERS) as r:
                report = await r.json()
                assert r.status == 200 and report["revision"] == "rev-2-signed", report
            assert (await search_call(s, proc.url))[:2] == (200, "rev-2-signed")
    finally:
        proc.stop()
