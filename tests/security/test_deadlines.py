"""No call without a deadline, none that outlives its agent, and no request target
that is anything but a path.

A Regate of its own (module fixture) sits in front of the witness and of a silent
tool: a real socket server that accepts connections, reads whatever it is sent and
never answers. Against it: `Expect: 100-continue` (Regate answers it itself and
never forwards it; the silent tool could otherwise hold a call for ever), an agent
that hangs up mid-call (the upstream request is cancelled, the slot freed, the
audit says `client_disconnected`), and request targets that are not paths
(absolute-form, CONNECT, `OPTIONS *`, fragments, no leading slash), on both a
prefix-routed and a host-routed tool.
"""

from __future__ import annotations

import hashlib
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import yaml

from tests.security.conftest import (
    HTTP,
    Response,
    _parse_one,
    assert_error,
    audit_for,
    audit_records,
    exchange,
    policy_data,
)
from proxy.upstream import HeadDeadlines
from tests.support.procs import ROOT, RegateProcess

pytestmark = pytest.mark.timeout(90)

SILENT_TIMEOUT_MS = 500     # the silent tool's deadline
LONG_TIMEOUT_MS = 20_000    # a deadline no test waits for: what ends those calls is the hang-up
SLOTS = 4                   # http.max_concurrent_per_agent
AGENTS = [f"deadline-agent-{i:02d}" for i in range(25)]
KEY = {a: f"key-{a}" for a in AGENTS}
HOSTED = "hosted.test"      # the host-routed tool's Host
BIG_BODY = 8 << 20          # more than the sockets between Regate and a tool that never reads hold


class SilentTool:
    """Accepts connections and reads them; never writes a byte. Keeps what each
    connection sent, and how many are open, behind a condition to wait on.

    `deaf=True`: it does not even read (and its receive window is tiny), so a client
    sending it a large body stalls mid-write, until `listen()` drains what is queued.
    """

    def __init__(self, deaf: bool = False) -> None:
        self.sock = socket.socket()
        if deaf:  # inherited by accepted connections
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cond = threading.Condition()
        self.open = 0
        self.received: list[bytearray] = []   # per connection, in accept order
        self._reading = threading.Event()
        if not deaf:
            self._reading.set()
        self._unread: list[tuple[socket.socket, bytearray]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def listen(self) -> None:
        self._reading.set()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        while not self._stop:
            if self._unread and self._reading.is_set():
                for conn, buf in self._unread:
                    sel.register(conn, selectors.EVENT_READ, buf)
                self._unread.clear()
            for key, _ in sel.select(0.1):
                if key.data is None:
                    try:
                        conn, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    buf = bytearray()
                    if self._reading.is_set():
                        sel.register(conn, selectors.EVENT_READ, buf)
                    else:
                        self._unread.append((conn, buf))
                    with self.cond:
                        self.open += 1
                        self.received.append(buf)
                        self.cond.notify_all()
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                with self.cond:
                    if data:
                        if len(key.data) < 1 << 20:
                            key.data.extend(data)
                    else:
                        sel.unregister(conn)
                        conn.close()
                        self.open -= 1
                    self.cond.notify_all()
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        for conn, _ in self._unread:
            conn.close()

    def wait(self, predicate, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def heads(self) -> list[bytes]:
        with self.cond:
            return [bytes(b).split(b"\r\n\r\n", 1)[0] for b in self.received]

    def head_with(self, marker: bytes) -> bytes | None:
        for head in self.heads():
            if marker in head:
                return head
        return None

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def silent():
    s = SilentTool()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def deaf():
    s = SilentTool(deaf=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def deadlines(witness, silent, deaf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deadlines")
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"sha256": hashlib.sha256(KEY[a].encode()).hexdigest(), "agent": a} for a in AGENTS]}))
    data = policy_data(tmp)
    tools_yaml = data / "tools" / "data.yaml"
    doc = yaml.safe_load(tools_yaml.read_text())
    for name in ("hosted", "silent", "silentlong", "deaf"):
        doc[name] = {"public": True, "methods": ["GET", "POST"]}
    tools_yaml.write_text(yaml.safe_dump(doc))
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys)},
        "policy": {"rego": str(ROOT / "rego"), "data": str(data)},
        "http": {**HTTP, "max_connections": 256, "max_concurrent_per_agent": SLOTS},
        "tools": [
            {"name": "search", "upstream": witness.upstream("search"), "timeout_ms": 5000},
            {"name": "hosted", "host": HOSTED, "upstream": witness.upstream("hosted"), "timeout_ms": 5000},
            {"name": "silent", "upstream": silent.url, "timeout_ms": SILENT_TIMEOUT_MS},
            {"name": "silentlong", "upstream": silent.url, "timeout_ms": LONG_TIMEOUT_MS},
            # An upload tool: its body streams through unread, as it comes.
            {"name": "deaf", "upstream": deaf.url, "timeout_ms": SILENT_TIMEOUT_MS,
             "max_body_bytes": 4 * BIG_BODY, "unread_body": "forward"},
        ],
        # What is under test is the deadline itself: no breaker may step in after the timeouts.
        "breakers": {"tool": {"enabled": False}, "agent": {"enabled": False}, "loop": {"enabled": False}},
        "audit": {"dir": str(tmp / "audit"), "fsync": "never"},
    }
    proc = RegateProcess(cfg, tmp)
    proc.audit_dir = tmp / "audit"
    yield proc
    proc.stop()


# ------------------------------------------------------------------ clients


def head(method: str, path: str, agent: str, *, host: str = "regate.test", body: bytes | None = None,
         headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"X-Api-Key: {KEY[agent]}", "Connection: close"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_responses(s: socket.socket, buf: bytes, until: float, want: int) -> tuple[list[Response], bytes]:
    """Responses (interim ones included) until `want` have come, the peer closes or `until` passes."""
    got: list[Response] = []
    while len(got) < want:
        resp, buf = _parse_one(buf, False)
        if resp is not None:
            got.append(resp)
            continue
        left = until - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            resp, buf = _parse_one(buf, True)
            if resp is not None:
                got.append(resp)
            break
        buf += chunk
    return got, buf


def expect_call(port: int, agent: str, path: str, *, wait_for_continue: bool,
                timeout: float = 8.0) -> tuple[Response | None, Response | None, float]:
    """POST with `Expect: 100-continue`: either wait for the interim 100 before sending
    the body (as curl does) or send it at once. (the interim response, the final one,
    seconds from the first byte to the final answer)."""
    body = orjson.dumps({"q": path})
    data = head("POST", path, agent, body=body, headers=(("Expect", "100-continue"),))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t0 = time.monotonic()
        until = t0 + timeout
        interim = None
        buf = b""
        if wait_for_continue:
            s.sendall(data)
            got, buf = read_responses(s, buf, min(until, t0 + 3.0), 1)
            if not got:
                return None, None, time.monotonic() - t0
            interim = got[0]
            if interim.status != 100:  # answered without asking for the body
                return None, interim, time.monotonic() - t0
            s.sendall(body)
        else:
            s.sendall(data + body)
        got, buf = read_responses(s, buf, until, 2)
        if got and got[0].status == 100:
            interim = interim or got.pop(0)
        return interim, (got[0] if got else None), time.monotonic() - t0


def call(port: int, data: bytes, timeout: float = 8.0) -> tuple[Response | None, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        t0 = time.monotonic()
        s.sendall(data)
        got, _ = read_responses(s, b"", t0 + timeout, 1)
        return (got[0] if got else None), time.monotonic() - t0


def burst(port: int, agent: str, n: int = SLOTS) -> list[Response | None]:
    """n calls from one agent at the same time, to the silent tool: each holds its slot
    until the deadline, so a single slot leaked earlier turns one of them into 429."""
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(call, port, head("GET", f"/tools/silent/burst-{i}", agent)) for i in range(n)]
        return [f.result()[0] for f in futures]


def assert_no_slot_leaked(port: int, agents: list[str]) -> None:
    for agent in agents:
        for resp in burst(port, agent):
            assert resp is not None, f"{agent}: no answer"
            assert_error(resp, 504, "upstream_timeout")  # never 429 too_many_concurrent


def decisions_without_outcome(audit_dir, ids: set[str], wait: float = 5.0) -> set[str]:
    """Allow records among `ids` that have no outcome record (waiting a little: outcomes
    are written after the answer)."""
    deadline = time.monotonic() + wait
    while True:
        recs = audit_records(audit_dir)
        allowed = {r["decision_id"] for r in recs if r.get("kind") == "decision" and r["decision_id"] in ids
                   and r["decision"].startswith("allow")}
        done = {r["decision_id"] for r in recs if r.get("kind") == "outcome"}
        missing = allowed - done
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.05)


# ------------------------------------------------------------------ the head deadline's timer


class FakeLoop:
    """The two things HeadDeadlines asks of a loop: the time, and one timer."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[list] = []   # [when, callback, cancelled]

    def time(self) -> float:
        return self.now

    def call_at(self, when, callback):
        timer = [when, callback, False]
        self.timers.append(timer)

        class Handle:
            def cancel(self_inner) -> None:
                timer[2] = True
        return Handle()

    def armed(self) -> list[float]:
        return sorted(t[0] for t in self.timers if not t[2])

    def advance(self, to: float) -> None:
        self.now = to
        for timer in sorted(self.timers, key=lambda t: t[0]):
            if not timer[2] and timer[0] <= to:
                timer[2] = True
                timer[1]()


class FakeTask:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeCall:
    def __init__(self) -> None:
        self.extra: dict = {}


# (time, event, call, timeout) -> the calls cancelled so far, the timers armed after it.
HEAD_DEADLINES = [
    (0.0, "add", "a", 0.5, set(), [0.5]),
    (0.1, "add", "b", 0.5, set(), [0.5]),            # same timeout, later: no new timer
    (0.2, "add", "c", 0.2, set(), [0.4]),            # shorter: the timer moves earlier
    (0.3, "done", "c", 0.2, set(), [0.4]),           # finished in time: nothing to cancel at 0.4
    (0.4, "tick", None, None, set(), [0.5]),         # the timer fires, finds nothing due, re-arms
    (0.5, "tick", None, None, {"a"}, [0.6]),         # a is due; b's deadline is next
    (0.55, "done", "b", 0.5, {"a"}, [0.6]),
    (0.6, "tick", None, None, {"a"}, []),            # nothing in flight: no timer at all
    (1.0, "add", "d", 0.5, {"a"}, [1.5]),
    (1.5, "tick", None, None, {"a", "d"}, []),
]


def test_the_head_deadlines_share_one_timer():
    loop = FakeLoop()
    deadlines = HeadDeadlines(loop)
    calls = {name: FakeCall() for name in "abcd"}
    tasks = {name: FakeTask() for name in "abcd"}
    for at, event, name, timeout, cancelled, armed in HEAD_DEADLINES:
        loop.advance(at)
        if event == "add":
            deadlines.add(calls[name], timeout, tasks[name])
        elif event == "done":
            deadlines.discard(calls[name], timeout)
        assert {n for n, t in tasks.items() if t.cancelled} == cancelled, (at, event)
        assert {n for n, c in calls.items() if c.extra.get("deadline")} == cancelled, (at, event)
        assert loop.armed() == armed, (at, event, loop.armed())


# ------------------------------------------------------------------ Expect


def test_expect_100_continue_is_answered_by_regate_and_never_reaches_the_tool(deadlines, witness):
    before = witness.count()
    interim, final, _ = expect_call(deadlines.port, AGENTS[0], "/tools/search/expect", wait_for_continue=True)
    assert interim is not None and interim.status == 100, "Regate did not ask for the body"
    assert final is not None and final.status == 200, final
    got = witness.records(before)
    assert len(got) == 1 and got[0]["decision_id"] == final.decision_id, got
    names = {k.lower() for k, _ in got[0]["headers"]}
    assert "expect" not in names, got[0]["headers"]


@pytest.mark.parametrize("value", ["100-continue, x-magic", "x-magic", "200-ok"])
def test_an_expectation_regate_cannot_meet_is_417(deadlines, witness, value):
    before = witness.count()
    body = b'{"q": 1}'
    resp, _ = call(deadlines.port, head("POST", "/tools/search/x", AGENTS[0], body=body,
                                        headers=(("Expect", value),)) + body)
    assert resp is not None
    assert_error(resp, 417, "expectation_failed")
    assert witness.records(before) == []


def test_a_hundred_expect_calls_to_a_silent_tool_are_answered_and_leave_nothing_behind(deadlines, silent):
    """The attack of issue 18: each call used to wait for the tool's 100 for ever."""
    calls = [(agent, i % 2 == 0) for agent in AGENTS for i in range(SLOTS)]
    assert len(calls) == 100
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(expect_call, deadlines.port, agent, f"/tools/silent/expect-{n}",
                               wait_for_continue=wait)
                   for n, (agent, wait) in enumerate(calls)]
        results = [f.result() for f in futures]
    ids = set()
    for (agent, wait), (interim, final, took) in zip(calls, results):
        assert final is not None, f"{agent}: no answer within {took:.1f}s"
        assert_error(final, 504, "upstream_timeout")
        ids.add(final.decision_id)
        if wait:
            assert interim is not None and interim.status == 100
        # The deadline ended it: not before it, and not long after.
        assert SILENT_TIMEOUT_MS / 1000 - 0.05 <= took < SILENT_TIMEOUT_MS / 1000 + 2.5, took
    # The tool was asked for nothing it could hold a call with.
    heads = [h for h in silent.heads() if b"/expect-" in h]
    assert len(heads) == 100
    assert not [h for h in heads if b"\nexpect:" in h.lower()], "Expect reached the tool"
    # No upstream connection left open, no slot held, no allow record without its outcome.
    assert silent.wait(lambda: silent.open == 0, 5), f"{silent.open} upstream connections still open"
    assert decisions_without_outcome(deadlines.audit_dir, ids) == set()
    assert_no_slot_leaked(deadlines.port, AGENTS[:5])
    assert silent.wait(lambda: silent.open == 0, 5)


def test_a_tool_that_never_reads_the_body_still_meets_its_deadline(deadlines, deaf):
    """The request shape the socket timeouts miss: Regate is still writing the body when
    the deadline passes (the read timeout would start only after it)."""
    body = b"x" * BIG_BODY
    data = head("POST", "/tools/deaf/upload", AGENTS[9], body=body).replace(
        b"application/json", b"application/octet-stream") + body
    with socket.create_connection(("127.0.0.1", deadlines.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(data)
        got, _ = read_responses(s, b"", t0 + 8, 1)
        took = time.monotonic() - t0
    assert got, f"no answer within {took:.1f}s"
    assert_error(got[0], 504, "upstream_timeout")
    assert took < SILENT_TIMEOUT_MS / 1000 + 2.5, took
    deaf.listen()  # now it drains what was queued, and sees the connection cut
    assert deaf.wait(lambda: deaf.open == 0, 5), f"{deaf.open} upstream connections still open"
    received = sum(len(b) for b in deaf.received)
    assert received < len(data), "the whole body went through: the test did not stall the write"


# ------------------------------------------------------------------ hang-ups


def test_an_agent_that_hangs_up_mid_call_ends_it(deadlines, silent):
    agent = AGENTS[5]
    socks = []
    markers = [f"hangup-{i}-{time.monotonic_ns()}".encode() for i in range(SLOTS)]
    try:
        for m in markers:  # every slot the agent has, each held by a call at the silent tool
            s = socket.create_connection(("127.0.0.1", deadlines.port), timeout=5)
            s.sendall(head("GET", f"/tools/silentlong/{m.decode()}", agent))
            socks.append(s)
        assert silent.wait(lambda: all(silent.head_with(m) for m in markers), 5), "the calls never reached the tool"
    finally:
        t0 = time.monotonic()
        for s in socks:
            s.close()
    # The upstream requests are cancelled at once, not at the 20 s deadline.
    assert silent.wait(lambda: silent.open == 0, 3), f"{silent.open} upstream connections still open"
    assert time.monotonic() - t0 < 3
    for m in markers:
        did = next(line.split(b":", 1)[1].strip().decode() for line in silent.head_with(m).split(b"\r\n")
                   if line.lower().startswith(b"x-regate-decision-id:"))
        decision = audit_for(deadlines.audit_dir, did, "decision")
        assert [d["decision"] for d in decision] == ["allow"], decision
        outcome = audit_for(deadlines.audit_dir, did, "outcome", wait=5)
        assert len(outcome) == 1, outcome
        assert outcome[0]["code"] == "client_disconnected" and outcome[0]["status"] == 499, outcome
    assert_no_slot_leaked(deadlines.port, [agent])


def test_an_agent_that_hangs_up_during_a_streamed_answer_ends_the_call(deadlines, witness):
    """The answer had started (200 and some bytes); the call still ends when the agent
    leaves, and the outcome says so rather than a plain success."""
    agent = AGENTS[8]
    with socket.create_connection(("127.0.0.1", deadlines.port), timeout=5) as s:
        s.sendall(head("GET", "/tools/search/download?size=268435456", agent))
        buf = b""
        until = time.monotonic() + 5
        while b"\r\n\r\n" not in buf and time.monotonic() < until:  # the head, and hardly a byte more
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        lines = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 200"), buf[:300]
        did = next(ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("x-regate-decision-id:"))
    outcome = audit_for(deadlines.audit_dir, did, "outcome", wait=5)
    assert len(outcome) == 1, outcome
    assert (outcome[0]["code"], outcome[0]["status"], outcome[0]["upstream_status"]) == (
        "client_disconnected", 499, 200), outcome
    assert_no_slot_leaked(deadlines.port, [agent])


def test_an_agent_that_hangs_up_while_sending_its_body_frees_its_slot(deadlines, silent):
    agent = AGENTS[6]
    marker = f"body-hangup-{time.monotonic_ns()}"
    socks = []
    for i in range(SLOTS):
        s = socket.create_connection(("127.0.0.1", deadlines.port), timeout=5)
        # 10 bytes of 1000: the policy is still waiting for the body when the agent leaves.
        s.sendall(head("POST", f"/tools/silentlong/{marker}-{i}", agent, body=b"x" * 1000) + b'{"q": "abc')
        socks.append(s)
    for s in socks:
        s.close()
    paths = {f"/tools/silentlong/{marker}-{i}" for i in range(SLOTS)}
    deadline = time.monotonic() + 5
    while True:
        recs = [r for r in audit_records(deadlines.audit_dir) if r.get("path") in paths]
        if len(recs) >= SLOTS or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # One record each, a refusal by the body reader (it sees the body cut off): nothing
    # ran, nothing reached the tool.
    assert sorted(r["path"] for r in recs) == sorted(paths), recs
    assert {(r["kind"], r["decision"], r["stage"], r["code"]) for r in recs} == {
        ("decision", "deny", "read_body", "bad_body")}, recs
    assert silent.head_with(marker.encode()) is None
    assert_no_slot_leaked(deadlines.port, [agent])


# ------------------------------------------------------------------ request targets

# (request line, Host, the code that refuses it): Route's bad_path for a target that
# parses but is not a path (nor a path with a fragment); the parser's bad_request for
# one that does not parse. None may reach a tool, and none is a 5xx.
TARGETS = [
    ("GET http://evil.example/x HTTP/1.1", HOSTED, "bad_path"),
    ("GET http://hosted.test/x HTTP/1.1", HOSTED, "bad_path"),
    ("GET http://regate.test/tools/search/x HTTP/1.1", "regate.test", "bad_path"),
    ("GET https://hosted.test/tools/search/x HTTP/1.1", "regate.test", "bad_path"),
    ("GET http://user:pw@hosted.test/x HTTP/1.1", HOSTED, "bad_path"),
    ("POST http://hosted.test/x HTTP/1.1", HOSTED, "bad_path"),
    ("CONNECT hosted.test:443 HTTP/1.1", HOSTED, "bad_path"),
    ("CONNECT evil.example:443 HTTP/1.1", "regate.test", "bad_path"),
    ("OPTIONS * HTTP/1.1", HOSTED, "bad_path"),
    ("OPTIONS * HTTP/1.1", "regate.test", "bad_path"),
    ("GET /x#frag HTTP/1.1", HOSTED, "bad_path"),
    ("GET /tools/search/x#frag HTTP/1.1", "regate.test", "bad_path"),
    ("GET /tools/search/x?a=1#frag HTTP/1.1", "regate.test", "bad_path"),
    ("GET tools/search/x HTTP/1.1", "regate.test", "bad_request"),
    ("GET x HTTP/1.1", HOSTED, "bad_request"),
    ("GET ?a=1 HTTP/1.1", HOSTED, "bad_request"),
    ("GET  HTTP/1.1", HOSTED, "bad_request"),
    ("GET  HTTP/1.1", "regate.test", "bad_request"),
]


@pytest.mark.parametrize("line,host,code", TARGETS)
def test_a_request_target_that_is_not_a_path_is_refused(deadlines, witness, line, host, code):
    before = witness.count()
    data = (f"{line}\r\nHost: {host}\r\nX-Api-Key: {KEY[AGENTS[7]]}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n").encode()
    ex = exchange(deadlines.port, data, timeout=5)
    assert_error(ex.first, 400, code)
    assert witness.records(before) == [], "the tool received it"


def test_the_host_routed_tool_still_takes_paths(deadlines, witness):
    """The refusals above are about the target's form: a path on a host-routed tool still runs."""
    before = witness.count()
    ex = exchange(deadlines.port, head("GET", "/x?a=1", AGENTS[7], host=HOSTED), timeout=5)
    assert ex.first.status == 200, ex.first
    got = witness.records(before)
    assert [r["raw_path"] for r in got] == ["/t/hosted/x?a=1"], got
