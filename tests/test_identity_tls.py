"""TLS end to end, with certificates made by the test and real handshakes.

Both listeners speak TLS (1.2 at least); their certificate is re-read on SIGHUP
and POST /admin/reload, and under load no call fails while new connections see
the new certificate. mTLS on the data listener: a SPIFFE client certificate
becomes its agent id; one from another trust domain is 401, an expired one or one
from another CA is refused in the handshake. An upstream that requires a client
certificate is reached with the tool's certificate and refused without it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import signal
import ssl
import time
import urllib.request

import aiohttp
import pytest

from tests.conftest import AGENT_KEY
from tests.security.conftest import Witness
from tests.support.identity import CA, TlsUpstream, claims_policy, peer_cn
from tests.support import procs
from tests.support.procs import ADMIN_HEADERS, RegateProcess

TD = "regate.test"
CODER = f"spiffe://{TD}/ns/agents/sa/coder"


def client_ctx(ca: CA, cert=None, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = max_version
    return ctx


async def peer_of(port: int, ctx: ssl.SSLContext) -> str:
    """The CN of the certificate a new connection to `port` is shown."""
    _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    w.close()
    return peer_cn(der)


async def get(url: str, ctx: ssl.SSLContext, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.get(url, headers=headers or {}) as r:
            return r.status, await r.json()


@pytest.fixture(scope="module")
def witness():
    w = Witness()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    server_ca, agents_ca, rogue_ca = CA(d, "Server CA"), CA(d, "Agents CA"), CA(d, "Rogue CA")
    out = {"dir": d, "server_ca": server_ca, "agents_ca": agents_ca, "rogue_ca": rogue_ca,
           "server": server_ca.issue("server", cn="regate-1", dns=("localhost",), ips=("127.0.0.1",), server=True),
           "coder": agents_ca.issue("coder", cn="coder", uris=(CODER,), client=True),
           "other_sa": agents_ca.issue("other", cn="other", uris=(f"spiffe://{TD}/ns/agents/sa/reviewer",),
                                       client=True),
           "wrong_domain": agents_ca.issue("evil", cn="evil", uris=("spiffe://evil.test/ns/agents/sa/coder",),
                                           client=True),
           "expired": agents_ca.issue("expired", cn="old", uris=(CODER,), client=True,
                                      not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3),
                                      not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)),
           "rogue": rogue_ca.issue("rogue", cn="coder", uris=(CODER,), client=True),
           "by_cn": agents_ca.issue("legacy", cn="legacy-bot", client=True)}
    return out


# ------------------------------------------------------------------ TLS on both listeners, rotation


@pytest.fixture()
def tls_regate(pki, witness, keys_file, tmp_path, monkeypatch):
    live_crt, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pki["server"][0], live_crt)
    shutil.copy(pki["server"][1], live_key)
    tls = {"cert": str(live_crt), "key": str(live_key)}
    cfg = {"tls": tls, "admin": {"tls": tls}, "auth": {"mode": "api_key", "keys": str(keys_file)},
           "policy": claims_policy(tmp_path), "limits": {"enabled": False},
           "tools": [{"name": "search", "upstream": witness.upstream("search")}]}
    # The process fixture probes http://.../healthz: probe the https admin port instead.
    ctx = client_ctx(pki["server_ca"])

    def wait_https(url, proc=None, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"regate exited: {proc.stdout.read().decode()}")
            try:
                with urllib.request.urlopen(url.replace("http://", "https://"), timeout=1, context=ctx):
                    return
            except Exception:
                time.sleep(0.05)
        raise TimeoutError(url)

    monkeypatch.setattr(procs, "wait_http", wait_https)
    proc = RegateProcess(cfg, tmp_path)
    proc.https = f"https://127.0.0.1:{proc.port}"
    proc.admin_https = f"https://127.0.0.1:{proc.admin_port}"
    proc.live = (live_crt, live_key)
    yield proc
    proc.stop()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_both_listeners_speak_tls_1_2_and_up_only(tls_regate, pki):
    ctx = client_ctx(pki["server_ca"])
    status, _ = await get(tls_regate.https + "/tools/search/q", ctx, {"X-Api-Key": AGENT_KEY})
    assert status == 200
    status, body = await get(tls_regate.admin_https + "/readyz", ctx)
    assert status == 200 and body["ready"]
    for port in (tls_regate.port, tls_regate.admin_port):
        _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        assert w.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        w.close()
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki["server_ca"], max_version=ssl.TLSVersion.TLSv1_1),
                                          server_hostname="localhost")
    # Plain HTTP on the TLS port: no HTTP answer at all, and no call.
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as s:
            async with s.get(tls_regate.url + "/tools/search/q", headers={"X-Api-Key": AGENT_KEY}) as r:
                await r.read()


async def test_certificate_rotation_on_sighup_under_load_fails_no_call(tls_regate, pki):
    ctx = client_ctx(pki["server_ca"])
    assert await peer_of(tls_regate.port, ctx) == "regate-1"
    results: list[int] = []
    stop = asyncio.Event()

    async def keepalive_worker():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=2)) as s:
            while not stop.is_set():
                async with s.get(tls_regate.https + "/tools/search/q", headers={"X-Api-Key": AGENT_KEY}) as r:
                    await r.read()
                    results.append(r.status)

    async def fresh_connection_worker():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as s:
            while not stop.is_set():
                async with s.get(tls_regate.https + "/tools/search/q", headers={"X-Api-Key": AGENT_KEY}) as r:
                    await r.read()
                    results.append(r.status)

    workers = [asyncio.ensure_future(keepalive_worker()) for _ in range(3)]
    workers += [asyncio.ensure_future(fresh_connection_worker()) for _ in range(2)]
    await asyncio.sleep(0.5)
    # The operator drops a new certificate in place (and it is valid: same CA, new name).
    new_crt, new_key = pki["server_ca"].issue("rotated", cn="regate-2", dns=("localhost",), ips=("127.0.0.1",),
                                              server=True)
    shutil.copy(new_crt, tls_regate.live[0])
    shutil.copy(new_key, tls_regate.live[1])
    tls_regate.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while await peer_of(tls_regate.port, ctx) != "regate-2" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await peer_of(tls_regate.port, ctx) == "regate-2"
    assert await peer_of(tls_regate.admin_port, ctx) == "regate-2"
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    assert len(results) > 20 and set(results) == {200}, [r for r in results if r != 200][:5]


async def test_a_broken_certificate_on_reload_keeps_the_old_one(tls_regate, pki):
    ctx = client_ctx(pki["server_ca"])
    tls_regate.live[1].write_text("not a key\n")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.post(tls_regate.admin_https + "/admin/reload", headers=ADMIN_HEADERS) as r:
            body = await r.json()
            assert r.status == 422 and not body["credentials"]["reloaded"], body
            assert "tls.cert/key" in body["error"]["message"]
    assert await peer_of(tls_regate.port, ctx) == "regate-1"
    shutil.copy(pki["server"][1], tls_regate.live[1])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.post(tls_regate.admin_https + "/admin/reload", headers=ADMIN_HEADERS) as r:
            body = await r.json()
            assert r.status == 200 and body["credentials"]["what"][-2:] == [
                f"tls: {tls_regate.live[0]}", f"admin.tls: {tls_regate.live[0]}"], body
            assert body["credentials"]["what"][0].endswith("keys.yaml")  # keys.yaml is reloaded too


# ------------------------------------------------------------------ mTLS and SPIFFE


@pytest.fixture(scope="module")
def mtls_regate(pki, witness, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mtls")
    cfg = {"tls": {"cert": str(pki["server"][0]), "key": str(pki["server"][1]),
                   "client_ca": str(pki["agents_ca"].path)},
           "auth": {"mode": "mtls", "mtls": {"trust_domains": [TD], "unmapped": "path",
                                             "agents": {CODER: "coder-7", "CN=legacy-bot": "legacy-bot"}}},
           "policy": claims_policy(tmp), "limits": {"enabled": False},
           "tools": [{"name": "search", "upstream": witness.upstream("search")}]}
    proc = RegateProcess(cfg, tmp)
    proc.https = f"https://127.0.0.1:{proc.port}"
    yield proc
    proc.stop()


async def seen_by_tool(proc, witness, ctx) -> dict:
    before = witness.count()
    status, body = await get(proc.https + "/tools/search/q", ctx)
    assert status == 200, body
    [rec] = witness.records(before)
    return {k.lower(): v for k, v in rec["headers"]}


async def test_a_spiffe_certificate_is_its_agent_id(mtls_regate, pki, witness):
    got = await seen_by_tool(mtls_regate, witness, client_ctx(pki["server_ca"], pki["coder"]))
    assert got["x-seen-agent"] == "coder-7" and got["x-seen-spiffe"] == CODER
    # Unmapped but from the trust domain: its path (unmapped: path).
    got = await seen_by_tool(mtls_regate, witness, client_ctx(pki["server_ca"], pki["other_sa"]))
    assert got["x-seen-agent"] == "ns/agents/sa/reviewer"
    # No SPIFFE ID: the subject CN, when mapped.
    got = await seen_by_tool(mtls_regate, witness, client_ctx(pki["server_ca"], pki["by_cn"]))
    assert got["x-seen-agent"] == "legacy-bot"


async def test_another_trust_domain_is_401(mtls_regate, pki, witness):
    before = witness.count()
    status, body = await get(mtls_regate.https + "/tools/search/q", client_ctx(pki["server_ca"], pki["wrong_domain"]))
    assert status == 401 and body["error"]["code"] == "spiffe_trust_domain"
    assert "evil.test" in body["error"]["message"] and TD in body["error"]["message"]
    assert witness.count() == before


@pytest.mark.parametrize("which", ["expired", "rogue", None])
async def test_expired_other_ca_or_no_certificate_fail_the_handshake(mtls_regate, pki, witness, which):
    before = witness.count()
    ctx = client_ctx(pki["server_ca"], pki[which] if which else None)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionResetError)):
        await get(mtls_regate.https + "/tools/search/q", ctx)
    assert witness.count() == before


# ------------------------------------------------------------------ TLS to upstreams


async def test_an_upstream_that_requires_a_client_certificate(pki, witness, keys_file, tmp_path):
    up_ca, client_ca = pki["server_ca"], pki["agents_ca"]
    # The upstream's certificate names upstream.internal only; the URL says 127.0.0.1.
    up_crt, up_key = up_ca.issue("upstream", cn="upstream", dns=("upstream.internal",), server=True)
    upstream = TlsUpstream(up_crt, up_key, client_ca.path)
    mine = client_ca.issue("regate-client", cn="regate-sidecar", client=True)
    tools = [
        {"name": "mtls", "upstream": upstream.url,
         "tls": {"ca": str(up_ca.path), "cert": str(mine[0]), "key": str(mine[1]), "server_name": "upstream.internal"}},
        {"name": "nocert", "upstream": upstream.url, "tls": {"ca": str(up_ca.path), "server_name": "upstream.internal"}},
        {"name": "wrongname", "upstream": upstream.url,
         "tls": {"ca": str(up_ca.path), "cert": str(mine[0]), "key": str(mine[1])}},
    ]
    cfg = {"auth": {"mode": "api_key", "keys": str(keys_file)}, "policy": claims_policy(tmp_path),
           "limits": {"enabled": False}, "tools": tools}
    proc = RegateProcess(cfg, tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proc.url + "/tools/mtls/x", headers={"X-Api-Key": AGENT_KEY}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json()) == {"client_cn": "regate-sidecar"}
            calls = upstream.calls
            for tool in ("nocert", "wrongname"):
                async with s.get(proc.url + f"/tools/{tool}/x", headers={"X-Api-Key": AGENT_KEY}) as r:
                    body = await r.json()
                    assert r.status == 502 and body["error"]["code"] in ("upstream_unreachable", "upstream_error"), body
            assert upstream.calls == calls
    finally:
        proc.stop()
        upstream.stop()


def test_upstream_tls_config_is_checked():
    from proxy.config import ConfigError, validate

    with pytest.raises(ConfigError, match="tls applies to https"):
        validate({"tools": [{"name": "t", "upstream": "http://x:1", "tls": {"ca": "ca.pem"}}]})
    with pytest.raises(ConfigError, match="cert and key go together"):
        validate({"tools": [{"name": "t", "upstream": "https://x:1", "tls": {"cert": "c.pem"}}]})
    cfg = validate({"tools": [{"name": "t", "upstream": "https://x:1", "tls": {"ca": "ca.pem"}}]}, "/etc/regate")
    assert cfg.tools[0].tls.ca == "/etc/regate/ca.pem"
    json.dumps(cfg.model_dump())  # still plain data


async def test_the_client_ca_rotates_on_reload_and_the_old_ca_is_dropped(pki, witness, tmp_path):
    live_ca = tmp_path / "client-ca.crt"
    shutil.copy(pki["agents_ca"].path, live_ca)
    cfg = {"tls": {"cert": str(pki["server"][0]), "key": str(pki["server"][1]), "client_ca": str(live_ca)},
           "auth": {"mode": "mtls", "mtls": {"trust_domains": [TD], "agents": {CODER: "coder-7"}}},
           "policy": claims_policy(tmp_path), "limits": {"enabled": False},
           "tools": [{"name": "search", "upstream": witness.upstream("search")}]}
    proc = RegateProcess(cfg, tmp_path)
    proc.https = f"https://127.0.0.1:{proc.port}"
    try:
        new_ca = CA(tmp_path, "Agents CA 2")
        new_coder = new_ca.issue("coder2", cn="coder", uris=(CODER,), client=True)
        old_ctx, new_ctx = client_ctx(pki["server_ca"], pki["coder"]), client_ctx(pki["server_ca"], new_coder)
        assert (await get(proc.https + "/tools/search/q", old_ctx))[0] == 200
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionResetError)):
            await get(proc.https + "/tools/search/q", new_ctx)
        shutil.copy(new_ca.path, live_ca)
        async with aiohttp.ClientSession() as s:
            async with s.post(proc.admin_url + "/admin/reload", headers=ADMIN_HEADERS) as r:
                assert r.status == 200, await r.text()
        assert (await get(proc.https + "/tools/search/q", new_ctx))[0] == 200
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionResetError)):
            await get(proc.https + "/tools/search/q", old_ctx)
    finally:
        proc.stop()
