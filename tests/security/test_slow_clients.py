"""Slow and abusive clients against the hostile Regate (http limits in conftest.HTTP:
1 s for a request head, 1 s for a policy-read body, 1 s idle in a streamed body,
24 connections, 4 calls in flight per agent)."""

from __future__ import annotations

import select
import socket
import threading
import time

import psutil
import pytest

from tests.conftest import OTHER_KEY
from tests.security.conftest import HTTP, _parse_one, assert_error, audit_for, exchange, request

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def still_alive(judge):
    yield
    judge.alive()


def trickle(port: int, first: bytes, piece: bytes, every: float, for_s: float,
            sent: threading.Semaphore | None = None) -> tuple[bytes, float, bool]:
    """Send `first`, then `piece` every `every` seconds until the server answers or closes,
    or `for_s` passes. (what came back, seconds from the first byte to the answer, closed).
    `sent` is released once `first` is sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(first)
        if sent is not None:
            sent.release()
        got = b""
        closed = False
        while time.monotonic() - t0 < for_s:
            ready, _, _ = select.select([s], [], [], every)
            if ready:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                got += chunk
                continue
            try:
                s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        return got, time.monotonic() - t0, closed


def test_slowloris_head_is_cut_with_408(hostile):
    got, took, closed = trickle(hostile.port, b"GET /tools/search/q HTTP/1.1\r\nHost: x\r\n", b"X-A: 1\r\n",
                                every=0.2, for_s=6)
    resp, _ = _parse_one(got, True)
    assert resp is not None, got
    assert_error(resp, 408, "header_timeout")
    assert closed
    assert HTTP["header_timeout_s"] <= took < HTTP["header_timeout_s"] + 1.5, took


def test_many_slowloris_connections_do_not_slow_anyone_else(hostile):
    results = []
    sent = threading.Semaphore(0)
    threads = [threading.Thread(target=lambda: results.append(trickle(
        hostile.port, b"GET /tools/search/q HTTP/1.1\r\n", b"X", every=0.1, for_s=5, sent=sent)))
        for _ in range(12)]
    for t in threads:
        t.start()
    for _ in range(12):  # every slowloris connection is open and trickling
        assert sent.acquire(timeout=20), "a slowloris connection did not open within 20 s"
    for _ in range(5):
        t0 = time.monotonic()
        assert exchange(hostile.port, request("GET", "/tools/search/busy")).first.status == 200
        # Served while the slowloris connections still hang on (they are cut at the 1 s head
        # deadline): what matters is that it did not wait for them, not a wall-clock figure.
        assert all(t.is_alive() for t in threads), f"served only after the slowloris ended ({results})"
        assert time.monotonic() - t0 < 1.0
    for t in threads:
        t.join()
    assert len(results) == 12 and all(closed and took < 3 for _, took, closed in results), \
        [(took, closed) for _, took, closed in results]


def test_a_slow_but_timely_head_and_an_idle_keepalive_are_served(hostile):
    full = request("GET", "/tools/search/a", close=False)
    pieces = [full[:20], full[20:45], full[45:]]
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=5) as s:
        for p in pieces:
            s.sendall(p)
            time.sleep(0.1)  # 0.2 s in all: well inside the 1 s head deadline
        buf = b""
        while (resp := _parse_one(buf, False)[0]) is None:
            buf += s.recv(65536)
        assert resp.status == 200
        # Idle past the head deadline (but inside keep-alive): not a slowloris, the next call is served.
        time.sleep(1.5)
        s.sendall(b"".join(pieces).replace(b"/tools/search/a", b"/tools/search/b"))
        buf = b""
        while (resp := _parse_one(buf, False)[0]) is None:
            chunk = s.recv(65536)
            assert chunk, "closed an idle keep-alive connection as if it were slow"
            buf += chunk
        assert resp.status == 200


def test_a_slow_body_policy_reads_is_cut_with_408_and_forwards_nothing(judge):
    head = request("POST", "/tools/shell/run", content_type="application/json",
                   headers=[("Content-Length", "100")])
    t0 = time.monotonic()
    ex, got = judge([head, b'{"command": '], timeout=6)
    took = time.monotonic() - t0
    err = assert_error(ex.first, 408, "body_timeout")
    assert got == []
    assert took < HTTP["body_timeout_s"] + 1.5, took
    recs = audit_for(judge.regate.audit_dir, err["decision_id"], "decision")
    assert [r["code"] for r in recs] == ["body_timeout"]


def test_a_streamed_body_that_stalls_is_cut_with_408_and_recorded(judge):
    head = request("POST", "/tools/search/upload", content_type="application/octet-stream",
                   headers=[("Content-Length", "100000")])
    ex, got = judge([head, b"x" * 1000], timeout=6)
    err = assert_error(ex.first, 408, "body_timeout")
    # It was allowed and forwarded as a stream: the tool saw a request it never got the end of.
    assert len(got) == 1 and got[0]["decision_id"] == err["decision_id"]
    assert got[0]["complete"] is False
    recs = audit_for(judge.regate.audit_dir, err["decision_id"])
    kinds = {r["kind"]: r for r in recs}
    assert kinds["decision"]["decision"] == "allow"
    deadline = time.monotonic() + 2
    while "outcome" not in kinds and time.monotonic() < deadline:
        kinds = {r["kind"]: r for r in audit_for(judge.regate.audit_dir, err["decision_id"])}
    assert kinds["outcome"]["code"] == "body_timeout" and kinds["outcome"]["status"] == 408


def test_a_client_that_stops_reading_holds_bounded_memory_and_is_cut(hostile):
    proc = psutil.Process(hostile.pid)
    rss0 = proc.memory_info().rss
    size = 512 << 20
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", hostile.port))
        s.sendall(request("GET", f"/tools/dl/download?size={size}"))
        peak = rss0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # not reading, past the tool's 1.5 s deadline: Regate's writes stall
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
        # Now drain what is there: the stream ends long before `size` (cut at the 1.5 s deadline).
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    assert peak - rss0 < 32 << 20, f"RSS grew {(peak - rss0) >> 20} MiB for one client that does not read"
    assert received < size // 4, received


def test_connection_cap_answers_503_and_recovers(hostile):
    cap = HTTP["max_connections"]
    time.sleep(0.3)  # connections of earlier tests are gone
    held = [socket.create_connection(("127.0.0.1", hostile.port), timeout=5) for _ in range(cap)]
    try:
        time.sleep(0.2)
        ex = exchange(hostile.port, request("GET", "/tools/search/over"), responses=2, timeout=3)
        assert_error(ex.first, 503, "too_many_connections")
        assert ex.first.header("Retry-After") == "1"
        assert ex.closed
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 3
    while True:
        ex = exchange(hostile.port, request("GET", "/tools/search/after"), timeout=3)
        if ex.first.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ex.first.status == 200


def test_per_agent_concurrency_cap_is_429_for_that_agent_only(judge, hostile):
    cap = HTTP["max_concurrent_per_agent"]
    slow = []
    threads = [threading.Thread(target=lambda: slow.append(
        exchange(hostile.port, request("GET", "/tools/search/slow?s=1.0"), timeout=5).first.status))
        for _ in range(cap)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    ex = exchange(hostile.port, request("GET", "/tools/search/one-more"), timeout=3)
    err = assert_error(ex.first, 429, "too_many_concurrent")
    assert ex.first.header("Retry-After") == "1"
    assert audit_for(hostile.audit_dir, err["decision_id"], "decision")[0]["code"] == "too_many_concurrent"
    # Another agent is not held back by coder-7's calls.
    assert exchange(hostile.port, request("GET", "/tools/search/other", key=OTHER_KEY)).first.status == 200
    for t in threads:
        t.join()
    assert slow == [200] * cap
    assert exchange(hostile.port, request("GET", "/tools/search/again")).first.status == 200


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
def test_a_body_whose_chunked_framing_breaks_midway_is_400_at_once(hostile, content_type):
    # The head and a first chunk arrive, the call starts reading its body (for the policy,
    # or streaming it to the tool); then a chunk size that is not hex. aiohttp's parser gives
    # up, but left alone the body's reader would wait for the body timeout.
    head = request("POST", "/tools/search/q", content_type=content_type,
                   headers=[("Transfer-Encoding", "chunked")])
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=5) as s:
        s.sendall(head + b"5\r\n{\"q\":\r\n")
        time.sleep(0.3)
        t0 = time.monotonic()
        s.sendall(b"ZZ\r\nxx\r\n0\r\n\r\n")
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        took = time.monotonic() - t0
    resp, rest = _parse_one(got, True)
    assert resp is not None, got
    assert_error(resp, 400, "bad_body")
    assert rest == b"", rest  # one answer for one request, and the connection is closed
    assert took < HTTP["body_timeout_s"] / 2, took
