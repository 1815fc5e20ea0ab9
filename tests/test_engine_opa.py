"""The `opa` engine end to end, against the real OPA (`opa run --server`,
built by the Makefile): allow, deny, undefined, OPA's own 500, OPA down, OPA
slower than the deadline, a bearer token, and the bundle revision OPA reports."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.engines import EngineTimeout
from proxy.engines.bundle import BundleError, load_bundle
from proxy.engines.decision import DecisionError, EngineError
from proxy.engines.embedded import EmbeddedEngine
from proxy.engines.opa import OpaEngine
from tests.support.opa_server import OpaMissing, OpaServer, build_bundle, free_port, opa_binary, shipped_paths

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

# Policies that make the real OPA misbehave for real.
FAULTS = """package faults

# A built-in that fails inside a deny rule: OPA's default would make `deny`
# undefined, and so allow.
builtin_error := {"allow": true} if not refused

refused if regex.match(input.request.body.pattern, "x")

# About a million iterations that find nothing: seconds of real evaluation.
slow := {"allow": true} if not collision

collision if {
	n := 1000 + count(input.agent)
	some a in numbers.range(1, n)
	some b in numbers.range(1, n)
	a * b == -1
}
"""

# Put into a running OPA: a second value for data.regate.decision, so OPA
# answers 500 (eval_conflict_error) until the module is deleted again.
CONFLICT = """package regate

decision := {"allow": false} if input.version == 1
"""

# --authorization=basic: OPA asks data.system.authz.allow about every request.
AUTHZ = """package system.authz

default allow := false

allow if input.path == ["health"]

allow if input.identity == "s3cret"
"""


@pytest.fixture(scope="module", autouse=True)
def real_opa() -> str:
    try:
        return opa_binary()
    except OpaMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def revision() -> str:
    return load_bundle(REGO, DATA).revision


@pytest.fixture(scope="module")
def bundled(tmp_path_factory, revision):
    """The shipped bundle as `opa build` makes it (revision = the embedded engine's), served with -b."""
    tarball = build_bundle(shipped_paths(REGO, DATA), tmp_path_factory.mktemp("opa") / "shipped.tar.gz", revision)
    with OpaServer(tarball, bundle=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The shipped files loaded as plain files (no revision), plus the fault policies."""
    faults = tmp_path_factory.mktemp("faults") / "faults.rego"
    faults.write_text(FAULTS)
    with OpaServer(*shipped_paths(REGO, DATA), faults) as srv:
        yield srv


@pytest.fixture
async def engine(bundled):
    eng = OpaEngine(bundled.url, "regate/decision", timeout_ms=500, rego_dir=REGO, data_dir=DATA)
    await eng.start()
    yield eng
    await eng.close()


async def logged_since(srv: OpaServer, before: int, count: int) -> list[dict]:
    """The Data API requests OPA logged after the first `before`, once `count` of them are in:
    OPA logs a request just after answering it."""
    for _ in range(100):
        if len(srv.data_requests()) >= before + count:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # and anything (a retry) that would come after
    return srv.data_requests()[before:]


async def test_opa_mounts_the_shipped_data_as_regate_does(bundled):
    data = load_bundle(REGO, DATA).data
    async with aiohttp.ClientSession() as s:
        for key, value in data.items():
            async with s.get(f"{bundled.url}/v1/data/{key}") as r:
                assert (await r.json())["result"] == value, key


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


async def test_one_long_lived_connection(bundled):
    before = len(bundled.data_requests())
    eng = OpaEngine(bundled.url, timeout_ms=500)
    await eng.start()
    try:
        for _ in range(5):
            await eng.evaluate(ALLOWED)
    finally:
        await eng.close()
    mine = await logged_since(bundled, before, 6)
    # What OPA saw: the start's revision query and the five decisions, over one connection.
    assert [r["req_path"] for r in mine] == ["/v1/data/system/bundles"] + ["/v1/data/regate/decision"] * 5
    assert len({r["client_addr"] for r in mine}) == 1, mine


async def test_undefined_decision_is_a_decision_error(plain):
    eng = OpaEngine(plain.url, "regate/no_such_rule", timeout_ms=500)
    await eng.start()
    try:
        with pytest.raises(DecisionError, match="undefined"):
            await eng.evaluate(ALLOWED)
    finally:
        await eng.close()


async def test_opa_answering_500_is_an_engine_error_without_retries(plain):
    eng = OpaEngine(plain.url, timeout_ms=2000)
    await eng.start()
    try:
        assert (await eng.evaluate(ALLOWED)).allow
        plain.put_policy("conflict", CONFLICT)
        before = len(plain.data_requests())
        try:
            with pytest.raises(EngineError, match="answered 500"):
                await eng.evaluate(ALLOWED)
            # opa-python-client retries a 500 by default; the engine has switched that off.
            logged = await logged_since(plain, before, 1)
            assert [(r["req_path"], r["resp_status"]) for r in logged] == [("/v1/data/regate/decision", 500)]
        finally:
            plain.delete_policy("conflict")
        assert (await eng.evaluate(ALLOWED)).allow  # the same session, once OPA is well again
    finally:
        await eng.close()


async def test_a_failing_builtin_is_an_engine_error_not_an_allow(plain):
    bad_regex = call("coder-7", "search", "POST", "/tools/search/q", {"pattern": "("})
    async with aiohttp.ClientSession() as s:  # what OPA answers when not asked to be strict
        async with s.post(f"{plain.url}/v1/data/faults/builtin_error", json={"input": bad_regex}) as r:
            assert (await r.json())["result"] == {"allow": True}
    eng = OpaEngine(plain.url, "faults/builtin_error", timeout_ms=500)
    await eng.start()
    try:
        with pytest.raises(EngineError, match="answered 500"):
            await eng.evaluate(bad_regex)
    finally:
        await eng.close()


async def test_opa_not_listening_is_an_engine_error():
    eng = OpaEngine(f"http://127.0.0.1:{free_port()}", timeout_ms=200)
    await eng.start()
    try:
        start = time.monotonic()
        with pytest.raises(EngineError, match="cannot reach OPA"):
            await eng.evaluate(ALLOWED)
        assert time.monotonic() - start < 0.2  # no retries with back-off
    finally:
        await eng.close()


async def test_opa_slower_than_the_timeout_is_an_engine_error_in_time(plain):
    before = len(plain.data_requests())
    eng = OpaEngine(plain.url, "faults/slow", timeout_ms=100)
    await eng.start()
    try:
        start = time.monotonic()
        with pytest.raises(EngineTimeout, match="within 100 ms"):
            await eng.evaluate(ALLOWED)
        elapsed = time.monotonic() - start
        assert elapsed < 0.4, elapsed
    finally:
        await eng.close()
    # The policy really is slow: OPA was still evaluating at the deadline, and
    # abandoned the query (500, cancelled) when Regate hung up, not later.
    *_, logged = await logged_since(plain, before, 2)
    assert (logged["req_path"], logged["resp_status"]) == ("/v1/data/faults/slow", 500), logged
    assert 100 <= logged["resp_duration"] < 1000, logged  # milliseconds; the whole query takes seconds


async def test_bearer_token(tmp_path):
    authz = tmp_path / "authz.rego"
    authz.write_text(AUTHZ)
    with OpaServer(*shipped_paths(REGO, DATA), authz,
                   args=("--authentication=token", "--authorization=basic")) as srv:
        good = OpaEngine(srv.url, timeout_ms=500, token="s3cret")
        bad = OpaEngine(srv.url, timeout_ms=500, token="wrong")
        await good.start()
        await bad.start()
        try:
            assert (await good.evaluate(ALLOWED)).allow
            with pytest.raises(EngineError, match="401"):
                await bad.evaluate(ALLOWED)
        finally:
            await good.close()
            await bad.close()


# --- the revision: what OPA reports, never a guess from local files ------------------


async def test_revision_is_the_one_opa_reports_for_its_bundle(engine, revision):
    assert engine.revision == revision  # from data.system.bundles at start
    assert revision.startswith("sha256:")  # the embedded engine's, given to `opa build --revision`
    await engine.evaluate(ALLOWED)
    assert engine.revision == revision  # and from the decision's provenance
    assert await engine.reload() == revision


async def test_opa_loaded_from_plain_files_has_no_revision(plain):
    eng = OpaEngine(plain.url, timeout_ms=500, rego_dir=REGO, data_dir=DATA)
    await eng.start()
    try:
        await eng.evaluate(ALLOWED)
        assert eng.revision == f"opa:{plain.url}"
    finally:
        await eng.close()


async def test_opa_started_after_regate_brings_its_revision_with_the_first_decision(tmp_path):
    tarball = build_bundle(shipped_paths(REGO, DATA), tmp_path / "b.tar.gz", "rev-42")
    srv = OpaServer(tarball, bundle=True)
    eng = OpaEngine(srv.url, timeout_ms=500)
    await eng.start()  # OPA is not up yet: Regate starts anyway
    try:
        assert eng.revision == f"opa:{srv.url}"
        with pytest.raises(BundleError, match="cannot ask OPA"):
            await eng.reload()
        with pytest.raises(EngineError):
            await eng.evaluate(ALLOWED)
        with srv:
            assert (await eng.evaluate(ALLOWED)).allow
            assert eng.revision == "rev-42"
    finally:
        await eng.close()
