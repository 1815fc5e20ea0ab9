"""Rate limits and budgets end to end: Regate as a real process (one, or `--workers 2`), the
shipped Rego with limits (limits/data.yaml) written by the test, a real upstream, a real redis-server
(killed and restarted mid-load), and a real HTTP client offering paced load.

The independent Regate processes of a test start, and take their load, concurrently: the
5-second accuracy window is the long pole, and it is paid once for all three stores.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio
import yaml
from aiohttp import web

from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.support.procs import ROOT, RegateProcess, free_port
from tests.support.redis_server import RedisServer


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


def data_dir(tmp: Path, limits: dict) -> Path:
    """The shipped policy data with this test's limits (limits/data.yaml)."""
    d = tmp / "data"
    shutil.copytree(ROOT / "policies", d, ignore=shutil.ignore_patterns("limits"))
    (d / "limits").mkdir()
    (d / "limits" / "data.yaml").write_text(yaml.safe_dump(limits))
    return d


async def start(regates: list, tmp_path: Path, specs: dict[str, dict]) -> dict[str, RegateProcess]:
    """Start one Regate per spec, concurrently. A spec: upstream, limits (the limits/data.yaml
    document), store (the `limits:` config section), workers."""
    def one(name: str, spec: dict) -> RegateProcess:
        tmp = tmp_path / name
        tmp.mkdir()
        cfg = {
            "auth": {"mode": "api_key", "keys": str(spec["keys"])},
            "policy": {"rego": str(ROOT / "rego"), "data": str(data_dir(tmp, spec["limits"]))},
            "tools": [{"name": "search", "upstream": spec["upstream"], "timeout_ms": 5000}],
            "limits": spec.get("store", {}),
        }
        proc = RegateProcess(cfg, tmp, workers=spec.get("workers", 1))
        regates.append(proc)
        return proc

    procs = await asyncio.gather(*(asyncio.to_thread(one, n, s) for n, s in specs.items()))
    return dict(zip(specs, procs))


class Answer:
    __slots__ = ("sent", "done", "status", "error", "headers")

    def __init__(self, sent: float, done: float, status: int, error: dict, headers) -> None:
        self.sent, self.done, self.status, self.error, self.headers = sent, done, status, error, headers

    @property
    def code(self) -> str | None:
        return self.error.get("code")

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.code!r}, sent={self.sent:.3f})"


async def get(session: aiohttp.ClientSession, url: str, key: str = AGENT_KEY) -> Answer:
    sent = time.monotonic()
    async with session.get(url, headers={"X-Api-Key": key}) as r:
        body = await r.read()
        error = orjson.loads(body).get("error", {}) if r.status != 200 else {}
        return Answer(sent, time.monotonic(), r.status, error, r.headers)


async def paced(url: str, rate_hz: float, seconds: float, *, new_connections: bool = False,
                key: str = AGENT_KEY) -> list[Answer]:
    """Offer `rate_hz` calls a second for `seconds` (first call at 0, last at `seconds`),
    without waiting for answers; fresh connections spread calls over `--workers`."""
    connector = aiohttp.TCPConnector(limit=0, force_close=new_connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05
        tasks = []
        for i in range(round(rate_hz * seconds) + 1):
            delay = t0 + i / rate_hz - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(get(session, url, key)))
        return list(await asyncio.gather(*tasks))


async def fetch(url: str) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            text = await r.text()
            return r.status, (orjson.loads(text) if r.content_type == "application/json" else text)


def fallbacks(metrics_text: str, part: str, mode: str) -> float:
    m = re.search(rf'^regate_limit_store_fallbacks_total\{{(?=[^}}]*part="{part}")(?=[^}}]*mode="{mode}")[^}}]*\}} (\S+)$',
                  metrics_text, re.M)
    return float(m.group(1)) if m else 0.0


def items(header: str) -> dict[str, dict[str, int]]:
    """`"agent";r=3;t=1, "tool";q=2;w=60` -> {"agent": {"r": 3, "t": 1}, "tool": {...}}."""
    out = {}
    for member in header.split(","):
        name, *params = member.strip().split(";")
        out[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in params)}
    return out


# -- headers ------------------------------------------------------------------


async def test_headers_on_allowed_and_limited_calls(upstream, keys_file, tmp_path, redis_server, regates):
    """Allowed calls carry RateLimit-Policy and RateLimit for the agent key, the agent×tool key
    and the budget; the call past the tool's burst gets 429 rate_limited with Retry-After;
    another agent is not affected. The same through the memory store and through Redis."""
    limits = {
        "defaults": {"agent": {"rate": "1000/h", "burst": 100}, "tool": None,
                     "budget": {"units": 1000, "window": "1d"}},
        "tools": {"search": {"rate": "1/min", "burst": 2}},
    }
    procs = await start(regates, tmp_path, {
        "memory": {"upstream": upstream, "keys": keys_file, "limits": limits},
        "redis": {"upstream": upstream, "keys": keys_file, "limits": limits,
                  "store": {"store": "redis", "redis_url": redis_server.url[:-1] + "3", "timeout_ms": 500}},
    })

    async def check(proc: RegateProcess) -> None:
        async with aiohttp.ClientSession() as s:
            url = f"{proc.url}/tools/search/q"
            first, second, third = [await get(s, url) for _ in range(3)]
            other = await get(s, url, OTHER_KEY)
        assert [first.status, second.status, third.status, other.status] == [200, 200, 429, 200]
        assert items(first.headers["RateLimit-Policy"]) == {
            "agent": {"q": 1000, "w": 3600}, "tool": {"q": 1, "w": 60}, "budget": {"q": 1000, "w": 86400}}
        got = items(first.headers["RateLimit"])
        assert got["agent"] == {"r": 99, "t": 4} and got["tool"] == {"r": 1, "t": 60}
        assert got["budget"]["r"] == 999 and 0 < got["budget"]["t"] <= 86400
        assert items(second.headers["RateLimit"])["tool"]["r"] == 0

        assert third.code == "rate_limited"
        assert 58 <= int(third.headers["Retry-After"]) <= 60
        limited = items(third.headers["RateLimit"])
        assert limited["tool"]["r"] == 0 and limited["tool"]["t"] == int(third.headers["Retry-After"])
        assert "RateLimit-Policy" in third.headers and "X-Regate-Decision-Id" in third.headers
        # The refused call consumed nothing: the agent key shows two calls, not three.
        assert limited["agent"]["r"] == 98
        assert items(other.headers["RateLimit"])["tool"]["r"] == 1

    await asyncio.gather(*(check(p) for p in procs.values()))
    _, body = await fetch(f"{procs['memory'].url}/tools/search/q")  # no key: 401, not limited
    assert body["error"]["code"] == "unauthenticated"


# -- accuracy -----------------------------------------------------------------

R, B, WINDOW_S = 20, 10, 5


async def test_accuracy_at_three_times_the_rate(upstream, keys_file, tmp_path, redis_server, regates):
    """Limit R/s with burst B; 3R calls a second offered for 5 s: admitted = 5R + B within ±5%,
    for the memory store, for Redis, and for `--workers 2` sharing Redis (both workers answer)."""
    limits = {"defaults": {"agent": {"rate": f"{R}/s", "burst": B}, "tool": None, "budget": None}}
    base = {"upstream": upstream, "keys": keys_file, "limits": limits}
    redis_url = redis_server.url[:-1]  # .../0 -> .../<db>: one database per Regate
    procs = await start(regates, tmp_path, {
        "memory": base,
        # A generous store timeout and deny-on-error: on a loaded CI machine a slow
        # Redis must show up as a 503, never as a silent local fallback that over-admits.
        "redis": {**base, "store": {"store": "redis", "redis_url": redis_url + "1", "timeout_ms": 2000,
                                    "on_store_error": "deny"}},
        "workers2": {**base, "workers": 2,
                     "store": {"store": "redis", "redis_url": redis_url + "2", "timeout_ms": 2000,
                               "on_store_error": "deny"}},
    })
    runs = await asyncio.gather(*(
        paced(f"{p.url}/tools/search/q", 3 * R, WINDOW_S, new_connections=name == "workers2")
        for name, p in procs.items()))

    expected = R * WINDOW_S + B
    for (name, proc), answers in zip(procs.items(), runs):
        statuses = {a.status for a in answers}
        assert statuses <= {200, 429}, (name, [a for a in answers if a.status not in (200, 429)][:3])
        assert all(a.code == "rate_limited" for a in answers if a.status == 429)
        admitted = sum(a.status == 200 for a in answers)
        assert abs(admitted - expected) <= 0.05 * expected, (name, admitted, expected, len(answers))
        if name == "workers2":
            # Decision ids start with a per-process prefix: both workers took calls.
            assert len({a.headers["X-Regate-Decision-Id"][:10] for a in answers}) == 2
        if name != "memory":
            _, metrics = await fetch(f"{proc.admin_url}/metrics")
            assert fallbacks(metrics, "rate", "local") == 0  # every answer came from Redis


# -- budgets ------------------------------------------------------------------


async def cost_upstream():
    """A tool that bills by the call: `X-Regate-Cost` from the `cost` query parameter."""
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"X-Regate-Cost": request.query.get("cost", "1")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


BUDGET_WINDOW_S = 3


async def test_budget_cut_off_by_reported_cost_and_restored_next_window(keys_file, tmp_path, redis_server,
                                                                        regates):
    """Budget 10 units per 3-s window (windows aligned to the epoch). Each call is charged the
    route's cost (1) up front and corrected to the tool's `X-Regate-Cost: 4` afterwards: three
    calls spend 12, the fourth is refused with 429 budget_exhausted saying when the budget
    returns (Retry-After, message, RateLimit), and after that the agent can call again."""
    runner, upstream = await cost_upstream()
    limits = {"defaults": {"agent": None, "tool": None,
                           "budget": {"units": 10, "window": f"{BUDGET_WINDOW_S}s"}}}
    try:
        procs = await start(regates, tmp_path, {
            "memory": {"upstream": upstream, "keys": keys_file, "limits": limits},
            "redis": {"upstream": upstream, "keys": keys_file, "limits": limits,
                      "store": {"store": "redis", "redis_url": redis_server.url[:-1] + "4", "timeout_ms": 500}},
        })
        # Start just after a window boundary so that the first calls share one window.
        await asyncio.sleep(BUDGET_WINDOW_S - time.time() % BUDGET_WINDOW_S + 0.05)

        async def spend(proc: RegateProcess) -> tuple[list[Answer], float, float]:
            async with aiohttp.ClientSession() as s:
                url = f"{proc.url}/tools/search/run?cost=4"
                answers = []
                began = time.time()
                for _ in range(4):
                    answers.append(await get(s, url))
                    await asyncio.sleep(0.05)  # the correction is written after the answer
                return answers, began, time.time()

        results = await asyncio.gather(*(spend(p) for p in procs.values()))
        waits = []
        for (name, proc), (answers, began, ended) in zip(procs.items(), results):
            assert math.floor(began / BUDGET_WINDOW_S) == math.floor(ended / BUDGET_WINDOW_S), "window crossed"
            assert [a.status for a in answers] == [200, 200, 200, 429], name
            budget = [items(a.headers["RateLimit"])["budget"]["r"] for a in answers[:3]]
            assert budget == [9, 5, 1], (name, budget)  # charged 1 up front; the +3 lands after
            cut = answers[3]
            assert cut.code == "budget_exhausted"
            retry = int(cut.headers["Retry-After"])
            assert 1 <= retry <= BUDGET_WINDOW_S
            assert items(cut.headers["RateLimit"])["budget"] == {"r": 0, "t": retry}
            assert items(cut.headers["RateLimit-Policy"])["budget"] == {"q": 10, "w": BUDGET_WINDOW_S}
            assert f"restored in {retry} s" in cut.error["message"], cut.error
            waits.append(retry)
        await asyncio.sleep(max(waits) + 0.05)
        async with aiohttp.ClientSession() as s:
            for name, proc in procs.items():
                back = await get(s, f"{proc.url}/tools/search/run?cost=4")
                assert back.status == 200, name
                assert items(back.headers["RateLimit"])["budget"]["r"] == 9
    finally:
        await runner.cleanup()


# -- Redis failure ------------------------------------------------------------


async def test_redis_killed_mid_load_each_on_store_error_mode(upstream, keys_file, tmp_path, regates):
    """Three Regates (on_store_error local, deny, allow) under load share one Redis, which is
    SIGKILLed and later restarted empty on the same port. While it is gone: local keeps
    limiting in-process (RateLimit headers, counted), deny answers 503 limits_unavailable with
    Retry-After, allow lets calls through unlimited (no RateLimit headers); /readyz says so (deny:
    not ready). No other 5xx, ever. Once Redis is back every mode answers from it again."""
    limits = {"defaults": {"agent": {"rate": "1000/s", "burst": 1000}, "tool": None,
                           "budget": {"units": 1_000_000, "window": "1d"}}}
    retry_s = 0.5
    with RedisServer() as srv:
        db = {"local": 1, "deny": 2, "allow": 3}
        procs = await start(regates, tmp_path, {
            mode: {"upstream": upstream, "keys": keys_file, "limits": limits,
                   "store": {"store": "redis", "redis_url": f"{srv.url[:-1]}{db[mode]}", "timeout_ms": 250,
                             "on_store_error": mode, "retry_interval_s": retry_s}}
            for mode in db})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        phase_a, phase_b, phase_c = 1.0, 1.5, 2.0
        load = [asyncio.ensure_future(paced(f"{p.url}/tools/search/q", 40, phase_a + phase_b + phase_c))
                for p in procs.values()]

        await asyncio.sleep(phase_a)
        killed = time.monotonic()
        await asyncio.to_thread(srv.kill)
        await asyncio.sleep(phase_b - 0.4)
        during = {mode: await fetch(f"{p.admin_url}/readyz") for mode, p in procs.items()}
        metrics_b = {mode: (await fetch(f"{p.admin_url}/metrics"))[1] for mode, p in procs.items()}
        await asyncio.sleep(max(0.0, t0 + phase_a + phase_b - loop.time()))
        await asyncio.to_thread(srv.start)
        restarted = time.monotonic()
        settled = restarted + retry_s + 0.3  # past the retry interval: every mode has probed Redis
        await asyncio.sleep(retry_s + 0.3)
        metrics_c0 = {mode: (await fetch(f"{p.admin_url}/metrics"))[1] for mode, p in procs.items()}
        runs = await asyncio.gather(*load)
        after = {mode: await fetch(f"{p.admin_url}/readyz") for mode, p in procs.items()}
        metrics_c1 = {mode: (await fetch(f"{p.admin_url}/metrics"))[1] for mode, p in procs.items()}
        stored = {}
        for mode, n in db.items():
            async with redis.asyncio.Redis(port=srv.port, db=n) as client:
                stored[mode] = await client.exists("regate:budget:{coder-7}")  # rate keys expire in ms

    for (mode, proc), answers in zip(procs.items(), runs):
        # No 5xx but deny's own 503; nothing refused by the limits themselves.
        for a in answers:
            assert a.status == 200 or (mode == "deny" and a.status == 503 and a.code == "limits_unavailable"), \
                (mode, a, a.code)
        before = [a for a in answers if a.done < killed]
        gone = [a for a in answers if killed + 0.1 < a.sent and a.done < restarted]
        back = [a for a in answers if a.sent > settled]
        assert len(before) > 20 and len(gone) > 30 and len(back) > 30, (mode, len(before), len(gone), len(back))
        assert all(a.status == 200 and "RateLimit" in a.headers for a in before + back), mode
        if mode == "local":
            assert all(a.status == 200 and "agent" in items(a.headers["RateLimit"]) for a in gone)
        elif mode == "allow":
            assert all(a.status == 200 and "RateLimit" not in a.headers for a in gone)
        else:
            assert all(a.status == 503 and a.headers["Retry-After"] == "1" for a in gone)

        status, body = during[mode]
        line = f"limits: shared store unreachable, answering with on_store_error={mode}"
        if mode == "deny":
            assert status == 503 and not body["ready"] and line in body["problems"], body
        else:
            assert status == 200 and body["ready"] and line in body["warnings"], body
        assert fallbacks(metrics_b[mode], "rate", mode) > 0
        status, body = after[mode]
        assert status == 200 and body["ready"], body
        assert not [w for w in body["warnings"] + body["problems"] if w.startswith("limits:")], body
        # Answered from Redis again: no more fallbacks after the retry interval, keys written.
        assert fallbacks(metrics_c1[mode], "rate", mode) == fallbacks(metrics_c0[mode], "rate", mode)
        assert stored[mode] == 1, mode
