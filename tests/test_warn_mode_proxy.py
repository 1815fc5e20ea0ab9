"""Warn-only limits and several windows per limit, end to end: Regate as a real process
(memory store, and a real redis-server), the shipped Rego with limits/data.yaml written by
the test, a real upstream and client.

A warn-mode limit lets every call through, counts what it would have refused in
`regate_would_refuse_total`, audits those calls as `would_refuse` with the code they would
have got, and sends no RateLimit headers for it; after the limits file says `enforce` and
`POST /admin/reload`, the same limit refuses, without a restart.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
import pytest
import yaml

from tests.conftest import AGENT_KEY
from tests.support.procs import RegateProcess
from tests.support.redis_server import RedisServer
from tests.test_limits_proxy import get, items, start
from tests.test_audit_proxy import read_log


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def regates():
    started: list[RegateProcess] = []
    yield started
    for proc in started:
        proc.stop()


def would_refuse(metrics_text: str, stage: str, code: str) -> float:
    m = re.search(rf'^regate_would_refuse_total\{{(?=[^}}]*stage="{stage}")(?=[^}}]*code="{code}")[^}}]*\}} (\S+)$',
                  metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


async def text(session: aiohttp.ClientSession, url: str, **kw) -> str:
    async with session.get(url, **kw) as r:
        return await r.text()


async def reload(session: aiohttp.ClientSession, proc: RegateProcess) -> dict:
    async with session.post(proc.admin_url + "/admin/reload", headers=proc.admin_headers) as r:
        assert r.status == 200, await r.text()
        return orjson.loads(await r.read())


WARN = {
    "defaults": {"agent": None, "tool": None, "budget": {"units": 2, "window": "1d", "mode": "warn"}},
    "tools": {"search": {"windows": [{"rate": "1/min", "burst": 2}], "mode": "warn"}},
}


async def test_warn_counts_without_refusing_then_enforces_after_a_reload(upstream, keys_file, tmp_path,
                                                                         redis_server, regates):
    procs = await start(regates, tmp_path, {
        "memory": {"upstream": upstream, "keys": keys_file, "limits": WARN},
        "redis": {"upstream": upstream, "keys": keys_file, "limits": WARN,
                  "store": {"store": "redis", "redis_url": redis_server.url[:-1] + "4", "timeout_ms": 500}},
    })

    async def check(name: str, proc: RegateProcess) -> None:
        async with aiohttp.ClientSession() as s:
            url = f"{proc.url}/tools/search/q"
            answers = [await get(s, url) for _ in range(4)]
            # Every call ran; none carries a warn-mode limit's RateLimit headers or Retry-After.
            assert [a.status for a in answers] == [200] * 4, answers
            assert all("RateLimit" not in a.headers and "Retry-After" not in a.headers for a in answers)
            metrics = await text(s, f"{proc.admin_url}/metrics")
            assert would_refuse(metrics, "ratelimit", "rate_limited") == 2
            assert would_refuse(metrics, "ratelimit", "budget_exhausted") == 2

            # The audit log has them as would_refuse with the code they would have got.
            recs = [r for r in read_log(proc.config_path.parent / "audit")[0] if r.get("kind") == "decision"]
            assert [r["decision"] for r in recs] == ["allow", "allow", "would_refuse", "would_refuse"]
            assert recs[2]["code"] == "rate_limited"
            assert {w["code"] for w in recs[2]["would_refuse"]} == {"rate_limited", "budget_exhausted"}
            assert "1/1m burst 2" in recs[2]["would_refuse"][0]["message"]

            # warn -> enforce: the limits file and a reload, no restart.
            enforce = yaml.safe_load(yaml.safe_dump(WARN))
            enforce["mode"] = "enforce"
            del enforce["tools"]["search"]["mode"]
            del enforce["defaults"]["budget"]["mode"]
            data = proc.config_path.parent / "data" / "limits" / "data.yaml"
            data.write_text(yaml.safe_dump(enforce))
            assert (await reload(s, proc))["reloaded"] is True
            refused = await get(s, url)
            assert refused.status == 429 and refused.code == "rate_limited", refused
            assert int(refused.headers["Retry-After"]) >= 1
            assert items(refused.headers["RateLimit"])["tool"]["r"] == 0

    await asyncio.gather(*(check(n, p) for n, p in procs.items()))


MULTI = {
    "defaults": {"agent": [{"rate": "100/s", "burst": 10}, {"rate": "3/min"}], "tool": None, "budget": None},
}


async def test_several_windows_refuse_at_the_tightest_with_its_headers(upstream, keys_file, tmp_path,
                                                                       redis_server, regates):
    procs = await start(regates, tmp_path, {
        "memory": {"upstream": upstream, "keys": keys_file, "limits": MULTI},
        "redis": {"upstream": upstream, "keys": keys_file, "limits": MULTI,
                  "store": {"store": "redis", "redis_url": redis_server.url[:-1] + "5", "timeout_ms": 500}},
    })

    async def check(proc: RegateProcess) -> None:
        async with aiohttp.ClientSession() as s:
            url = f"{proc.url}/tools/search/q"
            answers = [await get(s, url) for _ in range(4)]
        assert [a.status for a in answers] == [200, 200, 200, 429]
        first, last = answers[0], answers[-1]
        assert items(first.headers["RateLimit-Policy"]) == {"agent": {"q": 100, "w": 1},
                                                            "agent-1m": {"q": 3, "w": 60}}
        # RateLimit names each key's binding window: the minute's, with 2 left after one call.
        assert items(first.headers["RateLimit"]) == {"agent-1m": {"r": 2, "t": 20}}
        assert last.code == "rate_limited" and "3/1m" in last.error["message"]
        assert 19 <= int(last.headers["Retry-After"]) <= 20  # the 3/min window's next cell (one per 20 s)
        assert items(last.headers["RateLimit"])["agent-1m"]["r"] == 0

    await asyncio.gather(*(check(p) for p in procs.values()))


async def test_breakers_in_warn_mode_forward_and_count(keys_file, tmp_path, regates):
    """A failing tool behind a tool breaker and loop guard in warn mode: every call reaches the
    tool, and the refusals they would have got are counted and audited."""
    from tests.support.flaky_upstream import FlakyUpstream

    flaky = FlakyUpstream()
    try:
        (tmp_path / "rego").mkdir()
        (tmp_path / "data").mkdir()
        (tmp_path / "rego" / "p.rego").write_text("package regate\n\ndecision := {\"allow\": true}\n")
        cfg = {
            "auth": {"mode": "api_key", "keys": str(keys_file)},
            "policy": {"rego": str(tmp_path / "rego"), "data": str(tmp_path / "data")},
            "limits": {"enabled": False},
            "tools": [{"name": "sick", "upstream": flaky.lane_url("warn_sick"), "timeout_ms": 3000}],
            "breakers": {"mode": "warn", "tool": {"consecutive_failures": 2, "cooldown_s": 30},
                         "agent": {"enabled": False}, "loop": {"repeats": 2}},
        }
        proc = await asyncio.to_thread(RegateProcess, cfg, tmp_path)
        regates.append(proc)
        flaky.mode("warn_sick", "fail", status=500, message="db down")
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(5):
                async with s.post(f"{proc.url}/tools/sick/run", json={"q": 1},
                                  headers={"X-Api-Key": AGENT_KEY}) as r:
                    statuses.append(r.status)
                    assert "Retry-After" not in r.headers
            metrics = await text(s, f"{proc.admin_url}/metrics")
        assert statuses == [500] * 5 and flaky.calls("warn_sick") == 5
        assert would_refuse(metrics, "breaker", "tool_unavailable") == 3
        assert would_refuse(metrics, "breaker", "retry_loop") == 3
        recs = [r for r in read_log(tmp_path / "audit")[0] if r.get("kind") == "decision"]
        assert [r["decision"] for r in recs][2:] == ["would_refuse"] * 3
        assert recs[2]["code"] == "tool_unavailable"
    finally:
        flaky.stop()
