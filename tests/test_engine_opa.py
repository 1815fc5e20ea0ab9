"""The `opa` engine end to end: real HTTP to an OPA-REST server whose
evaluation is the real OPA engine (tests/support/opa_rest_server.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.engines.decision import DecisionError, EngineError
from proxy.engines.embedded import EmbeddedEngine
from proxy.engines.opa import OpaEngine
from tests.support.opa_rest_server import OpaRestServer

ROOT = Path(__file__).resolve().parents[1]
REGO, DATA = ROOT / "rego", ROOT / "policies"


def call(agent, tool, method, path, body=None):
    return {
        "version": 1,
        "agent": {"id": agent, "claims": {}},
        "tool": {"name": tool, "route": f"/tools/{tool}", "gpu": None},
        "request": {"method": method, "path": path, "query": {}, "headers": {}, "body": body,
                    "body_sha256": "", "size": 0},
        "mcp": None,
        "state": {},
        "time_ns": 1,
    }


ALLOWED = call("coder-7", "search", "GET", "/tools/search/q")
DENIED = call("coder-7", "shell", "POST", "/tools/shell/run", {"command": "rm -rf /"})


@pytest.fixture
async def server():
    srv = OpaRestServer(REGO, DATA)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def engine(server):
    eng = OpaEngine(server.url, "regate/decision", timeout_ms=200, rego_dir=REGO, data_dir=DATA)
    await eng.start()
    yield eng
    await eng.close()


async def test_allow(engine):
    d = await engine.evaluate(ALLOWED)
    assert d.allow is True
    assert d.headers_set == {"X-Regate-Agent": "coder-7"}


async def test_deny_with_reasons_same_as_embedded(engine):
    d = await engine.evaluate(DENIED)
    assert d.allow is False
    assert any("recursive deletion" in r for r in d.reasons)
    embedded = EmbeddedEngine(REGO, DATA)
    await embedded.start()
    assert (await embedded.evaluate(DENIED)).to_dict() == d.to_dict()
    # The same bundle has the same revision whichever engine evaluates it.
    assert engine.revision == embedded.revision
    assert engine.revision.startswith("sha256:")


async def test_one_long_lived_connection(engine, server):
    for _ in range(5):
        await engine.evaluate(ALLOWED)
    assert server.requests == 5
    assert len(server.peers) == 1


async def test_undefined_decision_is_a_decision_error(server):
    eng = OpaEngine(server.url, "regate/no_such_rule", timeout_ms=200)
    await eng.start()
    try:
        with pytest.raises(DecisionError, match="undefined"):
            await eng.evaluate(ALLOWED)
    finally:
        await eng.close()
    assert eng.revision == f"opa:{server.url}"


async def test_opa_answering_500_is_an_engine_error_without_retries(engine, server):
    server.status = 500
    with pytest.raises(EngineError, match="500"):
        await engine.evaluate(ALLOWED)
    assert server.requests == 1  # the client's own retries are off
    server.status = None
    assert (await engine.evaluate(ALLOWED)).allow


async def test_opa_not_listening_is_an_engine_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = OpaEngine(f"http://127.0.0.1:{port}", timeout_ms=200)
    await eng.start()
    try:
        start = time.monotonic()
        with pytest.raises(EngineError, match="cannot reach OPA"):
            await eng.evaluate(ALLOWED)
        assert time.monotonic() - start < 1.0
    finally:
        await eng.close()


async def test_opa_slower_than_the_timeout_is_an_engine_error_in_time(server):
    server.delay_ms = 400
    eng = OpaEngine(server.url, timeout_ms=50)
    await eng.start()
    try:
        start = time.monotonic()
        with pytest.raises(EngineError, match="within 50 ms"):
            await eng.evaluate(ALLOWED)
        elapsed = time.monotonic() - start
        assert elapsed < 0.5, elapsed
    finally:
        await eng.close()


async def test_bearer_token():
    srv = OpaRestServer(REGO, DATA, token="s3cret")
    await srv.start()
    good = OpaEngine(srv.url, timeout_ms=500, token="s3cret")
    bad = OpaEngine(srv.url, timeout_ms=500)
    await good.start()
    await bad.start()
    try:
        assert (await good.evaluate(ALLOWED)).allow
        with pytest.raises(EngineError, match="401"):
            await bad.evaluate(ALLOWED)
    finally:
        await good.close()
        await bad.close()
        await srv.stop()


async def test_server_runs_as_a_script(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/support/opa_rest_server.py"), "--port", str(port),
         "--rego", str(REGO), "--data", str(DATA)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"listening on http://127.0.0.1:{port}"
        eng = OpaEngine(f"http://127.0.0.1:{port}", timeout_ms=1000)
        await eng.start()
        try:
            assert not (await eng.evaluate(DENIED)).allow
        finally:
            await eng.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
