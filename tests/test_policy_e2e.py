"""The policy stage end to end: Regate as a real process with the shipped
bundle or a bundle written by the test, a real upstream, a real client."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.support.approvals import audit_records
from tests.support.procs import ROOT, RegateProcess, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

JSON = {"Content-Type": "application/json"}


def write_bundle(path: Path, rego: str, data: dict[str, str] | None = None) -> tuple[Path, Path]:
    (path / "rego").mkdir(parents=True, exist_ok=True)
    (path / "data").mkdir(parents=True, exist_ok=True)
    (path / "rego" / "policy.rego").write_text(rego)
    for name, text in (data or {}).items():
        (path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (path / "data" / name).write_text(text)
    return path / "rego", path / "data"


def tools(upstream: str, **extra) -> list[dict]:
    names = ("search", "shell", "files", "payments", "slow", "open")
    out = []
    for n in names:
        t = {"name": n, "upstream": upstream, "timeout_ms": 5000}
        t.update(extra.get(n, {}))
        out.append(t)
    return out


@pytest.fixture(scope="module")
def shipped(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shipped")
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
        "tools": tools(upstream),
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()


async def call(url, path, key=AGENT_KEY, method="GET", json=None, headers=None):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url + path, json=json, headers={"X-Api-Key": key, **(headers or {})}) as r:
            return r.status, r.headers, await r.json()


async def test_shipped_policy_allows_a_granted_call_and_sets_headers(shipped):
    status, headers, seen = await call(shipped.url, "/tools/search/q?x=1", headers={"X-Agent-Id": "spoofed"})
    assert status == 200
    assert headers["X-Regate-Policy-Revision"].startswith("sha256:")
    got = {k.lower(): v for k, v in seen["headers"].items()}
    # The policy sets the verified agent id and removes the agent's own claim.
    assert got["x-regate-agent"] == "coder-7"
    assert "x-agent-id" not in got


async def test_shipped_policy_denies_destructive_shell_with_reasons(shipped):
    status, headers, body = await call(shipped.url, "/tools/shell/run", method="POST", json={"command": "rm -rf /"})
    assert status == 403
    err = body["error"]
    assert err["code"] == "policy_denied"
    assert any("recursive deletion" in r for r in err["reasons"])
    assert headers["X-Regate-Policy-Revision"].startswith("sha256:")


async def test_shipped_policy_denies_tool_without_grant(shipped):
    status, _, body = await call(shipped.url, "/tools/shell/run", key=OTHER_KEY, method="POST", json={"command": "ls"})
    assert status == 403
    assert any("no grant for the tool 'shell'" in r for r in body["error"]["reasons"])


async def test_shipped_policy_confines_files(shipped):
    assert (await call(shipped.url, "/tools/files/workspace/a.txt"))[0] == 200
    status, _, body = await call(shipped.url, "/tools/files/etc/passwd")
    assert status == 403 and any("outside '/workspace/'" in r for r in body["error"]["reasons"])


ECHO_INPUT = """package regate
import rego.v1
decision := {"allow": false, "reasons": [json.marshal(input)]}
"""


async def test_credentials_never_reach_the_policy(upstream, keys_file, tmp_path):
    rego, data = write_bundle(tmp_path, ECHO_INPUT)
    proc = RegateProcess({"auth": {"mode": "api_key", "keys": str(keys_file)},
                          "policy": {"rego": str(rego), "data": str(data)}, "tools": tools(upstream)}, tmp_path)
    try:
        status, _, body = await call(proc.url, "/tools/search/x?a=1&b=2", method="POST", json={"k": [1, 2]},
                                     headers={"Authorization": "Bearer tool-secret", "Cookie": "s=1",
                                              "X-Trace": "t1"})
    finally:
        proc.stop()
    assert status == 403
    import json

    doc = json.loads(body["error"]["reasons"][0])
    assert doc["version"] == 1
    assert doc["agent"]["id"] == "coder-7"
    assert doc["tool"] == {"name": "search", "route": "/tools/search", "gpu": None}
    req = doc["request"]
    assert req["method"] == "POST" and req["path"] == "/tools/search/x"
    assert req["query"] == {"a": ["1"], "b": ["2"]}
    assert req["query_pairs"] == [["a", "1"], ["b", "2"]]
    assert req["arguments"] == {"a": "1", "b": "2", "k": [1, 2]}
    assert req["body"] == {"k": [1, 2]} and len(req["body_sha256"]) == 64
    assert req["headers"]["x-trace"] == "t1"
    for secret in ("authorization", "cookie", "x-api-key"):
        assert secret not in req["headers"]
    assert "tool-secret" not in body["error"]["reasons"][0] and AGENT_KEY not in body["error"]["reasons"][0]


LOWER_DEADLINE = """package regate
import rego.v1
decision := {"allow": true, "timeout_ms": 200}
"""


async def test_decision_can_only_lower_the_deadline(upstream, keys_file, tmp_path):
    rego, data = write_bundle(tmp_path, LOWER_DEADLINE)
    proc = RegateProcess({"auth": {"mode": "api_key", "keys": str(keys_file)},
                          "policy": {"rego": str(rego), "data": str(data)},
                          "tools": tools(upstream, slow={"timeout_ms": 100})}, tmp_path)
    try:
        # route 5000 ms, decision 200 ms: the decision wins.
        assert (await call(proc.url, "/tools/search/slow?s=1"))[0] == 504
        # route 100 ms, decision 200 ms: the route wins (a decision never extends).
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await call(proc.url, "/tools/slow/slow?s=0.15"))[0] == 504
        assert loop.time() - t0 < 0.15
        assert (await call(proc.url, "/tools/search/slow?s=0.05"))[0] == 200
    finally:
        proc.stop()


async def test_engine_down_fails_closed_unless_tool_is_fail_open(upstream, keys_file, tmp_path):
    cfg = {"auth": {"mode": "api_key", "keys": str(keys_file)},
           "policy": {"engine": "opa", "opa": {"url": f"http://127.0.0.1:{free_port()}"},
                      "rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
           "tools": tools(upstream, open={"fail_open": True})}
    proc = RegateProcess(cfg, tmp_path)
    try:
        status, _, body = await call(proc.url, "/tools/search/x")
        assert status == 403 and body["error"]["code"] == "policy_error"
        status, _, _ = await call(proc.url, "/tools/open/x")
        assert status == 200
        async with aiohttp.ClientSession() as s:
            async with s.get(proc.admin_url + "/metrics") as r:
                metrics = await r.text()
        assert 'regate_fail_open_total{stage="policy",tool="open"} 1.0' in metrics
        assert 'regate_policy_errors_total{kind="engine_error",tool="search"} 1.0' in metrics
    finally:
        proc.stop()


MALFORMED = """package regate
import rego.v1
decision := {"allow": "yes"}
"""


async def test_malformed_decision_is_a_policy_error(upstream, keys_file, tmp_path):
    rego, data = write_bundle(tmp_path, MALFORMED)
    proc = RegateProcess({"auth": {"mode": "api_key", "keys": str(keys_file)},
                          "policy": {"rego": str(rego), "data": str(data)}, "tools": tools(upstream)}, tmp_path)
    try:
        status, _, body = await call(proc.url, "/tools/search/x")
    finally:
        proc.stop()
    assert status == 403 and body["error"]["code"] == "policy_error"
    # The agent gets a stable message and the decision id; the detail is the operator's (issue 23).
    assert body["error"]["reasons"] == [] and body["error"]["decision_id"] in body["error"]["message"]
    assert "allow must be a boolean" not in str(body)
    (record,) = [r for r in audit_records(tmp_path / "audit") if r.get("decision_id") == body["error"]["decision_id"]]
    assert any("allow must be a boolean" in r for r in record["reasons"]), record


async def test_shadow_mode_forwards_and_counts_would_deny(upstream, keys_file, tmp_path):
    cfg = {"auth": {"mode": "api_key", "keys": str(keys_file)},
           "policy": {"mode": "shadow", "rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
           "tools": tools(upstream, search={"policy_mode": "enforce"})}
    proc = RegateProcess(cfg, tmp_path)
    try:
        status, _, _ = await call(proc.url, "/tools/shell/run", method="POST", json={"command": "rm -rf /"})
        assert status == 200  # shadow: forwarded as if allowed, nothing tells the agent
        async with aiohttp.ClientSession() as s:
            async with s.get(proc.admin_url + "/metrics") as r:
                metrics = await r.text()
        assert "regate_policy_would_deny_total{" in metrics and 'tool="shell"' in metrics
    finally:
        proc.stop()


BUNDLE = """package regate
import rego.v1
decision := {"allow": true, "headers": {"set": {"X-Bundle": data.which.name}}}
"""


async def test_reload_keeps_old_bundle_on_error_and_is_atomic_under_load(upstream, keys_file, tmp_path):
    rego, data = write_bundle(tmp_path, BUNDLE, {"which/data.yaml": "name: A\n"})
    proc = RegateProcess({"auth": {"mode": "api_key", "keys": str(keys_file)},
                          "policy": {"rego": str(rego), "data": str(data)},
                          "tools": tools(upstream)}, tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proc.url + "/tools/search/x", headers={"X-Api-Key": AGENT_KEY}) as r:
                rev_a = r.headers["X-Regate-Policy-Revision"]
            # A broken policy: the reload fails with file and line, the old bundle keeps serving.
            good = (rego / "policy.rego").read_text()
            (rego / "policy.rego").write_text(good + "\nbroken := {\n")
            async with s.post(proc.admin_url + "/admin/reload", headers=proc.admin_headers) as r:
                assert r.status == 422
                body = await r.json()
                assert "policy.rego" in body["error"]["message"]
                assert body["revision"] == rev_a
            async with s.get(proc.url + "/tools/search/x", headers={"X-Api-Key": AGENT_KEY}) as r:
                assert r.status == 200 and r.headers["X-Regate-Policy-Revision"] == rev_a
            (rego / "policy.rego").write_text(good)

            # Hundreds of calls in flight while the bundle flips between A and B.
            revisions = {rev_a: "A"}
            results = []

            async def one():
                async with s.get(proc.url + "/tools/search/slow?s=0.05", headers={"X-Api-Key": AGENT_KEY}) as r:
                    results.append((r.status, r.headers.get("X-Regate-Policy-Revision")))

            async def flipper():
                for name in ("B", "A", "B", "A", "B"):
                    (data / "which" / "data.yaml").write_text(f"name: {name}\n")
                    async with s.post(proc.admin_url + "/admin/reload", headers=proc.admin_headers) as r:
                        assert r.status == 200
                        revisions[(await r.json())["revision"]] = name
                    await asyncio.sleep(0.05)

            await asyncio.gather(flipper(), *(one() for _ in range(400)))
        assert len(revisions) == 2
        assert all(status == 200 for status, _ in results), [s for s, _ in results if s != 200][:5]
        assert {rev for _, rev in results} <= set(revisions)
    finally:
        proc.stop()


async def test_reload_decisions_match_their_revision(upstream, keys_file, tmp_path):
    """Each decision comes from exactly one bundle: the header the upstream saw
    (set by the policy) matches the revision Regate reported."""
    rego, data = write_bundle(tmp_path, BUNDLE, {"which/data.yaml": "name: A\n"})
    proc = RegateProcess({"auth": {"mode": "api_key", "keys": str(keys_file)},
                          "policy": {"rego": str(rego), "data": str(data)}, "tools": tools(upstream)}, tmp_path)
    try:
        names = {}
        pairs = []
        async with aiohttp.ClientSession() as s:
            async def one():
                async with s.get(proc.url + "/tools/search/x", headers={"X-Api-Key": AGENT_KEY}) as r:
                    seen = await r.json()
                    pairs.append((r.headers["X-Regate-Policy-Revision"], seen["headers"]["X-Bundle"]))

            for name in ("A", "B", "A"):
                (data / "which" / "data.yaml").write_text(f"name: {name}\n")
                async with s.post(proc.admin_url + "/admin/reload", headers=proc.admin_headers) as r:
                    names[(await r.json())["revision"]] = name
                await asyncio.gather(*(one() for _ in range(50)))
        for rev, bundle in pairs:
            assert names[rev] == bundle
    finally:
        proc.stop()
