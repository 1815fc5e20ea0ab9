"""Decision logs in OPA's format (proxy/decisionlogs): masking pointers, the
bounded buffer and its batches, the upload schedule, and end to end — a real
Regate process uploading to a real HTTP collector started by the test, through
a collector outage."""

from __future__ import annotations

import asyncio
import gzip
import importlib.metadata
import json
import random
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.config import Config, ConfigError, load as load_config
from proxy.decisionlogs import (
    DecisionLogger, Entry, EventBuffer, EventEncoder, MaskError, apply_mask, backoff_s, parse_pointer,
    parse_rules, rfc3339_ns, upload_due,
)
from tests.conftest import AGENT_KEY
from tests.support.procs import ROOT, RegateProcess, free_port


# --------------------------------------------------------------------------
# mask pointers


@pytest.mark.parametrize("pointer, parts", [
    ("/input", ["input"]),
    ("/input/request/headers/x-secret", ["input", "request", "headers", "x-secret"]),
    ("/input/a~1b", ["input", "a/b"]),
    ("/input/a~0b", ["input", "a~b"]),
    ("/input/~01", ["input", "~1"]),      # ~0 then 1: "~1" literally, not "/"
    ("/input/~10", ["input", "/0"]),
    ("/result/reasons/0", ["result", "reasons", "0"]),
    ("/input/", ["input", ""]),           # the empty key
])
def test_pointer_parts_unescape_as_rfc6901(pointer, parts):
    assert parse_pointer(pointer) == parts


@pytest.mark.parametrize("pointer, says", [
    ("input/x", "starting with '/'"),
    ("", "starting with '/'"),
    ("/labels/id", "/input or /result"),
    ("/input/a~2", "~0"),
    ("/input/a~", "~0"),
])
def test_bad_pointers_are_refused_with_the_reason(pointer, says):
    with pytest.raises(MaskError, match=re.escape(says)):
        parse_pointer(pointer)


def _event(doc, result=None):
    ev = {"input": doc}
    if result is not None:
        ev["result"] = result
    return ev


def test_remove_takes_keys_and_array_items_and_leaves_the_original_alone():
    doc = {"request": {"headers": {"x-secret": "s", "a/b": 1, "t~": 2, "keep": "k"}, "body": {"xs": [1, 2, 3]}},
           "agent": {"id": "a"}}
    before = orjson.dumps(doc)
    rules = parse_rules(["/input/request/headers/x-secret", "/input/request/headers/a~1b",
                         "/input/request/headers/t~0", "/input/request/body/xs/1"])
    out = apply_mask(_event(doc), rules)
    assert out["input"]["request"]["headers"] == {"keep": "k"}
    assert out["input"]["request"]["body"]["xs"] == [1, 3]
    assert out["erased"] == ["/input/request/headers/x-secret", "/input/request/headers/a~1b",
                             "/input/request/headers/t~0", "/input/request/body/xs/1"]
    assert orjson.dumps(doc) == before  # the engine's document is untouched
    assert out["input"]["agent"] is doc["agent"]  # what no rule touched is shared, not copied


def test_pointers_to_nothing_are_ignored_and_not_listed():
    doc = {"request": {"headers": {}, "body": None, "xs": [1]}}
    rules = parse_rules(["/input/request/headers/absent", "/input/request/body/x", "/input/nope/deeper",
                         "/input/request/xs/5", "/input/request/xs/01", "/result/allow"])
    out = apply_mask(_event(doc), rules)
    assert out == {"input": doc}
    assert "erased" not in out


def test_upsert_overwrites_or_creates_and_is_listed_as_masked():
    doc = {"request": {"headers": {"x-token": "t"}}}
    rules = parse_rules([{"op": "upsert", "path": "/input/request/headers/x-token", "value": "**REDACTED**"},
                         {"op": "upsert", "path": "/input/extra/note", "value": 1},
                         {"op": "remove", "path": "/result/reasons"}])
    out = apply_mask(_event(doc, {"allow": True, "reasons": ["r"]}), rules)
    assert out["input"]["request"]["headers"]["x-token"] == "**REDACTED**"
    assert out["input"]["extra"] == {"note": 1}
    assert out["result"] == {"allow": True}
    assert out["masked"] == ["/input/request/headers/x-token", "/input/extra/note"]
    assert out["erased"] == ["/result/reasons"]
    assert doc == {"request": {"headers": {"x-token": "t"}}}


def test_removing_the_whole_input_drops_the_key():
    out = apply_mask(_event({"a": 1}, {"allow": True}), parse_rules(["/input"]))
    assert "input" not in out and out["erased"] == ["/input"]


@pytest.mark.parametrize("rule, says", [
    ({"op": "replace", "path": "/input/x"}, "remove or upsert"),
    ({"op": "upsert", "path": "/input/x"}, "needs a value"),
    ({"path": "/input/x", "colour": 1}, "keys"),
    (3, "JSON pointer string"),
])
def test_bad_mask_objects_are_refused(rule, says):
    with pytest.raises(MaskError, match=re.escape(says)):
        parse_rules(["/input/ok", rule])


def test_config_names_the_bad_mask_and_defaults_to_off(tmp_path):
    cfg = Config(tools=[{"name": "t", "upstream": "http://127.0.0.1:1"}])
    assert cfg.decision_logs.url is None
    path = tmp_path / "regate.yaml"
    path.write_text("tools: [{name: t, upstream: 'http://127.0.0.1:1'}]\n"
                    "decision_logs: {url: 'http://127.0.0.1:2', mask: ['/input/ok', '/labels/id']}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "decision_logs.mask" in str(exc.value) and "[1]" in str(exc.value)
    path.write_text("tools: [{name: t, upstream: 'http://127.0.0.1:1'}]\n"
                    "decision_logs: {url: 'http://127.0.0.1:2', labels: {id: mine}}\n")
    with pytest.raises(ConfigError, match="set by Regate"):
        load_config(path)


def test_no_url_builds_nothing_and_a_url_hooks_the_policy_stage(tmp_path):
    from proxy.app import Regate

    base = {"auth": {"mode": "none"}, "audit": {"enabled": False}, "limits": {"enabled": False},
            "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
            "tools": [{"name": "search", "upstream": "http://127.0.0.1:1"}]}
    off = Regate(Config(**base))
    assert off.decision_logs is None and off.policy.decision_log is None
    on = Regate(Config(**base, decision_logs={"url": "http://127.0.0.1:2"}))
    assert on.policy.decision_log is on.decision_logs is not None


# --------------------------------------------------------------------------
# events, the buffer and batches


def test_timestamps_are_rfc3339_utc_with_nanoseconds():
    assert rfc3339_ns(0) == "1970-01-01T00:00:00.000000000Z"
    assert rfc3339_ns(1767225600_000000007) == "2026-01-01T00:00:00.000000007Z"
    assert rfc3339_ns(1767225600_123456789) == "2026-01-01T00:00:00.123456789Z"


def _entry(i: int, est: int = 100) -> Entry:
    return Entry(f"id{i}", "sha256:r", {"n": i}, {"allow": True}, None, 0, 2000, 1000, "127.0.0.1", est)


def test_the_event_carries_opas_fields():
    enc = EventEncoder(path="regate/decision", bundle="regate", labels={"id": "i", "version": "v"},
                       rules=parse_rules(["/input/n"]), eval_timer="timer_rego_query_eval_ns")
    ev = orjson.loads(enc.encode(_entry(7)))
    assert ev == {
        "labels": {"id": "i", "version": "v"}, "decision_id": "id7", "path": "regate/decision", "input": {},
        "result": {"allow": True}, "bundles": {"regate": {"revision": "sha256:r"}}, "requested_by": "127.0.0.1",
        "timestamp": "1970-01-01T00:00:00.000000000Z",
        "metrics": {"timer_server_handler_ns": 2000, "timer_rego_query_eval_ns": 1000}, "erased": ["/input/n"],
    }
    err = Entry("e", "sha256:r", {}, None, {"code": "engine_error", "message": "down"}, 0, 1, 1, None, 1)
    ev = orjson.loads(enc.encode(err))
    assert ev["error"] == {"code": "engine_error", "message": "down"} and "result" not in ev


def _json_event(size: int) -> bytes:
    return b'"' + b"x" * (size - 2) + b'"'


def test_batches_fill_up_to_batch_max_bytes_in_order():
    buf = EventBuffer(max_bytes=1 << 20, batch_max_bytes=350)
    for i in range(10):
        buf.add_encoded(_json_event(100))
    sizes = []
    for _ in range(10):
        batch = buf.take_batch()
        if not batch:
            break
        body = buf.body(batch)
        assert len(body) <= 350 and json.loads(body) == ["x" * 98] * len(batch)
        sizes.append(len(batch))
        buf.delivered()
    assert sizes == [3, 3, 3, 1]  # 1 + 3 * 101 = 304 <= 350 < 1 + 4 * 101


@pytest.mark.parametrize("size, kept", [(98, True), (99, False)])
def test_an_event_that_cannot_fit_one_batch_is_dropped_as_too_large(size, kept):
    buf = EventBuffer(max_bytes=1 << 20, batch_max_bytes=100)
    buf.add_encoded(_json_event(size))  # "[" + event + "]" must fit 100 bytes
    assert (len(buf.encoded) == 1) is kept
    assert buf.dropped["too_large"] == (0 if kept else 1)
    if kept:
        assert len(buf.body(buf.take_batch())) == 100


def test_full_batch_ready_counts_the_array_framing():
    buf = EventBuffer(max_bytes=1 << 20, batch_max_bytes=304)
    for _ in range(2):
        buf.add_encoded(_json_event(100))
    assert not buf.full_batch_ready()
    buf.add_encoded(_json_event(100))
    assert buf.full_batch_ready()  # 1 + 3 * 101 = 304


def test_the_bound_drops_oldest_encoded_first_then_oldest_pending():
    buf = EventBuffer(max_bytes=1000, batch_max_bytes=10_000)
    buf.add_encoded(_json_event(400))
    buf.add_encoded(_json_event(400))
    buf.add(_entry(1, est=300))  # 1100 > 1000: the oldest encoded event goes
    assert len(buf.encoded) == 1 and len(buf.pending) == 1 and buf.dropped["buffer_full"] == 1
    buf.add(_entry(2, est=300))  # 1000: fits
    buf.add(_entry(3, est=300))  # 1300: the last encoded one goes
    assert len(buf.encoded) == 0 and [e.decision_id for e in buf.pending] == ["id1", "id2", "id3"]
    buf.add(_entry(4, est=300))  # 1200: now the oldest pending entry
    assert [e.decision_id for e in buf.pending] == ["id2", "id3", "id4"]
    assert buf.dropped["buffer_full"] == 3 and buf.pending_bytes == 900


def test_a_failed_batch_goes_back_in_front_and_the_bound_applies_again():
    buf = EventBuffer(max_bytes=600, batch_max_bytes=350)
    events = [b'"%03d' % i + b"x" * 95 + b'"' for i in range(5)]  # 100 bytes each, numbered
    for e in events:
        buf.add_encoded(e)
    batch = buf.take_batch()
    assert batch == events[:3] and buf.in_flight == 3
    for i in range(5, 9):  # while the batch is out, new events arrive: the buffer holds 2 + 4
        buf.add_encoded(b'"%03d' % i + b"x" * 95 + b'"')
    assert buf.dropped["buffer_full"] == 0
    buf.requeue(batch)  # 9 events, 900 bytes: the 3 oldest (the failed batch) go
    assert buf.in_flight == 0 and buf.dropped["buffer_full"] == 3
    assert [e[1:4] for e in buf.encoded] == [b"%03d" % i for i in range(3, 9)]


def test_every_event_is_delivered_once_or_counted_dropped_once():
    rng = random.Random(19)
    buf = EventBuffer(max_bytes=3000, batch_max_bytes=900)
    added = delivered = 0
    seen: set[bytes] = set()
    for step in range(5000):
        op = rng.random()
        if op < 0.5:
            n = added
            added += 1
            buf.add(SimpleNamespace(est=rng.randint(50, 400), n=n))
        elif op < 0.7:
            for e in buf.take_pending(rng.randint(1, 5)):
                buf.add_encoded(b'"%06d' % e.n + b"y" * (e.est - 8) + b'"')
        elif op < 0.8:
            buf.add_encoded(b'"' + b"z" * 1000 + b'"')  # too large for a batch
            added += 1
        else:
            batch = buf.take_batch()
            if rng.random() < 0.6:
                buf.delivered()
                for b in batch:
                    assert b not in seen
                    seen.add(b)
                delivered += len(batch)
            else:
                buf.requeue(batch)
        assert buf.encoded_bytes + buf.pending_bytes <= buf.max_bytes or len(buf.pending) == 1
        assert buf.encoded_bytes == sum(map(len, buf.encoded))
        held = len(buf.encoded) + len(buf.pending) + buf.in_flight
        assert added == delivered + sum(buf.dropped.values()) + held, step


# --------------------------------------------------------------------------
# when to upload, and how long to wait after a failure


@pytest.mark.parametrize("now, last_flush, retry_at, waiting, full, expected", [
    (10.0, 9.0, 0.0, False, False, "none"),  # nothing waiting
    (10.0, 9.0, 0.0, True, False, "none"),   # a partial batch, flush_s (5) not passed
    (10.0, 9.0, 0.0, True, True, "full"),    # a full batch goes at once
    (14.0, 9.0, 0.0, True, False, "all"),    # flush_s passed: the partial one goes too
    (14.0, 9.0, 14.5, True, True, "none"),   # backing off: nothing, even a full batch
    (14.5, 9.0, 14.5, True, False, "all"),   # the backoff is over
])
def test_upload_schedule(now, last_flush, retry_at, waiting, full, expected):
    assert upload_due(now, last_flush, 5.0, retry_at, waiting, full) == expected


@pytest.mark.parametrize("retries, rand, expected", [
    (1, 1.0, 0.5), (2, 1.0, 1.0), (3, 1.0, 2.0), (8, 1.0, 60.0), (9, 1.0, 60.0),  # doubling, capped
    (1, 0.0, 0.25), (3, 0.5, 1.5), (8, 0.0, 30.0),                               # jitter: 50..100 %
    (10_000, 1.0, 60.0),                                                          # no overflow
])
def test_backoff_doubles_with_jitter_up_to_the_cap(retries, rand, expected):
    assert backoff_s(retries, 0.5, 60.0, lambda: rand) == pytest.approx(expected)


# --------------------------------------------------------------------------
# a real collector


class Collector:
    """An OPA decision-log service: POST /logs, gzip'd JSON arrays. `mode`: ok (store, 204),
    fail (500, store nothing), hang (wait `hang_s`, then 500)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.hang_s = 3.0
        self.posts: list[dict] = []
        self.events: list[dict] = []
        self.refused = 0
        self._runner: web.AppRunner | None = None

    async def _logs(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if self.mode == "hang":
            await asyncio.sleep(self.hang_s)
        if self.mode != "ok":
            self.refused += 1
            return web.Response(status=500, text="collector unavailable")
        body = gzip.decompress(raw)
        events = json.loads(body)
        self.posts.append({"path": request.path, "headers": dict(request.headers), "raw": raw, "body": body,
                           "events": events})
        self.events.extend(events)
        return web.Response(status=204)

    async def start(self) -> str:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/logs", self._logs)
        app.router.add_post("/custom/path", self._logs)
        # The raw body as sent: the test gunzips it itself.
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def ids(self) -> list[str]:
        return [e["decision_id"] for e in self.events]

    async def wait_for(self, ids, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(ids) <= set(self.ids()):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"events {sorted(set(ids) - set(self.ids()))} did not arrive in {timeout}s")


async def test_the_logger_batches_on_the_wire_and_flushes_a_partial_batch():
    """DecisionLogger against the collector, in this process: batches by size, in order."""
    collector = Collector()
    url = await collector.start()
    cfg = Config(tools=[{"name": "t", "upstream": "http://127.0.0.1:1"}],
                 decision_logs={"url": url, "batch_max_bytes": 2048, "flush_s": 0.2}).decision_logs
    logger = DecisionLogger(cfg, decision_path="regate/decision", engine_name="embedded")
    await logger.start()
    try:
        for i in range(20):
            call = SimpleNamespace(id=f"d{i:02d}", revision="sha256:x", body_size=0,
                                   request=SimpleNamespace(remote="10.0.0.1"))
            logger.log(call, {"i": i, "pad": "p" * 200}, {"allow": True}, time.perf_counter_ns(),
                       time.perf_counter_ns())
        await collector.wait_for([f"d{i:02d}" for i in range(20)], timeout=10)
    finally:
        await logger.close()
        await collector.stop()
    assert collector.ids() == [f"d{i:02d}" for i in range(20)]
    assert len(collector.posts) > 1 and all(len(p["body"]) <= 2048 for p in collector.posts)
    assert logger.uploaded == 20 and sum(logger.buffer.dropped.values()) == 0


# --------------------------------------------------------------------------
# end to end: a real Regate, a real collector

ECHO = """package regate
import rego.v1
# The decision carries the input the engine was given, so the test can compare it with the event's.
decision := {"allow": input.request.method == "GET", "reasons": [json.marshal(input)]}
"""

SHIPPED = {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")}


def _bundle(tmp: Path, rego: str) -> dict:
    (tmp / "rego").mkdir(parents=True, exist_ok=True)
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    (tmp / "rego" / "policy.rego").write_text(rego)
    return {"rego": str(tmp / "rego"), "data": str(tmp / "data")}


def _regate(tmp: Path, keys_file: Path, upstream: str, policy: dict, decision_logs: dict) -> RegateProcess:
    return RegateProcess({
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": policy,
        "tools": [{"name": n, "upstream": upstream, "timeout_ms": 5000} for n in ("search", "shell")],
        "decision_logs": decision_logs,
    }, tmp)


async def _call(session: aiohttp.ClientSession, url: str, path: str, *, key: str = AGENT_KEY, method: str = "GET",
                json_body=None, headers=None) -> tuple[int, dict]:
    async with session.request(method, url + path, json=json_body,
                               headers={"X-Api-Key": key, **(headers or {})}) as r:
        await r.read()
        return r.status, dict(r.headers)


async def _status(session: aiohttp.ClientSession, proc: RegateProcess) -> dict:
    async with session.get(proc.admin_url + "/admin/status", headers=proc.admin_headers) as r:
        assert r.status == 200
        return (await r.json())["decision_logs"]


async def _dropped_metric(session: aiohttp.ClientSession, proc: RegateProcess) -> float:
    async with session.get(proc.admin_url + "/metrics") as r:
        text = await r.text()
    return sum(float(m.group(1)) for m in re.finditer(r'^regate_decision_logs_dropped_total\{[^}]*\} (\S+)$', text,
                                                       re.M))


async def test_events_arrive_gzipped_in_opas_shape_with_masked_fields_removed(upstream, keys_file, tmp_path):
    collector = Collector()
    url = await collector.start()
    proc = _regate(tmp_path, keys_file, upstream, _bundle(tmp_path, ECHO), {
        "url": url, "resource": "/custom/path", "flush_s": 0.2, "labels": {"team": "platform"},
        "headers": {"Authorization": "Bearer logs-token"},
        "mask": ["/input/request/headers/x-secret",
                 {"op": "upsert", "path": "/input/request/headers/x-masked", "value": "**REDACTED**"}],
    })
    try:
        async with aiohttp.ClientSession() as s:
            secret = {"X-Secret": "s3cret", "X-Masked": "hide-me", "X-Keep": "kept"}
            allowed = await _call(s, proc.url, "/tools/search/q?x=1", headers=secret)
            denied = await _call(s, proc.url, "/tools/shell/run", method="POST", json_body={"command": "ls"},
                                 headers=secret)
            unknown_key = await _call(s, proc.url, "/tools/search/q", key="not-a-key")
            no_route = await _call(s, proc.url, "/tools/nowhere/x")
            assert allowed[0] == 200 and denied[0] == 403 and unknown_key[0] == 401 and no_route[0] == 404
            judged = [allowed[1]["X-Regate-Decision-Id"], denied[1]["X-Regate-Decision-Id"]]
            await collector.wait_for(judged)
            await asyncio.sleep(0.5)  # a refused call's event, had there been one, would have come too
            status = await _status(s, proc)
    finally:
        proc.stop()
        await collector.stop()

    for post in collector.posts:
        h = post["headers"]
        assert post["path"] == "/custom/path"
        assert h["Content-Type"] == "application/json" and h["Content-Encoding"] == "gzip"
        assert h["Authorization"] == "Bearer logs-token"
        assert post["raw"][:2] == b"\x1f\x8b" and isinstance(post["events"], list)
    # Calls refused before the policy (401, 404) have no decision and no event.
    assert sorted(collector.ids()) == sorted(judged)
    by_id = {e["decision_id"]: e for e in collector.events}
    revision = allowed[1]["X-Regate-Policy-Revision"]
    assert revision.startswith("sha256:") and denied[1]["X-Regate-Policy-Revision"] == revision
    instance = {e["labels"]["id"] for e in collector.events}
    assert len(instance) == 1 and uuid.UUID(instance.pop())
    for decision_id, allow in zip(judged, (True, False)):
        ev = by_id[decision_id]
        assert ev["path"] == "regate/decision"
        assert ev["bundles"] == {"regate": {"revision": revision}}
        assert ev["labels"]["version"] == importlib.metadata.version("regate")
        assert ev["labels"]["team"] == "platform"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", ev["timestamp"])
        m = ev["metrics"]
        assert set(m) == {"timer_server_handler_ns", "timer_rego_query_eval_ns"}
        assert 0 < m["timer_rego_query_eval_ns"] <= m["timer_server_handler_ns"] < 1e9
        assert ev["requested_by"] == "127.0.0.1"
        assert ev["result"]["allow"] is allow
        headers = ev["input"]["request"]["headers"]
        assert "x-secret" not in headers and headers["x-masked"] == "**REDACTED**" and headers["x-keep"] == "kept"
        assert ev["erased"] == ["/input/request/headers/x-secret"]
        assert ev["masked"] == ["/input/request/headers/x-masked"]
        # The event's input is the document the engine evaluated, masked on the way out only.
        seen = json.loads(ev["result"]["reasons"][0])
        assert seen["request"]["headers"]["x-secret"] == "s3cret"
        seen["request"]["headers"].pop("x-secret")
        seen["request"]["headers"]["x-masked"] = "**REDACTED**"
        assert seen == ev["input"]
    assert by_id[judged[1]]["input"]["request"]["body"] == {"command": "ls"}
    assert status["enabled"] and status["uploaded"] == 2 and status["dropped_total"] == 0
    assert "logs-token" not in json.dumps(status)


async def test_a_collector_outage_loses_only_what_the_buffer_bound_drops(upstream, keys_file, tmp_path):
    collector = Collector()
    url = await collector.start()
    proc = _regate(tmp_path, keys_file, upstream, SHIPPED, {
        "url": url, "flush_s": 0.2, "batch_max_bytes": 4096, "buffer_max_bytes": 8192,
        "timeout_s": 5, "backoff_min_s": 0.1, "backoff_max_s": 0.4,
    })
    sent: list[str] = []
    try:
        async with aiohttp.ClientSession() as s:

            async def calls(n: int) -> list[float]:
                took = []
                for i in range(n):
                    t0 = time.perf_counter()
                    status, headers = await _call(s, proc.url, f"/tools/search/q?i={i}")
                    took.append(time.perf_counter() - t0)
                    assert status == 200
                    sent.append(headers["X-Regate-Decision-Id"])
                return took

            await calls(3)
            await collector.wait_for(sent)
            # The collector hangs (2 s, then 500), then answers 500 at once, for a while.
            collector.hang_s = 2.0
            collector.mode = "hang"
            hung = await calls(25)
            await asyncio.sleep(0.5)
            collector.mode = "fail"
            failing = await calls(25)
            await asyncio.sleep(2.0)  # the hung upload has failed by now; retries keep failing
            during = await _status(s, proc)
            # Calls neither waited for the collector nor were refused.
            assert max(hung + failing) < 1.5, max(hung + failing)
            assert during["upload_errors"] >= 1 and during["last_error"] and during["dropped_total"] > 0
            assert during["buffered_bytes"] <= 8192
            collector.mode = "ok"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                after = await _status(s, proc)
                if after["buffered_events"] == 0 and after["in_flight_events"] == 0:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"buffer did not drain: {after}")
            dropped = await _dropped_metric(s, proc)
    finally:
        proc.stop()
        await collector.stop()

    arrived = collector.ids()
    assert len(arrived) == len(set(arrived)), "an event arrived twice"
    assert set(arrived) <= set(sent)
    lost = len(sent) - len(arrived)
    assert lost > 0
    assert dropped == lost == after["dropped_total"] == after["dropped"]["buffer_full"], (len(sent), after)
    assert after["uploaded"] == len(arrived) and after["logged"] == len(sent)
    # The oldest went: the newest calls of the outage arrived after it.
    assert set(sent[-3:]) <= set(arrived)
    assert collector.refused >= 2


async def test_no_collector_at_all_costs_calls_nothing(upstream, keys_file, tmp_path):
    proc = _regate(tmp_path, keys_file, upstream, SHIPPED, {
        "url": f"http://127.0.0.1:{free_port()}", "flush_s": 0.1, "backoff_min_s": 0.1, "backoff_max_s": 0.2,
    })
    try:
        async with aiohttp.ClientSession() as s:
            took = []
            for i in range(20):
                t0 = time.perf_counter()
                status, _ = await _call(s, proc.url, f"/tools/search/q?i={i}")
                took.append(time.perf_counter() - t0)
                assert status == 200
            await asyncio.sleep(0.5)
            status = await _status(s, proc)
    finally:
        proc.stop()
    assert max(took) < 1.5
    assert status["logged"] == 20 and status["uploaded"] == 0 and status["upload_errors"] >= 1
    assert "Connect" in status["last_error"] or "connect" in status["last_error"]
    assert status["buffered_events"] + status["dropped_total"] == 20
