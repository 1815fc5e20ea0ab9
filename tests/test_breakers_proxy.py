"""Breakers, agent back-off, the loop guard and Regate's own retries, end to end:
Regate as a real process in front of a real upstream that fails on command
(tests/support/flaky_upstream.py), a real HTTP client, real sockets.

Cool-downs are short (0.5 s, x4 on each re-open) so the whole file runs in seconds.
Each tool has its own lane in the flaky upstream, so tests do not share state.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.support.flaky_upstream import FlakyUpstream
from tests.support.procs import RegateProcess

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_TOKEN = "breaker-admin-token"

# Allow every call, and show the tool what the policy saw in input.state, so a
# test can check that the breaker state reaches the policy (it runs after the breaker).
ALLOW_AND_SHOW_STATE = """
package regate

import rego.v1

decision := {"allow": true, "headers": {"set": {
    "X-Seen-Breaker": object.get(input.state, "breaker", "none"),
    "X-Seen-Recent-Failures": sprintf("%v", [object.get(input.state, "recent_failures", -1)]),
}}}
"""

NO_AGENT_NO_LOOP = {"agent": {"enabled": False}, "loop": {"enabled": False}}
ONLY_RETRIES = {"tool": {"enabled": False}, **NO_AGENT_NO_LOOP}


def _write_bundle(tmp) -> tuple[str, str]:
    (tmp / "rego").mkdir()
    (tmp / "data").mkdir()
    (tmp / "rego" / "policy.rego").write_text(ALLOW_AND_SHOW_STATE)
    return str(tmp / "rego"), str(tmp / "data")


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    f = FlakyUpstream(tls_dir=tmp_path_factory.mktemp("flaky"))
    # Its info endpoint answers before the TLS site and the gates are up (a loaded machine
    # shows it): wait for both gates rather than read a port that is not there yet.
    deadline = time.monotonic() + 30
    while not {"plain", "tls"} <= set(f.info.get("gates", {})):
        assert time.monotonic() < deadline, f"the flaky upstream's gates did not come up: {f.info}"
        time.sleep(0.05)
        f.info = f._call("GET", "/_flaky/info")
    yield f
    f.stop()


def _start_regate(cfg: dict, tmp, flaky: FlakyUpstream) -> RegateProcess:
    # Regate trusts the flaky upstream's self-signed certificate through the
    # standard OpenSSL variable (read when the process starts).
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(flaky.cert)
    try:
        return RegateProcess(cfg, tmp)
    finally:
        if old is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = old


@pytest.fixture(scope="module")
def regate(flaky, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("breakers")
    rego, data = _write_bundle(tmp)
    lane = flaky.lane_url

    def tool(name: str, upstream: str | None = None, **extra: Any) -> dict:
        return {"name": name, "upstream": upstream or lane(name), "timeout_ms": 3000, **extra}

    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "admin": {"token": ADMIN_TOKEN},
        "policy": {"rego": rego, "data": data},
        "limits": {"enabled": False},
        "tools": [
            tool("sick"), tool("flappy"), tool("resettable"), tool("strict"),
            # The loop guard also tells plain-text calls apart: this tool takes unread bodies.
            tool("loop", unread_body="forward"),
            tool("slowpoke", timeout_ms=300),
            # A TLS handshake through the gate can take seconds on a loaded machine: only
            # the gate's hang-up may be a connect error.
            tool("retry_get", lane("retry_get", gate="tls"), timeout_ms=20_000),
            tool("retry_post", lane("retry_post", gate="tls"), timeout_ms=20_000),
            tool("retry_burst", lane("retry_burst", gate="tls"), timeout_ms=20_000),
            tool("crash_post", lane("crash_post", gate="plain")),
            tool("crash_get", lane("crash_get", gate="plain")),
        ],
        "breakers": {
            "tool": {"consecutive_failures": 3, "cooldown_s": 0.5, "cooldown_multiplier": 4.0,
                     "max_cooldown_s": 8.0, "half_open_timeout_s": 5.0},
            "agent": {"consecutive_failures": 3, "backoff_s": 1.0, "backoff_multiplier": 2.0},
            "loop": {"repeats": 3, "window_s": 30.0},
            "overrides": {
                # The tool breaker alone: an agent's own back-off would otherwise
                # refuse its half-open probe (it also failed 3 times in a row).
                # sick: a cool-down long enough for a 20-call burst on a loaded machine.
                "sick": {"tool": {"cooldown_s": 3.0}, **NO_AGENT_NO_LOOP}, "flappy": NO_AGENT_NO_LOOP, "slowpoke": NO_AGENT_NO_LOOP,
                "resettable": {"tool": {"cooldown_s": 30.0, "max_cooldown_s": 60.0}, **NO_AGENT_NO_LOOP},
                # The loop guard alone (the agent back-off would answer first).
                "loop": {"agent": {"enabled": False}},
                # Regate's own retries alone: no breaker may stop the calls first.
                "retry_get": ONLY_RETRIES, "retry_post": ONLY_RETRIES, "retry_burst": ONLY_RETRIES,
                "crash_post": ONLY_RETRIES, "crash_get": ONLY_RETRIES,
            },
        },
    }
    proc = _start_regate(cfg, tmp, flaky)
    yield proc
    proc.stop()


# --- helpers -----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Any
    json: Any
    elapsed: float


async def send(regate: RegateProcess, tool: str, path: str = "/call", *, key: str = AGENT_KEY,
               method: str = "POST", body: Any = None, raw: bytes | None = None) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"X-Api-Key": key}
    if data is not None:
        headers["Content-Type"] = "application/json"
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{regate.url}/tools/{tool}{path}", data=data, headers=headers) as r:
            text = await r.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return Reply(r.status, r.headers, parsed, time.monotonic() - t0)


def refusal(reply: Reply, status: int, code: str) -> dict:
    """The reply is Regate's own refusal with this status and code; returns the error."""
    assert reply.status == status, (reply.status, reply.json)
    err = reply.json["error"]
    assert err["code"] == code, err
    assert err["message"]
    assert err["decision_id"] == reply.headers["X-Regate-Decision-Id"]
    return err


def admin(regate: RegateProcess, method: str, path: str, token: str | None = ADMIN_TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(regate.admin_url + path, method=method, data=b"" if method == "POST" else None,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def tool_snapshot(regate: RegateProcess, tool: str) -> dict:
    status, snap = admin(regate, "GET", "/admin/breakers")
    assert status == 200
    return next(t for t in snap["tools"] if t["tool"] == tool)


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def wait_for_state(regate: RegateProcess, tool: str, state: str, timeout_s: float = 30.0) -> None:
    """Poll the admin snapshot (which applies due timed transitions) until ``tool`` is in ``state``."""
    deadline = time.monotonic() + timeout_s
    while (now := tool_snapshot(regate, tool)["state"]) != state:
        assert time.monotonic() < deadline, f"{tool} still {now}, not {state}, after {timeout_s:g}s"
        await asyncio.sleep(0.05)


async def wait_for_calls(flaky: FlakyUpstream, lane: str, n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while flaky.calls(lane) < n:
        assert time.monotonic() < deadline, f"lane {lane} saw {flaky.calls(lane)} calls, not {n}"
        await asyncio.sleep(0.02)


# --- the tool breaker ----------------------------------------------------------


async def test_tool_breaker_opens_fast_fails_half_opens_and_closes(regate, flaky):
    flaky.mode("sick", "fail", status=500, message="database connection pool exhausted")
    for _ in range(3):
        r = await send(regate, "sick", body={"q": 1})
        # Before the breaker opens the agent sees the tool's own answer.
        assert r.status == 500 and r.json["error"]["message"] == "database connection pool exhausted"
    opened = time.monotonic()
    assert flaky.calls("sick") == 3

    # Open: refused at once, with Retry-After at the end of the 3 s cool-down,
    # quoting the tool's last error; the tool does not see the call.
    r = await send(regate, "sick", body={"q": 1})
    err = refusal(r, 503, "tool_unavailable")
    assert 1 <= int(r.headers["Retry-After"]) <= 3
    assert "database connection pool exhausted" in err["message"]
    burst = await asyncio.gather(*(send(regate, "sick", body={"q": i}) for i in range(20)))
    assert [b.status for b in burst] == [503] * 20
    assert flaky.calls("sick") == 3
    snap = tool_snapshot(regate, "sick")
    assert snap["state"] == "open" and snap["opens_in_a_row"] == 1
    assert 0 < snap["retry_after_s"] <= 3.0

    # Half-open after the cool-down: one test call goes through (the tool is slow
    # now but healthy); a call that arrives while it is in flight is still refused.
    await sleep_until(opened + 3.0)
    await wait_for_state(regate, "sick", "half_open")
    flaky.mode("sick", "slow", delay_s=2.0)
    probe = asyncio.create_task(send(regate, "sick", body={"q": "probe"}))
    await wait_for_calls(flaky, "sick", 4)  # the probe is at the tool
    err = refusal(await send(regate, "sick", body={"q": "extra"}), 503, "tool_unavailable")
    assert "recovering" in err["message"]
    r = await probe
    assert r.status == 200
    assert r.json["headers"]["x-seen-breaker"] == "half_open"  # the policy saw it too
    assert flaky.calls("sick") == 4

    # The probe succeeded: closed, calls flow again.
    flaky.mode("sick", "healthy")
    r = await send(regate, "sick", body={"q": 2})
    assert r.status == 200 and r.json["headers"]["x-seen-breaker"] == "closed"
    assert tool_snapshot(regate, "sick")["state"] == "closed"


async def test_failed_probe_reopens_with_a_longer_cooldown(regate, flaky):
    flaky.mode("flappy", "fail", status=502, message="bad gateway")
    for _ in range(3):
        assert (await send(regate, "flappy")).status == 502
    opened = time.monotonic()
    r = await send(regate, "flappy")
    refusal(r, 503, "tool_unavailable")
    assert r.headers["Retry-After"] == "1"

    # The probe after the first cool-down fails: re-opened for 0.5 s x 4 = 2 s.
    await sleep_until(opened + 0.55)
    assert (await send(regate, "flappy")).status == 502
    reopened = time.monotonic()
    assert flaky.calls("flappy") == 4
    r = await send(regate, "flappy")
    err = refusal(r, 503, "tool_unavailable")
    assert r.headers["Retry-After"] == "2"
    assert "test call failed" in err["message"]
    snap = tool_snapshot(regate, "flappy")
    assert snap["state"] == "open" and snap["opens_in_a_row"] == 2
    assert 1.5 < snap["retry_after_s"] <= 2.0

    # Past where the first cool-down would have ended: still refused, tool untouched.
    await sleep_until(reopened + 0.7)
    refusal(await send(regate, "flappy"), 503, "tool_unavailable")
    assert flaky.calls("flappy") == 4

    # After the longer cool-down a successful probe closes it and forgets the re-opens.
    flaky.mode("flappy", "healthy")
    await sleep_until(reopened + 2.05)
    assert (await send(regate, "flappy")).status == 200
    assert (await send(regate, "flappy")).status == 200
    snap = tool_snapshot(regate, "flappy")
    assert snap["state"] == "closed" and snap["opens_in_a_row"] == 0
    metrics = urllib.request.urlopen(regate.admin_url + "/metrics", timeout=10).read().decode()
    assert 'regate_breaker_transitions_total{from_state="half_open",to_state="open",tool="flappy"} 1.0' in metrics
    assert 'regate_breaker_state{tool="flappy"} 0.0' in metrics


async def test_timeouts_open_the_breaker(regate, flaky):
    flaky.mode("slowpoke", "slow", delay_s=1.0)
    for _ in range(3):
        refusal(await send(regate, "slowpoke"), 504, "upstream_timeout")
    err = refusal(await send(regate, "slowpoke"), 503, "tool_unavailable")
    assert "timeout" in err["message"]
    assert flaky.calls("slowpoke") == 3


async def test_reset_closes_an_open_breaker(regate, flaky):
    flaky.mode("resettable", "fail")
    for _ in range(3):
        assert (await send(regate, "resettable")).status == 500
    r = await send(regate, "resettable")
    refusal(r, 503, "tool_unavailable")
    assert r.headers["Retry-After"] == "30"

    assert admin(regate, "POST", "/admin/breakers/resettable/reset", token=None)[0] == 401
    assert admin(regate, "POST", "/admin/breakers/nosuchtool/reset")[0] == 404
    assert admin(regate, "POST", "/admin/breakers/resettable/reset") == (
        200, {"reset": "resettable", "state": "closed"})
    flaky.mode("resettable", "healthy")
    assert (await send(regate, "resettable")).status == 200
    assert flaky.calls("resettable") == 4


# --- the agent x tool back-off ---------------------------------------------------


async def test_one_agent_failing_backs_off_while_others_pass(regate, flaky):
    flaky.mode("strict", "invalid", match="bad", message="validation failed: field 'amount' must be positive")
    # Three different invalid calls (not repeats: this is the back-off, not the loop guard).
    for i in range(3):
        r = await send(regate, "strict", body={"arg": f"bad call number {i}: {'xyz' * i}{i * 7919}"})
        assert r.status == 400
    assert flaky.calls("strict") == 3

    # coder-7 is isolated from this tool for 1 s, even for a valid call ...
    r = await send(regate, "strict", body={"arg": "good"})
    err = refusal(r, 429, "agent_backoff")
    assert r.headers["Retry-After"] == "1"
    assert "field 'amount' must be positive" in err["message"]
    assert flaky.calls("strict") == 3

    # ... while analyst-2 still reaches it, and the policy sees its own failure count.
    assert (await send(regate, "strict", key=OTHER_KEY, body={"arg": "bad but mine"})).status == 400
    r = await send(regate, "strict", key=OTHER_KEY, body={"arg": "good"})
    assert r.status == 200 and r.json["headers"]["x-seen-recent-failures"] == "1"
    assert flaky.calls("strict") == 5

    # After the back-off another failure doubles it.
    await asyncio.sleep(1.05)
    assert (await send(regate, "strict", body={"arg": "bad again, differently"})).status == 400
    r = await send(regate, "strict", body={"arg": "good"})
    refusal(r, 429, "agent_backoff")
    assert r.headers["Retry-After"] == "2"
    status, snap = admin(regate, "GET", "/admin/breakers")
    pair = next(p for p in snap["agents"] if p["agent"] == "coder-7" and p["tool"] == "strict")
    assert pair["failures"] == 4 and 1.5 < pair["retry_after_s"] <= 2.0

    # An operator's reset of the tool lifts it.
    assert admin(regate, "POST", "/admin/breakers/strict/reset")[0] == 200
    assert (await send(regate, "strict", body={"arg": "good"})).status == 200
    assert flaky.calls("strict") == 7


# --- the loop guard ------------------------------------------------------------

LONG = ("Find every customer who placed more than three orders in the last quarter, group them by region, "
        "and report the total revenue per region together with the average basket size; use the column "
        "usr_nme for the display name of each customer and sort regions by revenue, highest first, then by name.")
ERROR = "validation failed: unknown column 'usr_nme' in field list (did you mean 'user_name'?)"
BASE = {"query": LONG, "limit": 50, "format": "table", "request_id": "req-0001"}


def _one_char(text: str, at: int) -> str:
    return text[:at] + ("X" if text[at] != "X" else "Y") + text[at + 1:]


def _dump(doc: dict, **kw: Any) -> bytes:
    return json.dumps(doc, **kw).encode()


# name -> (the three failing calls, the retry that must be refused)
LOOP_CASES = {
    "exact": ([_dump(BASE)] * 3, _dump(BASE)),
    "reformatted": ([_dump(BASE)] * 3, _dump(BASE, indent=4, separators=(" ,", " :  "))),
    "whitespace_in_argument": ([_dump(BASE)] * 3, _dump({**BASE, "query": LONG.replace(" ", "  ") + "\n"})),
    "reordered_keys": ([_dump(BASE)] * 3, _dump(dict(reversed(list(BASE.items()))))),
    "one_changed_character": ([_dump(BASE)] * 3, _dump({**BASE, "query": _one_char(LONG, 40)})),
    "new_request_id": ([_dump(BASE)] * 3, _dump({**BASE, "request_id": "req-0002"})),
    # The agent edits a little each time, and every edit still fails.
    "drifting_edits": (
        [_dump(BASE), _dump({**BASE, "query": _one_char(LONG, 10)}),
         _dump(dict(reversed(list({**BASE, "query": _one_char(_one_char(LONG, 10), 20)}.items()))))],
        _dump({**BASE, "query": _one_char(_one_char(_one_char(LONG, 10), 20), 30), "limit": 50}),
    ),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
async def test_loop_guard_stops_repeats_and_near_repeats(regate, flaky, case):
    flaky.mode("loop", "invalid", match="usr_nme", message=ERROR)
    failing, retry = LOOP_CASES[case]
    path = f"/query/{case}"
    before = flaky.calls("loop")
    for body in failing:
        r = await send(regate, "loop", path, raw=body)
        assert r.status == 400 and r.json["error"]["message"] == ERROR
    assert flaky.calls("loop") == before + 3

    r = await send(regate, "loop", path, raw=retry)
    err = refusal(r, 429, "retry_loop")
    assert ERROR in err["message"]  # the upstream's own words, quoted back
    assert "change the arguments" in err["message"]
    assert int(r.headers["Retry-After"]) >= 1
    assert flaky.calls("loop") == before + 3  # never forwarded

    if case == "exact":
        # Another agent making the same call is not in a loop.
        assert (await send(regate, "loop", path, key=OTHER_KEY, raw=retry)).status == 400
        assert flaky.calls("loop") == before + 4


async def test_loop_guard_lets_a_genuinely_different_call_through(regate, flaky):
    flaky.mode("loop", "invalid", match="usr_nme", message=ERROR)
    path = "/query/different"
    for _ in range(3):
        assert (await send(regate, "loop", path, body=BASE)).status == 400
    refusal(await send(regate, "loop", path, body=BASE), 429, "retry_loop")
    before = flaky.calls("loop")

    # A different question, correctly spelled: forwarded, and it succeeds.
    fixed = {**BASE, "query": "List the ten products with the highest return rate this year, with the "
                              "user_name of the buyer who returned each one most often."}
    assert (await send(regate, "loop", path, body=fixed)).status == 200
    # A different question that happens to fail too is still the tool's to answer.
    other = {**BASE, "query": "Count the orders shipped late per carrier per week; label rows with usr_nme."}
    assert (await send(regate, "loop", path, body=other)).status == 400
    assert flaky.calls("loop") == before + 2
    # The original loop stays stopped.
    refusal(await send(regate, "loop", path, body=BASE), 429, "retry_loop")
    assert flaky.calls("loop") == before + 2


async def test_loop_guard_tells_plain_text_calls_apart(regate, flaky):
    flaky.mode("loop", "invalid", match="usr_nme", message=ERROR)
    async def post_text(text: str) -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{regate.url}/tools/loop/text", data=text.encode(),
                              headers={"X-Api-Key": AGENT_KEY, "Content-Type": "text/plain"}) as r:
                return r.status

    for i in range(3):
        assert await post_text(f"question {i}: which usr_nme placed order {i * 7919}?") == 400
    assert await post_text("an altogether different question about refunds per carrier") == 200


async def test_loop_guard_tells_calls_apart_with_policy_off(flaky, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loopoff")
    proc = _start_regate({
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"engine": "off"},
        "limits": {"enabled": False},
        "tools": [{"name": "loopoff", "upstream": flaky.lane_url("loopoff")}],
        "breakers": {"agent": {"enabled": False}},
    }, tmp, flaky)
    try:
        flaky.mode("loopoff", "invalid", match="usr_nme", message=ERROR)
        for _ in range(2):  # the default loop.repeats
            assert (await send(proc, "loopoff", body=BASE)).status == 400
        assert (await send(proc, "loopoff", body=BASE)).json["error"]["code"] == "retry_loop"
        r = await send(proc, "loopoff", body={"query": "a different question altogether", "limit": 5})
        assert r.status == 200, r.json
    finally:
        proc.stop()


# --- Regate's own retries --------------------------------------------------------
# The TLS gate hangs up during the handshake: a connect error, the request never
# left Regate. The gate counts every connection, so every attempt is seen.


async def test_idempotent_call_is_retried_once_after_a_connect_error(regate, flaky):
    flaky.mode("retry_get", "healthy", close=True)  # no keep-alive: every call connects
    for _ in range(10):  # calls that fill the retry budget (retries <= 10% of calls)
        assert (await send(regate, "retry_get", method="GET")).status == 200
    conns = flaky.gate_stats("tls")["connections"]
    flaky.gate("tls", hangup=1)
    r = await send(regate, "retry_get", method="GET")
    assert r.status == 200  # the agent never notices the refused connection
    assert flaky.gate_stats("tls")["connections"] == conns + 2
    assert flaky.calls("retry_get") == 11  # and the tool saw the call once


async def test_post_is_not_retried_after_a_connect_error(regate, flaky):
    flaky.mode("retry_post", "healthy", close=True)
    for _ in range(10):
        assert (await send(regate, "retry_post", body={"n": 1})).status == 200
    conns = flaky.gate_stats("tls")["connections"]
    flaky.gate("tls", hangup=1)
    refusal(await send(regate, "retry_post", body={"n": 2}), 502, "upstream_unreachable")
    assert flaky.gate_stats("tls")["connections"] == conns + 1
    assert flaky.calls("retry_post") == 10


async def test_retries_stay_within_budget_when_the_tool_is_dead(regate, flaky):
    flaky.mode("retry_burst", "healthy", close=True)
    for _ in range(50):
        assert (await send(regate, "retry_burst", method="GET")).status == 200
    conns = flaky.gate_stats("tls")["connections"]
    flaky.gate("tls", hangup=10_000)
    try:
        burst = await asyncio.gather(*(send(regate, "retry_burst", method="GET") for _ in range(100)))
    finally:
        flaky.gate("tls", hangup=0)
    assert [b.status for b in burst] == [502] * 100
    attempts = flaky.gate_stats("tls")["connections"] - conns
    # 150 calls in the window: at most 15 retries, however hard the agents push.
    assert 100 < attempts <= 100 + 15


# An upstream that reads the request and hangs up (a crash mid-call) may have acted
# on it: no retry, whatever the method, unless it fits the budget.


async def test_post_to_a_crashing_tool_is_sent_once(regate, flaky):
    flaky.gate("plain", hangup=10_000, after_head=True)
    try:
        before = flaky.gate_stats("plain")["heads"]
        for i in range(20):
            refusal(await send(regate, "crash_post", body={"n": i}), 502, "upstream_unreachable")
        assert flaky.gate_stats("plain")["heads"] - before == 20
    finally:
        flaky.gate("plain", hangup=0)


async def test_get_to_a_crashing_tool_stays_within_the_retry_budget(regate, flaky):
    flaky.gate("plain", hangup=10_000, after_head=True)
    try:
        before = flaky.gate_stats("plain")["heads"]
        for _ in range(20):
            refusal(await send(regate, "crash_get", method="GET"), 502, "upstream_unreachable")
        assert flaky.gate_stats("plain")["heads"] - before <= 22  # calls + 10%
    finally:
        flaky.gate("plain", hangup=0)
