"""Shared parts of the hostile-input suite: a witness upstream that writes down what
reached it, one Regate in front of it (real auth, the shipped Rego, tight limits),
a raw-socket HTTP client that sends bytes exactly as written (aiohttp's client
would normalise them), and readers for the audit log.

The Regate and the witness live for the whole session: starting them is the
costly part, and every test checks that Regate still answers afterwards.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import yaml

from proxy.audit import list_segments
from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.support.procs import ROOT, Process, RegateProcess, free_port

HERE = Path(__file__).resolve().parent
ERROR_KEYS = {"code", "message", "decision_id", "reasons"}
TOOLS = ("search", "shell", "files", "payments")
GENEROUS_LIMITS = {
    "defaults": {"agent": {"rate": "100000/s", "burst": 100000}, "tool": {"rate": "100000/s", "burst": 100000},
                 "budget": {"units": 100000000, "window": "1d"}},
}


# ------------------------------------------------------------------ processes


class Witness:
    """tests/security/witness_upstream.py as a process, and a small client for it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Process([sys.executable, str(HERE / "witness_upstream.py"), str(self.port)], f"{self.url}/_seen")

    def _get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def count(self) -> int:
        return self._get("/_seen")["calls"]

    def records(self, since: int = 0) -> list[dict]:
        return self._get("/_seen")["records"][since:]

    def by_id(self, decision_id: str) -> list[dict]:
        return self._get(f"/_seen/{decision_id}")

    def upstream(self, tool: str) -> str:
        return f"{self.url}/t/{tool}"

    def stop(self) -> None:
        self.proc.stop(signal.SIGKILL)


def policy_data(tmp: Path, limits: dict | None = None) -> Path:
    """The shipped policy data with limits (limits/data.yaml) of the test's choosing."""
    d = tmp / "policy-data"
    shutil.copytree(ROOT / "policies", d, ignore=shutil.ignore_patterns("limits"), dirs_exist_ok=True)
    (d / "limits").mkdir(exist_ok=True)
    (d / "limits" / "data.yaml").write_text(yaml.safe_dump(limits or GENEROUS_LIMITS))
    return d


# The http limits the suite runs under: small, so each can be shown to hold.
HTTP = {
    "max_line_size": 4096,
    "max_field_size": 4096,
    "max_headers": 48,
    "keepalive_timeout_s": 5,
    "header_timeout_s": 1.0,
    "body_timeout_s": 1.0,
    "body_idle_timeout_s": 1.0,
    "max_connections": 24,
    "max_concurrent_per_agent": 4,
    "shutdown_grace_s": 2,
}


@pytest.fixture(scope="session")
def witness():
    w = Witness()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def hostile(witness, keys_file, tmp_path_factory):
    """Regate as agents meet it: API keys, the shipped Rego, tight http limits, async approvals."""
    tmp = tmp_path_factory.mktemp("hostile")
    tools = [{"name": t, "upstream": witness.upstream(t), "timeout_ms": 5000} for t in TOOLS]
    # search takes uploads the policy does not read (bodies of other types than JSON).
    tools[TOOLS.index("search")]["unread_body"] = "forward"
    # A stalled download is cut at its deadline: short here so the test is quick.
    tools.append({"name": "dl", "upstream": witness.upstream("dl"), "timeout_ms": 1500})
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(ROOT / "rego"), "data": str(policy_data(tmp))},
        "http": HTTP,
        "tools": tools,
        "approvals": {"mode": "async"},
        "audit": {"dir": str(tmp / "audit"), "fsync": "never"},
    }
    # The dl tool is not in the shipped policy data: make it public for GET.
    tools_yaml = Path(cfg["policy"]["data"]) / "tools" / "data.yaml"
    doc = yaml.safe_load(tools_yaml.read_text())
    doc["dl"] = {"public": True, "methods": ["GET"]}
    tools_yaml.write_text(yaml.safe_dump(doc))
    proc = RegateProcess(cfg, tmp)
    proc.audit_dir = tmp / "audit"
    yield proc
    proc.stop()


# ------------------------------------------------------------------ raw HTTP


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self) -> object:
        return orjson.loads(self.body)

    @property
    def decision_id(self) -> str | None:
        return self.header("X-Regate-Decision-Id")


@dataclass
class Exchange:
    responses: list[Response] = field(default_factory=list)
    closed: bool = False        # the server closed the connection
    timed_out: bool = False     # nothing more came within the timeout, connection still open
    leftover: bytes = b""       # bytes that did not parse as a response
    raw: bytes = b""            # every byte received

    @property
    def first(self) -> Response:
        assert self.responses, \
            f"no response (closed={self.closed}, timed_out={self.timed_out}, {self.leftover[:200]!r})"
        return self.responses[0]


def _parse_one(buf: bytes, eof: bool) -> tuple[Response | None, bytes]:
    """One response from the front of buf, or (None, buf) if more bytes are needed."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None, buf
    head = buf[:end].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:] if ":" in ln]
    rest = buf[end + 4:]
    resp = Response(status, reason, headers, b"", buf[:end])  # type: ignore[arg-type]
    te = (resp.header("Transfer-Encoding") or "").lower()
    cl = resp.header("Content-Length")
    if status < 200 or status in (204, 304):
        return resp, rest
    if "chunked" in te:
        body = b""
        pos = 0
        while True:
            nl = rest.find(b"\r\n", pos)
            if nl < 0:
                resp.body = body
                return (None, buf) if not eof else (resp, b"")
            size = int(rest[pos:nl].split(b";")[0], 16)
            if size == 0:
                tail = rest.find(b"\r\n", nl + 2)
                resp.body = body
                if tail < 0:
                    return (None, buf) if not eof else (resp, b"")
                resp.body = body
                return resp, rest[tail + 2:]
            if len(rest) < nl + 2 + size + 2:
                if eof:
                    resp.body = body + rest[nl + 2:]
                    return resp, b""
                return None, buf
            body += rest[nl + 2:nl + 2 + size]
            pos = nl + 2 + size + 2
    if cl is not None:
        n = int(cl)
        if len(rest) < n:
            if eof:
                resp.body = rest
                return resp, b""
            return None, buf
        resp.body = rest[:n]
        return resp, rest[n:]
    if not eof:
        return None, buf
    resp.body = rest
    return resp, b""


def exchange(port: int, data: bytes | list[bytes], *, responses: int = 1, timeout: float = 5.0,
             gap: float = 0.0) -> Exchange:
    """Send bytes as written (a list: sent piece by piece, `gap` seconds apart) and read
    responses until `responses` have come, the server closes, or `timeout` passes."""
    out = Exchange()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            for i, piece in enumerate(data if isinstance(data, list) else [data]):
                if i and gap:
                    time.sleep(gap)
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = b""
        deadline = time.monotonic() + timeout
        while len(out.responses) < responses:
            resp, buf = _parse_one(buf, False)
            if resp is not None:
                out.responses.append(resp)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                out.timed_out = True
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                out.timed_out = True
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                out.closed = True
                while buf:
                    resp, buf = _parse_one(buf, True)
                    if resp is None:
                        break
                    out.responses.append(resp)
                break
            buf += chunk
            out.raw += chunk
        out.leftover = buf
    return out


def request(method: str, path: str, *, key: str | None = AGENT_KEY, headers: list[tuple[str, str]] | None = None,
            body: bytes | None = None, content_type: str | None = None, close: bool = True) -> bytes:
    """A well-formed request as bytes, to be sent raw (tests edit the bytes to break it)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: regate.test"]
    if key is not None:
        lines.append(f"X-Api-Key: {key}")
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def assert_error(resp: Response, status: int, code: str | None = None) -> dict:
    """Regate's own refusal: the status, JSON {"error": {...}} naming the code, the decision id."""
    assert resp.status == status, (resp.status, resp.body[:300])
    assert (resp.header("Content-Type") or "").startswith("application/json"), resp.headers
    doc = orjson.loads(resp.body)
    assert set(doc) == {"error"} and set(doc["error"]) == ERROR_KEYS, doc
    err = doc["error"]
    if code is not None:
        assert err["code"] == code, err
    assert err["message"], err
    assert err["decision_id"] == resp.decision_id, (err, resp.headers)
    return err


# ------------------------------------------------------------------ audit


class AuditTail:
    """Reads an audit directory incrementally and indexes its records by decision id."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.offsets: dict[Path, int] = {}
        self.by_id: dict[str, list[dict]] = {}
        self.all: list[dict] = []

    def refresh(self) -> None:
        for segs in list_segments(self.directory).values():
            for _, path in segs:
                start = self.offsets.get(path, 0)
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
                cut = data.rfind(b"\n") + 1
                self.offsets[path] = start + cut
                for line in data[:cut].splitlines():
                    if line:
                        rec = orjson.loads(line)
                        self.all.append(rec)
                        if "decision_id" in rec:
                            self.by_id.setdefault(rec["decision_id"], []).append(rec)


_TAILS: dict[Path, AuditTail] = {}


def audit_records(directory: Path) -> list[dict]:
    """Every complete line of every chain in the audit directory."""
    tail = _TAILS.setdefault(Path(directory), AuditTail(directory))
    tail.refresh()
    return tail.all


def audit_for(directory: Path, decision_id: str, kind: str | None = None, wait: float = 2.0) -> list[dict]:
    """The records of one decision id (waiting a little for an outcome record, written after the answer)."""
    tail = _TAILS.setdefault(Path(directory), AuditTail(directory))
    deadline = time.monotonic() + wait
    while True:
        tail.refresh()
        recs = [r for r in tail.by_id.get(decision_id, ()) if kind is None or r.get("kind") == kind]
        if recs or time.monotonic() > deadline:
            return recs
        time.sleep(0.02)


class Judge:
    """Sends one raw request to the hostile Regate and says what crossed it: the
    response(s), the requests the witness received meanwhile, and the audit records."""

    def __init__(self, regate: RegateProcess, witness: Witness) -> None:
        self.regate = regate
        self.witness = witness

    def __call__(self, data: bytes | list[bytes], **kw) -> tuple[Exchange, list[dict]]:
        before = self.witness.count()
        ex = exchange(self.regate.port, data, **kw)
        # A forwarded call is recorded by the witness before Regate can answer it.
        return ex, self.witness.records(before)

    def refused(self, data: bytes, status: int, code: str | None = None, **kw) -> dict:
        """Regate refused it: its JSON error, nothing reached any tool."""
        ex, got = self(data, **kw)
        err = assert_error(ex.first, status, code)
        assert got == [], f"refused with {status} yet the tool received {got}"
        return err

    def parser_refused(self, data: bytes, status: int = 400, code: str = "bad_request", **kw) -> dict:
        """Refused before it was a call (bad framing): JSON error, connection closed, nothing forwarded."""
        ex, got = self(data, **kw)
        err = assert_error(ex.first, status, code)
        assert got == [], got
        assert len(ex.responses) == 1, [r.status for r in ex.responses]
        return err

    def forwarded(self, data: bytes, tool: str, **kw) -> tuple[Response, dict]:
        """It reached exactly one tool, once, and that tool is the one Regate judged and recorded."""
        ex, got = self(data, **kw)
        resp = ex.first
        assert resp.status == 200, (resp.status, resp.body[:300])
        did = resp.decision_id
        assert len(got) == 1, got
        rec = got[0]
        assert rec["decision_id"] == did, (rec, did)
        assert_judged(self.regate.audit_dir, rec, tool)
        return resp, rec

    def alive(self) -> None:
        ex = exchange(self.regate.port, request("GET", "/tools/search/alive"), timeout=5)
        assert ex.first.status == 200, ex.first


def assert_judged(audit_dir: Path, rec: dict, tool: str) -> dict:
    """The request a tool received carries the decision id of an allow record for that
    same tool, method and path: what ran is what was judged."""
    decisions = audit_for(audit_dir, rec["decision_id"], "decision")
    assert len(decisions) == 1, decisions
    d = decisions[0]
    assert d["decision"] in ("allow", "allow_fail_open"), d
    assert d["tool"] == tool, (d["tool"], tool)
    assert rec["raw_path"].startswith(f"/t/{tool}/") or rec["raw_path"].split("?")[0] == f"/t/{tool}", rec["raw_path"]
    assert d["method"] == rec["method"], (d, rec)
    from yarl import URL

    # Decoded the way Regate decoded the path it judged (yarl, as aiohttp does).
    got_path = URL(rec["raw_path"].split("?", 1)[0][len(f"/t/{tool}"):] or "/", encoded=True).path
    judged_path = d["path"][len(f"/tools/{tool}"):] or "/"
    assert got_path == judged_path, (got_path, judged_path)
    sha = d.get("body_sha256")
    if sha is None:  # a streamed body is hashed as it goes: the outcome record has it
        outcomes = audit_for(audit_dir, rec["decision_id"], "outcome")
        sha = outcomes[0].get("body_sha256") if outcomes else None
    if sha is not None and rec["complete"]:
        assert sha == rec["body_sha256"], (sha, rec)
    return d


@pytest.fixture(scope="session")
def judge(hostile, witness) -> Judge:
    return Judge(hostile, witness)


KEYS = {"coder-7": AGENT_KEY, "analyst-2": OTHER_KEY}
